"""Inference workers of their own (``oversight infer``, ``inference.external``).

The store level on SQLite and PostgreSQL: claims are exclusive and expire, only a claim's holder
stores its result, stored results feed in commit order per stream, and feeding deletes them. The
service level: ``oversight run`` built as the service builds it, with no model loaded, and an
:class:`InferenceWorker` with the real encoder and a real ``hf`` reward model (MiniLM with a
sequence-classification head) beside it: every drift sample is fed exactly once, every review
sample scored once by the active version, and nothing is left in flight.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from model_helpers import untrained_hf_checkpoint
from prometheus_client import CollectorRegistry

from inference.test_workers import (
    assert_drift_sample_unbiased,
    assert_drift_throttled,
    committed_episodes,
    drift_samples_per_stream,
    episodes,
    fed,
    recovered,
    service,
    wait_for,
)
from inference.test_workers import settings as worker_settings
from monitor.config import load_settings
from monitor.episodes.deadletter import JsonlDeadLetterSink
from monitor.pipeline import LoopHooks
from monitor.reward.kinds import KindVersion
from monitor.reward.registry import Registry
from monitor.service import build_service
from monitor.service.infer import InferenceWorker
from monitor.sources.memory import MemorySource
from monitor.store import BatchWrite, Store
from monitor.store import tables as t
from monitor.store.inference import (
    EMBEDDING_STAGE,
    SCORE_STAGE,
    claim_for_embedding,
    claim_for_score,
    prune_results,
    store_results,
    stored_embeddings,
    stored_scores,
)

T0 = 1_767_225_600.0


def add_samples(store: Store, n: int, channels: tuple[str, ...] = ("drift",), start: int = 0) -> None:
    """``n`` episodes e<start>.., alternating between the streams chat and assistant, each sampled
    for ``channels`` and waiting, committed one after another (the first first)."""
    now = time.time()
    store.insert_ignore(
        t.episodes,
        [
            {
                "episode_id": f"e{i}",
                "stream": ("chat", "assistant")[i % 2],
                "model": None,
                "ts": T0 + i,
                "prompt": f"question {i}",
                "response": f"answer {i}",
                "metadata": None,
                "source": "test",
                "position": str(i),
                "ingested_at": now,
                "messages": None,
            }
            for i in range(start, start + n)
        ],
    )
    store.insert_ignore(
        t.samples,
        [
            {
                "episode_id": f"e{i}",
                "channel": c,
                "stream": ("chat", "assistant")[i % 2],
                "ts": T0 + i,
                "inclusion_probability": 0.5,
                "status": "pending",
                "created_at": now + i,
            }
            for i in range(start, start + n)
            for c in channels
        ],
    )


def vec(i: int) -> bytes:
    return np.full(4, float(i), dtype="<f4").tobytes()


def results(store: Store) -> list[tuple[str, str, bool]]:
    r = t.inference_results
    with store.engine.connect() as conn:
        return sorted((x[0], x[1], bool(x[2])) for x in conn.execute(sa.select(r.c.episode_id, r.c.stage, r.c.done)))


def test_two_workers_never_claim_the_same_sample(db_url: str) -> None:
    store = Store(db_url)
    add_samples(store, 10)
    a = claim_for_embedding(store, 4, "a", 30.0)
    b = claim_for_embedding(store, 100, "b", 30.0)
    assert [w.episode_id for w in a] == ["e0", "e1", "e2", "e3"]  # the oldest first
    assert [w.episode_id for w in b] == [f"e{i}" for i in range(4, 10)]
    assert a[0].prompt == "question 0" and a[1].stream == "assistant"
    assert claim_for_embedding(store, 100, "c", 30.0) == []  # all held
    # Another stage of the same episodes is claimed on its own.
    add_samples(store, 2, ("rm", "human"))
    scored = claim_for_score(store, 10, "c", 30.0)
    assert [(w.episode_id, w.rm) for w in scored] == [("e0", True), ("e1", True)]  # one item per episode
    store.close()


def test_an_expired_claim_is_taken_again_and_only_its_holder_stores(db_url: str) -> None:
    store = Store(db_url)
    add_samples(store, 3)
    dead = claim_for_embedding(store, 3, "dead", -1.0)  # a worker that died: its claims have expired
    alive = claim_for_embedding(store, 3, "alive", 30.0)
    assert [w.episode_id for w in alive] == [w.episode_id for w in dead] == ["e0", "e1", "e2"]
    # The dead worker's late results are not stored; the holder's are.
    assert store_results(store, EMBEDDING_STAGE, "dead", [{"episode_id": "e0", "vector": vec(9)}]) == 0
    rows = [{"episode_id": f"e{i}", "vector": vec(i)} for i in range(3)]
    assert store_results(store, EMBEDDING_STAGE, "alive", rows) == 3
    assert store_results(store, EMBEDDING_STAGE, "alive", rows) == 0  # done once
    got = stored_embeddings(store, 10)
    assert [(g.episode_id, g.vector.tolist()) for g in got] == [(f"e{i}", [float(i)] * 4) for i in range(3)]
    assert claim_for_embedding(store, 10, "late", 30.0) == []  # done: nobody computes it again
    store.close()


def test_stored_results_feed_in_commit_order_per_stream(db_url: str) -> None:
    store = Store(db_url)
    add_samples(store, 6)  # chat: e0 e2 e4, assistant: e1 e3 e5
    claim_for_embedding(store, 6, "w", 30.0)
    store_results(store, EMBEDDING_STAGE, "w", [{"episode_id": i, "vector": vec(1)} for i in ("e1", "e2", "e3")])
    # chat waits for e0 (claimed, not done): e2 may not overtake it; assistant feeds e1 e3, not e5.
    assert [g.episode_id for g in stored_embeddings(store, 10)] == ["e1", "e3"]
    assert [g.episode_id for g in stored_embeddings(store, 10, streams=["chat"])] == []
    assert [g.episode_id for g in stored_embeddings(store, 10, skip={"e1"})] == ["e3"]
    # A sample that has waited longer than hold_s (its computation keeps failing) holds nothing back.
    assert [g.episode_id for g in stored_embeddings(store, 10, hold_s=0.0)] == ["e1", "e2", "e3"]
    assert [g.episode_id for g in stored_embeddings(store, 1, hold_s=0.0)] == ["e1"]
    store.close()


def test_feeding_deletes_the_results_and_prune_drops_orphans(db_url: str) -> None:
    store = Store(db_url)
    add_samples(store, 4, ("drift", "rm"))
    claim_for_embedding(store, 4, "w", 30.0)
    claim_for_score(store, 4, "w", 30.0)
    store_results(store, EMBEDDING_STAGE, "w", [{"episode_id": f"e{i}", "vector": vec(i)} for i in range(4)])
    store_results(store, SCORE_STAGE, "w", [{"episode_id": f"e{i}", "version": "v1", "score": 0.5} for i in range(4)])
    got = stored_scores(store, 10)
    assert [(g.episode_id, g.rm, g.version, g.score) for g in got] == [(f"e{i}", True, "v1", 0.5) for i in range(4)]
    store.commit_batch(BatchWrite(embedded=["e0", "e1"]))
    row = {"version": "v1", "stream": "chat", "score": 0.5, "ts": T0, "created_at": time.time()}
    store.record_scores([{**row, "episode_id": "e0"}])  # type: ignore[typeddict-item]
    left = results(store)
    assert ("e0", EMBEDDING_STAGE, True) not in left and ("e1", EMBEDDING_STAGE, True) not in left
    assert ("e0", SCORE_STAGE, True) not in left and ("e1", SCORE_STAGE, True) in left
    assert [g.episode_id for g in stored_embeddings(store, 10)] == ["e2", "e3"]
    # A sample marked by another path (a pipeline that computed inline) leaves an orphan: pruned.
    with store.engine.begin() as conn:
        s = t.samples
        conn.execute(s.update().where(s.c.episode_id == "e2", s.c.channel == "drift").values(status="embedded"))
    assert prune_results(store) == 1
    assert ("e2", EMBEDDING_STAGE, True) not in results(store) and ("e3", EMBEDDING_STAGE, True) in results(store)
    store.close()


def test_run_feeds_an_external_workers_results_exactly_once(tmp_path: Path) -> None:
    overrides = [
        "dev=true",
        f"database.url=sqlite:///{tmp_path / 'db.sqlite'}",
        f"dead_letter.path={tmp_path / 'd.jsonl'}",
        f"reward.models_dir={tmp_path / 'models'}",
        "pipeline.batch_size=50",
        "sampling.drift.rate=0.3",
        "sampling.rm.rate=0.1",
        "sampling.human.rate=0.03",
        "drift.embedding.reference_size=20",
        "drift.reference_size=100000",  # the text signals stay in warm-up: only the model work matters here
        "inference.external=true",
        "inference.poll_s=0.05",
        "inference.settle_timeout_s=240",
        "reward.swap_poll_s=0.2",
    ]
    s = load_settings(None, overrides)
    store = Store(s.database.url)
    registry = Registry.for_settings(store, s)
    ckpt = untrained_hf_checkpoint(tmp_path / "hf")
    version = registry.register(
        KindVersion.create("hf", {"path": str(ckpt), "max_length": 64}), data_window={}, metrics={}
    )
    registry.promote(version)

    svc = build_service(
        s,
        source=MemorySource(episodes(300)),
        serve=False,
        store=store,
        dead_letters=JsonlDeadLetterSink(s.dead_letter.path, 1000),
        registry=CollectorRegistry(),
        background_calibration=True,  # as `oversight run`
    )
    assert svc.drift is not None and svc.scorer is not None
    # The pipeline loads no model: the encoder and the reward model are the worker's.
    assert not svc.drift.embeds and svc.scorer.version == version and svc.scorer.scoring

    worker = InferenceWorker(s, Store(s.database.url, migrate=False), worker_id="w1")
    assert [st.name for st in worker.stages] == ["embedding", "rm_score"]
    stop = threading.Event()
    out: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: out.update(stats=svc.run()), daemon=True)
    runner.start()
    # The pipeline commits its samples as waiting and waits for the worker (settle at the end).
    wait_for(lambda: sum(drift_samples_per_stream(store).values()) > 0, 60, "drift samples committed")
    worker.warm()
    # Each stage's rounds, and what they start, run inference.nice (10) below this thread.
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    priorities: set[int] = set()
    real_round = worker.round

    def round_at(stage: Any) -> int:
        priorities.add(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return real_round(stage)

    worker.round = round_at  # type: ignore[method-assign]
    serving = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    serving.start()
    runner.join(300)
    stop.set()
    serving.join(30)
    assert not runner.is_alive() and out["stats"].records == 300

    per_stream = drift_samples_per_stream(store)
    assert fed(store) == per_stream and sum(per_stream.values()) > 40
    s_, sc = t.samples, t.rm_scores
    with store.engine.connect() as conn:
        pending = sa.select(s_.c.channel, sa.func.count()).where(s_.c.status == "pending").group_by(s_.c.channel)
        statuses = {r[0]: int(r[1]) for r in conn.execute(pending)}
        review = conn.execute(
            sa.select(sa.func.count(sa.distinct(s_.c.episode_id))).where(s_.c.channel.in_(("rm", "human")))
        ).scalar_one()
        scores = conn.execute(sa.select(sc.c.episode_id, sc.c.version)).all()
    assert statuses == {}  # nothing waits
    assert priorities == {min(19, base + 10)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    assert review > 10 and len(scores) == len({e for e, _ in scores}) == review
    assert {v for _, v in scores} == {version}
    assert results(store) == []  # nothing left in flight
    done = worker.registry.get_sample_value
    assert (done("oversight_inference_items_total", {"stage": "embedding", "outcome": "ok"}) or 0) >= sum(
        per_stream.values()
    )
    assert (done("oversight_inference_items_total", {"stage": "rm_score", "outcome": "ok"}) or 0) >= review
    worker.close()
    svc.close()


@pytest.mark.postgres
def test_a_database_outage_turns_the_worker_red_and_it_recovers(tmp_path: Path) -> None:
    """A private PostgreSQL cluster stopped under a running ``oversight infer`` worker: its rounds
    fail and are counted, /readyz turns red, and once the database is back every waiting sample
    gets its result, none twice."""
    from pg_cluster import PgCluster

    with PgCluster() as pg:
        url = pg.create_database()
        s = load_settings(None, ["dev=true", f"database.url={url}", "reward.enabled=false", "inference.poll_s=0.05"])
        store = Store(url)
        add_samples(store, 40)
        worker = InferenceWorker(s, Store(url, migrate=False), worker_id="w1")
        worker.warm()
        stop = threading.Event()
        serving = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        try:
            serving.start()
            wait_for(lambda: len(stored_embeddings(store, 100, hold_s=0.0)) == 40, 120, "the first samples embedded")
            assert all(worker.readiness().values())
            pg.stop()

            def errors() -> float:
                value = worker.registry.get_sample_value(
                    "oversight_inference_worker_errors_total", {"stage": "embedding"}
                )
                return value or 0.0

            wait_for(lambda: errors() >= 2, 30, "failed rounds counted")
            assert worker.readiness()["database"] is False and worker.readiness()["writes"] is False
            pg.start()
            add_samples(store, 30, start=40)  # the test's own connections are replaced too
            wait_for(lambda: len(stored_embeddings(store, 100, hold_s=0.0)) == 70, 120, "embedded after the outage")
            wait_for(lambda: all(worker.readiness().values()), 30, "ready again")
        finally:
            stop.set()
            serving.join(30)
            worker.close()
        assert len(results(store)) == 70 and all(done for _, _, done in results(store))
        store.close()


@pytest.mark.slow  # about 20 s
def test_the_drift_rate_follows_an_external_workers_lag_and_stays_unbiased(tmp_path: Path) -> None:
    """No ``oversight infer`` runs at first: the drift samples wait, their lag passes
    ``inference.max_lag_s`` and the drift channel's rate halves down to its floor, as with the
    worker threads (the throttle reads the backlog from the store). A worker started then drains
    the backlog, the run settles, every sample is fed once, and the rate comes back; every sample
    records the probability in effect, so the Horvitz-Thompson count still estimates the traffic."""
    s = worker_settings(
        tmp_path,
        "inference.external=true",
        "sampling.drift.rate=0.5",
        "sampling.drift.floor=0.1",
        "inference.max_lag_s=0.3",
        "inference.adapt_every_s=0.1",
        "inference.settle_timeout_s=240",
    )
    store = Store(s.database.url)
    prom = CollectorRegistry()
    n = 2000
    svc = service(s, store, n, prom)
    assert svc.drift is not None and not svc.drift.embeds
    slow = LoopHooks(after_batch=lambda records: time.sleep(0.1))  # 500 episodes/s: the lag builds up
    runner = threading.Thread(target=lambda: svc.run(hooks=slow), daemon=True)
    runner.start()
    stop = threading.Event()
    worker = InferenceWorker(s, Store(s.database.url, migrate=False), worker_id="late")
    serving = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    try:
        wait_for(lambda: committed_episodes(store) == n, 120, "ingest")
        assert_drift_throttled(prom)
        worker.warm()
        serving.start()
        runner.join(240)
        assert not runner.is_alive()
        wait_for(lambda: recovered(svc), 10, "recovery")
    finally:
        stop.set()
        if serving.is_alive():
            serving.join(30)
        worker.close()
        svc.close()
    assert_drift_sample_unbiased(store, n, rate=0.5, floor=0.1)
    assert fed(store) == drift_samples_per_stream(store) and results(store) == []
    store.close()
