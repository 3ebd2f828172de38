"""Backlog reads restricted to the streams a replica owns, and to items not in flight, when those
sets are larger than a statement takes parameters (65,535 on PostgreSQL, 32,766 on SQLite): a
replica of a Kafka deployment with 100,000 streams owns tens of thousands. As IN lists the
reads failed, on every fetch, and the workers did nothing."""

from __future__ import annotations

import sqlalchemy as sa
from test_store import ep, sample

from monitor.store import BatchWrite, Store
from monitor.store import tables as t
from monitor.store.inference import waiting_for_embedding, waiting_for_score
from monitor.store.store import IN_LIST_MAX


def stored(store: Store, n: int) -> None:
    """Episodes e0..e{n-1}, each in a stream of its own, sampled for drift and rm."""
    episodes = [ep(f"e{i}", f"s{i}", float(i)) for i in range(n)]
    samples = [sample(f"e{i}", ch, 0.5, f"s{i}", float(i)) for i in range(n) for ch in ("drift", "rm")]
    store.commit_batch(BatchWrite(episodes=episodes, samples=samples))


def test_a_replica_that_owns_70000_streams_reads_its_backlog(db_url: str) -> None:
    store = Store(db_url)
    stored(store, 10)
    owned = {f"s{i}" for i in range(0, 70_000, 2)} | {f"s{i}" for i in range(1, 10, 2) if i < 5}
    skip = {f"x{i}" for i in range(70_000)} | {"e0"}
    embed = waiting_for_embedding(store, 100, skip=skip, streams=owned)
    assert [w.episode_id for w in embed] == ["e1", "e2", "e3", "e4", "e6", "e8"]
    score = waiting_for_score(store, 100, skip=skip, streams=owned)
    assert [w.episode_id for w in score] == ["e1", "e2", "e3", "e4", "e6", "e8"]
    # Small sets stay IN lists (the planner's best case); the same answer.
    few = waiting_for_embedding(store, 100, skip={"e0"}, streams={"s1", "s2"})
    assert [w.episode_id for w in few] == ["e1", "e2"] and len(owned) > IN_LIST_MAX
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.samples)).scalar_one() == 20
    store.close()
