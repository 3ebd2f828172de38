"""Inference workers: embeddings (and scores) off the ingest path, exactly once, and the model
channels' rates that follow the workers' lag.

The service is built as ``oversight run`` builds it (``prepare_for_service``: the workers on
their threads) with the real MiniLM encoder; only its speed is controlled, by holding it on an
event, so that "ingest never waits" is observed rather than assumed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from realdata import alpaca_rows

from monitor.config import Settings, load_settings
from monitor.drift import COMPONENT
from monitor.episodes.deadletter import JsonlDeadLetterSink
from monitor.pipeline import LoopHooks
from monitor.pipeline.background import BackgroundWork, lower_thread_priority
from monitor.service import Service, build_service
from monitor.signals.embeddings import Embedder
from monitor.sources.memory import MemorySource
from monitor.store import Store
from monitor.store import tables as t

T0 = 1_767_225_600


def episodes(n: int, streams: tuple[str, ...] = ("chat", "assistant")) -> list[bytes]:
    rows = alpaca_rows("gpt-3.5-turbo-1106")
    return [
        json.dumps(
            {
                "episode_id": f"e{i}",
                "stream": streams[i % len(streams)],
                "timestamp": T0 + i,
                "prompt": rows[i % len(rows)]["instruction"],
                "response": rows[i % len(rows)]["output"],
            }
        ).encode()
        for i in range(n)
    ]


def settings(tmp: Path, *extra: str) -> Settings:
    return load_settings(
        None,
        [
            "dev=true",
            f"database.url=sqlite:///{tmp / 'db.sqlite'}",
            f"dead_letter.path={tmp / 'd.jsonl'}",
            "pipeline.batch_size=50",
            "sampling.drift.rate=0.3",
            "drift.embedding.reference_size=20",
            "drift.reference_size=100000",  # the text signals stay in warm-up: only embeddings matter here
            "reward.enabled=false",
            "inference.poll_s=0.05",
            *extra,
        ],
    )


def service(s: Settings, store: Store, n: int, prom: CollectorRegistry) -> Service:
    return build_service(
        s,
        source=MemorySource(episodes(n)),
        serve=False,
        store=store,
        dead_letters=JsonlDeadLetterSink(s.dead_letter.path, 1000),
        registry=prom,
        background_calibration=True,  # as `oversight run`: the workers on their threads
    )


def drift_status(store: Store) -> dict[str, int]:
    s = t.samples
    q = sa.select(s.c.status, sa.func.count()).where(s.c.channel == "drift").group_by(s.c.status)
    with store.engine.connect() as conn:
        return {r[0]: int(r[1]) for r in conn.execute(q)}


def fed(store: Store) -> dict[str, int]:
    """Embeddings fed to each stream's detectors, from the committed drift checkpoints."""
    out = {}
    for stream in ("chat", "assistant"):
        state = store.load_state(stream, COMPONENT) or {}
        out[stream] = int((state.get("fed") or {}).get("embedding", 0))
    return out


def drift_samples_per_stream(store: Store) -> dict[str, int]:
    s = t.samples
    q = sa.select(s.c.stream, sa.func.count()).where(s.c.channel == "drift").group_by(s.c.stream)
    with store.engine.connect() as conn:
        return {r[0]: int(r[1]) for r in conn.execute(q)}


@dataclass
class Held:
    """The held encoder: ``gate`` lets it go on; ``threads`` it ran on, and their nice values."""

    gate: threading.Event
    threads: list[str] = field(default_factory=list)
    priorities: set[int] = field(default_factory=set)


@pytest.fixture
def held_encoder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Held]:
    """The real encoder, made to wait for an event before each non-empty batch; records the
    threads it ran on and their CPU priority."""
    out = Held(threading.Event())
    real = Embedder.embed_episodes

    def held(self: Embedder, prompts: list[str], responses: list[str]) -> Any:
        if prompts:
            out.gate.wait(120)
            out.threads.append(threading.current_thread().name)
            out.priorities.add(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return real(self, prompts, responses)

    monkeypatch.setattr(Embedder, "embed_episodes", held)
    yield out
    out.gate.set()


def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_ingest_commits_every_batch_while_the_encoder_is_held(tmp_path: Path, held_encoder: Held) -> None:
    gate, threads = held_encoder.gate, held_encoder.threads
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    s = settings(tmp_path)
    store = Store(s.database.url)
    prom = CollectorRegistry()
    svc = service(s, store, 400, prom)
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(stats=svc.run()), daemon=True)
    runner.start()
    try:
        # Every batch commits although no embedding can be computed: the drift samples wait.
        wait_for(
            lambda: sum(drift_samples_per_stream(store).values()) > 0 and committed_episodes(store) == 400,
            120,
            "ingest",
        )
        status = drift_status(store)
        assert status.get("embedded", 0) == 0 and status["pending"] > 60
        assert runner.is_alive(), "the run ended before its embeddings were done"
        gate.set()
        runner.join(180)
        assert not runner.is_alive(), "the run did not settle its embedding backlog"
    finally:
        gate.set()
        svc.close()
    n = drift_samples_per_stream(store)
    assert drift_status(store) == {"embedded": sum(n.values())}
    assert fed(store) == n  # each drift sample fed exactly once, to its own stream
    assert set(threads) == {"inference-embedding"}  # never on the pipeline's thread
    # ... and below its CPU priority (inference.nice, 10): on busy cores ingest goes first.
    assert held_encoder.priorities == {min(19, base + 10)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    assert prom.get_sample_value("oversight_inference_items_total", {"stage": "embedding", "outcome": "ok"}) == sum(
        n.values()
    )
    assert result["stats"].records == 400
    store.close()


def committed_episodes(store: Store) -> int:
    """Episodes committed (sampled or not): the traffic counts."""
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(t.traffic.c.episodes), 0))).scalar_one())


@pytest.mark.slow  # about 12 s
def test_a_restart_feeds_what_the_last_run_left_waiting(tmp_path: Path, held_encoder: Held) -> None:
    """The first run stops with its drift samples waiting (the encoder held); the next run, on a
    source with no new episode, embeds each of them once and commits it."""
    gate = held_encoder.gate
    s = settings(tmp_path, "inference.settle_timeout_s=0")
    store = Store(s.database.url)
    svc = service(s, store, 200, CollectorRegistry())
    with svc:
        svc.run()
    waiting = drift_status(store)["pending"]
    assert waiting > 20 and fed(store) == {"chat": 0, "assistant": 0}
    gate.set()
    s2 = settings(tmp_path)
    svc2 = build_service(
        s2,
        source=MemorySource([]),
        serve=False,
        store=store,
        dead_letters=JsonlDeadLetterSink(s2.dead_letter.path, 1000),
        registry=CollectorRegistry(),
        background_calibration=True,
    )
    with svc2:
        svc2.run()
    assert drift_status(store) == {"embedded": waiting}
    assert fed(store) == drift_samples_per_stream(store)
    store.close()


@pytest.mark.slow  # about 17 s
def test_drift_rate_follows_the_workers_lag_and_stays_unbiased(tmp_path: Path, held_encoder: Held) -> None:
    """While the encoder is held, the drift channel's rate halves every adaptation down to its
    floor; every sample records the probability in effect, so the Horvitz-Thompson count of the
    drift sample still estimates the traffic. Released, the rate comes back."""
    gate = held_encoder.gate
    s = settings(
        tmp_path,
        "sampling.drift.rate=0.5",
        "sampling.drift.floor=0.1",
        "inference.max_lag_s=0.3",
        "inference.adapt_every_s=0.1",
    )
    store = Store(s.database.url)
    prom = CollectorRegistry()
    n = 2000
    svc = service(s, store, n, prom)
    slow = LoopHooks(after_batch=lambda records: time.sleep(0.1))  # 500 episodes/s: the lag builds up
    runner = threading.Thread(target=lambda: svc.run(hooks=slow), daemon=True)
    runner.start()
    try:
        wait_for(lambda: committed_episodes(store) == n, 120, "ingest")
        assert_drift_throttled(prom)
        gate.set()
        runner.join(180)
        assert not runner.is_alive()
        # The backlog is gone, so the rate recovers at the next adaptations.
        wait_for(lambda: recovered(svc), 10, "recovery")
    finally:
        gate.set()
        svc.close()
    assert_drift_sample_unbiased(store, n, rate=0.5, floor=0.1)
    store.close()


def assert_drift_throttled(prom: CollectorRegistry) -> None:
    """The drift channel halved at least twice, while the oldest embedding waited past max_lag_s (0.3 s)."""
    throttled = prom.get_sample_value("oversight_sampling_throttle", {"channel": "drift"})
    assert throttled is not None and throttled <= 0.25
    assert (prom.get_sample_value("oversight_inference_lag_seconds", {"stage": "embedding"}) or 0) > 0.3


def recovered(svc: Service) -> bool:
    """The drift channel's rate is back to 1 (else run the throttle's adaptation now)."""
    return svc.pipeline.sampler.throttle_factor("drift") == 1.0 or step_observers(svc)


def assert_drift_sample_unbiased(store: Store, n: int, *, rate: float, floor: float) -> None:
    """Every drift sample recorded the probability in effect, between the rate and its floor (never
    below), so the Horvitz-Thompson count of the drift sample estimates the ``n`` episodes."""
    with store.engine.connect() as conn:
        probs = [
            float(p)
            for (p,) in conn.execute(sa.select(t.samples.c.inclusion_probability).where(t.samples.c.channel == "drift"))
        ]
    assert max(probs) == pytest.approx(rate) and min(probs) == pytest.approx(floor)
    ht = sum(1 / p for p in probs)
    sd = sum((1 - p) / p**2 for p in probs) ** 0.5
    assert abs(ht - n) < 4 * sd, (ht, n, sd)


def step_observers(svc: Service) -> bool:
    """Run the observers' periodic step now (the throttle's adaptation); False, for ``wait_for``."""
    for obs in svc.pipeline.observers:
        step = getattr(obs, "step", None)
        if step is not None:
            step()
    return False


@pytest.mark.parametrize("nice", [0, 7, 40])
def test_a_background_worker_lowers_only_its_own_threads_priority(nice: int) -> None:
    """Linux keeps a nice value per thread: the worker's computing thread (and what it starts)
    runs ``nice`` steps lower, capped at 19; the thread that started it keeps its priority."""
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: list[int] = []

    def compute(items: Any) -> list[int]:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return [1 for _ in items]

    items = ["a", "b"]
    work = BackgroundWork[str, int](
        "nice-test", lambda n, skip: [i for i in items if i not in skip][:n], compute, key=str, nice=nice, poll_s=0.05
    ).start()
    try:
        wait_for(lambda: work.pending() == 2, 10, "the worker's results")
    finally:
        work.stop()
    assert seen and set(seen) == {min(19, base + nice)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base


def test_a_worker_started_by_a_worker_is_not_lowered_twice() -> None:
    """The level is relative to the process: a thread that inherited a lowered priority keeps it
    rather than going lower again (and is never raised, which would need a privilege)."""
    base = os.getpriority(os.PRIO_PROCESS, os.getpid())
    got: list[int | None] = []

    def outer() -> None:
        got.append(lower_thread_priority(5, "outer"))
        inner = threading.Thread(target=lambda: got.append(lower_thread_priority(5, "inner")))
        inner.start()
        inner.join()
        got.append(lower_thread_priority(2, "outer again"))  # less than it has: kept

    th = threading.Thread(target=outer)
    th.start()
    th.join()
    assert got == [min(19, base + 5)] * 3


def test_an_item_that_fails_while_others_succeed_is_given_up_and_a_model_that_fails_all_gives_up_none() -> None:
    """Batches of nothing but failing items (the oldest, fetched together) still count, as long
    as the model produced other results between their attempts."""
    waiting = {f"{'p' if i % 4 == 0 else 'g'}{i}": i for i in range(64)}
    down = [True]
    gave_up: list[str] = []

    def fetch(n: int, skip: frozenset[str]) -> list[str]:
        return [k for k in sorted(waiting, key=waiting.__getitem__) if k not in skip][:n]

    def compute(items: Sequence[str]) -> list[float | None]:
        return [None if down[0] or k.startswith("p") else 1.0 for k in items]

    def give_up(items: Sequence[str]) -> None:
        gave_up.extend(items)
        for k in items:
            del waiting[k]

    work = BackgroundWork("t", fetch, compute, key=str, batch=4, retry_after_s=0.0, give_up_after=3, give_up=give_up)
    for _ in range(40):  # every item fails many times over: an outage, not the items
        work.run_once()
    assert work.given_up == 0 and len(waiting) == 64
    down[0] = False
    for i in range(64, 144):  # traffic goes on: one new item a round
        waiting[f"g{i}"] = i
        work.run_once()
        for k, _ in work.take():
            waiting.pop(k, None)
    assert sorted(gave_up) == sorted(f"p{i}" for i in range(0, 64, 4)) and len(waiting) <= 4


def test_an_item_that_fails_its_whole_batch_is_given_up_alone() -> None:
    """A model that raises for a whole batch because of one item (an hf batch before its per-item
    guard, a parser bug): the round is computed again an item at a time, so the failure is that
    item's. Charged to every item of the round, its neighbours were given up (unscorable) with it."""
    waiting = {f"{'p' if i % 4 == 0 else 'g'}{i}": i for i in range(32)}
    gave_up: list[str] = []
    scored: list[str] = []

    def fetch(n: int, skip: frozenset[str]) -> list[str]:
        return [k for k in sorted(waiting, key=waiting.__getitem__) if k not in skip][:n]

    def compute(items: Sequence[str]) -> list[float | None]:
        if any(k.startswith("p") for k in items):
            raise RuntimeError("one item broke the batch")
        return [1.0 for _ in items]

    def give_up(items: Sequence[str]) -> None:
        gave_up.extend(items)
        for k in items:
            del waiting[k]

    work = BackgroundWork("t", fetch, compute, key=str, batch=4, retry_after_s=0.0, give_up_after=3, give_up=give_up)
    for i in range(32, 112):
        waiting[f"g{i}"] = i
        work.run_once()
        for k, _ in work.take():
            scored.append(k)
            waiting.pop(k, None)
    assert sorted(gave_up) == sorted(f"p{i}" for i in range(0, 32, 4))
    assert not any(k.startswith("g") for k in gave_up) and len(waiting) <= 4
