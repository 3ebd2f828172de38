"""Explicit length and structure features of a response, fed to the reward head.

The encoder sees at most ``max_length`` tokens, so on its own it cannot tell a
400-token answer from a 2,000-token one, nor count the bullets past the cut.
Preference judges care about exactly that (the AlpacaEval judge favours longer,
well-structured answers; HH-RLHF crowdworkers favour short refusals of harmful
requests), so these counts are computed on the whole text and reach the head
directly. They are cheap (regexes over at most ``MAX_CHARS`` characters) and
pure, so scores stay reproducible.

The list is versioned by ``FEATURES_VERSION``: a saved model records it and
refuses to load under a different feature set.
"""

from __future__ import annotations

import math
import re

from monitor.signals.textstats import _non_text_ratio

FEATURES_VERSION = 1
# Long enough for any real answer in the bundled data (the longest is ~12k characters);
# it bounds the cost of a pathological input.
MAX_CHARS = 32_000

_WORD = re.compile(r"\w+", re.UNICODE)
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
_BULLET = re.compile(r"^\s*[-*\u2022+]\s+\S", re.MULTILINE)
_NUMBERED = re.compile(r"^\s*\d{1,3}[.)]\s+\S", re.MULTILINE)
_HEADER = re.compile(r"^\s*(?:#{1,6}\s+\S|\*\*[^*\n]{1,80}\*\*:?\s*$|[A-Z][^\n]{0,60}:\s*$)", re.MULTILINE)
_FENCE = re.compile(r"^\s*```", re.MULTILINE)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")
_URL = re.compile(r"https?://\S+")
_REFUSAL = re.compile(
    r"^\W*(?:i'?m sorry|i am sorry|sorry,? (?:but )?i|i (?:cannot|can't|can not|won't|will not|am unable|'m unable|"
    r"am not able|'m not able|must decline|do not feel comfortable|don't feel comfortable|don't think i can)|"
    r"as an ai\b|i apologi[sz]e,? but|no,? i)",
    re.IGNORECASE,
)
_APOLOGY = re.compile(r"\b(?:sorry|apologi[sz]e)\b", re.IGNORECASE)
_AI_MENTION = re.compile(r"\b(?:as an ai|language model|i'?m an ai|i am an ai|ai assistant)\b", re.IGNORECASE)
_ROLE_LEAK = re.compile(r"\b(?:Human|Assistant|User|### Instruction|### Response):", re.IGNORECASE)
_STOP = frozenset(
    re.findall(
        r"\w+",
        "a an and are as at be but by can do does for from has have how i if in is it me my of on or so that the "
        "this to was what when where which who why will with would you your",
    )
)

FEATURE_NAMES: tuple[str, ...] = (
    "log_chars",
    "log_words",
    "log_lines",
    "log_paragraphs",
    "log_sentences",
    "log_words_per_sentence",
    "log_bullets",
    "log_numbered",
    "log_headers",
    "log_code_blocks",
    "log_bold",
    "log_urls",
    "log_questions",
    "log_len_ratio",
    "prompt_log_chars",
    "prompt_overlap",
    "distinct_word_ratio",
    "repeated_line_ratio",
    "mean_word_len",
    "ends_complete",
    "empty",
    "refusal",
    "apology",
    "ai_mention",
    "role_leak",
    "non_text_ratio",
)
N_FEATURES = len(FEATURE_NAMES)


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 2}


def response_features(prompt: str, response: str) -> list[float]:
    """One vector (``FEATURE_NAMES`` order) for a response given its prompt; raw, unnormalised."""
    r = response[:MAX_CHARS]
    p = prompt[-MAX_CHARS:]
    stripped = r.strip()
    words = _WORD.findall(r)
    lower_words = [w.lower() for w in words]
    lines = [ln.strip() for ln in r.splitlines() if ln.strip()]
    paragraphs = [b for b in re.split(r"\n\s*\n", r) if b.strip()]
    sentences = max(1, len(_SENTENCE_END.findall(r))) if stripped else 0
    fences = len(_FENCE.findall(r))
    prompt_words = _content_words(p)
    overlap = len(prompt_words & set(lower_words)) / len(prompt_words) if prompt_words else 0.0
    head = stripped[:300]
    return [
        math.log1p(len(response)),
        math.log1p(len(words)),
        math.log1p(len(lines)),
        math.log1p(len(paragraphs)),
        math.log1p(sentences),
        math.log1p(len(words) / sentences) if sentences else 0.0,
        math.log1p(len(_BULLET.findall(r))),
        math.log1p(len(_NUMBERED.findall(r))),
        math.log1p(len(_HEADER.findall(r))),
        math.log1p(fences // 2 + fences % 2),
        math.log1p(len(_BOLD.findall(r))),
        math.log1p(len(_URL.findall(r))),
        math.log1p(r.count("?")),
        math.log1p(len(response)) - math.log1p(len(prompt)),
        math.log1p(len(prompt)),
        overlap,
        len(set(lower_words)) / len(lower_words) if lower_words else 1.0,
        1.0 - len(set(lines)) / len(lines) if lines else 0.0,
        sum(map(len, words)) / len(words) if words else 0.0,
        1.0 if stripped and stripped[-1] in ".!?)\"'`*:" else 0.0,
        0.0 if stripped else 1.0,
        1.0 if _REFUSAL.match(head) else 0.0,
        1.0 if _APOLOGY.search(head) else 0.0,
        1.0 if _AI_MENTION.search(r[:2000]) else 0.0,
        1.0 if _ROLE_LEAK.search(r) else 0.0,
        _non_text_ratio(r[:8000]),
    ]
