"""Migration 0016 on SQLite and the real PostgreSQL: the inbox's episode ids become unique per
stream. The rows waiting in it stay, in order, and so does its id sequence: the consumer's
position is an inbox id, so a row inserted after the upgrade must never get an id that a
consumed (and purged) row had."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from monitor.store import Store
from monitor.store import tables as t
from monitor.store.ingest import Inbox, InboxRow
from monitor.store.store import MIGRATIONS_DIR


def _migrate(store: Store, down: bool, revision: str) -> None:
    with store.engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)


def _rows(store: Store) -> list[tuple[int, str, str]]:
    i = t.inbox
    with store.engine.connect() as conn:
        return [
            (int(r.id), r.stream, r.episode_id)
            for r in conn.execute(sa.select(i.c.id, i.c.stream, i.c.episode_id).order_by(i.c.id))
        ]


def test_upgrade_keeps_the_waiting_rows_and_the_id_sequence(db_url: str) -> None:
    old = Store(db_url, migrate=False)
    old.migrate("0015")
    with old.engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO inbox (episode_id, stream, raw, received_at) VALUES (:e, :s, :r, 1.0)"),
            [{"e": f"e{k}", "s": "a", "r": b"{}"} for k in range(5)],
        )
        # The consumer read all five and the purge took the newest: its id must not come back.
        conn.execute(sa.text("DELETE FROM inbox WHERE id = 5"))
    old.close()
    store = Store(db_url)  # migrates to the head, as the service does at start
    assert _rows(store) == [(k + 1, "a", f"e{k}") for k in range(4)]
    inbox = Inbox(store)
    assert inbox.insert([InboxRow("e0", "b", b"{}", 2.0), InboxRow("e0", "a", b"{}", 2.0)]) == {("b", "e0")}
    assert _rows(store)[-1] == (6, "b", "e0"), "an id below the consumer's position would never be read"
    store.close()


def test_downgrade_keeps_one_row_per_episode_id(db_url: str) -> None:
    store = Store(db_url)
    Inbox(store).insert(
        [InboxRow("x", "a", b"{}", 1.0), InboxRow("x", "b", b"{}", 1.0), InboxRow("y", "b", b"{}", 1.0)]
    )
    _migrate(store, True, "0015")
    assert _rows(store) == [(1, "a", "x"), (3, "b", "y")]
    with store.engine.begin() as conn:
        try:
            with conn.begin_nested():
                conn.execute(
                    sa.text("INSERT INTO inbox (episode_id, stream, raw, received_at) VALUES ('x', 'c', :r, 1.0)"),
                    {"r": b"{}"},
                )
            unique = False
        except sa.exc.IntegrityError:
            unique = True
    assert unique, "0015's inbox holds an episode id once"
    _migrate(store, False, "head")
    assert Inbox(store).insert([InboxRow("x", "c", b"{}", 1.0)]) == {("c", "x")}
    store.close()
