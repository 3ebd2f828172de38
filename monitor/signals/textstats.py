"""Cheap text statistics, computed on every episode.

Each is a scalar or a binary signal; all are bounded in cost (at most the first
``MAX_CHARS`` characters are scanned) because they run on all traffic, not a sample.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

try:  # compiled at install (setup.py); optional, so an install without a C compiler still works
    from monitor.signals import textscan
except ImportError:  # pragma: no cover - the tests set it to None to run the Python path
    textscan = None  # type: ignore[assignment]

MAX_CHARS = 8000
# Refusal openings seen in deployed assistants; matched near the start of a response.
_REFUSAL = re.compile(
    r"^\W*(?:i'?m sorry|i am sorry|sorry, (?:but )?i|i (?:cannot|can't|can not|won't|will not|am unable|'m unable|"
    r"am not able|'m not able|must decline|do not feel comfortable|don't feel comfortable)|as an ai\b|"
    r"i apologi[sz]e,? but)",
    re.IGNORECASE,
)
_TEXT_CATEGORIES = ("L", "M", "N", "P", "Z")


@dataclass(frozen=True)
class SignalSpec:
    name: str
    kind: Literal["continuous", "binary"]
    description: str


TEXT_SIGNALS: dict[str, SignalSpec] = {
    s.name: s
    for s in (
        SignalSpec("response_log_chars", "continuous", "log(1 + characters in the response)"),
        SignalSpec("prompt_log_chars", "continuous", "log(1 + characters in the prompt)"),
        SignalSpec(
            "response_log_lines",
            "continuous",
            "log(1 + non-blank lines in the response): layout (lists, steps, paragraphs), which moves"
            " with a policy or style change even where length alone moves little",
        ),
        SignalSpec("empty_response", "binary", "the response is empty or whitespace"),
        SignalSpec("refusal", "binary", "the response opens like a refusal"),
        SignalSpec(
            "mixed_script",
            "binary",
            "the response's letters come from more than one writing system (e.g. Latin and Cyrillic or CJK):"
            " rare in real answers, typical of degenerate or adversarial output",
        ),
        SignalSpec("distinct_token_ratio", "continuous", "distinct / total word tokens of the response (repetition)"),
        SignalSpec(
            "non_text_ratio",
            "continuous",
            "share of response characters that are not letters, marks, digits, "
            "punctuation or spaces (symbols, control, private-use)",
        ),
    )
}


# These run on every episode, so the per-character work is left to C: bytes.translate (a table
# lookup per byte) and str.split, with Python looping only over the distinct characters that are
# not ASCII, their Unicode lookups cached. One real answer in seven holds a non-ASCII character (a
# curly quote, a dash, an accent: 14% over AlpacaEval's 23 models, a third for some of them), so
# that path must be nearly as cheap as the ASCII one: with a regex over every character it cost six
# times as much (308 against 51 us an answer). The drift observer's batch path goes further for
# ASCII answers: the compiled scan (``textscan.c``, see :func:`_scanned`) counts lines, tokens and
# non-text bytes without a Python object per token.
_NON_WORD = re.compile(r"\W+")
# Every ASCII byte that is not a word character (``\w`` in ASCII: letters, digits, underscore)
# becomes a space; the bytes of non-ASCII characters (0x80 and up in UTF-8) are kept, so a token
# that holds one is split again by the Unicode definition.
_ASCII_WORD = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_TO_SPACE = bytes(b if b in _ASCII_WORD or b >= 0x80 else 0x20 for b in range(256))
_CONTROL_BYTES = bytes(b for b in range(128) if (b < 32 and b not in b"\n\r\t") or b == 127)
_ASCII = re.compile(r"[\x00-\x7f]+")
_ASCII_LETTER = re.compile(r"[A-Za-z]")


@functools.lru_cache(maxsize=65536)
def _is_text_char(ch: str) -> bool:
    return unicodedata.category(ch)[0] in _TEXT_CATEGORIES or ch in "\n\r\t"


# The ASCII bytes that are not text by the same definition: the controls but tab, CR and LF, and
# the symbols ``$ + < = > ^ ` | ~`` (Unicode category S). Derived from the definition, so that a
# text's symbols count the same whether or not it holds a non-ASCII character.
_NON_TEXT_BYTES = bytes(b for b in range(128) if not _is_text_char(chr(b)))


@functools.lru_cache(maxsize=65536)
def _script(ch: str) -> str | None:
    """A letter's writing system: the first word of its Unicode name (LATIN, CYRILLIC, CJK, ...)."""
    return unicodedata.name(ch, "UNKNOWN").split(" ", 1)[0] if ch.isalpha() else None


def non_text_ratio(text: str) -> float:
    """Share of characters that are not text (see the ``non_text_ratio`` signal above).

    >>> non_text_ratio("plain text, and a bell" + chr(7)), non_text_ratio("emoji " + chr(0x1F600) + "!")
    (0.043478260869565216, 0.125)
    >>> non_text_ratio("x = a + b"), non_text_ratio("x = a + b, \u00e9")  # the same two symbols either way
    (0.2222222222222222, 0.16666666666666666)
    """
    return _non_text_share(text, _NON_TEXT_BYTES)


def _non_text_share(text: str, ascii_non_text: bytes) -> float:
    """The share of ``text`` that is not text: in pure ASCII the bytes in ``ascii_non_text`` (one
    table lookup per byte), else every character by its Unicode category (the ASCII ones by the
    same table lookup, the others once per distinct character)."""
    if not text:
        return 0.0
    if text.isascii():
        raw = text.encode("ascii")
        return (len(raw) - len(raw.translate(None, ascii_non_text))) / len(raw)
    ascii_part = text.encode("ascii", "ignore")
    bad = len(ascii_part) - len(ascii_part.translate(None, _NON_TEXT_BYTES))
    bad += sum(n for ch, n in Counter(_ASCII.sub("", text)).items() if not _is_text_char(ch))
    return bad / len(text)


def non_text_ratio_v1(text: str) -> float:
    """The reward model's ``non_text_ratio`` feature (feature sets 1 to 3), kept as those versions
    were trained on it: in a text without a non-ASCII character only the control characters count,
    not the ASCII symbols. The drift signal counts them (:func:`non_text_ratio`); a trained version
    must score with the features it learned, so the feature keeps its first definition.

    >>> non_text_ratio_v1("x = a + b"), non_text_ratio_v1("x = a + b, \u00e9")
    (0.0, 0.16666666666666666)
    """
    return _non_text_share(text, _CONTROL_BYTES)


def _mixed_script(text: str) -> float:
    if text.isascii():
        return 0.0
    scripts: set[str] = {"LATIN"} if _ASCII_LETTER.search(text) else set()
    for ch in _ASCII.sub("", text):
        script = _script(ch)
        if script is not None:
            scripts.add(script)
            if len(scripts) > 1:
                return 1.0
    return 0.0


def word_tokens(text: str) -> list[bytes]:
    r"""The lower-cased word tokens (``\w+`` runs) of ``text``, UTF-8 encoded.

    The ASCII non-word bytes become spaces and ``bytes.split`` cuts there; only a token that holds
    a non-ASCII character is cut again, by the Unicode definition (a curly apostrophe splits
    ``don't`` as ``'`` does). Lone surrogates (JSON allows them) pass through ``surrogatepass``.

    >>> word_tokens("Don\u2019t PANIC: caf\u00e9 2x_y!")
    [b'don', b't', b'panic', b'caf\xc3\xa9', b'2x_y']
    """
    raw = text.lower().encode("utf-8", "surrogatepass")
    tokens = raw.translate(_TO_SPACE).split()
    if raw.isascii():
        return tokens
    out: list[bytes] = []
    for token in tokens:
        if token.isascii():
            out.append(token)
        else:
            # The non-word runs become single spaces and str.split cuts there (no Unicode
            # character is both a word character and whitespace).
            words = _NON_WORD.sub(" ", token.decode("utf-8", "surrogatepass")).split()
            out.extend(w.encode("utf-8", "surrogatepass") for w in words)
    return out


def text_stats(prompt: str, response: str) -> dict[str, float]:
    """Every text signal of one episode."""
    r = response[:MAX_CHARS]
    return {
        "response_log_chars": math.log1p(len(response)),
        "prompt_log_chars": math.log1p(len(prompt)),
        "response_log_lines": math.log1p(_non_blank_lines(r)),
        "empty_response": 0.0 if response.strip() else 1.0,
        "refusal": 1.0 if _REFUSAL.match(r[:300]) else 0.0,
        "distinct_token_ratio": _distinct_ratio(r),
        "non_text_ratio": non_text_ratio(r),
        "mixed_script": _mixed_script(r),
    }


def _distinct_ratio(text: str) -> float:
    tokens = word_tokens(text)
    return len(set(tokens)) / len(tokens) if tokens else 1.0


def _non_blank_lines(text: str) -> int:
    return sum(1 for line in text.split("\n") if line.strip())


# The tables the compiled scan (``textscan.c``) reads, derived from the definitions above, so that
# its values are this module's to the bit (tests/signals/test_textscan.py): a word byte to its
# lower case (0: not a word byte), Python's whitespace (what ``str.strip`` removes), and the
# non-text bytes of :func:`non_text_ratio`.
_SCAN_LOWER = bytes(ord(chr(b).lower()) if b in _ASCII_WORD else 0 for b in range(256))
_SCAN_SPACE = bytes(1 if b < 128 and chr(b).isspace() else 0 for b in range(256))
_SCAN_NON_TEXT = bytes(1 if b in _NON_TEXT_BYTES else 0 for b in range(256))


def _scanned(rs: list[str]) -> tuple[list[int], list[float], list[float]]:
    """Each response's non-blank lines, distinct token ratio and non-text ratio: the ASCII ones
    in one compiled pass where the extension is built, the others' tokens in C too, their lines
    and non-text share in Python (all of it in Python without the extension)."""
    if textscan is None:
        return [_non_blank_lines(r) for r in rs], [_distinct_ratio(r) for r in rs], [non_text_ratio(r) for r in rs]
    lines, ratios, shares, rest = textscan.scan(rs, _SCAN_LOWER, _SCAN_SPACE, _SCAN_NON_TEXT, MAX_CHARS)
    for i in rest:
        # Lower-cased by Python (Unicode's rules, final sigma included), tokens counted in C.
        r = rs[i]
        raw = r.lower().encode("utf-8", "surrogatepass")
        lines[i], ratios[i], shares[i] = (
            _non_blank_lines(r),
            textscan.distinct_ratio(raw, _SCAN_LOWER),
            non_text_ratio(r),
        )
    return lines, ratios, shares


def text_stats_many(prompts: Sequence[str], responses: Sequence[str]) -> dict[str, list[float]]:
    """:func:`text_stats` of many episodes, one list per signal: the same values to the bit, with
    the per-signal work in comprehensions instead of a dict and eight calls per episode (the
    drift observer's batch path, where every episode of the traffic passes), and the scan of
    every character in C where it was compiled (:func:`_scanned`).

    >>> text_stats_many(["Hi?"], ["I'm sorry, I can't."])["refusal"]
    [1.0]
    """
    rs = [r[:MAX_CHARS] for r in responses]
    lines, ratios, shares = _scanned(rs)
    match = _REFUSAL.match
    return {
        "response_log_chars": [math.log1p(len(r)) for r in responses],
        "prompt_log_chars": [math.log1p(len(p)) for p in prompts],
        "response_log_lines": [math.log1p(n) for n in lines],
        # isspace() is strip()'s test without its copy; an empty response is empty too.
        "empty_response": [1.0 if not r or r.isspace() else 0.0 for r in responses],
        "refusal": [1.0 if match(r, 0, 300) else 0.0 for r in rs],  # endpos: r[:300] without its copy
        "distinct_token_ratio": ratios,
        "non_text_ratio": shares,
        "mixed_script": [_mixed_script(r) for r in rs],
    }


# Signals that later stages feed (monitor.drift.DriftMonitor.observe_value), not computed here.
FED_SIGNALS: dict[str, SignalSpec] = {
    s.name: s
    for s in (
        SignalSpec("rm_score", "continuous", "reward-model score of an episode on the rm channel"),
        SignalSpec(
            "rm_disagreement", "binary", "a human label disagrees with the reward model's verdict on the same episode"
        ),
    )
}
