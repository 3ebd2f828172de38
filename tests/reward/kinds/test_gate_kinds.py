"""The gate on each brought-in kind: hf (the real MiniLM sequence-classification checkpoint), judge
and http (STAND-IN servers) candidates evaluated against the active version on real labelled
pairs (AlpacaEval outputs rated by the judge's preference) in a real store; the report carries the
held-out size, every agreement with its interval and the paired gain with its bounds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labelled import Rated, alpaca_rated, fill
from standin import StandIn, chat_answer, chat_answer_by, json_answer_by, serve

from monitor.config import load_settings
from monitor.reward.kinds import KindVersion
from monitor.reward.kinds.gate import gate_version
from monitor.reward.registry import Registry
from monitor.reward.update import gate, render_gate
from monitor.store import Store


@pytest.fixture(scope="module")
def rated() -> list[Rated]:
    from monitor.reward.data import load_alpaca_eval

    return alpaca_rated(load_alpaca_eval(), 150)


@pytest.fixture
def length_judge() -> Iterator[StandIn]:
    """STAND-IN for the active judge: longer answers score higher (with logprobs)."""
    yield from serve(chat_answer)


@pytest.fixture
def oracle_judge(rated: list[Rated]) -> Iterator[StandIn]:
    by_text = {r.response: r.rating for r in rated}
    yield from serve(chat_answer_by(lambda resp: by_text.get(resp, 4) + 1))


@pytest.fixture
def oracle_json(rated: list[Rated]) -> Iterator[StandIn]:
    """STAND-IN for a reward service behind a JSON endpoint (Triton/KServe-style), reviewer-like."""
    by_text = {r.response: r.rating for r in rated}
    yield from serve(json_answer_by(lambda resp: by_text.get(resp, 4) / 7.0))


def _check_report(verdict: dict[str, Any]) -> None:
    new = verdict["new"]
    assert new["n"] == verdict["holdout"]["holdout_new"] >= 100 and new["responses"] >= 2
    for who in ("candidate", "active"):
        a = new[who]
        assert 0.0 <= a["lo"] <= a["agreement"] <= a["hi"] <= 1.0 and 0 < a["n_eff"] <= new["n"]
    g = new["gain"]
    assert g["lo"] <= g["gain"] <= g["hi"] and g["gain"] == pytest.approx(
        new["candidate"]["agreement"] - new["active"]["agreement"], abs=2e-4
    )
    assert (verdict["verdict"], verdict["rule"]) == gate(new, verdict["old"], 0.02, 0.02, 100)
    line = render_gate(verdict)
    assert f"new: {new['n']} pairs of {new['responses']} responses" in line and "gain" in line


@pytest.mark.parametrize("kind", ["judge", "http", pytest.param("hf", marks=pytest.mark.slow)])
def test_gate_evaluates_each_kind_on_labelled_pairs(
    kind: str,
    tmp_path: Path,
    rated: list[Rated],
    length_judge: StandIn,
    oracle_judge: StandIn,
    oracle_json: StandIn,
    request: pytest.FixtureRequest,
) -> None:
    # The stand-in judges score from the labels (an oracle), so they are blind to the probe set's
    # perturbations: the sensitivity rule would refuse them. This test is about the agreement gate.
    settings = load_settings(
        None,
        [
            "dev=true",
            f"database.url=sqlite:///{tmp_path / 'db.sqlite'}",
            f"reward.models_dir={tmp_path / 'm'}",
            "reward.update.sensitivity_pairs=0",
        ],
    )
    store = Store(settings.database.url)
    registry = Registry.for_settings(store, settings)
    active = registry.register(
        KindVersion.create("judge", {"base_url": f"{length_judge.url}/v1", "model": "length"}),
        data_window={},
        metrics={},
    )
    registry.promote(active)
    fill(store, rated)
    raw: dict[str, Any]
    if kind == "judge":
        raw = {"base_url": f"{oracle_judge.url}/v1", "model": "judge-v2"}
    elif kind == "http":
        raw = {"url": f"{oracle_json.url}/score", "score_path": "scores", "max_batch": 16}
    else:
        raw = {"path": str(request.getfixturevalue("hf_checkpoint")), "max_length": 64}
    version = registry.register(KindVersion.create(kind, raw), data_window={}, metrics={})
    verdict = gate_version(settings, store, version, stream="chat", since=0.0)
    _check_report(verdict)
    assert verdict["active"] == active and verdict["version"] == version
    if kind in ("judge", "http"):  # the reviewer-like stand-ins are clearly better than "longer wins"
        assert verdict["verdict"] == "promote" and (registry.active() or ("",))[0] == version
    store.close()
