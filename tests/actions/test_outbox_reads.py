"""The outbox's reads (``Store.unpublished``, ``Store.oldest_unpublished``): commit order, only the
rows still to publish, and a cost that follows what waits, not every row ever published.

In Kafka mode every batch with a score or a drift event read the outbox. The read walked the
primary key through every published score to find the few that were not (110 ms on SQLite and
40 ms on PostgreSQL a batch at a million scores, 0.7 and 1.1 ms now: migration 0019)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlite_steps import StepCounter

from monitor.store import Store
from monitor.store import tables as t


def _scores(url: str, first: int, n: int, *, published: bool, created: str = "g") -> None:
    """Episodes e<first>..e<first+n-1> with one score each, committed at ``created`` (SQL of g)."""
    series = f"WITH RECURSIVE s(g) AS (SELECT {first} UNION ALL SELECT g + 1 FROM s WHERE g < {first + n - 1}) "
    engine = sa.create_engine(url)
    if engine.dialect.name == "postgresql":
        series, src = "", f"FROM generate_series({first}, {first + n - 1}) AS g"
    else:
        src = "FROM s"
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                series + "INSERT INTO episodes (episode_id, stream, model, ts, prompt, response, metadata, source,"
                f" position, ingested_at) SELECT 'e' || g, 's', 'm', g, 'p', 'r', '{{}}', 't', 'e' || g, g {src}"
            )
        )
        conn.execute(
            sa.text(
                series + "INSERT INTO rm_scores (episode_id, version, stream, score, ts, created_at, published_at)"
                f" SELECT 'e' || g, 'v1', 's', 0.5, g, {created}, {'g' if published else 'NULL'} {src}"
            )
        )
    engine.dispose()


def test_an_outbox_is_read_in_commit_order_and_only_what_waits(db_url: str) -> None:
    store = Store(db_url)
    _scores(db_url, 1, 30, published=True)
    # Committed in the reverse order of their keys, three at each time (ties break by the key).
    _scores(db_url, 100, 9, published=False, created="1000 - (g - 100) / 3")
    rows = store.unpublished(t.rm_scores, 5)
    assert [(r["created_at"], r["episode_id"]) for r in rows] == [
        (998, "e106"),
        (998, "e107"),
        (998, "e108"),
        (999, "e103"),
        (999, "e104"),
    ]
    assert store.oldest_unpublished(t.rm_scores) == 998
    store.mark_published(t.rm_scores, rows)
    assert [r["episode_id"] for r in store.unpublished(t.rm_scores, 100)] == ["e105", "e100", "e101", "e102"]
    store.mark_published(t.rm_scores, store.unpublished(t.rm_scores, 100))
    assert store.unpublished(t.rm_scores, 100) == [] and store.oldest_unpublished(t.rm_scores) is None
    store.close()


def _read_steps(tmp_path: Path, published: int) -> int:
    """SQLite virtual-machine steps (in thousands) of an outbox's reads and marks: twenty rounds
    of 5 rows out of 100 waiting, beside ``published`` rows published before."""
    url = f"sqlite:///{tmp_path / f'o{published}.db'}"
    store = Store(url)
    _scores(url, 1, published, published=True)
    _scores(url, published + 1, 100, published=False)
    counter = StepCounter(store)
    for _ in range(20):
        rows = store.unpublished(t.rm_scores, 5)
        assert len(rows) == 5
        assert store.oldest_unpublished(t.rm_scores) is not None
        store.mark_published(t.rm_scores, rows)
    store.close()
    return counter.steps


def test_an_outbox_read_costs_what_waits_not_what_was_published(tmp_path: Path) -> None:
    """Counted in the database's own steps, not timed: with 20,000 scores published before, the
    rounds do the work they do with 200."""
    few, many = _read_steps(tmp_path, 200), _read_steps(tmp_path, 20_000)
    assert many < 2 * few, (few, many)
