"""Perturbation pairs for training: what they are made of, and what they must never touch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from labelled import Rated, fill
from realdata import alpaca_rows

from monitor.config import load_settings
from monitor.perturb import NAMES, make, make_seed_key, phrases
from monitor.perturb.phrases import PROBE_BANK, TRAINING_BANK
from monitor.reward.augment import answers_to_perturb, kinds_of, perturbation_pairs
from monitor.reward.registry import Registry
from monitor.reward.sensitivity import bundled_texts, gate_probe, probe_items
from monitor.reward.update import held_out, run_update
from monitor.store import Store


def _sentences(bank: phrases.Bank) -> set[str]:
    groups = (bank.claim_templates, bank.off_topic_sentences, bank.dismissive_openers, bank.compliance_templates)
    return {x.lower() for group in groups for x in group}


def test_the_training_bank_shares_no_sentence_with_the_probes() -> None:
    """Were training to insert the probe's own sentences, the gate would measure memory."""
    probe, training = _sentences(PROBE_BANK), _sentences(TRAINING_BANK)
    assert probe and training and not probe & training
    # Not even a long common stretch: the first six words of every sentence differ.
    heads = {" ".join(s.split()[:6]) for s in probe}
    assert not heads & {" ".join(s.split()[:6]) for s in training}


def test_probes_are_made_with_the_probe_bank_and_training_items_with_the_other() -> None:
    texts = bundled_texts()[:200]
    inserting = ["unsupported_claim", "off_topic", "rude_tone"]
    probes = probe_items([texts], seed=0, per_kind=20, kinds=inserting)
    assert probes and all(make(kind).apply(p.prompt, p.original, p.seed_key) == p for p in probes for kind in [p.kind])
    for p in probes:
        trained = make(p.kind, TRAINING_BANK).apply(p.prompt, p.original, p.seed_key)
        assert trained is not None and trained.perturbed != p.perturbed
        inserted = {x.split("{")[0].lower() for x in _sentences(PROBE_BANK)}
        assert any(head and head in p.perturbed.lower() for head in inserted)
        assert not any(head and head in trained.perturbed.lower() for head in inserted), trained.perturbed


def _records(n: int = 120) -> list[dict[str, Any]]:
    rows = alpaca_rows("gpt-3.5-turbo-1106")[:n]
    return [{"prompt": r["instruction"], "response": r["output"], "rating": 1 + i % 5} for i, r in enumerate(rows)]


def test_pairs_choose_the_reviewed_answer_over_its_worse_copy() -> None:
    records = _records()
    pairs = perturbation_pairs(records, per_kind=5, seed=3)
    counts = kinds_of(pairs)
    assert set(counts) <= set(NAMES) and max(counts.values()) == 5 and len(counts) >= 5
    rated = {(r["prompt"], r["response"]): r["rating"] for r in records}
    for p in pairs:
        assert rated[(p["prompt"], p["chosen"])] >= 3  # the median rating of these records
        assert p["rejected"] != p["chosen"] and p["group"] == p["prompt"] and "rejected_prompt" not in p
    assert perturbation_pairs(records, per_kind=5, seed=3) == pairs  # deterministic
    assert perturbation_pairs(records, per_kind=5, seed=4) != pairs
    assert perturbation_pairs(records, per_kind=0) == []


def test_excluded_prompts_are_never_perturbed() -> None:
    records = _records()
    everything = {p["prompt"] for p in perturbation_pairs(records, per_kind=40)}
    excluded = set(sorted(everything)[: len(everything) // 2])
    kept = perturbation_pairs(records, per_kind=40, exclude_prompts=excluded)
    assert kept and not {p["prompt"] for p in kept} & excluded
    assert all(prompt not in excluded for prompt, _ in answers_to_perturb(records, excluded, 0))


def test_skipped_and_unrated_records_are_left_alone() -> None:
    records = _records(10)
    for r in records:
        r["skipped"] = True
    assert perturbation_pairs([*records, {"prompt": "p", "response": "r", "rating": None}], per_kind=5) == []


def test_seed_keys_differ_from_the_probes() -> None:
    """A training item of a text is not the probe's edit of it with other words: its draws are
    keyed on another seed key, so where it cuts or inserts differs as well."""
    records = _records(60)
    pairs = {p["chosen"]: p for p in perturbation_pairs(records, per_kind=60, kinds=["truncate"])}
    same = 0
    for r in records:
        probe = make("truncate").apply(r["prompt"], r["response"], make_seed_key(r["prompt"], 0))
        if probe is not None and r["response"] in pairs:
            same += probe.perturbed == pairs[r["response"]]["rejected"]
    assert same < len(pairs) // 2


CHANGE = 10_000.0


def _fill(store: Store, n: int) -> None:
    """n instructions answered by gpt-3.5 before CHANGE and alpaca-7b after, each rated 1-5 by the
    judge's preference."""
    old = {r["instruction"]: r for r in alpaca_rows("gpt-3.5-turbo-1106")}
    new = [r for r in alpaca_rows("alpaca-7b") if r["instruction"] in old][:n]
    rated = []
    for i, r in enumerate(new):
        for side, row, ts in (("old", old[r["instruction"]], 100.0 + i), ("new", r, CHANGE + i)):
            rating = 1 + min(4, int(5 * float(row["judge_pref"])))
            rated.append(Rated(f"{side}-{i}", row["instruction"], row["output"], rating, ts=ts))
    fill(store, rated)


def test_an_update_trains_on_perturbation_pairs_away_from_what_the_gate_reads(
    tmp_path: Path, db_url: str, small_models: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The update's perturbed pairs reach training, are counted in its record, and answer none of
    the prompts the gate holds out or probes with; the gate measures on the probe drawn before."""
    import monitor.reward.train as train_module

    settings = load_settings(
        None,
        [
            "dev=true",
            f"database.url={db_url}",
            f"reward.models_dir={tmp_path / 'models'}",
            "reward.update.margin=0.0",
            "reward.update.sensitivity_pairs=10",
            "reward.update.perturbation_pairs=6",
            "reward.update.train={finetune_layers: 0, max_length: 64, epochs: 2, val_fraction: 0.0}",
        ],
    )
    store = Store(db_url)
    registry = Registry.for_settings(store, settings)
    registry.promote(registry.register(small_models["trained"], data_window={}, metrics={}))
    _fill(store, 120)
    trained_on: list[dict[str, Any]] = []
    bases: list[Any] = []
    real_train = train_module.train

    def spy(pairs: Any, *args: Any, **kwargs: Any) -> Any:
        trained_on.extend(pairs)
        bases.append(kwargs.get("base"))
        return real_train(pairs, *args, **kwargs)

    monkeypatch.setattr(train_module, "train", spy)
    probe = gate_probe(settings.reward.update, store, "chat")
    assert probe is not None and probe.from_stream > 0
    result = run_update(settings, store, stream="chat", since=CHANGE)

    perturbed = [p for p in trained_on if str(p.get("source", "")).startswith("perturbation:")]
    assert perturbed and result["pairs"]["train_perturbed"] == len(perturbed)
    rated = result["pairs"]["train_new"] + result["pairs"]["train_old"]
    assert len(perturbed) <= 0.25 * rated  # reward.update.perturbation_share
    assert max(kinds_of(perturbed).values()) == 6
    prompts = {p["prompt"] for p in perturbed}
    assert not prompts & probe.prompts
    assert not any(held_out(x, settings.reward.update.holdout_fraction) for x in prompts)
    assert result["gate"]["sensitivity"]["probe"]["pairs"] == len(probe.items)
    assert (registry.get(result["version"]) or {})["data_window"]["pairs"]["train_perturbed"] == len(perturbed)

    # The candidate trained from a copy of the active version (the default start).
    assert bases[0] is not None and bases[0].version == result["parent"]

    # 0 per kind: ratings only, as before; start: fresh trains from the base encoder.
    trained_on.clear()
    off = settings.model_copy(deep=True)
    off.reward.update.perturbation_pairs = 0
    off.reward.update.start = "fresh"
    assert run_update(off, store, stream="chat", since=CHANGE)["pairs"]["train_perturbed"] == 0
    assert trained_on and not any(str(p.get("source", "")).startswith("perturbation:") for p in trained_on)
    assert bases[1] is None


def test_a_cap_keeps_every_kind_in_turn() -> None:
    """``max_total`` (the update passes a share of the ratings' pairs) cuts every kind alike, so a
    few labels are not drowned and no kind is dropped for another."""
    records = _records()
    full = kinds_of(perturbation_pairs(records, per_kind=10))
    capped = perturbation_pairs(records, per_kind=10, max_total=2 * len(full))
    assert len(capped) == 2 * len(full) and kinds_of(capped) == dict.fromkeys(full, 2)
    assert capped == [p for p in perturbation_pairs(records, per_kind=10) if p in capped]  # the first of each
    assert perturbation_pairs(records, per_kind=10, max_total=0) == []
