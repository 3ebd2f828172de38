"""Text helpers shared by the perturbations: code spans, sentence boundaries, list items, words.

All are single passes of regular expressions without nested quantifiers over text that the
caller has already capped (``base.MAX_CHARS``), so their cost is linear in the text's length.
"""

from __future__ import annotations

import bisect
import itertools
import re
from dataclasses import dataclass

# A fenced code block: a fence line (``` or ~~~, optionally indented), the body, and the closing
# fence of the same kind, or the end of the text when a model forgot to close it.
_FENCE = re.compile(r"^[ \t]{0,3}(```|~~~)[^\n]*\n(.*?)(?:^[ \t]{0,3}\1[ \t]*$|\Z)", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]{1,200}`")
_URL = re.compile(r"\bhttps?://\S+|\bwww\.\S+")
# A sentence ends at . ! or ? (optionally closed by quotes or brackets) followed by whitespace and
# then something that can start a sentence, or by the end of the text.
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s+[\"'“‘(\[]?[A-Z0-9]|\s*\Z)")
# The word before a period that does not end a sentence.
_ABBREVIATIONS = frozenset(
    {"e.g", "i.e", "etc", "vs", "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "no", "fig", "approx", "inc", "ltd"}
)
# A list marker alone before the period: "1." or "a." at the start of a line is not a sentence.
_LIST_MARKER_ONLY = re.compile(r"^[ \t]*(?:\d{1,3}|[A-Za-z]|[ivxIVX]{1,4})$")
WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")

STOPWORDS = frozenset(
    (
        "a",
        "about",
        "above",
        "after",
        "again",
        "against",
        "all",
        "also",
        "am",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "because",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "doing",
        "down",
        "during",
        "each",
        "few",
        "for",
        "from",
        "further",
        "had",
        "has",
        "have",
        "having",
        "he",
        "her",
        "here",
        "hers",
        "herself",
        "him",
        "himself",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "itself",
        "just",
        "let",
        "me",
        "more",
        "most",
        "my",
        "myself",
        "no",
        "nor",
        "not",
        "now",
        "of",
        "off",
        "on",
        "once",
        "only",
        "or",
        "other",
        "our",
        "ours",
        "ourselves",
        "out",
        "over",
        "own",
        "same",
        "she",
        "should",
        "so",
        "some",
        "such",
        "than",
        "that",
        "the",
        "their",
        "theirs",
        "them",
        "themselves",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "to",
        "too",
        "under",
        "until",
        "up",
        "very",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "yours",
        "yourself",
        "yourselves",
        "one",
        "two",
        "three",
        "use",
        "used",
        "using",
        "make",
        "made",
        "like",
        "well",
        "many",
        "much",
        "may",
        "might",
        "must",
        "need",
        "via",
        "get",
        "got",
        "however",
        "therefore",
        "thus",
        "example",
        "examples",
        "following",
        "include",
        "including",
        "includes",
        "provide",
        "provides",
        "help",
        "helps",
        "please",
        "thank",
        "thanks",
        "sure",
        "certainly",
        "want",
        "write",
        "give",
        "list",
        "tell",
        "explain",
        "describe",
        "answer",
        "question",
        "something",
        "someone",
        "anything",
        "everything",
        "thing",
        "things",
        "way",
        "ways",
        "good",
        "best",
        "better",
        "new",
        "first",
        "second",
        "third",
        "another",
        "every",
        "really",
    )
)


def code_spans(text: str) -> list[tuple[int, int]]:
    """Sorted, non-overlapping ``[start, end)`` spans of fenced code blocks, inline code and URLs.

    Prose perturbations never edit or insert inside these (a changed URL or identifier is a
    different kind of error than the one they name); ``break_code`` edits only inside fences.
    """
    fenced = fenced_spans(text)
    spans = list(fenced)
    for rx in (_INLINE_CODE, _URL):
        for m in rx.finditer(text):
            if not inside(m.start(), fenced):
                spans.append((m.start(), m.end()))
    return merge(spans)


def fenced_spans(text: str) -> list[tuple[int, int]]:
    """``[start, end)`` of every fenced code block, fences included."""
    return [(m.start(), m.end()) for m in _FENCE.finditer(text)]


def fenced_bodies(text: str) -> list[tuple[int, int]]:
    """``[start, end)`` of the body (between the fences) of every fenced code block."""
    return [(m.start(2), m.end(2)) for m in _FENCE.finditer(text)]


def merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def inside(pos: int, spans: list[tuple[int, int]]) -> bool:
    """Whether ``pos`` lies in one of the sorted, non-overlapping ``spans`` (binary search)."""
    i = bisect.bisect_right(spans, (pos, float("inf"))) - 1
    return i >= 0 and spans[i][0] <= pos < spans[i][1]


def overlaps(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    i = bisect.bisect_right(spans, (start, float("inf"))) - 1
    if i >= 0 and spans[i][1] > start:
        return True
    return i + 1 < len(spans) and spans[i + 1][0] < end


def line_prefix(text: str, pos: int, limit: int = 200) -> str:
    """The text from the start of ``pos``'s line up to ``pos``, at most ``limit`` characters.

    A longer prefix comes back cut and led by "…", so it never looks blank or like a bare list
    marker. The bound keeps per-match look-backs constant, so a 20,000-character line with
    thousands of matches stays linear.
    """
    lo = max(0, pos - limit)
    nl = text.rfind("\n", lo, pos)
    if nl >= 0 or lo == 0:
        return text[nl + 1 : pos]
    return "…" + text[lo:pos]


def sentence_boundaries(text: str, excluded: list[tuple[int, int]]) -> list[int]:
    """Offsets just after the end of a sentence (after its closing punctuation), outside ``excluded``.

    Periods after a known abbreviation ("e.g.") or after a bare list marker ("1." at the start of a
    line) are not sentence ends. Inserting ``" " + sentence`` at one of these offsets puts a new
    sentence between two existing ones (or after the last).
    """
    out: list[int] = []
    for m in _SENTENCE_END.finditer(text):
        end = m.end()
        if inside(m.start(), excluded):
            continue
        before = line_prefix(text, m.start())
        if _LIST_MARKER_ONLY.match(before):
            continue
        if text[m.start()] == ".":
            last = before.rsplit(None, 1)[-1].lower() if before.strip() else ""
            if last in _ABBREVIATIONS or last.rstrip(".") in _ABBREVIATIONS:
                continue
        out.append(end)
    return out


def sentence_spans(text: str, excluded: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[start, end)`` of each sentence-like piece: split at sentence ends and at line breaks."""
    cuts = sorted({0, len(text), *sentence_boundaries(text, excluded), *(m.end() for m in re.finditer(r"\n", text))})
    out: list[tuple[int, int]] = []
    for start, e in itertools.pairwise(cuts):
        # Leading whitespace belongs to the gap, not to the sentence.
        s = start
        while s < e and text[s].isspace():
            s += 1
        if s < e:
            out.append((s, e))
    return out


def content_words(text: str) -> list[str]:
    """Lower-case words of 4+ letters that are not stopwords, in order of appearance."""
    return [
        w for w in (m.group(0).lower().strip("'-") for m in WORD.finditer(text)) if len(w) >= 4 and w not in STOPWORDS
    ]


# --- lists -------------------------------------------------------------------------------------

_ITEM = re.compile(
    r"^(?P<indent>[ \t]*)(?:"
    r"(?P<num>\d{1,3})(?P<sep>[.)])[ \t]+(?=\S)"
    r"|(?P<bullet>[-*•+])[ \t]+(?=\S)"
    r"|(?P<stepfmt>[*_#]{0,6}[ \t]*)(?P<step>[Ss]tep)[ \t]+(?P<stepnum>\d{1,3})(?=[\s:.)*_-])"
    r")"
)


@dataclass(frozen=True)
class ListItem:
    start: int  # offset of the item's line
    number: tuple[int, int] | None  # [start, end) of its number (numbered and step lists)
    value: int | None


@dataclass(frozen=True)
class DetectedList:
    """A run of at least one item of the same kind and marker at the same indent."""

    kind: str  # "numbered", "bulleted" or "step"
    items: tuple[ListItem, ...]
    end: int  # end of the last item's content (its last line, without the newline)

    @property
    def sequential(self) -> bool:
        """Numbers that count up by one (1, 2, 3...), which dropping an item must keep."""
        values = [it.value for it in self.items if it.value is not None]
        return len(values) == len(self.items) and all(b == a + 1 for a, b in itertools.pairwise(values))

    def removal_span(self, i: int, text: str) -> tuple[int, int]:
        """``[start, end)`` of item ``i`` together with the separator that goes with it.

        An item but the last runs to the next item's line; the last item runs from the end of
        the previous item's content, so that what follows the list keeps its own separator.
        """
        if i + 1 < len(self.items):
            return self.items[i].start, self.items[i + 1].start
        if i == 0:
            return self.items[0].start, self.end
        prev = self.items[i - 1].start
        return prev + len(text[prev : self.items[i].start].rstrip()), self.end


@dataclass
class _Run:
    key: tuple[str, str, str]
    indent: int
    items: list[ListItem]
    end: int
    blank_since_item: bool = False


def _line_key(m: re.Match[str]) -> tuple[str, str, str]:
    indent = m.group("indent").replace("\t", "    ")
    if m.group("num") is not None:
        return ("numbered", m.group("sep"), indent)
    if m.group("bullet") is not None:
        return ("bulleted", m.group("bullet"), indent)
    return ("step", m.group("stepfmt").strip(), indent)


def _list_item(m: re.Match[str], start: int) -> ListItem:
    """The item of a matched marker line starting at ``start``, with its number's span if numbered."""
    if m.group("num") is not None:
        return ListItem(start, (start + m.start("num"), start + m.end("num")), int(m.group("num")))
    if m.group("step") is not None:
        return ListItem(start, (start + m.start("stepnum"), start + m.end("stepnum")), int(m.group("stepnum")))
    return ListItem(start, None, None)


def _add_item(
    open_runs: dict[tuple[str, str, str], _Run], done: list[_Run], key: tuple[str, str, str], item: ListItem, end: int
) -> None:
    """An item line: it closes deeper lists and other markers at its indent, then joins (or opens)
    the list of its key, and the shallower lists it is nested in extend over it."""
    width = len(key[2])
    for k, run in list(open_runs.items()):
        if run.indent > width or (run.indent == width and k != key):
            done.append(open_runs.pop(k))
    current = open_runs.get(key)
    if current is None:
        open_runs[key] = _Run(key, width, [item], end)
    else:
        current.items.append(item)
        current.end = end
        current.blank_since_item = False
    for other in open_runs.values():
        if other.indent < width:
            other.end = end


def _add_other_line(open_runs: dict[tuple[str, str, str], _Run], done: list[_Run], indent: int, end: int) -> None:
    """A line that is not an item: a continuation of the lists it is indented under (or lazily
    continues, right after an item), the end of the others."""
    for k, run in list(open_runs.items()):
        if indent > run.indent or not run.blank_since_item:
            run.end = end
        else:
            done.append(open_runs.pop(k))


def detect_lists(text: str, excluded: list[tuple[int, int]]) -> list[DetectedList]:
    """Every list in ``text`` (outside ``excluded``): numbered ("1." / "1)"), bulleted (- * • +)
    or "Step N", in document order of their first item.

    Items of one list share kind, marker and indentation. Between two items there may be blank
    lines, lines indented deeper than the marker (continuations, nested lists) and, right after an
    item without a blank line, unindented lines (lazy continuation). A line at the list's indent
    after a blank line, a different marker at the same indent or a shallower item ends the list.
    """
    open_runs: dict[tuple[str, str, str], _Run] = {}
    done: list[_Run] = []
    pos = 0
    for line in text.splitlines(keepends=True):
        start, pos = pos, pos + len(line)
        body = line.rstrip("\r\n")
        end = start + len(body)
        if not body.strip():
            for run in open_runs.values():
                run.blank_since_item = True
            continue
        if inside(start, excluded):
            continue
        m = _ITEM.match(body)
        if m is not None:
            _add_item(open_runs, done, _line_key(m), _list_item(m, start), end)
        else:
            _add_other_line(open_runs, done, len(body) - len(body.lstrip(" \t")), end)
    done.extend(open_runs.values())
    lists = [DetectedList(r.key[0], tuple(r.items), r.end) for r in done]
    return sorted(lists, key=lambda d: d.items[0].start)
