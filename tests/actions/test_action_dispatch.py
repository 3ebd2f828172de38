"""dispatch_pending on SQLite and PostgreSQL: exactly one worker claims each request, state transitions,
per-sink results and metrics, and what happens after a worker dies mid-delivery (the request goes out
again, under the same idempotency key, and the receiver drops the repeat)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from action_helpers import Gate, Receiver
from prometheus_client import CollectorRegistry

from monitor.actions.dispatch import MIN_LEASE_S, dispatch_pending, lease_seconds
from monitor.actions.sinks import LogSink, Sink, WebhookSink
from monitor.config import Settings, WebhookConfig, load_settings
from monitor.metrics import Metrics
from monitor.store import Store, requests
from monitor.store import tables as t


@pytest.fixture
def settings() -> Settings:
    return load_settings(None, ["dev=true"])


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    try:
        yield s
    finally:
        s.close()


def webhook(receiver: Receiver, secret_file: Path, **cfg: Any) -> WebhookSink:
    base: dict[str, Any] = {"timeout_s": 10, "backoff_s": 0.01, "max_attempts": 3}
    return WebhookSink(WebhookConfig(url=receiver.url, secret_file=str(secret_file), **(base | cfg)))


def count(metrics: Metrics, kind: str, sink: str, outcome: str) -> float:
    return (
        metrics.registry.get_sample_value(
            "oversight_action_requests_total", {"kind": kind, "sink": sink, "outcome": outcome}
        )
        or 0.0
    )


def row_of(store: Store, rid: str) -> dict[str, Any]:
    row = requests.get(store, rid)
    assert row is not None
    return row


def backdate(store: Store, rid: str, *, created_s: float, tried_s: float) -> None:
    r = t.action_requests
    now = time.time()
    with store.engine.begin() as conn:
        conn.execute(r.update().where(r.c.id == rid).values(created_at=now - created_s, updated_at=now - tried_s))


def make_requests(store: Store, n: int, kind: str = "retrain") -> list[str]:
    return [requests.create(store, kind, f"s{i % 3}:{i}", f"s{i % 3}", {"i": i})[0] for i in range(n)]


class Crash(BaseException):
    """Stands for the worker process dying (not an error dispatch could catch and record)."""


class CrashingSink(Sink):
    name = "crasher"

    def send(self, request: Mapping[str, Any]) -> dict[str, Any]:
        raise Crash


class BrokenSink(Sink):
    name = "broken"

    def send(self, request: Mapping[str, Any]) -> dict[str, Any]:
        raise KeyError("bug")


def test_each_request_is_claimed_and_delivered_exactly_once_by_concurrent_workers(
    db_url: str, store: Store, settings: Settings, receiver: Receiver, secret_file: Path
) -> None:
    ids = make_requests(store, 24)
    metrics = Metrics(CollectorRegistry())
    workers = 4
    barrier = threading.Barrier(workers)
    done: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        # Each worker is a replica of its own: its own engine and sink.
        own = Store(db_url, migrate=False)
        try:
            barrier.wait(10)
            done.append(dispatch_pending(own, settings, "retrain", [webhook(receiver, secret_file)], metrics))
        except BaseException as e:
            errors.append(e)
        finally:
            own.close()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []
    assert sum(done) == 24
    assert len(receiver.deliveries) == 24  # not one POST more: no request was sent by two workers
    assert sorted(receiver.processed) == sorted(ids)
    assert receiver.duplicates == []
    for rid in ids:
        row = requests.get(store, rid)
        assert row is not None
        assert (row["state"], row["attempts"], row["last_error"]) == ("sent", 1, None)
        assert row["result"] == {"webhook": {"status": 202, "attempts": 1}}
    assert count(metrics, "retrain", "webhook", "sent") == 24
    assert count(metrics, "retrain", "webhook", "failed") == 0
    assert dispatch_pending(store, settings, "retrain", [webhook(receiver, secret_file)], metrics) == 0
    assert len(receiver.deliveries) == 24


def test_only_pending_requests_of_the_kind_are_dispatched(
    store: Store, settings: Settings, receiver: Receiver, secret_file: Path
) -> None:
    retrain = make_requests(store, 2, "retrain")
    rm = make_requests(store, 2, "rm_update")
    assert requests.claim(store, rm[1])  # the embedded worker's: running, and fresh
    assert dispatch_pending(store, settings, "rm_update", [webhook(receiver, secret_file)]) == 1
    assert set(receiver.processed) == {rm[0]}
    assert [row_of(store, r)["state"] for r in (*retrain, *rm)] == ["pending", "pending", "sent", "running"]


def test_permanent_refusal_marks_the_request_failed(
    store: Store, settings: Settings, receiver: Receiver, secret_file: Path
) -> None:
    (rid,) = make_requests(store, 1)
    receiver.script = [(400, {})]
    metrics = Metrics(CollectorRegistry())
    assert dispatch_pending(store, settings, "retrain", [webhook(receiver, secret_file)], metrics) == 1
    row = requests.get(store, rid)
    assert row is not None and row["state"] == "failed" and row["attempts"] == 1
    assert row["last_error"] == "webhook: permanent failure: HTTP 400 Bad Request"
    assert row["result"] == {"webhook": {"error": "permanent failure: HTTP 400 Bad Request", "permanent": True}}
    assert len(receiver.deliveries) == 1
    assert count(metrics, "retrain", "webhook", "failed") == 1
    # Failed is final: a later dispatch does not send it again.
    assert dispatch_pending(store, settings, "retrain", [webhook(receiver, secret_file)], metrics) == 0
    assert len(receiver.deliveries) == 1


def test_transient_failures_after_max_attempts_say_so(store: Store, receiver: Receiver, secret_file: Path) -> None:
    settings = load_settings(None, ["dev=true", "actions.redeliver_for_s=0"])  # no redelivery: failed at once
    (rid,) = make_requests(store, 1)
    receiver.script = [(503, {})] * 3
    assert dispatch_pending(store, settings, "retrain", [webhook(receiver, secret_file, max_attempts=3)]) == 1
    row = requests.get(store, rid)
    assert row is not None and row["state"] == "failed"
    assert row["last_error"] == "webhook: transient failure, gave up after 3 attempts: HTTP 503 Service Unavailable"
    assert row["result"]["webhook"]["permanent"] is False
    assert len(receiver.deliveries) == 3


def test_a_request_whose_receiver_is_down_is_sent_again_later_until_it_lands(
    store: Store, receiver: Receiver, secret_file: Path
) -> None:
    """The receiver answers 503 for longer than the sink's own retries: the request waits (pending,
    with its error), is not sent again before its delay, then lands under the same idempotency key."""
    settings = load_settings(None, ["dev=true", "actions.redeliver_backoff_s=0.3"])
    (rid,) = make_requests(store, 1)
    receiver.script = [(503, {})] * 4  # two deliveries of two attempts each
    sink = webhook(receiver, secret_file, max_attempts=2)
    assert dispatch_pending(store, settings, "retrain", [sink]) == 0  # not finished: waiting
    row = row_of(store, rid)
    assert row["state"] == "pending" and row["attempts"] == 1
    assert row["last_error"] == "webhook: transient failure, gave up after 2 attempts: HTTP 503 Service Unavailable"
    assert dispatch_pending(store, settings, "retrain", [sink]) == 0 and len(receiver.deliveries) == 2  # not due
    time.sleep(0.35)
    assert dispatch_pending(store, settings, "retrain", [sink]) == 0  # the second delivery fails too
    assert row_of(store, rid)["attempts"] == 2 and len(receiver.deliveries) == 4
    time.sleep(0.35)  # the delay doubled: 0.6 s after the second delivery
    assert dispatch_pending(store, settings, "retrain", [sink]) == 0 and len(receiver.deliveries) == 4
    time.sleep(0.3)
    assert dispatch_pending(store, settings, "retrain", [sink]) == 1
    row = row_of(store, rid)
    assert row["state"] == "sent" and row["last_error"] is None and "error" not in row["result"]["webhook"]
    assert list(receiver.processed) == [rid]  # delivered once, with the request's id as its key


def test_a_waiting_request_does_not_hold_back_new_ones_and_old_ones_fail(
    store: Store, receiver: Receiver, secret_file: Path
) -> None:
    settings = load_settings(None, ["dev=true", "actions.redeliver_backoff_s=3600", "actions.redeliver_for_s=60"])
    (old,) = make_requests(store, 1)
    receiver.script = [(503, {})]
    sink = webhook(receiver, secret_file, max_attempts=1)
    assert dispatch_pending(store, settings, "retrain", [sink]) == 0
    assert row_of(store, old)["state"] == "pending"
    new = requests.create(store, "retrain", "s9:9", "s9", {})[0]
    assert dispatch_pending(store, settings, "retrain", [sink]) == 1  # the new one, past the waiting one
    assert row_of(store, new)["state"] == "sent" and row_of(store, old)["state"] == "pending"
    # Past redeliver_for_s since it was created, a request that fails again is failed for good.
    backdate(store, old, created_s=120, tried_s=7200)  # created 2 min ago, due (tried 2 h ago)
    receiver.script = [(503, {})]
    assert dispatch_pending(store, settings, "retrain", [sink]) == 1
    assert row_of(store, old)["state"] == "failed"


def test_newer_waiting_requests_past_the_limit_do_not_hide_an_older_due_one(store: Store, settings: Settings) -> None:
    (due,) = make_requests(store, 1)
    newer = [requests.create(store, "retrain", f"n:{i}", "n", {"i": i})[0] for i in range(3)]
    r = t.action_requests
    with store.engine.begin() as conn:  # the newer ones failed a moment ago and wait an hour
        conn.execute(
            r.update().where(r.c.id.in_(newer)).values(attempts=1, last_error="webhook: down", updated_at=time.time())
        )
    assert dispatch_pending(store, settings, "retrain", [LogSink()], limit=2) == 1
    assert row_of(store, due)["state"] == "sent"
    assert {row_of(store, rid)["state"] for rid in newer} == {"pending"}


def test_a_permanent_refusal_is_not_sent_again(store: Store, receiver: Receiver, secret_file: Path) -> None:
    settings = load_settings(None, ["dev=true", "actions.redeliver_backoff_s=0.01"])
    (rid,) = make_requests(store, 1)
    receiver.script = [(422, {})]
    assert dispatch_pending(store, settings, "retrain", [webhook(receiver, secret_file)]) == 1
    time.sleep(0.05)
    assert dispatch_pending(store, settings, "retrain", [webhook(receiver, secret_file)]) == 0
    assert row_of(store, rid)["state"] == "failed" and len(receiver.deliveries) == 1


def test_every_sink_is_tried_and_each_outcome_recorded(store: Store, receiver: Receiver, secret_file: Path) -> None:
    settings = load_settings(None, ["dev=true", "actions.redeliver_backoff_s=0.05"])
    (rid,) = make_requests(store, 1)
    metrics = Metrics(CollectorRegistry())
    sinks = [BrokenSink(), LogSink(), webhook(receiver, secret_file)]
    assert dispatch_pending(store, settings, "retrain", sinks, metrics) == 0  # waits to be sent again
    row = requests.get(store, rid)
    assert row is not None and row["state"] == "pending"
    assert row["result"]["log"] == {"logged": True}
    assert row["result"]["webhook"] == {"status": 202, "attempts": 1}
    assert row["result"]["broken"] == {"error": "KeyError: 'bug'", "permanent": False}
    assert row["last_error"] == "broken: KeyError: 'bug'"
    assert set(receiver.processed) == {rid}
    outcomes = [("broken", "failed"), ("log", "sent"), ("webhook", "sent")]
    assert [count(metrics, "retrain", s, o) for s, o in outcomes] == [1, 1, 1]
    # Sent again to the sink that failed only: the others have it.
    time.sleep(0.1)
    assert dispatch_pending(store, settings, "retrain", sinks, metrics) == 0
    assert [count(metrics, "retrain", s, o) for s, o in outcomes] == [2, 1, 1]
    assert len(receiver.deliveries) == 1 and row_of(store, rid)["attempts"] == 2


def test_a_request_abandoned_mid_delivery_is_resumed_with_the_remaining_sinks(
    store: Store, settings: Settings, receiver: Receiver, secret_file: Path
) -> None:
    (rid,) = make_requests(store, 1)
    with pytest.raises(Crash):
        dispatch_pending(store, settings, "retrain", [webhook(receiver, secret_file), CrashingSink(), LogSink()])
    row = requests.get(store, rid)
    assert row is not None and row["state"] == "running"
    assert row["result"] == {"webhook": {"status": 202, "attempts": 1}}  # recorded before the crash
    # Within the lease nobody touches it: the first worker might still be alive.
    assert dispatch_pending(store, settings, "retrain", [webhook(receiver, secret_file), LogSink()]) == 0
    assert row_of(store, rid)["state"] == "running"
    # After the lease it is taken over; the webhook already has it and is not sent it again.
    assert dispatch_pending(store, settings, "retrain", [webhook(receiver, secret_file), LogSink()], lease_s=0) == 1
    row = requests.get(store, rid)
    assert row is not None
    assert (row["state"], row["attempts"]) == ("sent", 2)
    assert row["result"] == {"webhook": {"status": 202, "attempts": 1}, "log": {"logged": True}}
    assert len(receiver.deliveries) == 1


def test_a_worker_that_lost_its_lease_cannot_overwrite_the_new_owner(
    db_url: str, store: Store, settings: Settings, receiver: Receiver, secret_file: Path
) -> None:
    """Worker A stalls inside a delivery past its lease; B takes the request over and sends it too. A's
    delivery completes while B's is still in flight: A's late writes are refused, B finishes the request.
    The receiver gets the request twice under one Idempotency-Key and processes it once."""
    (rid,) = make_requests(store, 1)
    gate_a, gate_b = Gate(), Gate()
    receiver.gates = [gate_a, gate_b]
    lease = 0.3
    results: dict[str, int] = {}

    def worker(name: str) -> None:
        own = Store(db_url, migrate=False)
        try:
            results[name] = dispatch_pending(own, settings, "retrain", [webhook(receiver, secret_file)], lease_s=lease)
        finally:
            own.close()

    a = threading.Thread(target=worker, args=("a",))
    b = threading.Thread(target=worker, args=("b",))
    try:
        a.start()
        assert gate_a.arrived.wait(10)
        time.sleep(lease + 0.2)
        b.start()
        assert gate_b.arrived.wait(10)
        gate_a.release.set()
        a.join(30)
        assert results == {"a": 0}
        assert row_of(store, rid)["state"] == "running"
        assert row_of(store, rid)["result"] is None
        gate_b.release.set()
        b.join(30)
    finally:
        gate_a.release.set()
        gate_b.release.set()
        a.join(30)
        b.join(30)
    assert results == {"a": 0, "b": 1}
    row = row_of(store, rid)
    assert (row["state"], row["attempts"]) == ("sent", 2)
    assert row["result"] == {"webhook": {"status": 200, "attempts": 1}}  # B's: the receiver's "duplicate" answer
    assert len(receiver.verified()) == 2
    assert list(receiver.processed) == [rid]
    assert receiver.duplicates == [rid]


def test_failure_of_a_sink_is_not_counted_as_sent_for_later_recovery(
    store: Store, settings: Settings, receiver: Receiver, secret_file: Path
) -> None:
    (rid,) = make_requests(store, 1)
    receiver.script = [(503, {})] * 2
    # The webhook fails (transiently), then the worker dies before finishing the request.
    with pytest.raises(Crash):
        dispatch_pending(store, settings, "retrain", [webhook(receiver, secret_file, max_attempts=2), CrashingSink()])
    assert row_of(store, rid)["result"] is None
    assert dispatch_pending(store, settings, "retrain", [webhook(receiver, secret_file)], lease_s=0) == 1
    row = requests.get(store, rid)
    assert row is not None and row["state"] == "sent"
    assert set(receiver.processed) == {rid}


def test_lease_outlasts_every_retry_of_a_delivery(settings: Settings) -> None:
    assert lease_seconds(settings) >= MIN_LEASE_S
    slow = load_settings(None, ["dev=true", "actions.webhook.max_attempts=20", "actions.webhook.timeout_s=60"])
    assert lease_seconds(slow) >= 20 * 60 + 19 * 120


def test_no_sinks_is_an_error(store: Store, settings: Settings) -> None:
    with pytest.raises(ValueError, match="at least one sink"):
        dispatch_pending(store, settings, "retrain", [])
