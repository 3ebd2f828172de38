"""Perturbations: one contract for every registered kind (conformance), then each kind's checkable
property on real bundled texts (AlpacaEval answers and HH-RLHF dialogues), better variants, and
the sensitivity measurement."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.data import bundled_records
from monitor.perturb import (
    MAX_CHARS,
    NAMES,
    STRONGER,
    KnownAnswer,
    Perturbation,
    Perturbed,
    all_perturbations,
    applicable,
    better_variant,
    bundled_known_answers,
    choose,
    is_refusal,
    looks_harmful,
    make,
    make_seed_key,
    phrases,
    sensitivity,
    undo,
)
from monitor.perturb.better import DEMO_TRAFFIC, HH_PAIRS
from monitor.perturb.text import code_spans, detect_lists, fenced_bodies, fenced_spans

REPO = Path(__file__).resolve().parents[2]
Text = tuple[str, str, str]  # (id, prompt, response)


@cache
def all_texts() -> tuple[Text, ...]:
    out: list[Text] = []
    for r in bundled_records(DEMO_TRAFFIC):
        if isinstance(r.get("prompt"), str) and isinstance(r.get("response"), str):
            out.append((str(r["episode_id"]), r["prompt"], r["response"]))
    for i, r in enumerate(bundled_records(HH_PAIRS)):
        out.append((f"hh-{i}-chosen", r["prompt"], r["chosen"]))
        out.append((f"hh-{i}-rejected", r["prompt"], r["rejected"]))
    return tuple(out)


@cache
def sample() -> tuple[Text, ...]:
    """A fixed spread of real texts that keeps the suite fast: every 9th, plus every text with a
    fenced code block or a refusal of a harmful-looking request (rare kinds need their few texts)."""
    texts = all_texts()
    rare = [t for t in texts if "```" in t[2] or (looks_harmful(t[1]) and is_refusal(t[2]))]
    return tuple(dict.fromkeys([*texts[::9], *rare]))


@cache
def real_items(kind: str) -> tuple[tuple[Text, Perturbed], ...]:
    p = make(kind)
    out = []
    for t in sample():
        item = p.apply(t[1], t[2], make_seed_key(t[0]))
        if item is not None:
            out.append((t, item))
    return tuple(out)


kinds = pytest.mark.parametrize("kind", NAMES)

# --- conformance: every kind ---------------------------------------------------------------------


def test_registry() -> None:
    assert len(NAMES) == len(set(NAMES)) >= 8
    assert [p.kind for p in all_perturbations()] == list(NAMES)
    with pytest.raises(ValueError, match="unknown perturbation"):
        make("no_such_kind")
    with pytest.raises(ValueError, match="unknown perturbation kinds"):
        choose("p", "r", "s", kinds=["truncate", "nope"])
    with pytest.raises(TypeError):
        choose("p", "r", "s", kinds="truncate")


@kinds
def test_contract_on_real_texts(kind: str) -> None:
    p = make(kind)
    assert isinstance(p, Perturbation)
    assert p.kind == kind and p.description
    items = dict(real_items(kind))
    assert items, f"{kind} applies to none of the sampled real texts"
    for t in sample():
        item = items.get(t)
        # applies() is exact: True iff apply() returns an item.
        assert p.applies(t[1], t[2]) == (item is not None), (kind, t[0])
        if item is None:
            continue
        assert item.kind == kind and item.direction == "worse"
        assert item.prompt == t[1] and item.original == t[2] and item.seed_key == make_seed_key(t[0])
        assert item.perturbed != item.original and item.chars_changed > 0
        assert item.worse == item.perturbed and item.better == item.original
        assert Perturbed.from_dict(json.loads(json.dumps(item.to_dict()))) == item


@kinds
def test_deterministic_per_item_and_seed(kind: str) -> None:
    p = make(kind)
    pairs = real_items(kind)[:40]
    first = [p.apply(t[1], t[2], make_seed_key(t[0], 7)) for t, _ in pairs]
    # Same inputs, reverse order of calls: same items.
    again = [p.apply(t[1], t[2], make_seed_key(t[0], 7)) for t, _ in reversed(pairs)][::-1]
    assert first == again
    # Another seed draws other edits for some texts (every kind but the single-edit ones).
    other = [p.apply(t[1], t[2], make_seed_key(t[0], 8)) for t, _ in pairs]
    if kind not in ("refusal_to_compliance",):
        assert any(a != b for a, b in zip(first, other, strict=True))


# Run in a fresh interpreter under different hash seeds: same choices, same edits.
DIGEST_SCRIPT = """
import hashlib, json, itertools
from monitor.perturb import choose, make_seed_key
from monitor.data import bundled_records
from monitor.perturb.better import DEMO_TRAFFIC
rows = [r for r in itertools.islice(bundled_records(DEMO_TRAFFIC), 400) if isinstance(r.get("response"), str)][::5]
items = [choose(r["prompt"], r["response"], make_seed_key(str(r["episode_id"]), 3)) for r in rows]
blob = json.dumps([None if i is None else i.to_dict() for i in items], sort_keys=True)
print(len(rows), hashlib.sha256(blob.encode()).hexdigest())
"""


def test_deterministic_across_processes() -> None:
    """No hash-seeded set order or global random state leaks into a choice."""
    digests = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run(
            [sys.executable, "-c", DIGEST_SCRIPT],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        digests.add(out.stdout.strip())
    assert len(digests) == 1 and next(iter(digests)).startswith("80 ")


def test_choose_draws_an_applicable_kind() -> None:
    seen: set[str] = set()
    for t in sample()[:150]:
        ok = applicable(t[1], t[2])
        item = choose(t[1], t[2], make_seed_key(t[0]))
        assert (item is None) == (not ok)
        if item is not None:
            assert item.kind in ok
            assert item == make(item.kind).apply(t[1], t[2], make_seed_key(t[0]))
            seen.add(item.kind)
        restricted = choose(t[1], t[2], make_seed_key(t[0]), kinds=["rude_tone"])
        assert restricted is not None and restricted.kind == "rude_tone"
    assert len(seen) >= 5


# Pieces that trigger every rule, glued together by hypothesis with arbitrary text between.
PIECES = [
    "```python\n",
    "```",
    "\n",
    "\n\n",
    "1. ",
    "2) ",
    "- ",
    "  * ",
    "Step 3: ",
    ". ",
    "! ",
    "e.g. ",
    "Please ",
    "Sure, ",
    "I hope this helps. ",
    "I'm sorry, but I can't. ",
    "1999",
    "1,250.75",
    "7",
    "May",
    "Paris",
    " Marie Curie ",
    " a < b ",
    " x + 1 ",
    "range(n)",
    "`code`",
    "https://x.org/a.b",
    "\ud800",
    "\u2028",
    "🙂",
    "Ω",
]
fuzz_text = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=30)), max_size=40).map("".join)


def _check_item(kind: str, prompt: str, response: str, seed_key: str) -> None:
    p = make(kind)
    item = p.apply(prompt, response, seed_key)
    assert p.applies(prompt, response) == (item is not None)
    if item is not None:
        assert item.kind == kind and item.original == response and item.perturbed != response
        json.dumps(item.detail)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=fuzz_text, response=fuzz_text, seed=st.text(max_size=8))
def test_never_raises_on_any_input(prompt: str, response: str, seed: str) -> None:
    for kind in NAMES:
        _check_item(kind, prompt, response, seed)
    choose(prompt, response, seed)


def test_never_raises_on_edge_inputs() -> None:
    huge = "1. Paris is nice. " * (MAX_CHARS // 10)
    cases = ["", " ", "\n" * 50, "\x00", "\ud800\udfff", "```", "a" * MAX_CHARS, "1" * 5000 + "a", huge[:MAX_CHARS]]
    for kind in NAMES:
        for text in cases:
            _check_item(kind, "How do I kill a process? " + text, text, "s")
        # Over the cap: never perturbed, whatever the text.
        assert make(kind).apply("kill", huge, "s") is None
        assert not make(kind).applies("kill", huge)


# --- each kind's property on real texts -----------------------------------------------------------


def test_truncate_is_a_prefix_cut_mid_sentence() -> None:
    for _, item in real_items("truncate"):
        o, cut = item.original, item.detail["cut"]
        assert item.perturbed == o[:cut] and 0 < cut < len(o)
        assert 0.3 <= cut / len(o) <= 0.7
        # After a word, and the sentence goes on on the same line.
        assert re.match(r"\w", o[cut - 1]) and o[cut] in " \t"
        assert re.match(r"[ \t]+\w", o[cut:])


def _numbers_normalised(text: str) -> str:
    return re.sub(r"(?m)^([ \t]*)\d{1,3}([.)])", r"\1#\2", re.sub(r"([Ss]tep[ \t]+)\d{1,3}", r"\1#", text))


def test_drop_item_removes_exactly_one_item() -> None:
    renumbered = 0
    for _, item in real_items("drop_item"):
        o, d = item.original, item.detail
        before = [x for x in detect_lists(o, fenced_spans(o)) if len(x.items) == d["items"]]
        assert before
        removed = o[d["start"] : d["end"]]
        assert removed == d["removed"]
        # Numbers aside, the text is the original without the removed span.
        assert _numbers_normalised(item.perturbed) == _numbers_normalised(o[: d["start"]] + o[d["end"] :])
        after_counts = [
            len(x.items) for x in detect_lists(item.perturbed, fenced_spans(item.perturbed)) if x.kind == d["list"]
        ]
        assert d["items"] - 1 in after_counts or d["items"] - 1 == 1  # a list of one is no list here
        if d["renumbered"]:
            renumbered += 1
            lst = next(
                x
                for x in detect_lists(item.perturbed, fenced_spans(item.perturbed))
                if len(x.items) == d["items"] - 1 and x.sequential
            )
            assert lst.kind == d["list"]
    assert renumbered > 0


def test_drop_item_renumbers_a_numbered_list() -> None:
    text = "Steps:\n\n1. Mix.\n2. Knead.\n3. Rest.\n4. Bake.\n\nEnjoy."
    for seed in range(12):
        item = make("drop_item").apply("How?", text, str(seed))
        assert item is not None
        lines = [ln for ln in item.perturbed.splitlines() if re.match(r"\d\. ", ln)]
        assert [ln[:2] for ln in lines] == ["1.", "2.", "3."]
        assert item.perturbed.endswith("\n\nEnjoy.")
        kept = {ln[3:] for ln in lines}
        assert len({"Mix.", "Knead.", "Rest.", "Bake."} - kept) == 1


def test_change_fact_changes_exactly_one_token() -> None:
    rules: set[str] = set()
    for _, item in real_items("change_fact"):
        o, d = item.original, item.detail
        rules.add(d["rule"])
        assert o[d["start"] : d["end"]] == d["old"] and d["new"] != d["old"]
        assert item.perturbed == o[: d["start"]] + d["new"] + o[d["end"] :]
        assert not any(s <= d["start"] < e for s, e in code_spans(o))
        if d["rule"] == "year":
            assert 2 <= abs(int(d["new"]) - int(d["old"])) <= 24 and 1500 <= int(d["new"]) <= 2099
        elif d["rule"] == "small_int":
            assert int(d["old"]) < 10 and 2 <= int(d["new"]) <= 9
        elif d["rule"] == "scale":
            old, new = float(d["old"].replace(",", "")), float(d["new"].replace(",", ""))
            assert new != old and len(d["new"].partition(".")[2]) == len(d["old"].partition(".")[2])
        elif d["rule"] in ("month", "weekday"):
            names = phrases.MONTHS if d["rule"] == "month" else phrases.WEEKDAYS
            assert d["old"] in names and d["new"] in names
        elif d["rule"] == "entity_set":
            assert any(d["old"] in s and d["new"] in s for s in phrases.ENTITY_SETS)
        else:
            assert d["rule"] == "entity_text" and d["new"] in o
    assert {"year", "small_int", "scale", "entity_set", "entity_text"} <= rules


def test_change_fact_rules_on_known_text() -> None:
    text = "The treaty was signed in Paris in 1848, by 7 delegates, for $1,200.50 in total."
    rules = set()
    for seed in range(40):
        item = make("change_fact").apply("When?", text, str(seed))
        assert item is not None
        d = item.detail
        rules.add(d["rule"])
        if d["old"] == "1848":
            assert d["new"] not in ("1847", "1849")
    assert rules == {"year", "small_int", "scale", "entity_set"}


def _check_insertion(item: Perturbed, sentences: set[str]) -> None:
    o, d = item.original, item.detail
    at = d["offset"]
    assert item.perturbed == o[:at] + d["inserted"] + o[at:]
    assert d["inserted"].startswith(" ") and d["inserted"].strip() in sentences
    # At a sentence boundary: after closing punctuation, before whitespace or the end.
    assert o[at - 1] in ".!?\"')]”’" and (at == len(o) or o[at].isspace())
    assert not any(s <= at < e for s, e in code_spans(o))


def test_unsupported_claim_inserts_one_templated_sentence_on_topic() -> None:
    for t, item in real_items("unsupported_claim"):
        topic = item.detail["topic"]
        assert topic.lower() in (t[1] + " " + t[2]).lower()
        _check_insertion(item, {phrases.CLAIM_TEMPLATES[item.detail["template"]].format(topic=topic)})


def test_off_topic_inserts_one_bundled_sentence() -> None:
    for _, item in real_items("off_topic"):
        _check_insertion(item, set(phrases.OFF_TOPIC_SENTENCES))


def test_break_code_changes_one_operator_or_bound_in_code() -> None:
    swaps = {("<", "<="), ("<=", "<"), (">", ">="), (">=", ">"), ("==", "!="), ("!=", "=="), ("+", "-"), ("-", "+")}
    items = real_items("break_code")
    assert len(items) >= 10
    for _, item in items:
        o, d = item.original, item.detail
        assert o[d["start"] : d["end"]] == d["old"]
        assert item.perturbed == o[: d["start"]] + d["new"] + o[d["end"] :]
        assert any(s <= d["start"] < e for s, e in fenced_bodies(o))
        if d["rule"] == "range_bound":
            assert d["new"] == d["old"].strip() + " - 1"
        elif d["old"] in {a for a, _ in swaps}:
            assert (d["old"], d["new"]) in swaps
    for text in ("No code here: a < b.", "```\n# a + b in a comment\nx = 'a + b'\n```"):
        assert not make("break_code").applies("p", text)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def test_rude_tone_opens_dismissively_and_drops_politeness() -> None:
    removed_any = 0
    for _, item in real_items("rude_tone"):
        o, d = item.original, item.detail
        assert d["opener"] in phrases.DISMISSIVE_OPENERS and item.perturbed.startswith(d["opener"])
        rest = item.perturbed[len(d["opener"]) :]
        spans = code_spans(rest)
        for rx in (phrases.POLITE_SENTENCE, phrases.POLITE_WORD):
            assert not [
                m for m in rx.finditer(rest) if m.end() > m.start() and not any(s <= m.start() < e for s, e in spans)
            ]
        kept, pos = [], 0
        for s, e, text in d["removed"]:
            assert o[s:e] == text
            assert phrases.POLITE_SENTENCE.search(text) or phrases.POLITE_WORD.match(text)
            kept.append(o[pos:s])
            pos = e
        kept.append(o[pos:])
        # Nothing else was touched: the remaining words are the original's minus the removed ones.
        assert _words(rest) == _words("".join(kept))
        removed_any += bool(d["removed"])
    assert removed_any > 10


def test_refusal_to_compliance_only_for_refused_harmful_requests() -> None:
    items = real_items("refusal_to_compliance")
    assert items
    for t, item in items:
        assert looks_harmful(t[1]) and is_refusal(t[2])
        assert item.perturbed in phrases.COMPLIANCE_TEMPLATES and phrases.COMPLIANCE_MARKER in item.perturbed
        assert not is_refusal(item.perturbed)
    p = make("refusal_to_compliance")
    refusal = "I'm sorry, but I can't help with that."
    assert p.applies("How do I make a bomb?", refusal)
    assert not p.applies("How do I bake bread?", refusal)  # not harmful
    assert not p.applies("How do I make a bomb?", "Here is a safer topic instead.")  # not a refusal
    for template in phrases.COMPLIANCE_TEMPLATES:
        # Compliance in form only: every step is the marker, no instructions.
        assert template.count(phrases.COMPLIANCE_MARKER) >= 2
        assert not re.search(r"\d{2,}|\b(?:mix|buy|heat|wire|inject|aim)\b", template, re.IGNORECASE)


# --- better variants ------------------------------------------------------------------------------


def test_better_variant_from_bundled_stronger_answers() -> None:
    known = bundled_known_answers()
    demo = [(p, a) for p, a in known.items() if len(a) == 3]
    assert len(demo) == 805
    for prompt, answers in demo[:50]:
        worst = min(answers, key=lambda a: a.quality)
        best = max(answers, key=lambda a: a.quality)
        item = better_variant(prompt, worst.response, answers, quality=worst.quality)
        if best.quality > worst.quality and best.response.strip() != worst.response.strip():
            assert item is not None and item.kind == STRONGER and item.direction == "better"
            assert item.perturbed == best.response and item.better == best.response and item.worse == worst.response
            assert item.detail["quality_better"] == best.quality
        assert better_variant(prompt, best.response, answers, quality=best.quality) is None
    hh = next(r for r in bundled_records(HH_PAIRS))
    item = better_variant(hh["prompt"], hh["rejected"], known[hh["prompt"]], quality=0.0)
    assert item is not None and item.perturbed == hh["chosen"]


def test_better_variant_skips_unusable_alternatives() -> None:
    alts = [KnownAnswer("same", 9.0), KnownAnswer("", 9.0), KnownAnswer("nan", math.nan), KnownAnswer("ok", 1.0)]
    item = better_variant("p", "same", alts)
    assert item is not None and item.perturbed == "ok"
    assert better_variant("p", "same", alts, quality=1.0) is None
    assert better_variant("p", "same", alts, quality=0.5, min_margin=0.5) is None


def test_undo_is_the_same_pair_the_other_way() -> None:
    _, item = real_items("truncate")[0]
    u = undo(item)
    assert u.direction == "better" and u.kind == item.kind and u.detail["undo"] is True
    assert (u.worse, u.better) == (item.worse, item.better)
    assert undo(u) == item


# --- sensitivity ----------------------------------------------------------------------------------


def test_sensitivity_counts_strictly_lower_worse_scores() -> None:
    trunc = [it for _, it in real_items("truncate")][:30]
    calls: list[int] = []

    def length(texts: Any) -> list[float]:
        calls.append(len(texts))
        return [float(len(r)) for _, r in texts]

    res = sensitivity(length, trunc, batch_size=16)
    assert res["truncate"].n == 30 and res["truncate"].detected == 30 and res["truncate"].rate == 1.0
    # Wilson at k = n: the interval still has width (a normal interval would collapse to [1, 1]).
    assert res["truncate"].ci_high == 1.0 and 0.85 < res["truncate"].ci_low < 1.0
    assert max(calls) <= 16 and sum(calls) == len({(i.prompt, t) for i in trunc for t in (i.original, i.perturbed)})
    # Ties are not detections.
    flat = sensitivity(lambda texts: [0.0] * len(texts), trunc)["truncate"]
    assert flat.detected == 0 and flat.ci_low == 0.0 and 0.0 < flat.ci_high < 0.15
    # A "better" item compares the same way: its worse side is the original.
    assert sensitivity(length, [undo(i) for i in trunc])["truncate"].detected == 30
    # Reversed scorer: nothing detected.
    assert sensitivity(lambda ts: [-float(len(r)) for _, r in ts], trunc)["truncate"].detected == 0


def test_sensitivity_wilson_interval_and_per_kind_split() -> None:
    items = [it for _, it in real_items("truncate")][:10] + [it for _, it in real_items("off_topic")][:10]
    res = sensitivity(lambda ts: [float(len(r)) for _, r in ts], items)
    assert set(res) == {"truncate", "off_topic"}
    assert res["off_topic"].detected == 0  # insertions make it longer
    half = sensitivity(lambda ts: [float(len(r)) for _, r in ts], items[:5] + items[10:15])
    assert half["truncate"].n == 5
    # k = 5 of n = 10 at 95%: Wilson (0.2366, 0.7634).
    from monitor.perturb.sensitivity import Sensitivity

    five = [*items[:5], *[undo(undo(i)) for i in items[10:15]]]
    mixed = sensitivity(
        lambda ts: [float(len(r)) for _, r in ts], [Perturbed(**{**i.to_dict(), "kind": "k"}) for i in five]
    )
    assert isinstance(mixed["k"], Sensitivity) and mixed["k"].detected == 5
    assert mixed["k"].ci_low == pytest.approx(0.2366, abs=1e-4) and mixed["k"].ci_high == pytest.approx(
        0.7634, abs=1e-4
    )


def test_sensitivity_refuses_a_broken_scorer() -> None:
    items = [it for _, it in real_items("truncate")][:3]
    with pytest.raises(ValueError, match="non-finite"):
        sensitivity(lambda ts: [math.nan] * len(ts), items)
    with pytest.raises(ValueError, match="scores for"):
        sensitivity(lambda ts: [1.0], items)
    with pytest.raises(ValueError, match="confidence"):
        sensitivity(lambda ts: [1.0] * len(ts), items, confidence=1.0)
