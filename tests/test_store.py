"""The store, against SQLite and the real PostgreSQL: migrations, atomic batches, CAS offsets,
the service's keyed state, insert-ignore, drift events and the outbox."""

from __future__ import annotations

import threading
import time
from typing import Any, cast

import pytest
import sqlalchemy as sa

from monitor.config import DatabaseConfig
from monitor.store import BatchWrite, StaleOffsets, Store
from monitor.store.rows import EpisodeRow, SampleRow
from monitor.store.store import bucket_of


def ep(eid: str, stream: str = "s", ts: float = 120.0, **kw: Any) -> EpisodeRow:
    row: dict[str, Any] = {
        "episode_id": eid,
        "stream": stream,
        "model": None,
        "ts": ts,
        "prompt": "p",
        "response": "r",
        "metadata": {"k": 1},
        "source": "src",
        "position": "0:0",
        "ingested_at": 1.0,
    }
    row.update(kw)
    # A cast, not a check: the overrides may break the row's types on purpose (a NULL prompt, an
    # unencodable metadata) to test what the store refuses.
    return cast(EpisodeRow, row)


def sample(eid: str, channel: str, p: float, stream: str = "s", ts: float = 120.0) -> SampleRow:
    return {
        "episode_id": eid,
        "channel": channel,
        "stream": stream,
        "ts": ts,
        "inclusion_probability": p,
        "created_at": 1.0,
    }


def test_migrations_are_idempotent(db_url: str) -> None:
    s = Store(db_url)
    assert s.revision() == "0019"
    s.migrate()
    Store(db_url).close()
    assert s.revision() == "0019"
    insp = sa.inspect(s.engine)
    assert {
        "episodes",
        "samples",
        "traffic",
        "offsets",
        "stream_state",
        "review_tasks",
        "labels",
        "users",
        "drift_events",
        "rm_versions",
        "rm_active",
        "rm_scores",
        "action_requests",
        "internal_state",
    } <= set(insp.get_table_names())
    s.close()


def test_batch_is_atomic_and_idempotent_by_episode_id(db_url: str) -> None:
    s = Store(db_url)
    b = BatchWrite(
        episodes=[ep("a"), ep("b")],
        samples=[sample("a", "rm", 0.1), sample("a", "human", 0.01), sample("b", "drift", 0.05)],
        traffic={("s", bucket_of(120.0)): 10},
        offsets={("src", 0): (None, 10)},
        states={("s", "sampling"): {"version": 1, "x": [1, 2]}},
    )
    s.commit_batch(b)
    # The same rows again (a redelivery after a crash) under the next offsets: nothing duplicates.
    b2 = BatchWrite(
        episodes=[ep("a", response="changed")], samples=[sample("a", "rm", 0.5)], offsets={("src", 0): (10, 12)}
    )
    s.commit_batch(b2)
    assert s.sample_counts() == {"s": {"rm": 1, "human": 1, "drift": 1}}
    rows = s.sampled("s", "rm")
    assert len(rows) == 1 and rows[0]["response"] == "r" and rows[0]["inclusion_probability"] == 0.1
    assert rows[0]["metadata"] == {"k": 1}
    assert s.load_offsets("src") == {0: 12}
    assert s.load_state("s", "sampling") == {"version": 1, "x": [1, 2]}
    assert s.traffic_count("s") == 10
    s.close()


def test_stale_offsets_roll_back_everything(db_url: str) -> None:
    s = Store(db_url)
    s.commit_batch(BatchWrite(offsets={("src", 0): (None, 5), ("src", 1): (None, 7)}))
    zombie = BatchWrite(
        episodes=[ep("z")],
        samples=[sample("z", "rm", 0.1)],
        traffic={("s", 0): 3},
        offsets={("src", 0): (5, 9), ("src", 1): (6, 8)},  # partition 1 moved on without us
    )
    with pytest.raises(StaleOffsets):
        s.commit_batch(zombie)
    assert s.sample_counts() == {} and s.traffic_count("s") == 0
    assert s.load_offsets("src") == {0: 5, 1: 7}
    with pytest.raises(StaleOffsets):  # a second "first" writer of a partition
        s.commit_batch(BatchWrite(offsets={("src", 0): (None, 1)}))
    s.close()


def test_a_batch_recognises_its_own_commit(db_url: str) -> None:
    """The question a retry asks after a commit whose reply was lost: are the offsets this
    batch's? Only the batch that wrote them, while no one has moved them since, says yes."""
    s = Store(db_url)
    first = BatchWrite(episodes=[ep("a")], offsets={("src", 0): (None, 5), ("src", 1): (None, 7)})
    assert not s.committed(first)  # nothing stored yet
    s.commit_batch(first)
    assert s.committed(first)
    # The same range written by someone else (another consumer's batch): not ours.
    assert not s.committed(BatchWrite(offsets={("src", 0): (None, 5), ("src", 1): (None, 7)}))
    # One partition moved on by another batch: the first batch no longer holds both.
    s.commit_batch(BatchWrite(offsets={("src", 1): (7, 9)}))
    assert not s.committed(first)
    assert not s.committed(BatchWrite())  # without offsets there is nothing to recognise
    s.close()


def test_offsets_behind_a_batch_are_told_from_offsets_moved_on(db_url: str) -> None:
    """The other question a refused compare-and-set asks: did the offsets go *back* (the
    database lost commits: a failover to a standby that was behind, a restore), or did another
    consumer move them on? Only the first are listed, with what the batch expected and what
    is stored."""
    import sqlalchemy as sa

    s = Store(db_url)
    s.commit_batch(BatchWrite(offsets={("src", 0): (None, 10), ("src", 1): (None, 5), ("src", 2): (None, 3)}))
    nxt = BatchWrite(offsets={("src", 0): (10, 20), ("src", 1): (5, 8), ("src", 2): (3, 4), ("src", 3): (None, 1)})
    assert s.regressed(nxt) == {}  # where the batch expects them: nothing went back
    s.commit_batch(BatchWrite(offsets={("src", 1): (5, 9)}))  # another consumer moved partition 1 on
    with s.engine.begin() as c:  # what a lost tail leaves: partition 0 back at 4, partition 2's row gone
        c.execute(sa.text("UPDATE offsets SET next_offset = 4 WHERE source = 'src' AND partition = 0"))
        c.execute(sa.text("DELETE FROM offsets WHERE source = 'src' AND partition = 2"))
    assert s.regressed(nxt) == {("src", 0): (10, 4), ("src", 2): (3, None)}
    assert s.regressed(BatchWrite(offsets={("src", 5): (None, 1)})) == {}  # a first batch expects nothing
    assert s.regressed(BatchWrite()) == {}
    s.close()


def test_traffic_windows_and_sampled_windows_agree(db_url: str) -> None:
    s = Store(db_url)
    s.commit_batch(
        BatchWrite(
            episodes=[ep("a", ts=30.0), ep("b", ts=90.0), ep("c", ts=150.0)],
            samples=[
                sample("a", "rm", 0.5, ts=30.0),
                sample("b", "rm", 0.5, ts=90.0),
                sample("c", "rm", 0.5, ts=150.0),
            ],
            traffic={("s", 0): 4, ("s", 60): 2, ("s", 120): 6, ("t", 0): 1},
        )
    )
    assert s.traffic_count("s") == 12 and s.traffic_count("s", since=60.0) == 8
    assert s.traffic_count("s", since=60.0, until=120.0) == 2
    assert [r["episode_id"] for r in s.sampled("s", "rm", since=61.0, until=179.0)] == ["b"]
    assert s.streams() == ["s", "t"]
    s.close()


def test_concurrent_writers_serialise(db_url: str) -> None:
    """Two writers on different partitions commit concurrently without losing counts."""
    s = Store(db_url)
    errors: list[BaseException] = []

    def writer(part: int) -> None:
        try:
            expected = None
            for i in range(25):
                rows = [ep(f"p{part}-{i}")]
                s.commit_batch(
                    BatchWrite(
                        episodes=rows,
                        samples=[sample(f"p{part}-{i}", "rm", 0.1)],
                        traffic={("s", 0): 1},
                        offsets={("src", part): (expected, i + 1)},
                    )
                )
                expected = i + 1
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert s.traffic_count("s") == 50 and s.sample_counts() == {"s": {"rm": 50}}
    assert s.load_offsets("src") == {0: 25, 1: 25}
    s.close()


def test_find_rejected_names_the_refused_rows_and_changes_nothing(db_url: str) -> None:
    s = Store(db_url)
    nested: dict[str, Any] = {}
    for _ in range(5000):  # deeper than the JSON encoder recurses: refused before any database sees it
        nested = {"k": nested}
    b = BatchWrite(
        episodes=[ep("ok"), ep("null", prompt=None), ep("deep", metadata=nested), ep("long", stream="x" * 300)],
        samples=[sample("ok", "rm", 0.1), sample("null", "rm", 0.1), sample("deep", "rm", 0.1)],
    )
    rejected = s.find_rejected(b)
    # Both databases refuse a NULL in a NOT NULL column, and neither gets a value that cannot be
    # encoded; only PostgreSQL enforces VARCHAR lengths (SQLite stores the long stream as is).
    refused = {"null", "deep", "long"} if s.dialect == "postgresql" else {"null", "deep"}
    assert set(rejected) == refused
    assert "prompt" in rejected["null"].lower() and "null" in rejected["null"].lower()
    assert "recursion" in rejected["deep"].lower()
    assert all(len(why) <= 500 for why in rejected.values())
    assert s.sample_counts() == {}  # nothing of the trial inserts is left
    assert s.sampled("s", "rm") == []
    # The rows it did not name commit as they are.
    s.commit_batch(
        BatchWrite(
            episodes=[e for e in b.episodes if e["episode_id"] not in rejected],
            samples=[x for x in b.samples if x["episode_id"] not in rejected],
        )
    )
    assert [r["episode_id"] for r in s.sampled("s", "rm")] == ["ok"]
    s.close()


def test_ping(db_url: str) -> None:
    s = Store(db_url)
    assert s.ping()
    s.close()


@pytest.mark.postgres
def test_the_pool_follows_the_database_settings(pg_url: str) -> None:
    store = Store.open(DatabaseConfig(url=pg_url, pool_size=2, max_overflow=1, pool_timeout_s=0.5))
    held = []
    try:
        for _ in range(3):  # the pool and its overflow
            conn = store.engine.connect()
            conn.execute(sa.text("SELECT 1"))
            held.append(conn)
        t0 = time.monotonic()
        with pytest.raises(sa.exc.TimeoutError):
            store.engine.connect()
        assert 0.4 < time.monotonic() - t0 < 10
        held.pop().close()
        with store.engine.connect() as conn:  # one returned: the next operation gets it
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    finally:
        for conn in held:
            conn.close()
        store.close()


@pytest.mark.postgres
def test_postgres_connections_fail_on_a_silent_network(pg_url: str) -> None:
    """libpq's timeouts that turn a dead network into an error (tests/test_outages.py cuts one):
    from ``database.tcp_timeout_s``, unless the URL sets its own."""
    from monitor.store.store import Pool

    def options(store: Store) -> dict[str, str]:
        with store.engine.connect() as conn:
            info = conn.connection.dbapi_connection.pgconn.info  # type: ignore[union-attr]
        store.close()
        return {o.keyword.decode(): (o.val or b"").decode() for o in info}

    got = options(Store(pg_url, migrate=False, pool=Pool(tcp_timeout_s=12)))
    assert got["tcp_user_timeout"] == "12000" and got["keepalives"] == "1" and got["connect_timeout"] == "5"
    assert int(got["keepalives_idle"]) + int(got["keepalives_interval"]) * int(got["keepalives_count"]) <= 12
    sep = "&" if "?" in pg_url else "?"
    own = options(Store(f"{pg_url}{sep}tcp_user_timeout=7000", migrate=False, pool=Pool(tcp_timeout_s=12)))
    assert own["tcp_user_timeout"] == "7000"
