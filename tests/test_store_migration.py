"""Migration 0005 on SQLite and the real PostgreSQL: a database at revision 0004 whose
``stream_state`` holds the service's own rows under fake stream names upgrades in place, and
downgrades back."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from monitor.store import Store
from monitor.store import tables as t
from monitor.store.store import MIGRATIONS_DIR

SHORT_SOURCE = "file:/data/in.jsonl"
# A file source's name longer than stream_state's 64-character component (PostgreSQL refused it
# as is): the pipeline stored it shortened to a prefix and a hash.
LONG_SOURCE = "file:/" + "/".join(["a-rather-long-directory-name"] * 5) + "/episodes.jsonl"
# Shortened by a name no offsets row has: its full name cannot be recovered.
ORPHAN = "file:/gone/" + "x" * 80
STREAM_ROWS = [
    ("__input__", SHORT_SOURCE, {"records": 12}),
    ("__input__", "stdin", {"records": 3}),
    ("__actions__", "cursor", {"last_event_id": 41}),
    ("__simulate__", "kafka_feed", {"records": 900}),
    ("__health__", "write_probe", {"at": 1.5}),
    ("chat", "sampling", {"version": 1, "clock": 7}),
    ("chat", "drift", {"signals": {}}),
]


def shortened(name: str) -> str:
    """The component revision 0004's pipeline wrote for a source name (its ``index_component``)."""
    if len(name) <= 64:
        return name
    return f"{name[:47]}~{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def _config(conn: sa.Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = conn
    return cfg


def _at_0004(db_url: str) -> None:
    old = Store(db_url, migrate=False)
    old.migrate("0004")
    assert old.revision() == "0004"
    assert "internal_state" not in sa.inspect(old.engine).get_table_names()
    rows = [
        {"stream": s, "component": c, "state": st, "updated_at": 100.0 + i} for i, (s, c, st) in enumerate(STREAM_ROWS)
    ]
    rows += [
        {"stream": "__input__", "component": shortened(LONG_SOURCE), "state": {"records": 5000}, "updated_at": 1.0},
        {"stream": "__input__", "component": shortened(ORPHAN), "state": {"records": 8}, "updated_at": 1.0},
    ]
    with old.engine.begin() as conn:
        conn.execute(t.stream_state.insert(), rows)
        conn.execute(
            t.offsets.insert(),
            [
                {"source": LONG_SOURCE, "partition": 0, "next_offset": 123456, "updated_at": 1.0},
                {"source": SHORT_SOURCE, "partition": 0, "next_offset": 99, "updated_at": 1.0},
                {"source": "kafka:episodes", "partition": 3, "next_offset": 7, "updated_at": 1.0},
            ],
        )
    old.close()


def _stream_state(store: Store) -> dict[tuple[str, str], dict[str, object]]:
    with store.engine.connect() as conn:
        return {(r.stream, r.component): dict(r.state) for r in conn.execute(sa.select(t.stream_state))}


def test_upgrade_moves_the_services_rows_out_of_stream_state(db_url: str) -> None:
    _at_0004(db_url)
    store = Store(db_url)  # migrates to head, as the service does at start
    assert store.revision() == "0019"
    assert store.load_internal(f"input_index:{SHORT_SOURCE}") == {"records": 12}
    assert store.load_internal("input_index:stdin") == {"records": 3}
    assert store.load_internal(f"input_index:{LONG_SOURCE}") == {"records": 5000}  # its full name again
    assert store.load_internal(f"input_index:{shortened(ORPHAN)}") == {"records": 8}  # kept as it was
    assert store.load_internal("actions:cursor") == {"last_event_id": 41}
    assert store.load_internal("simulate:kafka_feed") == {"records": 900}
    assert store.load_internal("health:write_probe") == {"at": 1.5}
    with store.engine.connect() as conn:
        moved = {r.key: r.updated_at for r in conn.execute(sa.select(t.internal_state))}
    assert len(moved) == 7 and moved["actions:cursor"] == 102.0
    # Only the streams' own state stays; the offsets are untouched.
    assert _stream_state(store) == {
        ("chat", "sampling"): {"version": 1, "clock": 7},
        ("chat", "drift"): {"signals": {}},
    }
    assert store.load_offsets(LONG_SOURCE) == {0: 123456}
    # And the service writes there from now on.
    store.probe_write()
    assert _stream_state(store).keys() == {("chat", "sampling"), ("chat", "drift")}
    store.close()


def test_upgrade_of_a_database_without_such_rows(db_url: str) -> None:
    old = Store(db_url, migrate=False)
    old.migrate("0004")
    old.close()
    store = Store(db_url)
    assert store.revision() == "0019"
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.internal_state)).scalar_one() == 0
    store.close()


def test_downgrade_puts_the_rows_back(db_url: str) -> None:
    _at_0004(db_url)
    store = Store(db_url)
    before = _stream_state(store)
    store.save_internal("a-key-of-a-later-version", {"x": 1})  # revision 0004 has no place for it
    with store.engine.begin() as conn:
        command.downgrade(_config(conn), "0004")
    assert store.revision() == "0004"
    assert "internal_state" not in sa.inspect(store.engine).get_table_names()
    after = _stream_state(store)
    assert after[("__input__", SHORT_SOURCE)] == {"records": 12}
    assert after[("__input__", shortened(LONG_SOURCE))] == {"records": 5000}
    assert after[("__input__", shortened(ORPHAN))] == {"records": 8}
    assert after[("__actions__", "cursor")] == {"last_event_id": 41}
    assert after[("__simulate__", "kafka_feed")] == {"records": 900}
    assert after[("__health__", "write_probe")] == {"at": 1.5}
    assert len(after) == len(before) + 7
    # And up again: the same state as the first upgrade.
    store.migrate()
    assert store.load_internal(f"input_index:{LONG_SOURCE}") == {"records": 5000}
    assert store.load_internal("actions:cursor") == {"last_event_id": 41}
    store.close()


def test_a_store_that_does_not_migrate_refuses_a_schema_that_is_not_this_builds(tmp_path: object) -> None:
    """With database.migrate: false a service started on a schema a newer build had migrated, and
    `db purge` deleted rows in it; on an older schema a command failed at its first query."""
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    from monitor.config import DatabaseConfig
    from monitor.store import SchemaMismatch

    db = Path(str(tmp_path)) / "db.sqlite"
    url = f"sqlite:///{db}"
    Store(url).close()  # this build's head
    assert Store.open(DatabaseConfig(url=url, migrate=False)).revision() is not None
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(sa.text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    with pytest.raises(SchemaMismatch, match="9999_from_the_future, which this build does not know"):
        Store.open(DatabaseConfig(url=url, migrate=False))
    oversight = Path(sys.executable).with_name("oversight")
    cmd = [str(oversight), "db", "purge", "--days", "1", "--db", url]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "which this build does not know" in res.stderr and "Traceback" not in res.stderr
    with engine.begin() as c:
        c.execute(sa.text("UPDATE alembic_version SET version_num = '0002'"))
    with pytest.raises(SchemaMismatch, match=r"at 0002, older than this build's .*: run oversight db upgrade"):
        Store.open(DatabaseConfig(url=url, migrate=False))
    cmd = [str(oversight), "drift", "events", "--db", url]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "run oversight db upgrade" in res.stderr, res.stderr
    engine.dispose()


def test_a_locked_database_is_unavailable_not_without_a_schema(tmp_path: Path) -> None:
    """A database another process holds locked answered "has no schema (oversight db upgrade creates
    it)": every failure to read the version table was taken for a missing table."""
    import sqlite3

    path = tmp_path / "o.db"
    store = Store(f"sqlite:///{path}")
    assert store.revision() is not None
    empty = Store(f"sqlite:///{tmp_path / 'empty.db'}", migrate=False)
    assert empty.revision() is None  # no schema at all: still None
    holder = sqlite3.connect(path, isolation_level=None, timeout=0)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        locked = Store(f"sqlite:///{path}?timeout=0.2", migrate=False)
        with pytest.raises(sa.exc.OperationalError, match="locked"):
            locked.revision()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
