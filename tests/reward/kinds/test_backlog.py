"""A slow or failing remote scorer never stalls ingest: with the STAND-IN judge holding every
request, the pipeline commits every batch; the rm-sampled episodes wait in the store (counted) and
are scored after a restart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from standin import StandIn, judge_score

from monitor.config import Settings, load_settings
from monitor.episodes.deadletter import JsonlDeadLetterSink
from monitor.reward.kinds import KindVersion, load_backend
from monitor.reward.kinds.background import backlog_count, score_backlog
from monitor.reward.kinds.resilience import BackendMetrics
from monitor.reward.registry import Registry
from monitor.service import build_service
from monitor.sources.memory import MemorySource
from monitor.store import Store
from monitor.store import tables as t


def _episodes(n: int) -> list[bytes]:
    return [
        json.dumps(
            {
                "episode_id": f"e{i}",
                "stream": "chat",
                "timestamp": 1_767_225_600 + i,
                "prompt": "Q?",
                "response": "A" * i,
            }
        ).encode()
        for i in range(n)
    ]


def _settings(tmp_path: Path, *extra: str) -> Settings:
    """Every episode sampled for rm review, in a SQLite store under ``tmp_path``, drift off."""
    return load_settings(
        None,
        [
            "dev=true",
            f"database.url=sqlite:///{tmp_path / 'db.sqlite'}",
            f"dead_letter.path={tmp_path / 'dead.jsonl'}",
            f"reward.models_dir={tmp_path / 'models'}",
            "sampling.rm.rate=1.0",
            "drift.enabled=false",
            *extra,
        ],
    )


def test_held_judge_does_not_stall_ingest_and_backlog_is_scored_after_restart(
    tmp_path: Path, judge_standin: StandIn
) -> None:
    judge_standin.script.mode = "hold"  # every request waits until released
    settings = _settings(tmp_path, "pipeline.batch_size=20")
    store = Store(settings.database.url)
    registry = Registry.for_settings(store, settings)
    judge = {"base_url": f"{judge_standin.url}/v1", "model": "stand-in", "resilience": {"timeout_s": 30}}
    version = registry.register(KindVersion.create("judge", judge), data_window={}, metrics={})
    registry.promote(version)
    prom = CollectorRegistry()
    svc = build_service(
        settings,
        source=MemorySource(_episodes(100)),
        serve=False,
        store=store,
        dead_letters=JsonlDeadLetterSink(settings.dead_letter.path, 1000),
        registry=prom,
    )
    with svc:
        stats = svc.run()
    assert stats.batches == 5  # every batch committed while the judge answered nothing
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.episodes)).scalar_one() == 100
        assert conn.execute(sa.select(sa.func.count()).select_from(t.rm_scores)).scalar_one() == 0
    assert prom.get_sample_value("oversight_rm_deferred_total") == 100
    assert backlog_count(store) == 100

    # A restart (here: the backlog command's function) finds the same episodes waiting.
    judge_standin.script.release.set()
    metrics = BackendMetrics.on(CollectorRegistry())
    backend = load_backend(registry.path_of(version))
    counts = score_backlog(store, backend, metrics, batch=16)
    assert counts == {"scored": 100, "failed": 0, "deferred": 0, "waiting": 0}
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(t.rm_scores.c.episode_id, t.rm_scores.c.version, t.rm_scores.c.score)).all()
    assert len(rows) == 100 and {r.version for r in rows} == {version}
    by_id = {r.episode_id: r.score for r in rows}
    assert by_id["e99"] > by_id["e0"] and round(by_id["e0"]) == judge_score("")
    store.close()


def _refused_backlog(tmp_path: Path, *extra: str) -> tuple[Settings, Store]:
    """30 episodes waiting for a score, two of them (e0, e7) with an answer the judge refuses."""
    settings = _settings(tmp_path, *extra)
    store = Store(settings.database.url)
    values = [
        json.dumps(
            {"episode_id": f"e{i}", "stream": "chat", "timestamp": 1_767_225_600 + i, "prompt": "Q?", "response": r}
        ).encode()
        for i, r in enumerate(["POISON" if i in (0, 7) else "A" * i for i in range(30)])
    ]
    # Nothing scores during ingest: all 30 wait.
    with build_service(
        settings.model_copy(update={"reward": settings.reward.model_copy(update={"enabled": False})}),
        source=MemorySource(values),
        serve=False,
        store=store,
        dead_letters=JsonlDeadLetterSink(settings.dead_letter.path, 1000),
        registry=CollectorRegistry(),
    ) as svc:
        svc.run()
    assert backlog_count(store) == 30
    return settings, store


def _refused_ids(store: Store) -> set[str]:
    with store.engine.connect() as conn:
        status = dict(conn.execute(sa.select(t.samples.c.episode_id, t.samples.c.status)).all())
    return {e for e, s in status.items() if s == "unscorable"}


def _asked(judge: StandIn, text: str) -> int:
    return len([b for b in judge.script.bodies if text in json.dumps(b)])


def _judge_worker(
    tmp_path: Path, judge_standin: StandIn, give_up_after: int, prom: CollectorRegistry, **resilience: Any
) -> tuple[Store, Any]:
    """The refused backlog (``_refused_backlog``) and a background scorer of the stand-in judge."""
    from monitor.reward.kinds.background import BackgroundScorer

    settings, store = _refused_backlog(tmp_path)
    judge = {
        "base_url": f"{judge_standin.url}/v1",
        "model": "stand-in",
        "resilience": {"max_attempts": 1, **resilience},
    }
    registry = Registry.for_settings(store, settings)
    version = registry.register(KindVersion.create("judge", judge), data_window={}, metrics={})
    backend = load_backend(registry.path_of(version))
    worker = BackgroundScorer(
        store, backend, BackendMetrics.on(prom), batch=8, retry_after_s=0.01, give_up_after=give_up_after
    )
    return store, worker


def _round(worker: Any, store: Store) -> None:
    """One fetch -> score round, its scores committed as the scorer's batch would."""
    import time

    worker.run_once()
    store.record_scores(
        [
            {"episode_id": w.episode_id, "version": "v", "stream": w.stream, "score": float(sc.value or 0.0),
             "ts": w.ts, "created_at": 0.0}
            for w, sc in worker.take()
        ]
    )  # fmt: skip
    time.sleep(0.02)


def test_an_episode_the_judge_refuses_leaves_the_backlog_and_an_outage_gives_up_on_none(
    tmp_path: Path, judge_standin: StandIn
) -> None:
    """Retried forever, refused episodes piled up oldest first in every fetch, and their retries
    took a growing share of the judge's calls until the episodes behind them starved."""
    prom = CollectorRegistry()
    store, worker = _judge_worker(tmp_path, judge_standin, 3, prom, breaker_reset_s=0.01)

    def rounds(n: int) -> None:
        for _ in range(n):
            _round(worker, store)

    judge_standin.script.mode = "fail"  # the endpoint is down: every episode fails, none is given up
    rounds(12)
    assert worker.failed >= 30 and worker.given_up == 0 and backlog_count(store) == 30
    judge_standin.script.mode, judge_standin.script.refuse = "ok", "POISON"
    for _ in range(300):  # rounds until done (on a loaded machine the circuit may reject a few first)
        rounds(1)
        if worker.given_up == 2 and backlog_count(store) == 0:
            break
    assert worker.given_up == 2 and backlog_count(store) == 0 and _refused_ids(store) == {"e0", "e7"}
    assert prom.get_sample_value("oversight_rm_async_scored_total", {"outcome": "given_up"}) == 2
    hits = _asked(judge_standin, "POISON")
    rounds(3)  # never asked again
    assert _asked(judge_standin, "POISON") == hits
    worker.backend.close()
    store.close()


def test_an_overloaded_judge_gets_no_episode_given_up(tmp_path: Path, judge_standin: StandIn) -> None:
    """A judge over its rate limit (429 to three requests in four) scores some episodes of every
    round: its 429s were counted against the others, and at ``give_up_after`` episodes it never
    refused were marked unscorable for good (14 of 30 in one run). Only a refusal of the episode
    (or an answer that cannot be parsed) counts; the episodes wait until they are scored."""
    store, worker = _judge_worker(tmp_path, judge_standin, 2, CollectorRegistry(), breaker_failures=1000)
    judge_standin.script.mode, judge_standin.script.refuse = "overloaded", "POISON"
    for _ in range(400):
        _round(worker, store)
        if backlog_count(store) == 0:
            break
    assert backlog_count(store) == 0 and worker.failed > 30  # many 429s on the way
    assert _refused_ids(store) == {"e0", "e7"}  # the refused ones only, none the judge was too busy for
    worker.backend.close()
    store.close()


@pytest.mark.parametrize("mode", ["ok", "overloaded"])
def test_an_inference_worker_of_its_own_gives_up_on_refused_episodes_too(
    tmp_path: Path, judge_standin: StandIn, mode: str
) -> None:
    """``oversight infer`` claims by lease: a refused episode's claim expired and it was claimed
    again, forever. A judge over its rate limit (``overloaded``) gets no other episode given up."""
    import time

    from monitor.service.infer import InferenceWorker

    # Four a round: the refused ones fail while the others are scored, round after round.
    extra = ("inference.retry_after_s=0.01", "inference.batch_size=4", "reward.backlog_give_up_after=3")
    settings, store = _refused_backlog(tmp_path, *extra)
    resilience = {"max_attempts": 1, "breaker_failures": 1000}
    judge = {"base_url": f"{judge_standin.url}/v1", "model": "stand-in", "resilience": resilience}
    registry = Registry.for_settings(store, settings)
    registry.promote(registry.register(KindVersion.create("judge", judge), data_window={}, metrics={}))
    judge_standin.script.refuse, judge_standin.script.mode = "POISON", mode
    worker = InferenceWorker(settings, Store(settings.database.url, migrate=False), worker_id="w1")
    (stage,) = worker.stages

    def held() -> dict[str, bool]:
        with store.engine.connect() as conn:
            return dict(conn.execute(sa.select(t.inference_results.c.episode_id, t.inference_results.c.done)).all())

    for _ in range(300):  # rounds until done
        worker.round(stage)
        time.sleep(0.02)
        if len(_refused_ids(store)) == 2 and len(held()) == 28 and all(held().values()):
            break
    assert _refused_ids(store) == {"e0", "e7"}
    assert len(held()) == 28 and all(held().values())  # scores for the rest; no claim left on the two
    metric = {"stage": "rm_score", "outcome": "given_up"}
    assert worker.registry.get_sample_value("oversight_inference_items_total", metric) == 2
    hits = _asked(judge_standin, "POISON")
    for _ in range(3):
        worker.round(stage)
        time.sleep(0.02)
    assert _asked(judge_standin, "POISON") == hits
    worker.close()
    store.close()
