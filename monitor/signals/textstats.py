"""Cheap text statistics, computed on every episode.

Each is a scalar or a binary signal; all are bounded in cost (at most the first
``MAX_CHARS`` characters are scanned) because they run on all traffic, not a sample.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

MAX_CHARS = 8000
_TOKEN = re.compile(r"\w+", re.UNICODE)
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


def non_text_ratio(text: str) -> float:
    """Share of characters that are not text (see the ``non_text_ratio`` signal above)."""
    if not text:
        return 0.0
    if text.isascii():
        bad = sum(1 for ch in text if (ord(ch) < 32 and ch not in "\n\r\t") or ord(ch) == 127)
        return bad / len(text)
    bad = 0
    for ch in text:
        cat = unicodedata.category(ch)
        if cat[0] not in _TEXT_CATEGORIES and ch not in "\n\r\t":
            bad += 1
    return bad / len(text)


def _mixed_script(text: str) -> float:
    if text.isascii():
        return 0.0
    scripts: set[str] = set()
    for ch in text:
        if ch.isalpha():
            # The first word of a letter's Unicode name is its script (LATIN, CYRILLIC, CJK, ...).
            scripts.add("LATIN" if ch.isascii() else unicodedata.name(ch, "UNKNOWN").split(" ", 1)[0])
            if len(scripts) > 1:
                return 1.0
    return 0.0


def text_stats(prompt: str, response: str) -> dict[str, float]:
    """Every text signal of one episode."""
    r = response[:MAX_CHARS]
    tokens = _TOKEN.findall(r.lower())
    return {
        "response_log_chars": math.log1p(len(response)),
        "prompt_log_chars": math.log1p(len(prompt)),
        "response_log_lines": math.log1p(sum(1 for line in r.split("\n") if line.strip())),
        "empty_response": 0.0 if response.strip() else 1.0,
        "refusal": 1.0 if _REFUSAL.match(r[:300]) else 0.0,
        "distinct_token_ratio": len(set(tokens)) / len(tokens) if tokens else 1.0,
        "non_text_ratio": non_text_ratio(r),
        "mixed_script": _mixed_script(r),
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
