"""Pair adapters on real data (bundled, tests/realdata.py): prompts split right, winners right, no leakage."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import pytest
from realdata import HH

from monitor.reward import data


@pytest.fixture(scope="module")
def alpaca_dir(real_data: Path) -> Path:
    return real_data / "alpaca_eval"


@pytest.fixture(scope="module")
def hh_pairs() -> list[data.Pair]:
    return data.hh_rlhf_pairs(HH)


@pytest.fixture(scope="module")
def alpaca_pairs(alpaca_dir: Path) -> list[data.Pair]:
    return data.alpaca_eval_pairs(alpaca_dir)


def test_hh_pairs_rebuild_the_original_dialogues(hh_pairs: list[data.Pair]) -> None:
    with gzip.open(HH, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    # Every row but the few whose two dialogues share no prompt or end identically.
    assert len(rows) - 10 <= len(hh_pairs) <= len(rows)
    originals = {(r["chosen"].strip(), r["rejected"].strip()) for r in rows}
    for p in hh_pairs:
        assert p["prompt"].startswith("Human:") and p["prompt"].endswith("Assistant:")
        assert p["chosen"] != p["rejected"]
        assert p["chosen"] or p["rejected"]  # an empty answer (silence) is a real, sometimes preferred, reply
    # The crowdworker's choice stays the chosen side: prompt + chosen is a chosen dialogue.
    rebuilt = {(f"{p['prompt']} {p['chosen']}", f"{p['prompt']} {p['rejected']}") for p in hh_pairs}
    normal = {(" ".join(c.split()), " ".join(r.split())) for c, r in originals}
    hits = sum((" ".join(c.split()), " ".join(r.split())) in normal for c, r in rebuilt)
    assert hits == len(hh_pairs)


def test_hh_prompt_with_assistant_inside_the_answer_falls_back_to_the_common_prefix() -> None:
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: rob a bank?\n\nAssistant: No.\n\nAssistant: Really no."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: rob a bank?\n\nAssistant: Sure, first..."
    prompt, c, r = data.split_dialogue(chosen, rejected) or ("", "", "")
    assert prompt.endswith("rob a bank?\n\nAssistant:")
    assert c == "No.\n\nAssistant: Really no." and r == "Sure, first..."
    assert data.split_dialogue("\n\nHuman: a\n\nAssistant: same", "\n\nHuman: a\n\nAssistant: same") is None


def test_alpaca_pairs_follow_the_judge(alpaca_dir: Path, alpaca_pairs: list[data.Pair]) -> None:
    prefs: dict[tuple[str, str], float] = {}
    for f in alpaca_dir.glob("*.jsonl.gz"):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                if row.get("judge_pref") is not None:
                    prefs[(row["generator"], row["instruction"])] = row["judge_pref"]

    def logit(p: float) -> float:
        p = min(max(p, 1e-4), 1 - 1e-4)
        return math.log(p / (1 - p))

    assert 2500 <= len(alpaca_pairs) <= 4 * 805
    for p in alpaca_pairs:
        win = prefs[(p["chosen_model"], p["prompt"])]
        lose = prefs[(p["rejected_model"], p["prompt"])]
        assert logit(win) - logit(lose) >= 1.0 - 1e-9
        assert p["chosen_model"] not in data.DEFAULT_EXCLUDE and p["rejected_model"] not in data.DEFAULT_EXCLUDE
    per_instruction: dict[str, int] = {}
    for p in alpaca_pairs:
        per_instruction[p["prompt"]] = per_instruction.get(p["prompt"], 0) + 1
    assert max(per_instruction.values()) <= 4


def test_alpaca_pairs_are_seeded(alpaca_dir: Path) -> None:
    a = data.alpaca_eval_pairs(alpaca_dir, pairs_per_instruction=2, seed=3)
    b = data.alpaca_eval_pairs(alpaca_dir, pairs_per_instruction=2, seed=3)
    c = data.alpaca_eval_pairs(alpaca_dir, pairs_per_instruction=2, seed=4)
    assert a == b
    assert a != c


def test_splits_never_share_a_prompt_group(hh_pairs: list[data.Pair], alpaca_pairs: list[data.Pair]) -> None:
    for pairs in (hh_pairs, alpaca_pairs):
        train, test = data.split_pairs(pairs, 0.2, seed=0)
        assert 0.1 < len(test) / len(pairs) < 0.3
        assert not {data.group_of(p) for p in train} & {data.group_of(p) for p in test}
        # Same instruction text, different group key would also leak: check the prompts too.
        assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    # HH groups by the first human turn, so two dialogues with the same opening stay together.
    train, test = data.split_pairs(hh_pairs, 0.2, seed=0)
    assert not {data.first_human_turn(p["prompt"]) for p in train} & {data.first_human_turn(p["prompt"]) for p in test}
    # A pair's side depends on its group only, not on the rest of the data.
    _, test_half = data.split_pairs(hh_pairs[::2], 0.2, seed=0)
    assert test_half == [p for p in test if p in hh_pairs[::2]]


def test_pairs_from_ratings_average_and_gap() -> None:
    records: list[dict[str, Any]] = [
        {"prompt": "q", "response": "good", "rating": 7},
        {"prompt": "q", "response": "good", "rating": 5},  # second reviewer: mean 6
        {"prompt": "q", "response": "ok", "rating": 5},
        {"prompt": "q", "response": "bad", "rating": 2},
        {"prompt": "q", "response": "skipped", "rating": None, "skipped": True},
        {"prompt": "other", "response": "alone", "rating": 7},
    ]
    pairs = data.pairs_from_ratings(records, min_gap=1.0)
    got = {(p["chosen"], p["rejected"]) for p in pairs}
    assert got == {("good", "ok"), ("good", "bad"), ("ok", "bad")}
    assert {(p["chosen"], p["rejected"]) for p in data.pairs_from_ratings(records, min_gap=2.0)} == {
        ("good", "bad"),
        ("ok", "bad"),
    }


def test_pairs_file_round_trip_and_validation(tmp_path: Path, hh_pairs: list[data.Pair]) -> None:
    for name in ("pairs.jsonl", "pairs.jsonl.gz"):
        path = tmp_path / name
        assert data.write_pairs(hh_pairs[:50], path) == 50
        assert data.read_pairs(path) == hh_pairs[:50]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        data.read_pairs(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="not JSON"):
        data.read_pairs(bad)


def test_heldout_model_split_keeps_test_models_and_instructions_out_of_training(alpaca_dir: Path) -> None:
    models = data.alpaca_eval_models(alpaca_dir)
    assert "NullModel" not in models and "claude-2" in models
    held = ["claude-2"]
    train, test = data.heldout_model_split(held, alpaca_dir, seed=3)
    assert train and test
    train_groups = {p["group"] for p in train}
    for p in train:
        assert "claude-2" not in (p["chosen_model"], p["rejected_model"])
    for p in test:
        assert "claude-2" in (p["chosen_model"], p["rejected_model"])
        assert p["group"] not in train_groups
        assert p["margin"] >= 1.0
    # Every qualifying pair of a held-out instruction is tested, not a sample of them.
    all_pairs = data.alpaca_eval_pairs(alpaca_dir, pairs_per_instruction=None, seed=3)
    test_groups = {p["group"] for p in test}
    expected = [
        p for p in all_pairs if p["group"] in test_groups and "claude-2" in (p["chosen_model"], p["rejected_model"])
    ]
    assert len(test) == len(expected)
    with pytest.raises(ValueError, match="no test models"):
        data.heldout_model_split([], alpaca_dir)


def test_model_folds_leave_the_development_models_out() -> None:
    models = [f"m{i}" for i in range(10)] + list(data.DEV_MODELS)
    folds = data.model_folds(models, 3)
    assert len(folds) == 3
    flat = [m for f in folds for m in f]
    assert sorted(flat) == sorted(f"m{i}" for i in range(10))
    assert not set(flat) & set(data.DEV_MODELS)
    with pytest.raises(ValueError):
        data.model_folds(models, 0)


def test_the_partner_view_is_the_list_it_stands_for() -> None:
    """Cross-prompt partners are drawn from a view of the indices far enough in rating, not from a
    list built by scanning every item for every item (quadratic in the labels ever stored): the
    view must be that list, element for element, so that the seeded draw picks the same pairs."""
    import random

    from monitor.reward.data import Partners

    rng = random.Random(3)
    for _ in range(2000):
        size = rng.randint(0, 30)
        low = rng.randint(0, size)
        high = rng.randint(low, size)
        skip = sorted(rng.sample(range(size), rng.randint(0, min(size, 5))))
        want = [j for j in range(size) if (j < low or j >= high) and j not in skip]
        view = Partners(low, high, size, skip)
        assert len(view) == len(want) and list(view) == want and view[:] == want
        if want:
            assert random.Random(7).sample(view, min(3, len(want))) == random.Random(7).sample(want, min(3, len(want)))
