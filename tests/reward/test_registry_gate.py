"""Registry and promotion gate with real (small) reward models and real AlpacaEval judge pairs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from monitor.config import load_settings
from monitor.metrics import Metrics
from monitor.review.stats import rm_agreement
from monitor.reward.registry import Registry, RegistryError
from monitor.reward.train import evaluate
from monitor.reward.update import decide, gate, render_gate
from monitor.store import Store


def _settings(tmp_path: Path, url: str) -> Any:
    # The held-out rule alone: an untrained head and a trained model see different flaws (the
    # trained one prefers longer answers), which the sensitivity rule would rightly refuse; that
    # rule has its own tests (test_rm_sensitivity.py).
    overrides = ["dev=true", f"database.url={url}", f"reward.models_dir={tmp_path / 'models'}"]
    return load_settings(None, [*overrides, "reward.update.sensitivity_pairs=0"])


def _side(n: int, cand: float, act: float | None, lo: float = 0.0, hi: float = 0.0) -> dict[str, Any]:
    """A side report as ``side_report`` builds it: agreements, and the gain with its bounds."""
    a = {"agreement": cand, "lo": cand - 0.05, "hi": cand + 0.05, "n_eff": n}
    if act is None:
        return {"n": n, "responses": n, "candidate": a, "active": None, "gain": None}
    g = {"gain": cand - act, "lo": lo, "hi": hi, "se": 0.02, "discordant": n / 4}
    return {"n": n, "responses": n, "candidate": a, "active": {**a, "agreement": act}, "gain": g}


def test_gate_rules() -> None:
    # The gain must be significant (lower bound above 0) and reach the margin, on enough pairs.
    assert gate(_side(300, 0.70, 0.60, 0.05, 0.15), _side(100, 0.66, 0.65, -0.05, 0.07), 0.02, 0.02, 100)[0] == (
        "promote"
    )
    # The same point gain, with an interval that straddles 0, or on too few pairs: undecided.
    verdict, why = gate(_side(300, 0.70, 0.60, -0.01, 0.2), None, 0.02, 0.02, 100)
    assert verdict == "undecided" and "straddles" in why
    verdict, why = gate(_side(60, 0.70, 0.60, 0.05, 0.15), None, 0.02, 0.02, 100)
    assert verdict == "undecided" and "min_gate_pairs" in why
    # Not better by the margin, surely: rejected.
    verdict, why = gate(_side(300, 0.61, 0.60, -0.01, 0.015), None, 0.02, 0.02, 100)
    assert verdict == "reject" and "new-window" in why
    # A significant drop on the old window beyond max_regression: rejected; a drop not significant: undecided.
    new = _side(300, 0.70, 0.60, 0.05, 0.15)
    verdict, why = gate(new, _side(100, 0.60, 0.65, -0.09, -0.01), 0.02, 0.02, 100)
    assert verdict == "reject" and "old-window" in why
    assert gate(new, _side(100, 0.60, 0.65, -0.12, 0.02), 0.02, 0.02, 100)[0] == "undecided"
    assert gate(None, None, 0.0, 0.0, 100)[0] == "reject"
    # No active version: the candidate must beat chance by the margin.
    assert gate(_side(50, 0.55, None), None, 0.02, 0.0, 100)[0] == "promote"
    assert gate(_side(50, 0.51, None), None, 0.02, 0.0, 100)[0] == "reject"


def test_gate_promotes_better_and_rejects_worse(
    tmp_path: Path, db_url: str, small_models: dict[str, Any], alpaca_split: dict[str, list[dict[str, Any]]]
) -> None:
    settings = _settings(tmp_path, db_url)
    store = Store(db_url)
    registry = Registry.for_settings(store, settings)
    metrics = Metrics()
    trained, untrained = small_models["trained"], small_models["untrained"]
    test = alpaca_split["test"]
    acc_t = evaluate(trained, test)["pairwise_accuracy"]
    acc_u = evaluate(untrained, test)["pairwise_accuracy"]
    assert acc_t > acc_u + 0.05, (acc_t, acc_u)  # the premise of the test

    split = {"holdout_new": test[:100], "holdout_old": test[100:], "train_new": [], "train_old": []}
    # First the untrained head is the active version (e.g. the bootstrap of a fresh install).
    v0 = registry.register(untrained, data_window={}, metrics={})
    assert registry.promote(v0) == 0
    verdict = decide(
        settings, registry, trained, untrained, split, data_window={"w": 1}, train_metrics={}, metrics=metrics
    )
    assert verdict["passed"] and verdict["verdict"] == "promote", verdict
    assert verdict["new"]["n"] == 100 and verdict["new"]["gain"]["lo"] > 0
    active = registry.active()
    assert active is not None and active[0] == verdict["version"] and active[2] == 1
    rows = {r["version"]: r for r in registry.versions()}
    assert rows[v0]["status"] == "retired" and rows[verdict["version"]]["status"] == "active"
    assert rows[verdict["version"]]["gate"]["candidate_new"] == pytest.approx(verdict["candidate_new"])

    # A worse candidate (another untrained head) is kept but rejected; the active one stays.
    worse = type(untrained).create(untrained.config, seed=7)
    verdict2 = decide(settings, registry, worse, trained, split, data_window={}, train_metrics={}, metrics=metrics)
    assert not verdict2["passed"] and verdict2["verdict"] == "reject", verdict2
    assert registry.active() == active
    assert {r["version"]: r["status"] for r in registry.versions()}[verdict2["version"]] == "rejected"
    assert (Path(settings.reward.models_dir) / verdict2["version"]).is_dir()
    assert metrics.rm_updates.labels("promoted")._value.get() == 1
    assert metrics.rm_updates.labels("rejected")._value.get() == 1


def test_a_promotion_over_a_version_changed_since_the_gate_is_held(
    tmp_path: Path, db_url: str, small_models: dict[str, Any], alpaca_split: dict[str, list[dict[str, Any]]]
) -> None:
    """An update gates against the version active when it started; a rollback (or another update)
    while it trained made another one active. Its promotion overwrote that: it is kept undecided
    now, to be gated again against what is active, and the rollback stands."""
    settings = _settings(tmp_path, db_url)
    registry = Registry.for_settings(Store(db_url), settings)
    trained, untrained = small_models["trained"], small_models["untrained"]
    test = alpaca_split["test"]
    split = {"holdout_new": test[:100], "holdout_old": test[100:], "train_new": [], "train_old": []}
    v0 = registry.register(untrained, data_window={}, metrics={})
    registry.promote(v0)
    seen = registry.generation()  # what the update read before it trained
    other = registry.register(type(untrained).create(untrained.config, seed=3), data_window={}, metrics={})
    registry.promote_by_hand(other, "rolled back meanwhile", "alice")
    verdict = decide(settings, registry, trained, untrained, split, data_window={}, train_metrics={}, generation=seen)
    assert verdict["verdict"] == "undecided" and not verdict["passed"], verdict
    assert "active version changed since the gate" in verdict["rule"]
    active = registry.active()
    assert active is not None and active[0] == other
    assert registry.get(verdict["version"])["status"] == "undecided"  # type: ignore[index]


def test_a_candidate_that_is_the_active_version_changes_nothing(
    tmp_path: Path, db_url: str, small_models: dict[str, Any], alpaca_split: dict[str, list[dict[str, Any]]]
) -> None:
    """Early stopping kept the start: the candidate has the active version's weights and id. Its
    verdict was written on the active version's row (marked rejected while active, an override
    erased); nothing is written now."""
    settings = _settings(tmp_path, db_url)
    registry = Registry.for_settings(Store(db_url), settings)
    trained = small_models["trained"]
    v = registry.register(trained, data_window={}, metrics={})
    registry.promote(v)
    before = registry.get(v)
    test = alpaca_split["test"]
    split = {"holdout_new": test[:100], "holdout_old": test[100:], "train_new": [], "train_old": []}
    verdict = decide(settings, registry, trained, trained, split, data_window={}, train_metrics={})
    assert verdict["verdict"] == "unchanged" and not verdict["passed"] and verdict["version"] == v
    assert registry.get(v) == before
    assert "nothing changed" in render_gate(verdict)


def test_a_candidate_the_new_window_rejects_is_rejected_whatever_the_old_window() -> None:
    """An old-window loss that is not significant made the verdict undecided before the new
    window's reject rule was read: the request waited for labels that could not change it."""
    worse_new = _side(300, 0.60, 0.62, -0.06, 0.01)
    doubtful_old = _side(100, 0.60, 0.65, -0.12, 0.02)
    verdict, why = gate(worse_new, doubtful_old, 0.02, 0.02, 100)
    assert verdict == "reject" and "new-window" in why, why


def test_registry_load_active_round_trip(tmp_path: Path, small_models: dict[str, Any]) -> None:
    store = Store("sqlite://")
    registry = Registry(store, tmp_path / "models")
    assert registry.active() is None and registry.load_active() is None
    with pytest.raises(RegistryError):
        registry.promote("rm-nope")
    v = registry.register(small_models["trained"], data_window={}, metrics={"x": 1})
    assert registry.register(small_models["trained"], data_window={}, metrics={}) == v  # idempotent
    registry.promote(v)
    loaded = registry.load_active()
    assert loaded is not None
    model, gen = loaded
    texts = (["Name a colour.", "Say hi."], ["Blue.", "Hello! How can I help you today?"])
    assert model.score(*texts) == small_models["trained"].score(*texts)
    assert gen == 0 and model.version == v


def test_a_person_promotes_a_rejected_version_on_the_record(
    tmp_path: Path, small_models: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """``oversight rm promote``: the gate's refusal stays in the record, with who overrode it and
    why; the active version's generation moves on, so running scorers swap to it."""
    from monitor.cli.app import main

    url = f"sqlite:///{tmp_path / 'o.db'}"
    store = Store(url)
    registry = Registry(store, tmp_path / "models")
    v0 = registry.register(small_models["untrained"], data_window={}, metrics={})
    registry.promote(v0)
    v1 = registry.register(small_models["trained"], data_window={}, metrics={})
    refusal = {"passed": False, "verdict": "reject", "reason": "sensitivity lost: off_topic 0.90 -> 0.30"}
    registry.reject(v1, refusal)
    common = ["--db", url, "--set", f"reward.models_dir={tmp_path / 'models'}", "--dev"]

    # No reason, an unknown version, a version whose files are gone: refused, nothing changes.
    assert main(["rm", "promote", "--version", v1, "--reason", "  ", *common]) == 2
    assert "a reason is required" in capsys.readouterr().err
    assert main(["rm", "promote", "--version", "rm-nope", "--reason", "x", *common]) == 2
    assert "unknown version rm-nope" in capsys.readouterr().err
    assert registry.active() == (v0, registry.path_of(v0), 0)

    code = main(
        ["rm", "promote", "--version", v1, "--reason", "ranks the new policy 0.84 vs 0.20", "--by", "ana", *common]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {
        "version": v1,
        "active": True,
        "generation": 1,
        "changed": True,
        "status_before": "rejected",
        "replaced": v0,
    }
    rows = {r["version"]: r for r in registry.versions()}
    assert rows[v1]["status"] == "active" and rows[v0]["status"] == "retired"
    gate_record = rows[v1]["gate"]
    assert {k: gate_record[k] for k in refusal} == refusal  # the gate's verdict is kept as it was
    override = gate_record["override"]
    assert (override["by"], override["reason"]) == ("ana", "ranks the new policy 0.84 vs 0.20")
    assert (override["status_before"], override["verdict_before"]) == ("rejected", "reject")
    assert registry.generation() == 1
    # The admin page and summary say so.
    settings = load_settings(None, ["dev=true", f"database.url={url}", f"reward.models_dir={tmp_path / 'models'}"])
    shown = rm_agreement(store, settings)
    assert shown is not None and shown["active version"] == v1
    assert shown["made active by hand"] == "by ana over the gate's verdict reject: ranks the new policy 0.84 vs 0.20"

    # Again: nothing to do. A rollback to the retired version is the same command.
    assert main(["rm", "promote", "--version", v1, "--reason", "again", *common]) == 0
    assert json.loads(capsys.readouterr().out)["changed"] is False
    shutil.rmtree(registry.path_of(v0))
    assert main(["rm", "promote", "--version", v0, "--reason", "rollback", *common]) == 2
    assert "has no files" in capsys.readouterr().err and registry.active() == (v1, registry.path_of(v1), 1)
    store.close()
