"""Small real reward models for the registry, gate and scorer tests (trained once per session)."""

from __future__ import annotations

from typing import Any

import pytest

from monitor.reward.data import alpaca_eval_pairs, split_of


@pytest.fixture(scope="session")
def alpaca_split() -> dict[str, list[dict[str, Any]]]:
    pairs = alpaca_eval_pairs(pairs_per_instruction=2)
    out: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for p in pairs:
        out[split_of(p["group"])].append(p)
    return {"train": out["train"][:240], "test": out["test"][:160]}


@pytest.fixture(scope="session")
def small_models(alpaca_split: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """An untrained model and one trained for a few seconds (frozen encoder, short sequences)."""
    from monitor.reward.model import ModelConfig, RewardModel
    from monitor.reward.train import TrainConfig, train

    cfg = TrainConfig(finetune_layers=0, max_length=64, epochs=3, seed=0, val_fraction=0.0)
    trained, _ = train(alpaca_split["train"], cfg, progress=False)
    untrained = RewardModel.create(ModelConfig(finetune_layers=0, max_length=64), seed=1)
    return {"trained": trained, "untrained": untrained}
