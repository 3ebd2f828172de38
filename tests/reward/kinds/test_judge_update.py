"""The update of a remote judge, end to end on a real store with real AlpacaEval labels: an
isotonic calibration on the fresh labels (a new version, gated), a training request through the
action sinks, and the retrained endpoint the owner registers later, gated on the held-out labels
(STAND-IN judges: local OpenAI-compatible servers; no LLM runs here)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from labelled import Rated, alpaca_rated, fill
from standin import StandIn, chat_answer_by, serve

from monitor.actions.dispatch import dispatch_pending
from monitor.actions.sinks import make_sinks
from monitor.config import Settings, load_settings
from monitor.reward.kinds import KindVersion
from monitor.reward.kinds.calibration import apply, fit_isotonic, pava
from monitor.reward.kinds.gate import gate_version
from monitor.reward.registry import Registry
from monitor.reward.update import gate, run_update
from monitor.store import Store
from monitor.store import requests as rq

OVERSIGHT = [sys.executable, "-m", "monitor.cli"]


# --- isotonic regression (PAVA) ---------------------------------------------------------------


def _brute_isotonic(y: list[float]) -> np.ndarray:
    """The isotonic fit by its definition: at each point, max over windows starting before it of
    the min over windows ending after it of the window's mean (the min-max formula)."""
    n = len(y)

    def mean(i: int, j: int) -> float:
        return sum(y[i : j + 1]) / (j - i + 1)

    return np.array([max(min(mean(i, j) for j in range(k, n)) for i in range(k + 1)) for k in range(n)])


def test_pava_matches_the_min_max_formula() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        y = rng.integers(1, 8, size=int(rng.integers(1, 15))).astype(float).tolist()
        fit = pava(y)
        assert np.all(np.diff(fit) >= -1e-12)
        assert fit == pytest.approx(_brute_isotonic(y))
    assert pava([3.0, 1.0, 1.0], [1.0, 1.0, 2.0]).tolist() == pytest.approx([1.5, 1.5, 1.5])  # weighted means


def test_fit_isotonic_maps_raw_scores_onto_ratings() -> None:
    raw = [1.0, 2.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    rating = [1.0, 3.0, 1.0, 2.0, 5.0, 4.0, 7.0]
    cal = fit_isotonic(raw, rating)
    assert cal.labels == 7 and list(cal.x) == sorted(cal.x)
    mapped = apply(cal, raw)
    assert np.all(np.diff(mapped) >= 0)  # monotone: never reverses an order
    assert mapped[0] == pytest.approx(1.0) and mapped[-1] == pytest.approx(7.0)
    assert float(np.mean(mapped)) == pytest.approx(float(np.mean(rating)), abs=0.5)
    with pytest.raises(ValueError, match="no order"):
        fit_isotonic([2.0, 2.0], [1.0, 5.0])
    with pytest.raises(ValueError, match="finite"):
        fit_isotonic([1.0, float("nan")], [1.0, 5.0])


# --- the update path ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rated() -> list[Rated]:
    from monitor.reward.data import load_alpaca_eval

    return alpaca_rated(load_alpaca_eval(), 150)


@pytest.fixture
def oracle(rated: list[Rated]) -> Iterator[StandIn]:
    """STAND-IN for a better (retrained) judge: it mostly agrees with the reviewers."""
    by_text = {r.response: r.rating for r in rated}
    yield from serve(chat_answer_by(lambda resp: by_text.get(resp, 4) + 1))


@pytest.fixture
def contrarian(rated: list[Rated]) -> Iterator[StandIn]:
    """STAND-IN for a worse judge: it rates the reviewers' order upside down."""
    by_text = {r.response: r.rating for r in rated}
    yield from serve(chat_answer_by(lambda resp: 9 - by_text.get(resp, 4)))


# The stand-in judges score from the labels (an oracle) and are blind to the sensitivity probes'
# perturbations; these tests are about the agreement gate, so the sensitivity rule is off
# (tests/reward/test_rm_sensitivity.py tests it).
NO_SENSITIVITY = "reward.update.sensitivity_pairs=0"


def _settings(tmp_path: Path, *extra: str) -> Settings:
    return load_settings(
        None,
        [
            "dev=true",
            f"database.url=sqlite:///{tmp_path / 'db.sqlite'}",
            f"reward.models_dir={tmp_path / 'models'}",
            NO_SENSITIVITY,
            *extra,
        ],
    )


def _active_judge(settings: Settings, store: Store, url: str, model: str = "length-judge") -> str:
    registry = Registry.for_settings(store, settings)
    cfg: dict[str, Any] = {"base_url": f"{url}/v1", "model": model, "resilience": {"backoff_s": 0.01}}
    v = registry.register(KindVersion.create("judge", cfg), data_window={}, metrics={})
    registry.promote(v)
    return v


def test_judge_update_is_a_calibration_and_a_training_request(
    tmp_path: Path, judge_standin: StandIn, rated: list[Rated], caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path)
    store = Store(settings.database.url)
    registry = Registry.for_settings(store, settings)
    active = _active_judge(settings, store, judge_standin.url)
    fill(store, rated)

    result = run_update(settings, store, stream="chat", since=0.0)
    verdict = result["gate"]
    assert result["kind"] == "judge" and result["parent"] == active and result["version"] != active
    assert result["pairs"]["train_perturbed"] == 0  # a calibration trains nothing on pairs
    rec = json.loads((registry.path_of(result["version"]) / "kind.json").read_text())
    cal = rec["config"]["calibration"]
    # The version covers endpoint, model, rubric and the calibration map.
    assert rec["identity"]["endpoint"] == f"{judge_standin.url}/v1" and len(rec["identity"]["calibration_sha256"]) == 64
    assert cal["labels"] >= 8 and 1.0 <= min(cal["y"]) <= max(cal["y"]) <= 7.0  # on the reviewers' 1-7 scale
    # Gated like any candidate: a monotone map cannot order pairs better, so it is not promoted.
    new = verdict["new"]
    assert new["n"] >= 100 and (verdict["verdict"], verdict["rule"]) == gate(new, verdict["old"], 0.02, 0.02, 100)
    assert verdict["verdict"] != "promote" and new["candidate"]["agreement"] <= new["active"]["agreement"] + 1e-9
    assert registry.active() is not None and (registry.active() or ("",))[0] == active

    # The request to the owner's training pipeline: once per active version, stream and window.
    req = result["training_request"]
    again = run_update(settings, store, stream="chat", since=0.0)["training_request"]
    assert req["created"] and not again["created"] and again["id"] == req["id"]
    rows = rq.listing(store, kind="rm_training")
    assert [r["id"] for r in rows] == [req["id"]]
    payload = rows[0]["payload"]
    assert payload["event"] == "reward_model_training_request" and payload["idempotency_key"] == req["key"]
    assert payload["rm_version"] == active and payload["labels"]["count"] == len(rated)
    assert payload["label_window"]["stream"] == "chat" and payload["model"] == "length-judge"
    # Delivered through the action sinks (here the log sink), like a retraining request.
    with caplog.at_level(logging.WARNING, logger="monitor.actions"):
        assert dispatch_pending(store, settings, "rm_training", make_sinks(["log"], settings)) == 1
    assert (rq.get(store, req["id"]) or {})["state"] == "sent"
    assert any("reward_model_training_request" in m and req["id"] in m for m in caplog.messages)
    store.close()


def _register_gate(tmp_path: Path, url: str, model: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / f"{model}.yaml"
    cfg.write_text(f"base_url: {url}/v1\nmodel: {model}\n")
    args = ["rm", "register", "--kind", "judge", "--kind-config", str(cfg), "--gate", "--stream", "chat"]
    common = [
        "--dev",
        "--db",
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        "--set",
        f"reward.models_dir={tmp_path / 'models'}",
        "--set",
        NO_SENSITIVITY,
    ]
    return subprocess.run([*OVERSIGHT, *args, *common], capture_output=True, text=True, timeout=180, check=False)


def test_retrained_judge_registered_later_is_gated(
    tmp_path: Path, judge_standin: StandIn, oracle: StandIn, contrarian: StandIn, rated: list[Rated]
) -> None:
    settings = _settings(tmp_path)
    store = Store(settings.database.url)
    active = _active_judge(settings, store, judge_standin.url)
    fill(store, rated)
    store.close()

    worse = _register_gate(tmp_path, contrarian.url, "judge-v2-worse")
    assert worse.returncode == 0, worse.stderr
    out = json.loads(worse.stdout)
    assert out["gate"]["verdict"] == "reject" and out["active"] is False
    assert "gate reject" in worse.stderr and "Traceback" not in worse.stderr

    better = _register_gate(tmp_path, oracle.url, "judge-v2")
    assert better.returncode == 0, better.stderr
    out = json.loads(better.stdout)
    g = out["gate"]
    assert g["verdict"] == "promote" and out["active"] is True, better.stderr
    assert (
        g["new"]["n"] >= 100 and g["new"]["gain"]["lo"] > 0 and g["new"]["candidate"]["lo"] > g["new"]["active"]["hi"]
    )
    store = Store(settings.database.url)
    assert (Registry.for_settings(store, settings).active() or ("",))[0] == out["version"] != active
    store.close()


def test_too_few_labels_leave_the_gate_undecided(
    tmp_path: Path, judge_standin: StandIn, oracle: StandIn, rated: list[Rated]
) -> None:
    settings = _settings(tmp_path)
    store = Store(settings.database.url)
    registry = Registry.for_settings(store, settings)
    active = _active_judge(settings, store, judge_standin.url)
    fill(store, rated[:40])
    v = registry.register(
        KindVersion.create("judge", {"base_url": f"{oracle.url}/v1", "model": "judge-v2"}), data_window={}, metrics={}
    )
    verdict = gate_version(settings, store, v, stream="chat", since=0.0)
    assert verdict["verdict"] == "undecided" and verdict["could_not_decide"] and verdict["new"]["n"] < 100
    assert "min_gate_pairs" in verdict["rule"]
    assert (registry.get(v) or {})["status"] == "undecided" and (registry.active() or ("",))[0] == active
    store.close()
