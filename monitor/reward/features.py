"""Explicit length and structure features of a response, fed to the reward head.

The encoder sees at most ``max_length`` tokens, so on its own it cannot tell a
400-token answer from a 2,000-token one, nor count the bullets past the cut.
Preference judges care about exactly that (the AlpacaEval judge favours longer,
well-structured answers; HH-RLHF crowdworkers favour short refusals of harmful
requests), so these counts are computed on the whole text and reach the head
directly. They are cheap (regexes over at most ``MAX_CHARS`` characters) and
pure, so scores stay reproducible.

The list is versioned by ``FEATURES_VERSION``: a saved model records the version and the names
it was trained on. Versions only ever append features, so a model saved under an older version
loads and computes just its own (first) features; a model whose names are not a prefix of this
code's list refuses to load.

Version 2 added repetition (distinct word trigrams, longest line), markdown tables and inline
code, stock openers and closers, digits/colons/newlines, non-ASCII share (a reply in another
script than the prompt) and echoing the prompt: on AlpacaEval judge pairs (5-fold CV over the
training pairs, head on frozen encoder states) they lower the Bradley-Terry loss from 0.371 to
0.348 and lift accuracy over "longer wins" from +1.2 to +2.0 points.
"""

from __future__ import annotations

import math
import re

from monitor.signals.textstats import _non_text_ratio

FEATURES_VERSION = 2
# The first FEATURES_BY_VERSION[v] names are feature set v (later versions append).
FEATURES_BY_VERSION = {1: 26, 2: 40}
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
_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$", re.MULTILINE)
_INLINE_CODE = re.compile(r"`[^`\n]+`")
_OPENER = re.compile(r"^\W*(?:sure|certainly|of course|absolutely|here (?:is|are)|great question)", re.IGNORECASE)
_CLOSER = re.compile(
    r"\b(?:in summary|in conclusion|overall|to summari[sz]e|i hope this helps|let me know if)\b", re.IGNORECASE
)
_DIGIT = re.compile(r"\d")
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
    # v2
    "distinct_trigram_ratio",
    "log_longest_line",
    "log_chars_per_line",
    "log_table_rows",
    "log_inline_code",
    "stock_opener",
    "stock_closer",
    "digit_ratio",
    "log_colons",
    "log_newlines",
    "non_ascii_ratio",
    "prompt_non_ascii_ratio",
    "non_ascii_gap",
    "echoes_prompt",
)
N_FEATURES = len(FEATURE_NAMES)


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 2}


def _non_ascii_ratio(text: str) -> float:
    return sum(1 for c in text if ord(c) > 127) / max(1, len(text))


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
    trigrams = list(zip(lower_words, lower_words[1:], lower_words[2:], strict=False))
    raw_lines = [ln for ln in r.splitlines() if ln.strip()]
    r_na = _non_ascii_ratio(r[:4000])
    p_na = _non_ascii_ratio(p[:4000])
    p_head = prompt.strip()[:60].lower()
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
        # v2
        len(set(trigrams)) / len(trigrams) if trigrams else 1.0,
        math.log1p(max((len(ln) for ln in raw_lines), default=0)),
        math.log1p(len(r) / max(1, len(raw_lines))),
        math.log1p(len(_TABLE_ROW.findall(r))),
        math.log1p(len(_INLINE_CODE.findall(r))),
        1.0 if _OPENER.match(stripped[:100]) else 0.0,
        1.0 if _CLOSER.search(r[-600:]) else 0.0,
        len(_DIGIT.findall(r)) / max(1, len(r)),
        math.log1p(r.count(":")),
        math.log1p(r.count("\n")),
        r_na,
        p_na,
        abs(r_na - p_na),
        1.0 if p_head and p_head in stripped.lower()[:400] else 0.0,
    ]
