"""A seeded corpus of mutated episode records for the ingest fuzz tests (file and Kafka).

Imported by module name (pytest puts tests/ on sys.path for tests/test_*.py; tests/kafka adds it).

Every record starts as a valid episode. Most are then mutated: structurally (the poison pills of
issue 13 and their neighbours: integers and floats beyond every range, nesting at and around the
depth limit and far beyond it, NUL and lone-surrogate escapes deep inside, control characters
in ids, a BOM, wrong types, boundary lengths, odd timestamps, unusual Unicode), then, for many,
at the byte level (flips, cuts, splices, invalid UTF-8, stray escapes). The seed fixes the corpus:
a failure reproduces with the same records.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from typing import Any

SEED = 13
BASE_TS = 1_767_225_600  # 2026-01-01T00:00:00Z
STREAMS = ("chat", "code", "search", "ünï-cödé", "s p a c e")

# Characters that exercise text handling downstream (text statistics, tokenisers, the UI):
# combining marks, right-to-left and bidi controls, zero-width, astral, CJK and Cyrillic.
ODD_TEXT = [
    "e\u0301",
    "\u202eevil",
    "\u200b",
    "\u2028",
    "\ufeff",
    "\U0001f600",
    "\U0010fffd",
    "日本語",
    "кириллица",
    "\\",
    '"',
    "<script>alert(1)</script>",
    "\t",
    "\r\n",
    "\x7f",
    "\x85",
    "",
]
CONTROLS = [chr(c) for c in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0))]
DEPTHS = (30, 31, 32, 33, 34, 100, 600, 1000, 1023, 1024, 1025, 3000)
RAW_BYTES = [
    b"\x00",
    b"\xff",
    b"\xc3\x28",  # invalid continuation
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\xc0\xaf",  # overlong
    b"\xef\xbb\xbf",  # BOM in the middle
    b"\\u0000",
    b"\\ud800",
    b"\\udc00",
    b"\\ud83d\\ude00",
    b"\\",
    b'"',
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"1e400",
    b"NaN",
    b"-Infinity",
    b"\r",
    b"\t",
]


def valid_episode(rng: random.Random, i: int) -> dict[str, Any]:
    words = ["the", "model", "answer", "is", "step", "1.", "-", "ok", "no", rng.choice(ODD_TEXT)]
    return {
        "episode_id": f"fz-{i}",
        "stream": rng.choice(STREAMS),
        "model": rng.choice(["policy-v1", "policy-v2", "m" * 256]),
        "timestamp": BASE_TS + i,
        "prompt": " ".join(rng.choices(words, k=rng.randint(0, 20))),
        "response": " ".join(rng.choices(words, k=rng.randint(0, 60))),
        "metadata": {"i": i, "judge_pref": rng.random(), "tags": ["a", {"b": [1, 2.5, None, True]}]},
    }


def _deep_metadata(ep: dict[str, Any], rng: random.Random) -> bytes:
    # Serialised by hand: json.dumps itself recurses and would fail on the deepest ones.
    depth = rng.choice(DEPTHS)
    leaf = rng.choice(['"x"', "1", '"\\u0000"', '"\\ud800"', "1" + "0" * 400, "[]"])
    bits = rng.getrandbits(depth)
    arrays = [bool(bits >> j & 1) for j in range(depth - 1)]  # below {"d": ...}, itself level 1
    opens = "".join("[" if a else '{"k":' for a in arrays)
    closes = "".join("]" if a else "}" for a in reversed(arrays))
    ep = dict(ep)
    ep["metadata"] = "@@META@@"
    if rng.random() < 0.3:
        ep["response"] = ep["response"] + rng.choice(["\x00", "\ud800", "ok"])
    text = json.dumps(ep).replace('"@@META@@"', '{"d":' + opens + leaf + closes + "}")
    return text.encode("utf-8", "surrogatepass")


def _set(field: str, values: list[Any]) -> Callable[[dict[str, Any], random.Random], bytes]:
    def mutate(ep: dict[str, Any], rng: random.Random) -> bytes:
        ep = dict(ep)
        ep[field] = rng.choice(values)
        return _dumps(ep)

    return mutate


def _dumps(obj: Any) -> bytes:
    # allow_nan: NaN/Infinity literals are part of the corpus; surrogatepass: lone surrogates too.
    return json.dumps(obj, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


def _raw_number(ep: dict[str, Any], rng: random.Random) -> bytes:
    where = rng.choice(["timestamp", "metadata", "schema_version"])
    num = rng.choice(
        [
            "1" + "0" * rng.randint(18, 500),
            "-" + "9" * rng.randint(19, 5000),
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "1e308",
            "1e309",
            "-1e400",
            "1e-400",
            "2.5e-324",
            "0.1e99999999999999999999",
            "253402300799",
            "253402300800",
            "-0",
            "1.0",
        ]
    )
    ep = dict(ep)
    ep[where] = "@@NUM@@" if where != "metadata" else {"n": "@@NUM@@", "l": ["@@NUM@@"]}
    return _dumps(ep).replace(b'"@@NUM@@"', num.encode())


def _control_id(ep: dict[str, Any], rng: random.Random) -> bytes:
    ep = dict(ep)
    field = rng.choice(["episode_id", "stream", "model"])
    s = str(ep.get(field) or "x")
    at = rng.randint(0, len(s))
    ep[field] = s[:at] + rng.choice(CONTROLS) + s[at:]
    return _dumps(ep)


def _odd_text(ep: dict[str, Any], rng: random.Random) -> bytes:
    ep = dict(ep)
    field = rng.choice(["episode_id", "stream", "model", "prompt", "response"])
    ep[field] = "".join(rng.choice(ODD_TEXT) for _ in range(rng.randint(1, 8)))
    if rng.random() < 0.2:
        ep[field] += chr(rng.randint(0xD800, 0xDFFF))  # a lone surrogate, as an escape or raw bytes
    return _dumps(ep)


def _missing_or_unknown(ep: dict[str, Any], rng: random.Random) -> bytes:
    ep = dict(ep)
    if rng.random() < 0.5:
        ep.pop(rng.choice(list(ep)))
    else:
        ep[rng.choice(["extra", "Episode_id", "", "\x00", "metadata ", "schema_version"])] = 1
    return _dumps(ep)


def _top_level(ep: dict[str, Any], rng: random.Random) -> bytes:
    return rng.choice(
        [
            b"[]",
            b"null",
            b"0",
            b'"episode"',
            b"{}",
            b"",
            b"\xef\xbb\xbf" + _dumps(ep),
            _dumps([ep]),
            _dumps(ep) + b" trailing",
            _dumps(ep) + _dumps(ep),
            b"[" * 2000 + b"]" * 2000,
            b"{" * 50,
            _dumps(ep).replace(b'"episode_id"', b'"episode_id": "dup", "episode_id"'),
        ]
    )


def _big(ep: dict[str, Any], rng: random.Random) -> bytes:
    # Around the default 256 KiB limit, or whitespace only (blank in files, invalid JSON in Kafka).
    ep = dict(ep)
    n = rng.choice([262_000, 262_144, 270_000])
    if rng.random() < 0.3:
        return b" " * n
    ep["response"] = "y" * n
    return _dumps(ep)


STRUCTURAL: list[Callable[[dict[str, Any], random.Random], bytes]] = [
    _deep_metadata,
    _raw_number,
    _control_id,
    _odd_text,
    _missing_or_unknown,
    _top_level,
    _set("episode_id", ["", "x" * 128, "x" * 129, 7, None, ["a"], {"a": 1}, True, "fz-dup"]),
    _set("stream", ["", "s" * 128, "s" * 129, 3, None, [], "default"]),
    _set("model", ["", "m" * 257, 1.5, None, {"v": 1}, False]),
    _set("prompt", ["", None, 5, [], {"t": "x"}, "\u0000", "p" * 5000]),
    _set("response", ["", None, 5.5, ["r"], "r" * 5000]),
    _set("metadata", [None, [], "m", 1, {}, {"": {"": {"": []}}}, {"\u0000": 1}, {f"k{j}": j for j in range(500)}]),
    _set("schema_version", [1, 2, 0, "1", 1.0, True, None, -1]),
    _set(
        "timestamp",
        [
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:00:00+24:00",
            "2026-01-01t00:00:00z",
            "2026-13-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "0001-01-01T00:00:00Z",
            "2026-01-01T00:00:00",
            "2026-01-01 00:00:00.123456789+01:00",
            "  2026-01-01T00:00:00Z  ",
            "x" * 100,
            "",
            -1,
            0,
            253402300799,
            253402300800,
            1e308,
            True,
            None,
            [],
            float("nan"),
            float("inf"),
        ],
    ),
]


def _byte_mutation(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        at = rng.randint(0, len(b))
        if op == 0 and b:  # flip a byte
            b[min(at, len(b) - 1)] = rng.randrange(256)
        elif op == 1:  # insert a nasty token
            b[at:at] = rng.choice(RAW_BYTES)
        elif op == 2:  # delete a span
            del b[at : at + rng.randint(1, 20)]
        elif op == 3:  # truncate
            del b[at:]
        elif op == 4 and b:  # duplicate a span
            end = min(len(b), at + rng.randint(1, 40))
            b[end:end] = b[at:end]
        elif op == 5:  # random bytes
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:  # swap two spans
            j = rng.randint(0, len(b))
            lo, hi = sorted((at, j))
            b[lo:hi] = b[lo:hi][::-1]
    return bytes(b)


def mutated_records(n: int, seed: int = SEED, *, single_line: bool) -> tuple[list[bytes], set[int]]:
    """``n`` records, and the indices of those left valid on purpose (about 20%; the rest are
    structurally mutated, a third of them byte by byte too, and some of those are valid still).

    ``single_line``: no record holds a newline byte (one record per line of a file)."""
    records, valid = _corpus(n, seed, single_line)
    return list(records), set(valid)


@functools.cache
def _corpus(n: int, seed: int, single_line: bool) -> tuple[tuple[bytes, ...], frozenset[int]]:
    # Cached: the SQLite and PostgreSQL variants of a test feed the same records.
    rng = random.Random(seed)
    out: list[bytes] = []
    valid: set[int] = set()
    for i in range(n):
        ep = valid_episode(rng, i)
        roll = rng.random()
        if roll < 0.2:
            raw = _dumps(ep)
            valid.add(i)
        else:
            raw = rng.choice(STRUCTURAL)(ep, rng)
            if roll > 0.7:
                raw = _byte_mutation(raw, rng)
        if single_line:
            raw = raw.replace(b"\n", b" ")
        out.append(raw)
    return tuple(out), frozenset(valid)
