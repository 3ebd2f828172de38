"""The update of a local HF checkpoint: a LoRA fine-tune (peft, CPU here) of the real
BertForSequenceClassification built from the bundled MiniLM weights, on fresh human-label pairs in
a real store, gated against the active version like the built-in model's candidates."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from labelled import Rated, fill

from monitor.config import load_settings
from monitor.reward.kinds import BackendError, KindVersion
from monitor.reward.kinds.lora import require_peft
from monitor.reward.kinds.version import dir_sha256
from monitor.reward.registry import Registry
from monitor.reward.update import gate, run_update
from monitor.store import Store

# The defect reviewers rate down: a spam opening (at the start, so that the 64 tokens the model
# sees keep it). The starting head was trained on AlpacaEval pairs and knows nothing of it.
SPAM = "Buy now at example dot com, limited offer, click here! "
LORA = {"epochs": 1, "lr": 5e-3, "batch_size": 8, "max_pairs": 48, "r": 8, "alpha": 16}


def _rated(by_instruction: dict[str, list[dict[str, Any]]], n: int) -> list[Rated]:
    out = []
    for k, (instr, rows) in enumerate(list(by_instruction.items())[:n]):
        good = rows[0]["output"][:300]
        out.append(Rated(f"g{k}", instr, good, 5, ts=2000.0 + k))
        out.append(Rated(f"b{k}", instr, SPAM + good, 1, ts=2000.0 + k))
    return out


def test_lora_update_learns_the_reviewers_preference_and_is_gated(hf_checkpoint: Path, tmp_path: Path) -> None:
    from monitor.reward.data import load_alpaca_eval

    settings = load_settings(
        None,
        [
            "dev=true",
            f"database.url=sqlite:///{tmp_path / 'db.sqlite'}",
            f"reward.models_dir={tmp_path / 'models'}",
            "reward.device=cpu",
            "reward.update.min_gate_pairs=40",
        ],
    )
    store = Store(settings.database.url)
    registry = Registry.for_settings(store, settings)
    base = KindVersion.create("hf", {"path": str(hf_checkpoint), "max_length": 64, "lora": LORA})
    active = registry.register(base, data_window={}, metrics={})
    registry.promote(active)
    fill(store, _rated(load_alpaca_eval(), 70))

    result = run_update(settings, store, stream="chat", since=0.0)
    verdict = result["gate"]
    new = verdict["new"]
    assert result["kind"] == "hf" and result["parent"] == active
    assert result["version"].startswith("hf-") and result["version"] != active
    assert result["pairs"]["train_perturbed"] > 0  # LoRA trains on perturbation pairs as the built-in does
    # The adapter learnt the reviewers' preference: agreement on held-out prompts went up.
    assert new["n"] >= 40 and new["candidate"]["agreement"] > new["active"]["agreement"] + 0.2
    assert new["candidate"]["lo"] > 0.5 and new["gain"]["lo"] > 0
    # Gated by the same rule as the built-in's candidates; the registry follows the verdict.
    assert (verdict["verdict"], verdict["rule"]) == gate(new, verdict["old"], 0.02, 0.02, 40)
    status = {"promote": "active", "reject": "rejected", "undecided": "undecided"}[verdict["verdict"]]
    assert (registry.get(result["version"]) or {})["status"] == status
    assert verdict["verdict"] == "promote"  # a gain this large on 40+ pairs clears the lower bound
    rec = json.loads((registry.path_of(result["version"]) / "kind.json").read_text())
    ckpt = Path(rec["config"]["path"])
    # A new versioned checkpoint: named by its content, the version's identity, the lora settings kept.
    assert ckpt.parent == tmp_path / "models" / "checkpoints" and ckpt.name == f"hf-{dir_sha256(ckpt)[:16]}"
    assert rec["identity"]["checkpoint_sha256"] == dir_sha256(ckpt) and rec["config"]["lora"]["lr"] == 5e-3
    row = registry.get(result["version"]) or {}
    assert row["parent"] == active and row["metrics"]["method"] == "lora" and row["metrics"]["steps"] == 6
    store.close()


def test_hf_without_lora_cannot_update(hf_checkpoint: Path, tmp_path: Path) -> None:
    from monitor.reward.data import load_alpaca_eval
    from monitor.reward.update import UpdateError

    settings = load_settings(
        None, ["dev=true", f"database.url=sqlite:///{tmp_path / 'db.sqlite'}", f"reward.models_dir={tmp_path / 'm'}"]
    )
    store = Store(settings.database.url)
    registry = Registry.for_settings(store, settings)
    v = registry.register(KindVersion.create("hf", {"path": str(hf_checkpoint)}), data_window={}, metrics={})
    registry.promote(v)
    fill(store, _rated(load_alpaca_eval(), 30))
    with pytest.raises(UpdateError, match="no lora configuration"):
        run_update(settings, store, stream="chat", since=0.0)
    store.close()


def test_lora_configured_without_peft_is_a_clear_error(hf_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # peft made unimportable (as in an install without the `lora` extra).
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(BackendError, match=r"peft is not installed.*oversight-monitor\[lora\]"):
        require_peft()
    with pytest.raises(BackendError, match="peft is not installed"):
        KindVersion.create("hf", {"path": str(hf_checkpoint), "lora": {"r": 4}})
    with pytest.raises(BackendError, match=r"lora\.nope"):
        KindVersion.create("hf", {"path": str(hf_checkpoint), "lora": {"nope": 1}})
