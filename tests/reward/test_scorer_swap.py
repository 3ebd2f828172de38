"""The pipeline's reward-model scorer: batched scoring of the rm channel and hot swap on promotion."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from monitor.config import load_settings
from monitor.episodes.deadletter import JsonlDeadLetterSink
from monitor.reward.data import load_alpaca_eval
from monitor.reward.registry import Registry
from monitor.service import build_service
from monitor.sources.memory import MemorySource
from monitor.store import Store
from monitor.store import tables as t
from sampling import Decision


def _episodes(n: int) -> list[bytes]:
    rows = [r for rs in load_alpaca_eval().values() for r in rs[:1]][:n]
    return [
        json.dumps(
            {
                "episode_id": f"e{i}",
                "stream": "chat",
                "model": "policy",
                "timestamp": 1_767_225_600 + i,
                "prompt": r["instruction"],
                "response": r["output"],
            }
        ).encode()
        for i, r in enumerate(rows)
    ]


def test_hot_swap_under_replay_loses_and_duplicates_no_score(
    tmp_path: Path, db_url: str, small_models: dict[str, Any]
) -> None:
    settings = load_settings(
        None,
        [
            "dev=true",
            f"database.url={db_url}",
            f"dead_letter.path={tmp_path / 'dead.jsonl'}",
            f"reward.models_dir={tmp_path / 'models'}",
            "reward.swap_poll_s=0.01",
            # The scores are compared with the model's own fp32 scores to 4 places below (on a CPU
            # with native bf16, `auto` would score in bf16: tests/reward/test_bf16_scoring.py).
            "reward.precision=fp32",
            "sampling.rm.rate=0.5",
            "sampling.human.rate=0.1",
            "pipeline.batch_size=20",
            "drift.signals.rm_score=[page_hinkley]",
            "drift.reference_size=20",
            "drift.fed_reference_size=20",
        ],
    )
    store = Store(db_url)
    registry = Registry.for_settings(store, settings)
    v1 = registry.register(small_models["untrained"], data_window={}, metrics={})
    v2 = registry.register(small_models["trained"], data_window={}, metrics={})
    registry.promote(v1)
    values = _episodes(240)
    pipeline = build_service(
        settings,
        source=MemorySource(values),
        serve=False,
        store=store,
        dead_letters=JsonlDeadLetterSink(settings.dead_letter.path, 1000),
        registry=CollectorRegistry(),
    )
    metrics = pipeline.metrics
    scorer = pipeline.scorer
    assert scorer is not None

    def promote_midway() -> None:
        deadline = time.monotonic() + 120
        while scorer.scored < 40 and time.monotonic() < deadline:
            time.sleep(0.005)
        registry.promote(v2)

    th = threading.Thread(target=promote_midway)
    th.start()
    pipeline.run()
    th.join()

    with store.engine.connect() as conn:
        rm = {r.episode_id for r in conn.execute(sa.select(t.samples.c.episode_id).where(t.samples.c.channel == "rm"))}
        human = {
            r.episode_id for r in conn.execute(sa.select(t.samples.c.episode_id).where(t.samples.c.channel == "human"))
        }
        scores = conn.execute(sa.select(t.rm_scores)).all()
    by_episode: dict[str, list[Any]] = {}
    for s in scores:
        by_episode.setdefault(s.episode_id, []).append(s)
    # Every rm- or human-sampled episode scored exactly once (the human ones for the disagreement
    # signal), nothing else scored.
    missing, extra = (rm | human) - set(by_episode), set(by_episode) - (rm | human)
    assert not missing and not extra, (sorted(missing)[:10], sorted(extra)[:10])
    assert len(rm) > 80 and human
    assert all(len(v) == 1 for v in by_episode.values())
    versions = {s.version for s in scores}
    assert versions == {v1, v2}
    # Each episode's score is the one its version gives: the swap happened at a batch boundary
    # and the new version is the promoted model itself.
    order = sorted(scores, key=lambda s: int(s.episode_id[1:]))
    first_v2 = next(i for i, s in enumerate(order) if s.version == v2)
    assert all(s.version == v1 for s in order[:first_v2]) and all(s.version == v2 for s in order[first_v2:])
    sample = order[first_v2 : first_v2 + 5]
    texts = {json.loads(v)["episode_id"]: json.loads(v) for v in values}
    expect = small_models["trained"].score(
        [texts[s.episode_id]["prompt"] for s in sample], [texts[s.episode_id]["response"] for s in sample]
    )
    assert [round(s.score, 4) for s in sample] == [round(x, 4) for x in expect]
    # Metrics: the score histogram counted every score, the active version gauge follows the swap.
    assert metrics.registry.get_sample_value("oversight_rm_score_count", {"stream": "chat"}) == len(rm)
    assert metrics.registry.get_sample_value("oversight_rm_active_version_info", {"version": v2}) == 1
    assert metrics.registry.get_sample_value("oversight_rm_active_version_info", {"version": v1}) is None
    # The scores reached drift detection as a signal (its state was checkpointed; a drift event
    # on rm_score, which the swap itself may cause, restarts the count).
    drift_state = store.load_state("chat", "drift")
    assert drift_state is not None
    n = drift_state["signals"]["rm_score"]["n"]
    with store.engine.connect() as conn:
        fired = conn.execute(sa.select(t.drift_events).where(t.drift_events.c.signal == "rm_score")).all()
    assert n == len(rm) if not fired else 0 < n < len(rm)


def test_no_active_version_scores_nothing_and_keeps_ingesting(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        [
            "dev=true",
            "database.url=sqlite://",
            f"dead_letter.path={tmp_path / 'dead.jsonl'}",
            f"reward.models_dir={tmp_path / 'models'}",
            "sampling.rm.rate=1.0",
        ],
    )
    store = Store(settings.database.url)
    pipeline = build_service(
        settings,
        source=MemorySource(_episodes(30)),
        serve=False,
        store=store,
        dead_letters=JsonlDeadLetterSink(settings.dead_letter.path, 1000),
        registry=CollectorRegistry(),
    )
    stats = pipeline.run()
    assert pipeline.scorer is not None
    assert stats.records == 30 and pipeline.scorer.unscored == 30 and pipeline.scorer.scored == 0
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.rm_scores)).scalar_one() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(t.episodes)).scalar_one() == 30


def _service_registry(tmp_path: Path, swap_poll_s: float) -> tuple[Any, Store, Registry]:
    """Settings of a service whose scorer polls for promotions every ``swap_poll_s``, its store and registry."""
    settings = load_settings(
        None,
        [
            "dev=true",
            f"database.url=sqlite:///{tmp_path / 'db.sqlite'}",
            f"reward.models_dir={tmp_path / 'models'}",
            f"reward.swap_poll_s={swap_poll_s}",
        ],
    )
    store = Store(settings.database.url)
    return settings, store, Registry.for_settings(store, settings)


def test_service_loads_a_promoted_version_off_the_ingest_thread(
    tmp_path: Path, small_models: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """In the service a promoted version loads on a thread of its own (an ONNX export or a large
    checkpoint takes tens of seconds): batch boundaries go on with the version in hand, the new one
    is installed once loaded, a failed load keeps the old one and is tried again, and a version
    that stopped being active while it loaded never scores."""
    import monitor.reward.scorer as scorer_module
    from monitor.episodes import parse_episode
    from monitor.metrics import Metrics
    from monitor.reward.model import ModelConfig, RewardModel
    from monitor.reward.scorer import RewardScorer

    caplog.set_level(logging.INFO, logger="monitor.reward.scorer")
    settings, store, registry = _service_registry(tmp_path, 0.001)
    v1 = registry.register(small_models["untrained"], data_window={}, metrics={})
    v2 = registry.register(small_models["trained"], data_window={}, metrics={})
    registry.promote(v1)
    real_load = scorer_module.load_version
    gates: dict[str, threading.Event] = {}
    loads: list[str] = []
    broken: set[str] = set()
    closed: list[str] = []

    ended: list[str] = []

    def gated_load(cfg: Any, path: Any, reg: Any, threads: int | None = None) -> Any:
        name = Path(path).name
        loads.append(name)
        try:
            return opened_load(cfg, path, reg, name)
        finally:
            ended.append(name)

    def opened_load(cfg: Any, path: Any, reg: Any, name: str) -> Any:
        if name in gates and not gates[name].wait(30):
            raise TimeoutError("the test never opened the gate")
        if name in broken:
            raise OSError(f"{name}: disk error")
        backend = real_load(cfg, path, reg)
        original_close = backend.close

        def close() -> None:
            closed.append(name)
            original_close()

        monkeypatch.setattr(backend, "close", close)
        return backend

    monkeypatch.setattr(scorer_module, "load_version", gated_load)
    metrics = Metrics(CollectorRegistry())
    scorer = RewardScorer(settings.reward, registry, metrics)
    scorer.score_in_background()  # the service's mode: the first version loads at once
    assert scorer.version == v1 and loads == [v1]

    def boundary_until(version: str) -> None:
        deadline = time.monotonic() + 60
        while scorer.version != version and time.monotonic() < deadline:
            time.sleep(0.01)
            scorer.checkpoint()
        assert scorer.version == version

    # A slow load: the batch boundary returns with v1 still scoring while v2 loads.
    gates[v2] = threading.Event()
    registry.promote(v2)
    time.sleep(0.01)
    scorer.checkpoint()
    # The boundary returned while the load still waits at its gate: it did not wait for it.
    assert loads == [v1, v2] and ended == [v1] and scorer.version == v1
    ep = parse_episode(b'{"episode_id": "e1", "prompt": "2+2?", "response": "4"}', 1 << 20, now=0.0)
    scorer.observe(ep, Decision({"rm": 1.0}, {"rm": 1.0}, u_review=0.0, u_drift=0.5), 0)
    scorer.checkpoint()  # the episode waits in the store for the background scorer: not lost
    gates[v2].set()
    boundary_until(v2)
    assert metrics.registry.get_sample_value("oversight_rm_active_version_info", {"version": v2}) == 1

    # A load that fails keeps v2 and is tried again at the next poll.
    broken.add(v1)
    registry.promote(v1)
    deadline = time.monotonic() + 60
    while loads.count(v1) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
        scorer.checkpoint()
    assert loads.count(v1) >= 3 and scorer.version == v2
    broken.discard(v1)
    boundary_until(v1)

    # Promoted again while a load is in flight: the stale load is closed, never installed.
    stale = threading.Event()
    gates[v2] = stale
    registry.promote(v2)
    time.sleep(0.01)
    scorer.checkpoint()  # v2 starts loading and waits at its gate
    del gates[v2]
    v3 = registry.register(
        RewardModel.create(ModelConfig(finetune_layers=0, max_length=64, length_anchor=0.0), seed=2),
        data_window={},
        metrics={},
    )
    registry.promote(v3)
    stale.set()
    boundary_until(v3)
    # v2 loaded twice: once installed (closed when v1 replaced it), once stale (closed unused).
    assert loads.count(v2) == 2 and closed.count(v2) == 2
    assert sum(f"scoring with {v2} " in r.getMessage() for r in caplog.records) == 1
    scorer.close()
    store.close()


def test_a_version_that_cannot_load_is_retried_off_the_ingest_thread_and_less_and_less(
    tmp_path: Path, small_models: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a restart no version is in hand, and the active one cannot load (a checkpoint changed in
    place, re-hashed on every try): it was loaded on the ingest thread at every poll, for good (75%
    of the thread in the hunt's run). It loads on a thread of its own, and each failure doubles the
    wait before the next try."""
    import monitor.reward.scorer as scorer_module
    from monitor.metrics import Metrics
    from monitor.reward.scorer import RewardScorer

    settings, store, registry = _service_registry(tmp_path, 0.05)
    registry.promote(registry.register(small_models["untrained"], data_window={}, metrics={}))
    loads: list[float] = []

    def failing_load(cfg: Any, path: Any, reg: Any, threads: int | None = None) -> Any:
        loads.append(time.monotonic())
        time.sleep(0.3)  # a slow failure: hashing a large checkpoint
        raise OSError("the checkpoint changed since it was registered")

    monkeypatch.setattr(scorer_module, "load_version", failing_load)
    scorer = RewardScorer(settings.reward, registry, Metrics(CollectorRegistry()))
    scorer.score_in_background()  # the service's mode: the first try is at once
    assert scorer.version is None and len(loads) == 1
    slowest = 0.0
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        t0 = time.monotonic()
        scorer.checkpoint()  # a batch boundary, on the ingest thread
        slowest = max(slowest, time.monotonic() - t0)
        time.sleep(0.01)
    scorer.close()
    store.close()
    assert slowest < 0.2, slowest  # no boundary waited for a load
    # 0.05 s, then 0.1, 0.2, 0.4, 0.8 (plus the 0.3 s a try takes): a handful, not one per poll.
    assert 3 <= len(loads) <= 8, len(loads)


def test_the_service_scores_on_onnx_runtime_beside_ingest_with_the_worker_threads(
    tmp_path: Path, small_models: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``oversight run`` scores on a worker thread beside the ingest loop. An ONNX Runtime session
    on every core, spinning between runs, took the loop's core (``bench/encoder.py``, reward beside a
    busy thread); the service's scorer loads the active version on ``inference.worker_threads()``
    without spinning, as the embedding worker does. Inline scoring (replay) keeps every core."""
    from monitor.inference.onnx import CACHE_ENV
    from monitor.reward import scorer as scorer_module
    from monitor.reward.kinds import BuiltinBackend

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    settings = load_settings(
        None,
        [
            "dev=true",
            f"database.url=sqlite:///{tmp_path / 'db.sqlite'}",
            f"reward.models_dir={tmp_path / 'models'}",
            "reward.backend=onnx",
            "drift.enabled=false",
            "inference.threads=1",
        ],
    )
    store = Store(settings.database.url)
    registry = Registry.for_settings(store, settings)
    version = registry.register(small_models["untrained"], data_window={}, metrics={})
    registry.promote(version)
    sessions: list[Any] = []
    real_load = scorer_module.load_version

    def load(cfg: Any, path: Any, reg: Any, threads: int | None = None) -> Any:
        backend = real_load(cfg, path, reg, threads)
        assert isinstance(backend, BuiltinBackend)
        sessions.append(backend.model.runner.session.get_session_options())
        return backend

    monkeypatch.setattr(scorer_module, "load_version", load)
    svc = build_service(settings, source=MemorySource([]), serve=False, store=store, registry=CollectorRegistry())
    try:
        svc.prepare_for_service()
    finally:
        svc.close()
    assert [o.intra_op_num_threads for o in sessions] == [1]
    assert sessions[0].get_session_config_entry("session.intra_op.allow_spinning") == "0"
    inline = real_load(settings.reward, registry.path_of(version), None)  # the cached export, as replay loads it
    assert isinstance(inline, BuiltinBackend)
    assert inline.model.runner.session.get_session_options().intra_op_num_threads == 0  # one per core
