"""Two replicas' outbox relays on one PostgreSQL database publish each row once: both read the same
unpublished rows, and two rounds between the read and the mark sent every row twice in normal
operation (10 messages for 9 drift events, no fault). A real Tansu broker and PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa

from monitor.store.rows import DriftEventRow

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]
# The lock of one outbox in the current schema (Store.one_at_a_time).
KEY = ":k, hashtext(current_schema() || '.' || :n)"


def events(n: int) -> list[DriftEventRow]:
    return [
        DriftEventRow(
            stream=f"s{i % 3}",
            signal="x",
            detector="cusum",
            statistic=1.0,
            threshold=0.5,
            p_val=None,
            episode_id=f"e{i}",
            input_index=i,
            event_ts=float(i),
            created_at=1.0 + i,
        )
        for i in range(n)
    ]


def cfg(kenv: Any, topic: str) -> Any:
    from monitor.config import KafkaConfig

    return KafkaConfig(bootstrap_servers=[kenv.bootstrap], topic=topic, drift_topic=topic)


def keys_of(records: list[Any]) -> Counter[str]:
    return Counter(dict(r.headers)["oversight.idempotency_key"].decode() for r in records)


def test_a_round_finds_another_relay_publishing_and_sends_nothing(kenv: Any, pg_url: str) -> None:
    from monitor.actions.outbox import OUTBOX_LOCK, drift_publisher
    from monitor.store import BatchWrite, Store

    topic = kenv.topic()
    store = Store(pg_url)
    store.commit_batch(BatchWrite(drift_events=events(3)))
    publisher = drift_publisher(cfg(kenv, topic), store)
    other = sa.create_engine(pg_url)
    try:
        with other.connect() as conn:  # another replica's relay, mid-round
            lock = {"k": OUTBOX_LOCK, "n": publisher.name}
            held = conn.execute(sa.text(f"SELECT pg_try_advisory_lock({KEY})"), lock).scalar()
            assert held
            assert publisher.publish_pending() == 0
            assert store.oldest_unpublished(publisher.table) is not None
            conn.execute(sa.text(f"SELECT pg_advisory_unlock({KEY})"), lock)
        assert publisher.publish_pending() == 3
        assert store.oldest_unpublished(publisher.table) is None
    finally:
        publisher.close()
        other.dispose()
        store.close()
    assert len(kenv.consume_all(topic, expect=3)) == 3


def test_two_relays_publishing_at_once_send_each_row_once(kenv: Any, pg_url: str) -> None:
    from monitor.actions.outbox import drift_publisher
    from monitor.store import BatchWrite, Store

    topic = kenv.topic()
    rows = 400
    stores = [Store(pg_url), Store(pg_url)]
    for i in range(0, rows, 50):  # committed batch by batch, as the pipeline commits them
        stores[0].commit_batch(BatchWrite(drift_events=events(rows)[i : i + 50]))
    publishers = [drift_publisher(cfg(kenv, topic), s) for s in stores]
    errors: list[BaseException] = []

    def relay(p: Any) -> None:
        try:
            for _ in range(400):
                if p.publish_pending(limit=20) == 0 and stores[0].oldest_unpublished(p.table) is None:
                    return
        except BaseException as e:  # reported by the test
            errors.append(e)

    threads = [threading.Thread(target=relay, args=(p,)) for p in publishers]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert not errors, errors
    finally:
        for p in publishers:
            p.close()
        for s in stores:
            s.close()
    got = keys_of(kenv.consume_all(topic, expect=rows + 50, timeout_s=15))
    assert len(got) == rows
    assert max(got.values()) == 1, [k for k, n in got.items() if n > 1][:5]


def test_a_round_needs_one_connection_and_another_schemas_relay_is_no_obstacle(kenv: Any, pg_url: str) -> None:
    """The lock's connection does the round's reads and writes: a pool of one connection publishes
    (a second checkout waited for the pool and failed every round). A relay of another deployment
    in the same database (another schema) holding its own lock does not stop this one."""
    from monitor.actions.outbox import OUTBOX_LOCK, drift_publisher
    from monitor.store import BatchWrite, Store
    from monitor.store.store import Pool

    topic = kenv.topic()
    store = Store(pg_url, pool=Pool(size=1, overflow=0, timeout_s=3.0))
    store.commit_batch(BatchWrite(drift_events=events(5)))
    publisher = drift_publisher(cfg(kenv, topic), store)
    schema = f"other_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_url)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    other = Store(pg_url.rsplit("%3D", 1)[0] + f"%3D{schema}")  # another deployment's store
    try:
        with other.one_at_a_time(OUTBOX_LOCK, publisher.name) as (theirs, _):
            assert theirs
            assert publisher.publish_pending() == 5
        assert store.oldest_unpublished(publisher.table) is None
    finally:
        publisher.close()
        other.close()
        store.close()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    assert len(kenv.consume_all(topic, expect=5)) == 5
