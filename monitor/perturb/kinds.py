"""The eight rule-based perturbations. Each makes a response worse in one named way and records
what it changed in ``Perturbed.detail`` (offsets are into the original response).

=========================  ==========================================================================
kind                       the checkable property
=========================  ==========================================================================
``truncate``               a strict prefix, cut after a word that is not its sentence's last
                           (the next word follows on the same line), keeping 30-70% of the chars
``drop_item``              one item of a detected list (numbered "1." / "1)", bulleted - * • +,
                           or "Step N"; at least 3 items) removed; later numbers renumbered when
                           the list counted up by one
``change_fact``            exactly one token changed: a number, a date (year, month, weekday) or a
                           capitalised named entity, to a different plausible value (rules below)
``unsupported_claim``      one confident template sentence inserted at a sentence boundary, its
                           slot filled with a topic word of the prompt or response
``off_topic``              one true but irrelevant sentence inserted at a sentence boundary
``break_code``             one operator or bound changed inside a fenced code block
``rude_tone``              a dismissive opener prepended, politeness sentences and words removed
``refusal_to_compliance``  for a harmful-looking prompt answered with a refusal: the whole
                           response replaced by a compliance outline with no actual content
=========================  ==========================================================================

``change_fact`` rules: a year (1500-2099) moves by 2-24 years either way (not +1, which reads as a
typo); an integer below 10 becomes another integer from 2-9; any other number is multiplied or
divided by a factor in [1.5, 3) at its own precision (thousands separators kept); a month or
weekday name becomes another one; an entity from a bundled set (countries, cities, well-known
people, companies, programming languages, planets, religions, languages) becomes another member
of the same set, any other capitalised name in mid-sentence becomes a different name with as many
words from the same text. Prose perturbations never touch code blocks, inline code or URLs.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from monitor.perturb import phrases
from monitor.perturb.base import Draws, RuleBased
from monitor.perturb.text import (
    DetectedList,
    code_spans,
    content_words,
    detect_lists,
    fenced_bodies,
    fenced_spans,
    inside,
    line_prefix,
    overlaps,
    sentence_boundaries,
    sentence_spans,
)
from monitor.signals.textstats import text_stats

# --- truncate ----------------------------------------------------------------------------------

# A gap between two words on one line: cutting there stops mid-sentence.
_MID_SENTENCE_GAP = re.compile(r"(?<=\w)[ \t]+(?=\w)")


class Truncate(RuleBased[int]):
    kind = "truncate"
    description = "cut the response mid-sentence, keeping 30-70% of its characters"
    keep_min = 0.3
    keep_max = 0.7
    min_chars = 40

    def candidates(self, prompt: str, response: str) -> Sequence[int]:
        n = len(response)
        if n < self.min_chars:
            return ()
        lo, hi = math.ceil(self.keep_min * n), math.floor(self.keep_max * n)
        return [m.start() for m in _MID_SENTENCE_GAP.finditer(response) if lo <= m.start() <= hi]

    def rewrite(self, prompt: str, response: str, cands: Sequence[int], draws: Draws) -> tuple[str, dict[str, Any]]:
        cut = draws.pick("cut", cands)
        return response[:cut], {
            "cut": cut,
            "kept_fraction": round(cut / len(response), 4),
            "removed": response[cut:],
        }


# --- drop_item ---------------------------------------------------------------------------------


class DropItem(RuleBased[DetectedList]):
    kind = "drop_item"
    description = "remove one item of a numbered, bulleted or 'Step N' list of 3+ items (renumbering)"
    min_items = 3

    def candidates(self, prompt: str, response: str) -> Sequence[DetectedList]:
        return [d for d in detect_lists(response, fenced_spans(response)) if len(d.items) >= self.min_items]

    def rewrite(
        self, prompt: str, response: str, cands: Sequence[DetectedList], draws: Draws
    ) -> tuple[str, dict[str, Any]]:
        lst = draws.pick("list", cands)
        i = draws.index("item", len(lst.items))
        start, end = lst.removal_span(i, response)
        edits: list[tuple[int, int, str]] = [(start, end, "")]
        renumber = lst.kind in ("numbered", "step") and lst.sequential
        if renumber:
            for item in lst.items[i + 1 :]:
                if item.number is not None and item.value is not None:  # always, in a sequential list
                    edits.append((item.number[0], item.number[1], str(item.value - 1)))
        return apply_edits(response, edits), {
            "list": lst.kind,
            "item": i,
            "items": len(lst.items),
            "start": start,
            "end": end,
            "removed": response[start:end],
            "renumbered": len(edits) - 1,
        }


def apply_edits(text: str, edits: Sequence[tuple[int, int, str]]) -> str:
    """Replace non-overlapping ``[start, end)`` spans by new strings (one pass)."""
    out: list[str] = []
    pos = 0
    for s, e, new in sorted(edits):
        out.append(text[pos:s])
        out.append(new)
        pos = e
    out.append(text[pos:])
    return "".join(out)


# --- change_fact -------------------------------------------------------------------------------

_YEAR = re.compile(r"(?<![\w.,:/$#-])(1[5-9]\d\d|20\d\d)(?![\w/:%]|[.,-]\d)")
# Not part of an identifier, a version, a time, a range or a date ("GPT-4", "3.5.1", "10:30", "20-30").
# Bounded lengths: a 20,000-digit "number" is not a fact (and int() refuses over 4,300 digits).
_NUMBER = re.compile(r"(?<![\w.,:/^#-])(\d{1,3}(?:,\d{3}){1,5}|\d{1,15})(\.\d{1,10})?(?![\w/:^]|[.,\-–]\d)")
# Not followed by a capitalised word: "August Belmont" is a name.
_DATE_WORD = re.compile(r"\b(?:" + "|".join(phrases.MONTHS + phrases.WEEKDAYS) + r")\b(?! [A-Z][a-z])")
_NAME_WORD = r"[A-Z][A-Za-z]*[a-z][A-Za-z]*"
# A possessive "'s" stays outside the name ("Chrome's" -> "Chrome"); other apostrophes ("O'Brien",
# "Don't") and hyphens make it no name of ours.
_ENTITY = re.compile(rf"(?<![\w'’-]){_NAME_WORD}(?: {_NAME_WORD}){{0,3}}(?![\w-])(?!['’](?!s\b))")
_ENTITY_SET_OF = {name: s for s in reversed(phrases.ENTITY_SETS) for name in s}
_POOL = 64
_LIST_MARKER_BEFORE = re.compile(r"(?:^|\n)[ \t]*(?:\d{1,3}[.)]|[-*•+]|#{1,6})?[ \t]*[*_\"'“(]*$")


@dataclass(frozen=True)
class Token:
    cls: str  # "number", "date" or "entity"
    rule: str  # "small_int", "scale", "year", "month", "weekday", "entity_set", "entity_text"
    start: int
    end: int
    old: str
    choices: tuple[str, ...] = ()  # the replacement pool of the "entity" and date-word rules


def _is_list_number(text: str, start: int, end: int) -> bool:
    before = line_prefix(text, start)
    return (not before.strip() and text[end : end + 1] in (".", ")")) or before.lower().rstrip().endswith("step")


def _sentence_start(text: str, start: int) -> bool:
    """Whether a capitalised word at ``start`` opens a sentence (so its capital says nothing)."""
    i = start - 1
    if i >= 0 and text[i] in "\"'“‘([":
        return True  # the start of a quotation or a title, as good as a sentence start
    while i >= 0 and text[i] in " \t\"'“‘(*_#>":
        i -= 1
    if i < 0 or text[i] in ".!?:;\n":
        return True
    return bool(_LIST_MARKER_BEFORE.search(text, max(0, start - 12), start))


def _numbers(text: str, excluded: list[tuple[int, int]]) -> list[Token]:
    out: list[Token] = []
    for m in _YEAR.finditer(text):
        if not inside(m.start(), excluded) and not _is_list_number(text, m.start(), m.end()):
            out.append(Token("date", "year", m.start(), m.end(), m.group(0)))
    years = {t.start for t in out}
    for m in _NUMBER.finditer(text):
        if m.start() in years and m.group(2) is None:
            continue
        if inside(m.start(), excluded) or _is_list_number(text, m.start(), m.end()):
            continue
        rule = "small_int" if m.group(2) is None and "," not in m.group(1) and int(m.group(1)) < 10 else "scale"
        out.append(Token("number", rule, m.start(), m.end(), m.group(0)))
    for m in _DATE_WORD.finditer(text):
        # "May" opening a sentence is usually the verb.
        if inside(m.start(), excluded) or (m.group(0) == "May" and _sentence_start(text, m.start())):
            continue
        pool = phrases.MONTHS if m.group(0) in phrases.MONTHS else phrases.WEEKDAYS
        rule = "month" if pool is phrases.MONTHS else "weekday"
        out.append(Token("date", rule, m.start(), m.end(), m.group(0), pool))
    return out


def _entities(text: str, excluded: list[tuple[int, int]]) -> list[Token]:
    found: list[tuple[int, int, str]] = []
    for m in _ENTITY.finditer(text):
        start, words = m.start(), m.group(0).split(" ")
        # Drop words that say nothing: a sentence's first word, "The", "I"...
        while words and (_sentence_start(text, start) or words[0] in phrases.NOT_ENTITIES):
            start += len(words[0]) + 1
            words = words[1:]
        while words and words[-1] in phrases.NOT_ENTITIES:
            words = words[:-1]
        if words and not inside(start, excluded):
            name = " ".join(words)
            found.append((start, start + len(name), name))
    # A single capitalised word seen once is too often a heading word or a quoted title; a name
    # with several words, one used twice, or one of a bundled set is much more likely an entity.
    seen = Counter(name for _, _, name in found)
    found = [f for f in found if " " in f[2] or seen[f[2]] >= 2 or f[2] in _ENTITY_SET_OF]
    # Replacement pools by word count: the first _POOL distinct names, which bounds the work on a
    # text made of thousands of distinct names.
    by_words: dict[int, list[str]] = {}
    for name in seen:
        pool = by_words.setdefault(name.count(" "), [])
        if len(pool) < _POOL and (" " in name or seen[name] >= 2 or name in _ENTITY_SET_OF):
            pool.append(name)
    choices: dict[str, tuple[str, ...]] = {}
    out: list[Token] = []
    for s, e, name in found:
        bundled = _ENTITY_SET_OF.get(name)
        if bundled is not None:
            out.append(Token("entity", "entity_set", s, e, name, tuple(x for x in bundled if x != name)))
            continue
        if name not in choices:
            low = name.lower()
            pool = by_words.get(name.count(" "), [])
            choices[name] = tuple(x for x in pool if x.lower() not in low and low not in x.lower())
        if choices[name]:
            out.append(Token("entity", "entity_text", s, e, name, choices[name]))
    return out


def _scaled(old: str, draws: Draws) -> str:
    intpart, _, frac = old.partition(".")
    commas = "," in intpart
    value = float(intpart.replace(",", "") + ("." + frac if frac else ""))
    factor = 1.5 + 1.5 * draws.uniform("factor")
    if value == 0:
        new = float(2 + draws.index("zero", 3))
    elif draws.uniform("updown") < 0.5:
        new = value * factor
    else:
        new = value / factor
    decimals = len(frac)
    text = f"{new:,.{decimals}f}" if commas else f"{new:.{decimals}f}"
    if text == old or float(text.replace(",", "")) == value:
        # Rounding at the number's precision undid the change (small decimals): double instead.
        new = value * 2 if value else 1.0
        text = f"{new:,.{decimals}f}" if commas else f"{new:.{decimals}f}"
    return text


def _new_value(tok: Token, draws: Draws) -> str:
    if tok.rule == "year":
        year = int(tok.old)
        shift = 2 + draws.index("shift", 23)
        new = year - shift if draws.uniform("sign") < 0.5 else year + shift
        if not 1500 <= new <= 2099:
            new = 2 * year - new
        return str(new)
    if tok.rule == "small_int":
        return str(draws.pick("int", [v for v in range(2, 10) if v != int(tok.old)]))
    if tok.rule == "scale":
        return _scaled(tok.old, draws)
    if tok.rule in ("month", "weekday"):
        i = tok.choices.index(tok.old)
        return tok.choices[(i + 1 + draws.index("shift", len(tok.choices) - 1)) % len(tok.choices)]
    return draws.pick("entity", tok.choices)


class ChangeFact(RuleBased[Token]):
    kind = "change_fact"
    description = "change exactly one number, date or named entity to a different plausible value"

    def candidates(self, prompt: str, response: str) -> Sequence[Token]:
        excluded = code_spans(response)
        return _numbers(response, excluded) + _entities(response, excluded)

    def rewrite(self, prompt: str, response: str, cands: Sequence[Token], draws: Draws) -> tuple[str, dict[str, Any]]:
        # Each class present is equally likely, whatever its count: a text full of numbers
        # still gets its entities changed now and then.
        classes = sorted({t.cls for t in cands})
        cls = draws.pick("class", classes)
        tok = draws.pick("token", [t for t in cands if t.cls == cls])
        new = _new_value(tok, draws)
        return response[: tok.start] + new + response[tok.end :], {
            "class": tok.cls,
            "rule": tok.rule,
            "start": tok.start,
            "end": tok.end,
            "old": tok.old,
            "new": new,
        }


# --- inserted sentences ------------------------------------------------------------------------


def _insert_at(response: str, at: int, sentence: str) -> tuple[str, str]:
    inserted = " " + sentence
    return response[:at] + inserted + response[at:], inserted


def topic_words(prompt: str, response: str, top: int = 5) -> list[str]:
    """The episode's own topic words: content words ranked by 2 x count in the prompt + count in
    the response (first appearance breaks ties)."""
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    for weight, text in ((2, prompt), (1, response)):
        for w in content_words(text):
            counts[w] += weight
            first.setdefault(w, len(first))
    return sorted(counts, key=lambda w: (-counts[w], first[w]))[:top]


class UnsupportedClaim(RuleBased[int]):
    kind = "unsupported_claim"
    description = "insert one confident, specific, unsourced claim about the episode's own topic"

    def candidates(self, prompt: str, response: str) -> Sequence[int]:
        if not content_words(prompt + " " + response):
            return ()  # nothing to fill the template's slot with
        return sentence_boundaries(response, code_spans(response))

    def rewrite(self, prompt: str, response: str, cands: Sequence[int], draws: Draws) -> tuple[str, dict[str, Any]]:
        topic = draws.pick("topic", topic_words(prompt, response))
        t = draws.index("template", len(self.bank.claim_templates))
        sentence = self.bank.claim_templates[t].format(topic=topic)
        at = draws.pick("at", cands)
        text, inserted = _insert_at(response, at, sentence)
        return text, {"offset": at, "inserted": inserted, "template": t, "topic": topic}


class OffTopic(RuleBased[int]):
    kind = "off_topic"
    description = "insert one true but irrelevant sentence at a sentence boundary"

    def candidates(self, prompt: str, response: str) -> Sequence[int]:
        return sentence_boundaries(response, code_spans(response))

    def rewrite(self, prompt: str, response: str, cands: Sequence[int], draws: Draws) -> tuple[str, dict[str, Any]]:
        s = draws.index("sentence", len(self.bank.off_topic_sentences))
        at = draws.pick("at", cands)
        text, inserted = _insert_at(response, at, self.bank.off_topic_sentences[s])
        return text, {"offset": at, "inserted": inserted, "sentence": s}


# --- break_code --------------------------------------------------------------------------------

# Binary operators with a space on both sides and an operand-like character beyond: "a < b" but
# not "<div>", "->", "a << b" or a YAML "- item".
_COMPARISON = re.compile(r"(?<=[\w)\]'\"]) (===|!==|<=|>=|==|!=|<|>|&&|\|\|) (?=[\w(\['\"-])")
_ARITHMETIC = re.compile(r"(?<=[\w)\]]) (\+=|-=|\+|-) (?=[\w(\[])")
_RANGE = re.compile(r"\brange\(([^(),\n]{1,60})(?:, *([^(),\n]{1,60}))?\)")
_SWAP = {
    "===": "!==",
    "!==": "===",
    "<=": "<",
    "<": "<=",
    ">=": ">",
    ">": ">=",
    "==": "!=",
    "!=": "==",
    "&&": "||",
    "||": "&&",
    "+": "-",
    "-": "+",
    "+=": "-=",
    "-=": "+=",
}


@dataclass(frozen=True)
class CodeEdit:
    block: int
    start: int
    end: int
    old: str
    new: str
    rule: str


_COMMENT = re.compile(r"#|//|--|/\*|<!--")


def _in_comment_or_string(text: str, pos: int) -> bool:
    """Whether ``pos`` follows a line comment marker or an odd number of quotes on its line (a
    heuristic: the edit must change what the code does, not a comment or a string)."""
    before = line_prefix(text, pos)
    return bool(_COMMENT.search(before)) or before.count('"') % 2 == 1 or before.count("'") % 2 == 1


def _code_edits(response: str) -> list[CodeEdit]:
    out: list[CodeEdit] = []
    for b, (s, e) in enumerate(fenced_bodies(response)):
        for rule, rx in (("comparison", _COMPARISON), ("arithmetic", _ARITHMETIC)):
            for m in rx.finditer(response, s, e):
                if not _in_comment_or_string(response, m.start(1)):
                    out.append(CodeEdit(b, m.start(1), m.end(1), m.group(1), _SWAP[m.group(1)], rule))
        for m in _RANGE.finditer(response, s, e):
            if _in_comment_or_string(response, m.start()):
                continue
            g = 2 if m.group(2) is not None else 1
            bound = m.group(g).strip()
            if bound:
                out.append(CodeEdit(b, m.start(g), m.end(g), m.group(g), f"{bound} - 1", "range_bound"))
    return sorted(out, key=lambda c: c.start)


class BreakCode(RuleBased[CodeEdit]):
    kind = "break_code"
    description = "change one operator or loop bound inside a fenced code block (< to <=, + to -, range(n) to n - 1)"

    def candidates(self, prompt: str, response: str) -> Sequence[CodeEdit]:
        return _code_edits(response)

    def rewrite(
        self, prompt: str, response: str, cands: Sequence[CodeEdit], draws: Draws
    ) -> tuple[str, dict[str, Any]]:
        c = draws.pick("edit", cands)
        return response[: c.start] + c.new + response[c.end :], {
            "block": c.block,
            "start": c.start,
            "end": c.end,
            "old": c.old,
            "new": c.new,
            "rule": c.rule,
        }


# --- rude_tone ---------------------------------------------------------------------------------

_WORD_CHAR = re.compile(r"\w")
_BLOCK_START = re.compile(r"[ \t]*(?:\d{1,3}[.)]|[-*•+]|#{1,6}|```|~~~|\|)")


def politeness_spans(response: str) -> list[tuple[int, int]]:
    """``[start, end)`` of what ``rude_tone`` removes: every sentence with a politeness phrase
    ("I hope this helps", "feel free to"...) with the blanks after it, and the words "please",
    "kindly" and an opening "Sure," / "Certainly!"..., outside code and URLs."""
    excluded = code_spans(response)
    spans: list[tuple[int, int]] = []
    for s, e in sentence_spans(response, excluded):
        if not overlaps(s, e, excluded) and phrases.POLITE_SENTENCE.search(response, s, e):
            end = e
            while end < len(response) and response[end] in " \t":
                end += 1
            spans.append((s, end))
    sentences = list(spans)
    for m in phrases.POLITE_WORD.finditer(response):
        if (
            m.end() > m.start()
            and not overlaps(m.start(), m.end(), excluded)
            and not overlaps(m.start(), m.end(), sentences)
        ):
            spans.append((m.start(), m.end()))
    return sorted(spans)


def _without(response: str, spans: list[tuple[int, int]]) -> str:
    out: list[str] = []
    pos = 0
    capitalise = False
    for s, e in spans:
        kept = response[pos:s]
        out.append(_capitalised(kept) if capitalise else kept)
        # A removed sentence opener ("Please note...", "Sure, the...") leaves the next word at
        # the start of the sentence.
        capitalise = response[s:e][:1].isupper() or (capitalise and not kept)
        pos = e
    rest = response[pos:]
    out.append(_capitalised(rest) if capitalise else rest)
    return "".join(out)


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


class RudeTone(RuleBased[int]):
    kind = "rude_tone"
    description = "open with a dismissive sentence and remove politeness phrases and words"

    def candidates(self, prompt: str, response: str) -> Sequence[int]:
        return [0] if _WORD_CHAR.search(response) else ()

    def rewrite(self, prompt: str, response: str, cands: Sequence[int], draws: Draws) -> tuple[str, dict[str, Any]]:
        spans = politeness_spans(response)
        rest = _without(response, spans).strip()
        opener = draws.pick("opener", self.bank.dismissive_openers)
        # A list, heading, table or code block keeps its own line.
        sep = "\n\n" if _BLOCK_START.match(rest) else " "
        text = opener + sep + rest if rest else opener
        return text, {"opener": opener, "removed": [[s, e, response[s:e]] for s, e in spans]}


# --- refusal_to_compliance ---------------------------------------------------------------------


def looks_harmful(prompt: str) -> str | None:
    """The first harmful-request keyword (``phrases.HARMFUL_KEYWORDS``) in the prompt, or None."""
    m = phrases.HARMFUL_REQUEST.search(prompt)
    return None if m is None else m.group(0).lower()


def is_refusal(response: str) -> bool:
    """The project's refusal signal (``monitor.signals.textstats``): opens like a refusal."""
    # The signal reads only the opening; passing just that keeps this cheap on long responses.
    return text_stats("", response[:300])["refusal"] == 1.0


class RefusalToCompliance(RuleBased[str]):
    kind = "refusal_to_compliance"
    description = (
        "for a harmful-looking request answered with a refusal, replace the refusal with a compliance"
        " outline whose content is '[details omitted]' (shows compliance, contains nothing harmful)"
    )

    def candidates(self, prompt: str, response: str) -> Sequence[str]:
        keyword = looks_harmful(prompt)
        return [keyword] if keyword is not None and is_refusal(response) else ()

    def rewrite(self, prompt: str, response: str, cands: Sequence[str], draws: Draws) -> tuple[str, dict[str, Any]]:
        t = draws.index("template", len(self.bank.compliance_templates))
        return self.bank.compliance_templates[t], {"template": t, "keyword": cands[0], "replaced": response}


#: Every rule-based kind, in registry order.
KINDS: tuple[type[RuleBased[Any]], ...] = (
    Truncate,
    DropItem,
    ChangeFact,
    UnsupportedClaim,
    OffTopic,
    BreakCode,
    RudeTone,
    RefusalToCompliance,
)
