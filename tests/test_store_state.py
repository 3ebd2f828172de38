"""The store's access by meaning, against SQLite and the real PostgreSQL: the service's keyed state
(``internal_state``) with compare-and-set, insert-ignore, drift events, and the outbox of
unpublished rows."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa

from monitor.store import BatchWrite, DriftEventRow, StaleOffsets, Store
from monitor.store import tables as t
from monitor.store.store import PROBE_KEY

# Longer than stream_state's 64-character component and the offsets' 255-character source.
LONG_KEY = "input_index:file:/" + "/".join(["a-directory-with-a-long-name"] * 12) + "/episodes.jsonl.gz"


def event(stream: str, signal: str, episode_id: str, index: int) -> DriftEventRow:
    return {
        "stream": stream,
        "signal": signal,
        "detector": "page_hinkley",
        "statistic": 12.5,
        "threshold": 10.0,
        "p_val": None,
        "episode_id": episode_id,
        "input_index": index,
        "event_ts": 1000.0 + index,
        "created_at": 2000.0 + index,
    }


@pytest.fixture
def store(db_url: str) -> Any:
    s = Store(db_url)
    yield s
    s.close()


def test_internal_state_saves_loads_and_takes_any_key(store: Store) -> None:
    assert len(LONG_KEY) > 300
    assert store.load_internal(LONG_KEY) is None
    store.save_internal(LONG_KEY, {"records": 7})
    store.save_internal(LONG_KEY, {"records": 9, "nested": {"a": [1, 2]}})  # overwrites
    store.save_internal("actions:cursor", {"last_event_id": 3})
    assert store.load_internal(LONG_KEY) == {"records": 9, "nested": {"a": [1, 2]}}
    assert store.load_internal("actions:cursor") == {"last_event_id": 3}
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.internal_state)).scalar_one() == 2
        assert conn.execute(sa.select(sa.func.count()).select_from(t.stream_state)).scalar_one() == 0


def test_save_internal_in_the_callers_transaction_rolls_back_with_it(store: Store) -> None:
    with pytest.raises(RuntimeError), store.engine.begin() as conn:
        store.save_internal("k", {"v": 1}, conn)
        raise RuntimeError("the caller's transaction fails after the write")
    assert store.load_internal("k") is None
    with store.engine.begin() as conn:
        store.save_internal("k", {"v": 2}, conn)
    assert store.load_internal("k") == {"v": 2}


def test_batch_commits_internal_state_with_its_offsets(store: Store) -> None:
    store.commit_batch(BatchWrite(offsets={("src", 0): (None, 5)}, internal={LONG_KEY: {"records": 5}}))
    assert store.load_internal(LONG_KEY) == {"records": 5}
    # A zombie's batch (its offset moved on) leaves the keyed state as it was.
    with pytest.raises(StaleOffsets):
        store.commit_batch(BatchWrite(offsets={("src", 0): (3, 9)}, internal={LONG_KEY: {"records": 9}}))
    assert store.load_internal(LONG_KEY) == {"records": 5}
    store.commit_batch(BatchWrite(offsets={("src", 0): (5, 8)}, internal={LONG_KEY: {"records": 8}, "other": {"x": 1}}))
    assert store.load_internal(LONG_KEY) == {"records": 8} and store.load_internal("other") == {"x": 1}


def test_cas_internal_sets_only_from_the_expected_state(store: Store) -> None:
    assert store.cas_internal("cursor", None, {"last": 1})  # creates
    assert not store.cas_internal("cursor", None, {"last": 5})  # someone created it first
    assert store.load_internal("cursor") == {"last": 1}
    assert not store.cas_internal("cursor", {"last": 0}, {"last": 5})  # moved since it was read
    assert store.load_internal("cursor") == {"last": 1}
    assert store.cas_internal("cursor", {"last": 1}, {"last": 2, "seen": (1, 2)})
    # Compared as the JSON reads back: a tuple written is a list read.
    assert store.load_internal("cursor") == {"last": 2, "seen": [1, 2]}
    assert store.cas_internal("cursor", {"last": 2, "seen": (1, 2)}, {"last": 3})
    assert not store.cas_internal("missing", {"last": 1}, {"last": 2})  # nothing to compare with
    assert store.load_internal("missing") is None
    assert store.load_internal("cursor") == {"last": 3}


def test_cas_internal_loses_no_update_under_concurrent_writers(store: Store) -> None:
    """Writers that each read the counter and compare-and-set it one higher: every success is
    one step, so the final value is exactly the number of successes (a lost update would leave
    it lower) and no two writers succeed from the same value."""
    store.save_internal("counter", {"n": 0})
    wins: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer() -> None:
        try:
            for _ in range(30):
                cur = store.load_internal("counter")
                assert cur is not None
                if store.cas_internal("counter", cur, {"n": cur["n"] + 1}):
                    with lock:
                        wins.append(cur["n"])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    final = store.load_internal("counter")
    assert final is not None and final["n"] == len(wins) and sorted(wins) == list(range(len(wins)))
    assert len(wins) >= 30  # at least one writer's every attempt, or more, went through


def test_insert_ignore_skips_existing_keys(store: Store) -> None:
    rows = [event("chat", "len", "e1", 1), event("chat", "len", "e2", 2)]
    store.insert_ignore(t.drift_events, rows)
    # Again, plus one new row and a repeat under the unique (stream, signal, episode) key.
    store.insert_ignore(t.drift_events, [*rows, event("chat", "len", "e3", 3), event("chat", "len", "e1", 99)])
    store.insert_ignore(t.drift_events, [])
    got = store.drift_events()
    assert [(e["episode_id"], e["input_index"]) for e in got] == [("e1", 1), ("e2", 2), ("e3", 3)]


def test_insert_ignore_in_the_callers_transaction_rolls_back_with_it(store: Store) -> None:
    with pytest.raises(RuntimeError), store.engine.begin() as conn:
        store.insert_ignore(t.drift_events, [event("chat", "len", "e1", 1)], conn)
        raise RuntimeError("the caller's transaction fails after the insert")
    assert store.drift_events() == []


def test_drift_events_filters_orders_and_limits(store: Store) -> None:
    store.commit_batch(
        BatchWrite(
            drift_events=[
                event("chat", "len", "c1", 10),
                event("code", "len", "k1", 11),
                event("chat", "ratio", "c2", 12),
                event("chat", "len", "c3", 13),
            ]
        )
    )
    every = store.drift_events()
    assert [e["episode_id"] for e in every] == ["c1", "k1", "c2", "c3"]
    ids = [e["id"] for e in every]
    assert ids == sorted(ids) and len(set(ids)) == 4
    first = every[0]
    assert first["stream"] == "chat" and first["signal"] == "len" and first["detector"] == "page_hinkley"
    assert first["statistic"] == 12.5 and first["threshold"] == 10.0 and first["p_val"] is None
    assert first["event_ts"] == 1010.0 and first["published_at"] is None
    assert [e["episode_id"] for e in store.drift_events(newest_first=True)] == ["c3", "c2", "k1", "c1"]
    assert [e["episode_id"] for e in store.drift_events(stream="chat")] == ["c1", "c2", "c3"]
    assert [e["episode_id"] for e in store.drift_events(stream="chat", limit=2, newest_first=True)] == ["c3", "c2"]
    assert [e["episode_id"] for e in store.drift_events(since_id=ids[1])] == ["c2", "c3"]
    assert [e["episode_id"] for e in store.drift_events(since_id=ids[0], limit=1)] == ["k1"]
    assert store.drift_events(since_id=ids[-1]) == []
    assert store.drift_events(stream="nobody") == []


def test_outbox_rows_are_pending_until_marked_published(store: Store) -> None:
    store.commit_batch(
        BatchWrite(drift_events=[event("chat", "len", f"e{i}", i) for i in range(5)]),
    )
    pending = store.unpublished(t.drift_events, limit=3)
    assert [r["episode_id"] for r in pending] == ["e0", "e1", "e2"]
    assert all(r["published_at"] is None for r in pending)
    store.mark_published(t.drift_events, pending)
    store.mark_published(t.drift_events, [])
    assert [r["episode_id"] for r in store.unpublished(t.drift_events, limit=10)] == ["e3", "e4"]
    published = [e for e in store.drift_events() if e["published_at"] is not None]
    assert [e["episode_id"] for e in published] == ["e0", "e1", "e2"]


def test_probe_write_uses_a_row_of_its_own(store: Store) -> None:
    store.probe_write()
    first = store.load_internal(PROBE_KEY)
    assert first is not None and first["at"] > 0
    store.probe_write()
    second = store.load_internal(PROBE_KEY)
    assert second is not None and second["at"] >= first["at"]
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.stream_state)).scalar_one() == 0
