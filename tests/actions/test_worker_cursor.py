"""The action worker's cursor over drift events, on SQLite and the real PostgreSQL: each event is
taken by exactly one worker, also when two read the same cursor at once, and the cursor survives
a restart."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from monitor.actions.worker import ActionWorker
from monitor.config import Settings, load_settings
from monitor.store import BatchWrite, Store
from monitor.store import requests as rq
from monitor.store import tables as t


def _settings(db_url: str, tmp_path: Path) -> Settings:
    return load_settings(None, ["dev=true", f"database.url={db_url}", f"reward.models_dir={tmp_path / 'models'}"])


def _events(store: Store, stream: str, first: int, n: int) -> None:
    store.commit_batch(
        BatchWrite(
            drift_events=[
                {
                    "stream": stream,
                    "signal": "response_log_chars",
                    "detector": "page_hinkley",
                    "statistic": 12.0,
                    "threshold": 10.0,
                    "p_val": None,
                    "episode_id": f"{stream}-{i}",
                    "input_index": i,
                    "event_ts": 10_000.0 + i,
                    "created_at": 1.0,
                }
                for i in range(first, first + n)
            ]
        )
    )


def test_two_workers_reading_the_same_cursor_take_each_event_once(db_url: str, tmp_path: Path) -> None:
    """Both workers read the cursor (none yet) and the new events before either moves it: the
    database's compare-and-set lets exactly one of them act on the events."""
    settings = _settings(db_url, tmp_path)
    store = Store(db_url)
    _events(store, "chat", 0, 3)
    workers = [ActionWorker(settings, store), ActionWorker(settings, store)]
    # Hold each worker's thread right after it read the drift events until the other one has too
    # (PostgreSQL). SQLite runs one write transaction at a time: there the second worker waits for
    # the first, the barrier times out and the workers run one after the other.
    barrier = threading.Barrier(2)
    held: set[int] = set()
    racing: set[int] = set()

    def hold(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        me = threading.get_ident()
        reads_events = statement.lstrip().upper().startswith("SELECT") and "FROM drift_events" in statement
        if me in racing and me not in held and reads_events:
            held.add(me)
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=2)

    sa.event.listen(store.engine, "before_cursor_execute", hold)
    taken: list[int] = []
    errors: list[BaseException] = []

    def run(w: ActionWorker) -> None:
        racing.add(threading.get_ident())
        try:
            taken.append(w.ingest_events())
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    sa.event.remove(store.engine, "before_cursor_execute", hold)
    assert not errors
    assert sorted(taken) == [0, 3], taken
    # Nothing left for anyone; the next event is taken once.
    assert [w.ingest_events() for w in workers] == [0, 0]
    _events(store, "chat", 3, 1)
    assert sorted(w.ingest_events() for w in workers) == [0, 1]
    store.close()


def test_the_cursor_survives_a_restart(db_url: str, tmp_path: Path) -> None:
    settings = _settings(db_url, tmp_path)
    store = Store(db_url)
    _events(store, "chat", 0, 2)
    assert ActionWorker(settings, store).ingest_events() == 2
    ids = [e["id"] for e in store.drift_events()]
    # Kept in the service's keyed state, not in the per-stream state.
    assert store.load_internal("actions:cursor") == {"last_event_id": ids[-1]}
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.stream_state)).scalar_one() == 0
    store.close()

    store = Store(db_url)
    restarted = ActionWorker(settings, store)
    assert restarted.ingest_events() == 0
    _events(store, "code", 0, 1)
    assert restarted.ingest_events() == 1
    # One incident per stream, each event in it once.
    reqs = {r["stream"]: r for r in rq.listing(store)}
    assert sorted(reqs) == ["chat", "code"]
    assert [e["id"] for e in reqs["chat"]["payload"]["drift_events"]] == ids
    store.close()


def test_an_incident_carries_a_bounded_number_of_events(db_url: str, tmp_path: Path) -> None:
    """Every event of an open incident used to be appended and the whole payload written again:
    quadratic in the events (3,000 made a 0.74 MB payload and a 16 s round), and past about 130 the
    Kubernetes sink refused the request. Its first events and its newest are kept, all counted."""
    import json

    from monitor.actions.worker import INCIDENT_EVENTS_FIRST, INCIDENT_EVENTS_NEWEST

    settings = _settings(db_url, tmp_path)
    store = Store(db_url)
    worker = ActionWorker(settings, store)
    for first in range(0, 600, 100):  # six rounds, the incident open throughout (an event a second)
        _events(store, "chat", first, 100)
        assert worker.ingest_events() == 100
    ids = [e["id"] for e in store.drift_events()]
    [req] = rq.listing(store)
    payload = req["payload"]
    kept = [e["id"] for e in payload["drift_events"]]
    assert kept == ids[:INCIDENT_EVENTS_FIRST] + ids[-INCIDENT_EVENTS_NEWEST:]
    assert payload["events_total"] == 600 and payload["last_event_id"] == ids[-1]
    assert len(json.dumps(payload)) < 32 * 1024
    assert worker.ingest_events() == 0
    store.close()


def test_an_outage_while_acting_loses_no_event(db_url: str, tmp_path: Path) -> None:
    """The cursor moves past an event only after the event is acted on: an outage (or a kill) in the
    middle of a round leaves the rest of the round for the next one. Moved first, the three events
    after the failure were skipped for good: no incident, no request for their streams."""
    settings = _settings(db_url, tmp_path)
    store = Store(db_url)
    for stream in ("s1", "s2", "s3", "s4"):
        _events(store, stream, 0, 1)
    worker = ActionWorker(settings, store)
    act = worker._on_event
    calls = 0

    def failing_once(ev: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise sa.exc.OperationalError("insert", {}, Exception("server closed the connection"))
        act(ev)

    worker._on_event = failing_once  # type: ignore[method-assign]
    with contextlib.suppress(sa.exc.OperationalError):
        worker.ingest_events()
    assert sorted(r["stream"] for r in rq.listing(store)) == ["s1"]
    assert worker.ingest_events() == 3
    assert sorted(r["stream"] for r in rq.listing(store)) == ["s1", "s2", "s3", "s4"]
    # Events acted on again (a kill after acting, before the cursor moved) make no second request,
    # and no incident holds an event twice.
    before = {r["id"]: r["payload"] for r in rq.listing(store)}
    store.save_internal("actions:cursor", {"last_event_id": 0})
    assert worker.ingest_events() == 4
    assert {r["id"]: r["payload"] for r in rq.listing(store)} == before
    store.close()


def test_two_workers_attaching_at_once_keep_every_event(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events attached to one open incident by two workers at once: each attach is a locked
    read-modify-write of the payload, so the later one does not overwrite the earlier one's event.
    Both read the open incident first (the barrier); the second event's write waits for the first's,
    as the cursor orders them (an incident skips an event older than its newest: a redelivery)."""
    settings = _settings(db_url, tmp_path)
    store = Store(db_url)
    _events(store, "chat", 0, 1)
    ActionWorker(settings, store).ingest_events()
    _events(store, "chat", 1, 2)
    first, second = store.drift_events(since_id=0)[1:3]
    workers = [ActionWorker(settings, store), ActionWorker(settings, store)]
    barrier = threading.Barrier(2)
    held: set[int] = set()
    first_written = threading.Event()

    def hold(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        me = threading.get_ident()
        if me not in held and "FROM action_requests" in statement and statement.lstrip().upper().startswith("SELECT"):
            held.add(me)
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=2)

    modify = rq.modify_payload

    def in_order(store_: Store, rid: str, change: Any) -> bool:
        if threading.current_thread().name == "second":
            first_written.wait(10)
        try:
            return modify(store_, rid, change)
        finally:
            if threading.current_thread().name == "first":
                first_written.set()

    monkeypatch.setattr(rq, "modify_payload", in_order)
    sa.event.listen(store.engine, "before_cursor_execute", hold)
    threads = [
        threading.Thread(target=w._on_event, args=(ev,), name=name)
        for w, ev, name in zip(workers, (first, second), ("first", "second"), strict=True)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    sa.event.remove(store.engine, "before_cursor_execute", hold)
    [req] = rq.listing(store)
    assert sorted(e["id"] for e in req["payload"]["drift_events"]) == [e["id"] for e in store.drift_events()]
    store.close()
