/*
 * The per-character work of three text signals over a batch of ASCII responses, in one pass each:
 * non-blank lines, distinct / total word tokens, and the share of non-text characters.
 *
 * Why C: these run on every episode of the traffic. In Python each answer's word tokens became a
 * list of bytes objects and then a set (16 of the 22 us an episode the text signals cost); here a
 * token is a span of the answer, hashed in place, and nothing is allocated per token.
 *
 * Only the definitions' mechanics live here. The tables that define "word character", "whitespace"
 * and "non-text character" come from Python (monitor/signals/textstats.py derives them from the
 * same definitions as its own path), so the two cannot drift apart; tests/signals/test_textscan.py
 * holds them to the same values, bit for bit. `scan` leaves a response that is not ASCII to the
 * caller (its index is returned): Python lower-cases it (Unicode case rules, final sigma included, stay
 * Python's) and `distinct_ratio` counts the tokens of its UTF-8, with the word definition of Python's
 * re (`\w`: alphanumeric or '_'); its Unicode categories and scripts stay in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint64_t hash;
    Py_ssize_t start;
    Py_ssize_t len;
    uint64_t stamp; /* which text the entry belongs to: no clearing between texts */
} Slot;

/* One table for every call, grown as needed and never cleared: each text takes a stamp of its own
 * (0: never used), so an entry of another text is an empty one. Allocating and stamping a table per
 * call cost 10 us, more than scanning a short answer, and the pipeline calls once a batch, which at
 * low volume holds an episode or two. Safe without a lock: the interpreter lock is held from a text's
 * table lookup (`table_for`) to its last probe, with no Python code in between. Tables past
 * KEPT_SLOTS (texts of over about 256 KB, never the pipeline's) are the call's own, freed after. */
#define KEPT_SLOTS ((size_t)1 << 18)
static Slot *kept = NULL;
static size_t kept_size = 0;
static uint64_t next_stamp = 1;

/* A table of at least `size` slots (a power of two), or NULL with MemoryError set. `*own`: the
 * caller frees it (past KEPT_SLOTS). */
static Slot *
table_for(size_t size, int *own)
{
    *own = size > KEPT_SLOTS;
    if (*own) {
        Slot *t = PyMem_Calloc(size, sizeof(Slot));
        if (t == NULL)
            PyErr_NoMemory();
        return t;
    }
    if (size > kept_size) {
        Slot *grown = PyMem_Calloc(size, sizeof(Slot));
        if (grown == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        PyMem_Free(kept);
        kept = grown;
        kept_size = size;
    }
    return kept;
}

/* The power of two, at least 16, at or above `need`. */
static size_t
slots_for(size_t need)
{
    size_t size = 16;
    while (size < need)
        size <<= 1;
    return size;
}

static int
same_token(const unsigned char *data, const unsigned char *lower, Py_ssize_t a, Py_ssize_t b, Py_ssize_t len)
{
    for (Py_ssize_t k = 0; k < len; k++) {
        if (lower[data[a + k]] != lower[data[b + k]])
            return 0;
    }
    return 1;
}

/* Adds the token data[start:start+len) of hash h to the set; 1 when it was not there yet. Tokens
 * compare lower-cased through `lower`, or byte for byte when `lower` is NULL (text lowered already). */
static int
add_token(const unsigned char *data, const unsigned char *lower, Slot *slots, size_t mask, uint64_t stamp,
          uint64_t h, Py_ssize_t start, Py_ssize_t len)
{
    size_t at = (size_t)(h ^ (h >> 29)) & mask;
    for (;;) {
        Slot *s = &slots[at];
        if (s->stamp != stamp) {
            s->stamp = stamp;
            s->hash = h;
            s->start = start;
            s->len = len;
            return 1;
        }
        if (s->hash == h && s->len == len &&
            (lower ? same_token(data, lower, s->start, start, len) : !memcmp(data + s->start, data + start, len)))
            return 0;
        at = (at + 1) & mask;
    }
}

/* Word tokens of data[0:n): runs of bytes whose `lower` entry is not 0, compared lower-cased. */
static void
count_tokens(const unsigned char *data, Py_ssize_t n, const unsigned char *lower, Slot *slots, size_t mask,
             uint64_t stamp, Py_ssize_t *total, Py_ssize_t *distinct)
{
    Py_ssize_t i = 0, all = 0, seen = 0;
    while (i < n) {
        while (i < n && !lower[data[i]])
            i++;
        if (i >= n)
            break;
        Py_ssize_t start = i;
        uint64_t h = 1469598103934665603ULL; /* FNV-1a */
        while (i < n && lower[data[i]]) {
            h = (h ^ lower[data[i]]) * 1099511628211ULL;
            i++;
        }
        all++;
        seen += add_token(data, lower, slots, mask, stamp, h, start, i - start);
    }
    *total = all;
    *distinct = seen;
}

/* The character at data[i] of UTF-8 (surrogates allowed, as Python's "surrogatepass" writes them):
 * its code point, and in *len its bytes. A byte that starts no valid sequence is one unit of its own,
 * code point -1 (never a word character): Python never writes one, this only keeps the scan in bounds. */
static long
utf8_at(const unsigned char *data, Py_ssize_t n, Py_ssize_t i, Py_ssize_t *len)
{
    unsigned char c = data[i];
    Py_ssize_t need = c >= 0xF0 && c <= 0xF4 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 && c < 0xE0 ? 2 : 0;
    *len = 1;
    if (c < 0x80)
        return c;
    if (need == 0 || i + need > n)
        return -1;
    long cp = c & (need == 2 ? 0x1F : need == 3 ? 0x0F : 0x07);
    for (Py_ssize_t k = 1; k < need; k++) {
        if ((data[i + k] & 0xC0) != 0x80)
            return -1;
        cp = (cp << 6) | (data[i + k] & 0x3F);
    }
    *len = need;
    return cp;
}

/* A word character as Python's re reads ``\w`` in a str pattern: alphanumeric (Unicode) or '_'. */
static int
is_word(long cp, const unsigned char *lower)
{
    if (cp < 0)
        return 0;
    if (cp < 0x80)
        return lower[cp] != 0;
    return Py_UNICODE_ISALNUM((Py_UCS4)cp);
}

/* Word tokens of lower-cased UTF-8 text: runs of word characters, compared byte for byte. */
static void
count_tokens_utf8(const unsigned char *data, Py_ssize_t n, const unsigned char *lower, Slot *slots, size_t mask,
                  uint64_t stamp, Py_ssize_t *total, Py_ssize_t *distinct)
{
    Py_ssize_t i = 0, all = 0, seen = 0, len;
    while (i < n) {
        long cp = utf8_at(data, n, i, &len);
        if (!is_word(cp, lower)) {
            i += len;
            continue;
        }
        Py_ssize_t start = i;
        uint64_t h = 1469598103934665603ULL;
        while (i < n) {
            cp = utf8_at(data, n, i, &len);
            if (!is_word(cp, lower))
                break;
            for (Py_ssize_t k = 0; k < len; k++)
                h = (h ^ data[i + k]) * 1099511628211ULL;
            i += len;
        }
        all++;
        seen += add_token(data, NULL, slots, mask, stamp, h, start, i - start);
    }
    *total = all;
    *distinct = seen;
}

static Py_ssize_t
count_lines(const unsigned char *data, Py_ssize_t n, const unsigned char *space)
{
    /* Lines as str.split("\n") cuts them, counted when one holds a character that is not space. */
    Py_ssize_t lines = 0;
    int filled = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = data[i];
        if (c == '\n') {
            lines += filled;
            filled = 0;
        }
        else if (!space[c]) {
            filled = 1;
        }
    }
    return lines + filled;
}

static Py_ssize_t
count_flagged(const unsigned char *data, Py_ssize_t n, const unsigned char *flags)
{
    Py_ssize_t bad = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        bad += flags[data[i]] != 0;
    return bad;
}

static int
table_ok(const Py_buffer *b, const char *what)
{
    if (b->len != 256) {
        PyErr_Format(PyExc_ValueError, "%s must be a table of 256 bytes", what);
        return 0;
    }
    return 1;
}

/* Puts a new reference (NULL: its creation failed, the error set) at list[i]; -1 on failure. */
static int
set_item(PyObject *list, Py_ssize_t i, PyObject *x)
{
    if (x == NULL)
        return -1;
    PyList_SET_ITEM(list, i, x);
    return 0;
}

PyDoc_STRVAR(scan_doc,
             "scan(texts, lower, space, non_text, max_chars) -> (lines, distinct_ratio, non_text_ratio, rest)\n\n"
             "For each ASCII text, cut at max_chars: its non-blank lines, distinct / total word tokens (1.0 when\n"
             "it has none) and the share of its characters flagged in non_text. ``lower`` maps a word byte to\n"
             "its lower case and every other byte to 0; ``space`` flags whitespace. ``rest``: the indices of\n"
             "the texts that are not ASCII, whose entries are 0 and left to the caller.");

static PyObject *
scan(PyObject *self, PyObject *args)
{
    PyObject *texts;
    Py_buffer lower, space, non_text;
    Py_ssize_t max_chars;
    PyObject *seq = NULL, *lines = NULL, *ratios = NULL, *shares = NULL, *rest = NULL, *out = NULL;

    if (!PyArg_ParseTuple(args, "Oy*y*y*n", &texts, &lower, &space, &non_text, &max_chars))
        return NULL;
    if (!table_ok(&lower, "lower") || !table_ok(&space, "space") || !table_ok(&non_text, "non_text"))
        goto done;
    if (max_chars < 0 || max_chars > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "max_chars must be between 0 and 2**24");
        goto done;
    }
    seq = PySequence_Fast(texts, "texts must be a sequence of str");
    if (seq == NULL)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    lines = PyList_New(n);
    ratios = PyList_New(n);
    shares = PyList_New(n);
    rest = PyList_New(0);
    if (lines == NULL || ratios == NULL || shares == NULL || rest == NULL)
        goto done;
    const unsigned char *lo = lower.buf, *sp = space.buf, *nt = non_text.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyUnicode_Check(item)) {
            PyErr_Format(PyExc_TypeError, "texts[%zd] is %.100s, not str", i, Py_TYPE(item)->tp_name);
            goto done;
        }
        if (PyUnicode_READY(item) < 0)
            goto done;
        if (!PyUnicode_IS_ASCII(item)) {
            PyObject *index = PyLong_FromSsize_t(i);
            int failed = index == NULL || PyList_Append(rest, index) < 0;
            Py_XDECREF(index);
            if (failed || set_item(lines, i, PyLong_FromLong(0)) < 0 || set_item(ratios, i, PyFloat_FromDouble(0.0)) < 0 ||
                set_item(shares, i, PyFloat_FromDouble(0.0)) < 0)
                goto done;
            continue;
        }
        const unsigned char *data = PyUnicode_1BYTE_DATA(item);
        Py_ssize_t len = PyUnicode_GET_LENGTH(item);
        if (len > max_chars)
            len = max_chars;
        /* At most (len + 1) / 2 tokens: a table of twice len keeps the load under 1/4, and a short
         * text's probes stay in a few cache lines of the shared table. */
        size_t used = slots_for((size_t)len * 2 + 2);
        int own;
        Slot *slots = table_for(used, &own);
        if (slots == NULL)
            goto done;
        Py_ssize_t total, distinct;
        count_tokens(data, len, lo, slots, used - 1, next_stamp++, &total, &distinct);
        if (own)
            PyMem_Free(slots);
        if (set_item(lines, i, PyLong_FromSsize_t(count_lines(data, len, sp))) < 0 ||
            set_item(ratios, i, PyFloat_FromDouble(total ? (double)distinct / (double)total : 1.0)) < 0 ||
            set_item(shares, i, PyFloat_FromDouble(len ? (double)count_flagged(data, len, nt) / (double)len : 0.0)) < 0)
            goto done;
    }
    out = PyTuple_Pack(4, lines, ratios, shares, rest);

done:
    Py_XDECREF(seq);
    Py_XDECREF(lines);
    Py_XDECREF(ratios);
    Py_XDECREF(shares);
    Py_XDECREF(rest);
    PyBuffer_Release(&lower);
    PyBuffer_Release(&space);
    PyBuffer_Release(&non_text);
    return out;
}

PyDoc_STRVAR(distinct_ratio_doc,
             "distinct_ratio(raw, lower) -> float\n\n"
             "Distinct / total word tokens (1.0 when there are none) of lower-cased UTF-8 text (lone surrogates\n"
             "as \"surrogatepass\" writes them): runs of the ASCII bytes ``lower`` maps to non-zero and of the\n"
             "other characters that are alphanumeric, as ``\\w+`` in a str pattern.");

static PyObject *
distinct_ratio(PyObject *self, PyObject *args)
{
    Py_buffer raw, lower;
    PyObject *out = NULL;
    if (!PyArg_ParseTuple(args, "y*y*", &raw, &lower))
        return NULL;
    if (table_ok(&lower, "lower")) {
        /* At most (bytes + 1) / 2 tokens: a table of twice that keeps the load under 1/2. */
        size_t size = slots_for((size_t)raw.len + 2);
        int own;
        Slot *slots = table_for(size, &own);
        if (slots != NULL) {
            Py_ssize_t total, distinct;
            count_tokens_utf8(raw.buf, raw.len, lower.buf, slots, size - 1, next_stamp++, &total, &distinct);
            if (own)
                PyMem_Free(slots);
            out = PyFloat_FromDouble(total ? (double)distinct / (double)total : 1.0);
        }
    }
    PyBuffer_Release(&raw);
    PyBuffer_Release(&lower);
    return out;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, scan_doc},
    {"distinct_ratio", distinct_ratio, METH_VARARGS, distinct_ratio_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "monitor.signals.textscan",
    "The text signals' per-character work over ASCII responses (see monitor/signals/textstats.py).",
    -1,
    methods,
};

PyMODINIT_FUNC
PyInit_textscan(void)
{
    return PyModule_Create(&module);
}
