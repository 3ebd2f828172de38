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

Version 3 adds what the prompt asks for (brevity, a list, code, creative writing, a question, a
number of items) and the response's length and structure *given* that request (length times each
request type, items when a list was asked for, whether the item count matches the asked number, a
code block when code was asked for), plus paragraph length, share of lines that are list items,
markdown headers and length on a linear (capped) and squared scale. The judge's length preference
depends on the request: a long answer to "in one sentence" loses, a long list to "give me ten
ideas" wins. Head on frozen encoder states (layers 6 and 4, dropout 0.3, lr 3e-4), mean of 5
seeds: AlpacaEval validation accuracy 0.846 -> 0.857 and held-out accuracy 0.881 -> 0.885;
HH-RLHF harmless stays within noise (0.654 -> 0.649 held-out, 0.637 -> 0.658 with the previous
head settings).

Version 4 adds what a reader sees past the encoder's cut and a length preference rewards: sentences
that share no content word with the prompt or with the rest of the answer (an irrelevant aside), and
sentences that state a figure on an authority's word ("a 2019 study found 80%..."). Without them a
head over the first 128 tokens plus length counts could only prefer an answer padded with either,
anywhere past the cut, as longer; with them the update's perturbation pairs
(``monitor/reward/augment.py``) can teach it not to.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from monitor.signals.textstats import non_text_ratio_v1

FEATURES_VERSION = 4
# The first FEATURES_BY_VERSION[v] names are feature set v (later versions append).
FEATURES_BY_VERSION = {1: 26, 2: 40, 3: 60, 4: 63}
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
# v3: what the prompt asks for, so the head can tell "long is good" from "long ignores the request".
_ASKS_BRIEF = re.compile(
    r"\b(?:brief(?:ly)?|short|concise(?:ly)?|one (?:word|sentence|line|paragraph)|"
    r"in (?:a )?(?:few|one|two|three) (?:words|sentences)|single (?:word|sentence)|summari[sz]e|tl;?dr|"
    r"only (?:the|answer|return|output|respond)|just (?:the|give|answer|say)|yes or no)\b",
    re.IGNORECASE,
)
_ASKS_LIST = re.compile(
    r"\b(?:list|steps?|ways|tips|ideas|examples|suggestions|options|reasons|names|outline|bullet)\b", re.I
)
_ASKS_CODE = re.compile(
    r"\b(?:code|function|python|javascript|program|script|sql|regex|java|c\+\+|implement|algorithm|bash)\b", re.I
)
_ASKS_CREATIVE = re.compile(
    r"\b(?:poem|story|song|lyrics|haiku|limerick|essay|letter|email|joke|tweet|slogan|rap)\b", re.I
)
_COUNT = re.compile(r"\b(\d{1,2}|two|three|four|five|six|seven|eight|nine|ten)\b", re.IGNORECASE)
_COUNT_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
_MD_HEADER = re.compile(r"^\s*#{1,6}\s+\S", re.MULTILINE)
# v4: sentences (a line break ends one too) and their content words, compared on a 5-letter prefix
# so that plurals and tenses meet ("studies"/"study" do not, "cities"/"city" do: a crude stem).
_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+|$)", re.MULTILINE)
_STEM_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{3,}")
_COMMON = frozenset(
    re.findall(
        r"\w+",
        "that this with from have what when where which would there their them they been were will your about into"
        " than then also some more most such only other very just like make made many much each over even back"
        " after before these those while because could should being does doing here",
    )
)
_AUTHORITY = re.compile(
    r"\b(?:stud(?:y|ies)|research(?:ers)?|survey(?:s|ed)?|experts?|scientists?|specialists?|official(?:ly)?|"
    r"records?|according|prove[dn]|shown|established|documented|analys[ie]s|audits?|reports?|confirm(?:s|ed)?|"
    r"demonstrated|law|cited|unanimous(?:ly)?|fact)\b",
    re.IGNORECASE,
)
#: Sentences read per response for the v4 features: bounds the pairwise comparison's cost.
MAX_SENTENCES = 200
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
    # v3
    "asks_brief",
    "asks_list",
    "asks_code",
    "asks_creative",
    "prompt_is_question",
    "log_chars_if_brief",
    "log_chars_if_list",
    "log_chars_if_code",
    "log_chars_if_creative",
    "log_items_if_list",
    "item_line_share",
    "log_chars_per_paragraph",
    "asks_count",
    "count_matches",
    "log_count_gap",
    "log_chars_squared",
    "has_code_block",
    "code_block_if_code",
    "log_md_headers",
    "kchars_capped",
    # v4
    "log_isolated_sentences",
    "isolated_sentence_share",
    "log_figures_on_authority",
)
N_FEATURES = len(FEATURE_NAMES)


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 2}


def _non_ascii_ratio(text: str) -> float:
    return sum(1 for c in text if ord(c) > 127) / max(1, len(text))


def _asked_count(prompt: str) -> int | None:
    """The first number 2-30 in the prompt ("give me 5 ideas"), read as how many items it asks for."""
    m = _COUNT.search(prompt)
    if m is None:
        return None
    t = m.group(1).lower()
    n = _COUNT_WORDS.get(t) or (int(t) if t.isdigit() else None)
    return n if n is not None and 2 <= n <= 30 else None


@dataclass(frozen=True)
class _Parsed:
    """What several feature groups read of one response, computed once."""

    r: str  # the response, clipped to MAX_CHARS
    stripped: str
    words: list[str]
    lower_words: list[str]
    lines: list[str]  # non-blank lines, stripped
    raw_lines: list[str]  # non-blank lines as written
    paragraphs: list[str]
    fences: int
    bullets: int
    numbered: int

    @classmethod
    def of(cls, response: str) -> _Parsed:
        r = response[:MAX_CHARS]
        words = _WORD.findall(r)
        raw_lines = [ln for ln in r.splitlines() if ln.strip()]
        return cls(
            r=r,
            stripped=r.strip(),
            words=words,
            lower_words=[w.lower() for w in words],
            lines=[ln.strip() for ln in raw_lines],
            raw_lines=raw_lines,
            paragraphs=[b for b in re.split(r"\n\s*\n", r) if b.strip()],
            fences=len(_FENCE.findall(r)),
            bullets=len(_BULLET.findall(r)),
            numbered=len(_NUMBERED.findall(r)),
        )


def response_features(prompt: str, response: str) -> list[float]:
    """One vector (``FEATURE_NAMES`` order) for a response given its prompt; raw, unnormalised.

    Four groups, in the order the feature versions added them: shape and lexical (v1), layout
    and language (v2), how the response meets what the prompt asks for (v3), and sentences off the
    subject or stating figures on an authority's word (v4).
    """
    t = _Parsed.of(response)
    return [
        *_shape_features(prompt, response, t),
        *_layout_features(prompt, t),
        *_request_features(prompt, t),
        *_coherence_features(prompt, t),
    ]


def _shape_features(prompt: str, response: str, t: _Parsed) -> list[float]:
    """v1: length, structure, overlap with the prompt, refusals and leaks."""
    r, stripped, words, lower_words, lines = t.r, t.stripped, t.words, t.lower_words, t.lines
    sentences = max(1, len(_SENTENCE_END.findall(r))) if stripped else 0
    prompt_words = _content_words(prompt[-MAX_CHARS:])
    overlap = len(prompt_words & set(lower_words)) / len(prompt_words) if prompt_words else 0.0
    head = stripped[:300]
    return [
        math.log1p(len(response)),
        math.log1p(len(words)),
        math.log1p(len(lines)),
        math.log1p(len(t.paragraphs)),
        math.log1p(sentences),
        math.log1p(len(words) / sentences) if sentences else 0.0,
        math.log1p(t.bullets),
        math.log1p(t.numbered),
        math.log1p(len(_HEADER.findall(r))),
        math.log1p(t.fences // 2 + t.fences % 2),
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
        non_text_ratio_v1(r[:8000]),  # as trained: see non_text_ratio_v1
    ]


def _layout_features(prompt: str, t: _Parsed) -> list[float]:
    """v2: repetition, line shape, tables and code, openers and closers, script of the text."""
    r, stripped, lower_words, raw_lines = t.r, t.stripped, t.lower_words, t.raw_lines
    trigrams = list(zip(lower_words, lower_words[1:], lower_words[2:], strict=False))
    r_na = _non_ascii_ratio(r[:4000])
    p_na = _non_ascii_ratio(prompt[-MAX_CHARS:][:4000])
    p_head = prompt.strip()[:60].lower()
    return [
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


def _request_features(prompt: str, t: _Parsed) -> list[float]:
    """v3: what the prompt asks for (brevity, a list, code, creative writing) against what came back."""
    r, raw_lines = t.r, t.raw_lines
    p_req = prompt[-4000:]
    log_chars = math.log1p(len(r))
    brief, wants_list, code, creative = (
        1.0 if rx.search(p_req) else 0.0 for rx in (_ASKS_BRIEF, _ASKS_LIST, _ASKS_CODE, _ASKS_CREATIVE)
    )
    items = t.bullets + t.numbered  # list items: the two patterns never match the same line
    asked = _asked_count(p_req)
    has_fence = 1.0 if t.fences else 0.0
    return [
        brief,
        wants_list,
        code,
        creative,
        1.0 if p_req.strip().endswith("?") else 0.0,
        log_chars * brief,
        log_chars * wants_list,
        log_chars * code,
        log_chars * creative,
        math.log1p(items) * wants_list,
        items / max(1, len(raw_lines)),
        math.log1p(len(r) / max(1, len(t.paragraphs))),
        1.0 if asked is not None else 0.0,
        1.0 if asked is not None and items == asked else 0.0,
        math.log1p(abs(items - asked)) if asked is not None else 0.0,
        log_chars**2 / 10,
        has_fence,
        has_fence * code,
        math.log1p(len(_MD_HEADER.findall(r))),
        min(len(r), 8000) / 1000.0,
    ]


def _stems(text: str) -> set[str]:
    return {w[:5] for w in (m.group(0).lower() for m in _STEM_WORD.finditer(text)) if w not in _COMMON}


def isolated_sentences(prompt: str, sentences: list[str]) -> tuple[int, int]:
    """(sentences of at least three content words that share none with the prompt or with any
    other sentence, such sentences counted at all): an aside on another subject."""
    stems = [_stems(x) for x in sentences]
    seen: dict[str, int] = {}
    for st in stems:
        for w in st:
            seen[w] = seen.get(w, 0) + 1
    asked = _stems(prompt[-4000:])
    long_enough = isolated = 0
    for st in stems:
        if len(st) < 3:
            continue
        long_enough += 1
        # A stem the sentence shares with another sentence is counted more than once in ``seen``.
        if not any(w in asked or seen[w] > 1 for w in st):
            isolated += 1
    return isolated, long_enough


def _coherence_features(prompt: str, t: _Parsed) -> list[float]:
    """v4: sentences off the subject, and figures stated on an authority's word."""
    sentences = [x for x in _SENTENCE.findall(t.r) if x.strip()][:MAX_SENTENCES]
    isolated, counted = isolated_sentences(prompt, sentences)
    figures = sum(1 for x in sentences if _DIGIT.search(x) and _AUTHORITY.search(x))
    return [math.log1p(isolated), isolated / counted if counted else 0.0, math.log1p(figures)]
