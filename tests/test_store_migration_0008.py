"""Migration 0008 on SQLite and the real PostgreSQL: ``labels.rated`` is added to a database at
revision 0007 whose labels keep reading as before (``rated`` NULL), is written from then on, and a
downgrade drops it again, keeping the rows."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from monitor.quality.labels import agreement, label_rows, per_item
from monitor.review.export import csv_rows, iter_ratings
from monitor.store import Store
from monitor.store import tables as t
from monitor.store.store import MIGRATIONS_DIR

# Later migrations stack on 0008: the upgrade runs to whatever the head is today.
HEAD = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()

EPISODE = {
    "stream": "chat",
    "model": "m",
    "ts": 10.0,
    "prompt": "p",
    "response": "r",
    "metadata": None,
    "source": "file:x",
    "position": "0",
    "ingested_at": 1.0,
}


def label(eid: str, user_id: int, rating: int, flags: list[str], **kw: Any) -> dict[str, Any]:
    row = {
        "episode_id": eid,
        "slot": user_id - 1,
        "user_id": user_id,
        "stream": "chat",
        "skipped": False,
        "skip_reason": None,
        "rating": rating,
        "flags": flags,
        "critique": "",
        "preference": None,
        "time_spent_ms": 1000,
        "created_at": 50.0 + user_id,
    }
    return row | kw


def _at_0007(db_url: str) -> None:
    old = Store(db_url, migrate=False)
    old.migrate("0007")
    assert "rated" not in {c["name"] for c in sa.inspect(old.engine).get_columns("labels")}
    with old.engine.begin() as conn:
        # Today's tables, with the columns revision 0007 has: each insert names only the row's keys.
        conn.execute(t.episodes.insert(), [{**EPISODE, "episode_id": e} for e in ("e1", "e2")])
        conn.execute(
            t.samples.insert(),
            [
                {"episode_id": e, "channel": "human", "stream": "chat", "ts": 10.0, "inclusion_probability": 0.5}
                | {"created_at": 1.0}
                for e in ("e1", "e2")
            ],
        )
        conn.execute(
            t.users.insert(),
            [{"name": n, "role": "reviewer", "password_hash": "x", "created_at": 1.0} for n in ("ann", "bob")],
        )
        conn.execute(t.labels.insert(), [label("e1", 1, 6, ["harmful"]), label("e1", 2, 5, ["harmful"])])
    old.close()


def _rated(store: Store) -> dict[tuple[str, int], str | None]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(t.labels.c.episode_id, t.labels.c.user_id, t.labels.c.rated))
        return {(r.episode_id, r.user_id): r.rated for r in rows}


def test_upgrade_keeps_existing_labels_readable_and_stores_rated_from_then_on(db_url: str) -> None:
    _at_0007(db_url)
    store = Store(db_url)  # to head, as the service does at start
    assert store.revision() == HEAD and HEAD is not None and HEAD >= "0008"
    assert _rated(store) == {("e1", 1): None, ("e1", 2): None}
    # The readers of labels: estimates, agreement, exports.
    rows = label_rows(store)
    assert [(r.episode_id, r.rating, r.flags) for r in rows] == [("e1", 6, ["harmful"]), ("e1", 5, ["harmful"])]
    assert per_item(rows)["e1"]["labels"] == [(6, {"harmful"}), (5, {"harmful"})]
    assert agreement(rows, ["harmful"])["n_items"] == 1
    recs = list(iter_ratings(store))
    assert [(r["reviewer"], r["flags"], r["rated"]) for r in recs] == [
        ("ann", ["harmful"], None),
        ("bob", ["harmful"], None),
    ]
    assert len(list(csv_rows(recs))) == 3  # header and two rows
    with store.engine.begin() as conn:
        conn.execute(t.labels.insert(), [label("e2", 1, 3, [], rated="conversation")])
    assert _rated(store)[("e2", 1)] == "conversation"
    assert [r["rated"] for r in iter_ratings(store)] == [None, None, "conversation"]
    store.close()


def test_downgrade_drops_the_column_and_keeps_the_rows(db_url: str) -> None:
    _at_0007(db_url)
    store = Store(db_url)
    with store.engine.begin() as conn:
        conn.execute(t.labels.insert(), [label("e2", 1, 3, [], rated="final_turn")])
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0007")
    assert store.revision() == "0007"
    assert "rated" not in {c["name"] for c in sa.inspect(store.engine).get_columns("labels")}
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM labels")).scalar_one() == 3
    store.migrate()  # and up again: the column is back, NULL for every row
    assert set(_rated(store).values()) == {None}
    store.close()
