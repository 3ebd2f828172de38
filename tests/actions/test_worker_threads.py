"""The action worker's rounds: a step that fails does not skip the rest of the round, the quality
gauges stay fresh while a model step or a dispatch runs for a long time, and a Kafka sink is built
once, not once per round (a producer, with its thread and sockets, left behind every 5 s)."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from bench import tansu
from monitor.actions.worker import CURSOR_KEY, LANES, ActionWorker
from monitor.config import Settings, load_settings
from monitor.metrics import Metrics
from monitor.review.auth import create_user
from monitor.store import Store
from monitor.store import requests as rq
from monitor.store import tables as t


def _settings(tmp_path: Path, *extra: str) -> Settings:
    return load_settings(
        None,
        ["dev=true", f"database.url=sqlite:///{tmp_path / 'o.db'}", f"reward.models_dir={tmp_path / 'models'}", *extra],
    )


def _label(store: Store, n: int, user_id: int, start: int = 0, rating: int | None = None) -> None:
    """``n`` human-sampled episodes of stream chat, each rated once (``rating``, else 1 to 7 in turn)."""
    now = time.time()
    ids = [f"e{i}" for i in range(start, start + n)]
    with store.engine.begin() as conn:
        conn.execute(
            t.episodes.insert(),
            [
                {
                    "episode_id": e,
                    "stream": "chat",
                    "model": "m",
                    "ts": now,
                    "prompt": "p",
                    "response": "r",
                    "metadata": {},
                    "source": "t",
                    "position": e,
                    "ingested_at": now,
                }
                for e in ids
            ],
        )
        conn.execute(
            t.samples.insert(),
            [
                {
                    "episode_id": e,
                    "channel": "human",
                    "stream": "chat",
                    "ts": now,
                    "inclusion_probability": 0.5,
                    "created_at": now,
                }
                for e in ids
            ],
        )
        conn.execute(
            t.labels.insert(),
            [
                {
                    "episode_id": e,
                    "slot": 0,
                    "user_id": user_id,
                    "stream": "chat",
                    "skipped": False,
                    "rating": 1 + i % 7 if rating is None else rating,
                    "flags": [],
                    "critique": "",
                    "time_spent_ms": 1,
                    "created_at": now,
                }
                for i, e in enumerate(ids)
            ],
        )


def _estimate(metrics: Metrics) -> float | None:
    value: float | None = metrics.registry.get_sample_value(
        "oversight_quality_estimate", {"stream": "chat", "bound": "estimate"}
    )
    return value


def _errors(metrics: Metrics, step: str) -> float | None:
    value: float | None = metrics.registry.get_sample_value("oversight_action_worker_errors_total", {"step": step})
    return value


def test_a_failing_step_does_not_skip_the_gauges(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    store = Store(settings.database.url)
    _label(store, 12, create_user(store, "rev", "reviewer", "correct horse battery").id)
    # A fault of the incidents step, the first of its round: its cursor row is garbled.
    store.save_internal(CURSOR_KEY, {"last_event_id": "garbled"})
    metrics = Metrics(CollectorRegistry())
    worker = ActionWorker(settings, store, metrics)
    # Pre-zeroed: the first failure of any step shows in rate().
    steps = [step for lane in LANES.values() for step in lane]
    assert sorted(steps) == ["dispatch", "gauges", "incidents", "sensitivity", "updates"]
    assert all(_errors(metrics, step) == 0.0 for step in steps)
    try:
        assert worker.run_round(LANES["action-worker"]) == 1
        assert _errors(metrics, "incidents") == 1.0 and worker.errors == 1
        assert _errors(metrics, "gauges") == 0.0
        assert _estimate(metrics) == pytest.approx(sum(1 + i % 7 for i in range(12)) / 12)
        # run_once (tests, the simulation) still stops at the first failure, on the caller's thread.
        with pytest.raises(ValueError, match="garbled"):
            worker.run_once()
    finally:
        worker.stop()
        store.close()


class _Slow(ActionWorker):
    """Stand-ins for a step that takes minutes: an update that trains, a dispatch that waits out a
    broker's bootstrap timeout. The ``slow`` step blocks until released."""

    def __init__(self, slow: str, *args: Any, **kwargs: Any) -> None:
        self.slow = slow
        self.busy = threading.Event()
        self.release = threading.Event()
        super().__init__(*args, **kwargs)

    def _hold(self, step: str) -> None:
        if step == self.slow:
            self.busy.set()
            assert self.release.wait(60), "never released"

    def run_updates(self) -> list[dict[str, Any]]:
        self._hold("updates")
        return super().run_updates()

    def dispatch(self) -> int:
        self._hold("dispatch")
        return super().dispatch()


@pytest.mark.parametrize("slow", ["updates", "dispatch"])
def test_the_gauges_stay_fresh_while_a_slow_step_runs(tmp_path: Path, slow: str) -> None:
    settings = _settings(tmp_path, "reward.update.poll_s=0.1")
    store = Store(settings.database.url)
    user = create_user(store, "rev", "reviewer", "correct horse battery").id
    metrics = Metrics(CollectorRegistry())
    worker = _Slow(slow, settings, store, metrics)
    worker.start()
    try:
        assert worker.busy.wait(10), f"the worker never ran its {slow} step"
        _label(store, 7, user)  # labels that come in while the slow step runs
        deadline = time.monotonic() + 20
        while _estimate(metrics) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _estimate(metrics) == pytest.approx(4.0), f"the quality gauge froze while {slow} ran"
        assert not worker.release.is_set()  # still busy
        _label(store, 7, user, start=7, rating=7)
        while _estimate(metrics) == pytest.approx(4.0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _estimate(metrics) == pytest.approx((28 + 49) / 14)
    finally:
        worker.release.set()
        worker.stop()
        store.close()
    assert worker.errors == 0


class _SlowGauges(ActionWorker):
    """A refresh that takes 0.1 s (a stand-in for a database with years of labels, or a slow
    one), and fails when ``failing`` is set (after taking its time, as a timeout does). Records
    when each refresh started and how long it took."""

    failing = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refreshes: list[tuple[float, float]] = []

    def refresh_gauges(self) -> dict[str, dict[str, Any]]:
        start = time.monotonic()
        try:
            time.sleep(0.1)
            if self.failing:
                raise RuntimeError("statement timeout")
            return super().refresh_gauges()
        finally:
            self.refreshes.append((start, time.monotonic() - start))


@pytest.mark.parametrize("failing", [False, True])
def test_the_gauges_take_at_most_their_duty_of_the_time(tmp_path: Path, failing: bool) -> None:
    """Rounds back to back for 1.5 s: a refresh of 0.1 s every round would take the whole thread
    (15 refreshes); with actions.gauges_duty=0.25 a refresh that took t starts the next no sooner
    than t / 0.25 after its own start, whether it succeeded or failed. run_once (tests, the
    simulation) is not paced."""
    settings = _settings(tmp_path, "actions.gauges_duty=0.25")
    store = Store(settings.database.url)
    _label(store, 12, create_user(store, "rev", "reviewer", "correct horse battery").id)
    metrics = Metrics(CollectorRegistry())
    worker = _SlowGauges(settings, store, metrics)
    worker.failing = failing
    try:
        end = time.monotonic() + 1.5
        rounds = 0
        while time.monotonic() < end:
            worker.run_round(LANES["action-worker"])
            rounds += 1
        refreshes = worker.refreshes
        assert 2 <= len(refreshes) <= 5 and rounds > 2 * len(refreshes), (rounds, refreshes)
        for (start, took), (later, _) in itertools.pairwise(refreshes):
            assert later - start >= took / 0.25 - 0.01, refreshes  # the pace, however slow the machine
        last = metrics.registry.get_sample_value("oversight_gauges_refresh_seconds")
        assert last is not None and last >= 0.1
        assert _errors(metrics, "gauges") == (len(refreshes) if failing else 0)
        if not failing:
            assert _estimate(metrics) == pytest.approx(sum(1 + i % 7 for i in range(12)) / 12)
        worker.failing = False
        before = len(refreshes)
        worker.run_once()
        worker.run_once()
        assert len(worker.refreshes) == before + 2
    finally:
        worker.stop()
        store.close()


def _producer_threads() -> int:
    return sum(1 for th in threading.enumerate() if "kafka" in th.name.lower())


@pytest.mark.kafka
def test_the_kafka_sink_is_built_once(tmp_path: Path, action_kafka: str) -> None:
    topic = f"retrain-{uuid.uuid4().hex[:10]}"
    tansu.create_topic(action_kafka, topic, 1)
    settings = _settings(
        tmp_path,
        'actions.retrain_sinks=["kafka"]',
        f'kafka.bootstrap_servers=["{action_kafka}"]',
        f"kafka.retrain_topic={topic}",
    )
    store = Store(settings.database.url)
    worker = ActionWorker(settings, store, Metrics(CollectorRegistry()))
    before = _producer_threads()
    try:
        for i in range(4):
            rq.create(store, "retrain", f"chat:{i}", "chat", {"stream": "chat", "i": i})
            assert worker.dispatch() == 1
        # One producer for all four rounds (each built its own before).
        assert _producer_threads() - before == 1
    finally:
        worker.stop()
        store.close()
    assert _producer_threads() == before  # closed at stop
    got = tansu.consume_all(action_kafka, topic, expect=4)
    assert len(got) == 4
