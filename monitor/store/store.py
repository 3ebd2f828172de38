"""Durable state of the pipeline, written one transaction per batch.

A batch's sampled rows, traffic counts, stream-state checkpoints, the service's own keyed
state (``internal_state``) and the source offsets it consumed commit together, so after any
crash the database holds exactly the effects of the offsets it records: redelivered records are
either already counted (offset stored) or not at all. Offsets are written with compare-and-set,
so a zombie replica that lost its partition cannot commit the same range twice.

Access is by meaning: callers ask for drift events, keyed state or an insert that skips existing
keys, and the SQL of each lives here once.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Engine

from monitor.retry import first_line, sqlstate, transient
from monitor.store import tables as t
from monitor.store.rows import DriftEvent, DriftEventRow, EpisodeRow, ReviewTaskRow, RmScoreRow, SampleRow

if TYPE_CHECKING:
    from monitor.config import DatabaseConfig

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
BUCKET_S = 60
IN_LIST_MAX = 1000  # values of an IN list; more are one bound parameter (Store.one_of)
STREAM_ROWS = 5000  # rows a streamed read (Store.iter_sampled) fetches at a time
# Commit order per outbox table; the first column keys its partial index of unpublished rows.
OUTBOX_ORDER = {"drift_events": ("id",), "rm_scores": ("created_at", "episode_id", "version")}
PROBE_KEY = "health:write_probe"  # the internal_state row of the pipeline's idle write probe
CONNECT_TIMEOUT_S = 5  # a database host that drops packets must not hang the pipeline for minutes
# SQLite checkpoints its write-ahead log inside the commit that takes it past this many pages (32 MB of
# 4 KB pages; SQLite's default is 1,000). The service checkpoints on a thread of its own instead
# (monitor/store/wal.py), so this is the safety net of a process without one, or of one that fell behind.
INLINE_CHECKPOINT_PAGES = 8000

log = logging.getLogger(__name__)


# Not the other stream's name: the dead letter is read by whoever runs this stream.
_CONFLICT = "episode_id already belongs to an episode of another stream (ids are unique across streams)"


class StaleOffsets(RuntimeError):
    """Another consumer committed these partitions since we read them; the batch was rolled back."""


class EpisodeIdConflict(RuntimeError):
    """Episodes of the batch whose id another stream's episode already holds; the batch was rolled
    back. ``rows``: (episode id, stream) of each such row -> detail. Ids are the store's key across
    every stream, so the samples and review tasks of such a record would point at the other
    stream's episode: its reviewers would read that stream's text (and its estimates count it)."""

    def __init__(self, rows: Mapping[tuple[str, str], str]):
        super().__init__(f"{len(rows)} episode(s) whose id already belongs to another stream")
        self.rows = dict(rows)


def normalize_url(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def bucket_of(ts: float) -> int:
    return math.floor(ts / BUCKET_S) * BUCKET_S


def outbox_order(table: sa.Table) -> list[sa.Column[Any]]:
    """The order an outbox table publishes in: commit order. Its first column is the key of the
    table's partial index of unpublished rows (migration 0019); the rest only break ties."""
    return [table.c[name] for name in OUTBOX_ORDER[table.name]]


def horizon_key(stream: str) -> str:
    """The internal-state key of a stream's retention horizon."""
    return f"retention_horizon:{stream}"


@dataclass
class BatchWrite:
    """Everything one batch changes. ``offsets`` maps (source, partition) to (expected, new);
    ``states`` (stream, component) to a stream's checkpoint; ``internal`` a key of the service's
    own state (``internal_state``, e.g. ``input_index:<source name>``) to its new value."""

    episodes: list[EpisodeRow] = field(default_factory=list)
    samples: list[SampleRow] = field(default_factory=list)
    traffic: dict[tuple[str, int], int] = field(default_factory=dict)
    offsets: dict[tuple[str, int], tuple[int | None, int]] = field(default_factory=dict)
    states: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    internal: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: list[ReviewTaskRow] = field(default_factory=list)
    drift_events: list[DriftEventRow] = field(default_factory=list)
    audit_applied: list[int] = field(default_factory=list)
    rm_scores: list[RmScoreRow] = field(default_factory=list)
    # Drift samples whose embedding this batch fed to the detectors (``monitor.store.inference``).
    embedded: list[str] = field(default_factory=list)
    # Written with the offsets, the same on every retry of this batch: a retry that finds its
    # own id knows the earlier attempt committed (:meth:`Store.committed`).
    commit_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def no_such_table(e: sa.exc.DBAPIError) -> bool:
    """Whether a query failed because its table does not exist (PostgreSQL's undefined_table, SQLite's
    "no such table")."""
    return sqlstate(e) == "42P01" or "no such table" in str(e.orig)


class SchemaMismatch(RuntimeError):
    """The database's schema is not this build's, and the store was not to migrate it."""


class Store:
    def __init__(self, url: str, *, migrate: bool = True, echo: bool = False, pool: Pool | None = None):
        self.url = normalize_url(url)
        self.engine: Engine = _make_engine(self.url, echo, pool or Pool())
        self.dialect = self.engine.dialect.name
        if migrate:
            self.migrate()

    @classmethod
    def open(cls, cfg: DatabaseConfig, *, migrate: bool | None = None, check_schema: bool | None = None) -> Store:
        """The store ``database`` settings describe (``migrate``: instead of ``cfg.migrate``). Not
        migrated, its schema must be this build's (``check_schema``, by default where it does
        not migrate): raises :class:`SchemaMismatch`."""
        pool = Pool(cfg.pool_size, cfg.max_overflow, cfg.pool_timeout_s, cfg.tcp_timeout_s)
        migrating = cfg.migrate if migrate is None else migrate
        store = cls(cfg.url, migrate=migrating, pool=pool)
        if check_schema if check_schema is not None else not migrating:
            try:
                problem = store.schema_problem(store.revision())
            except (sa.exc.OperationalError, sa.exc.InterfaceError):
                # Unreachable now: an outage, which the service waits out and shows (the ingest API
                # answers 503 meanwhile); a store that does not migrate never needed to connect here.
                problem = None
            except BaseException:
                store.close()
                raise
            if problem is not None:
                store.close()
                raise SchemaMismatch(problem)
        return store

    # -- lifecycle -------------------------------------------------------
    def migrate(self, target: str = "head") -> None:
        """Upgrade the schema to ``target`` (a revision; the tests build older databases)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, target)

    @staticmethod
    def schema_problem(revision: str | None) -> str | None:
        """Why this build cannot use a database at ``revision`` without migrating it (None: it can,
        or there is no schema yet). With ``database.migrate: false`` a service started on a schema a
        newer build had migrated, and ``db purge`` deleted rows in it; on an older one a command
        failed at its first query ("no such table: drift_events")."""
        from alembic.config import Config
        from alembic.script import ScriptDirectory

        if revision is None:
            return None
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        scripts = ScriptDirectory.from_config(cfg)
        head = scripts.get_current_head()
        if revision == head:
            return None
        if revision in {s.revision for s in scripts.walk_revisions()}:
            return f"the database schema is at {revision}, older than this build's {head}: run oversight db upgrade"
        return (
            f"the database schema is at {revision}, which this build does not know (its newest is {head}):"
            " a newer oversight migrated it; run that version"
        )

    def revision(self) -> str | None:
        """The schema's migration revision; None when the database has no schema (no version table).
        Any other failure (a locked or unreachable database) is raised: it said "has no schema",
        which sent an operator to run ``db upgrade`` on a live database."""
        with self.engine.connect() as conn:
            try:
                return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
            except sa.exc.DBAPIError as e:
                if no_such_table(e):
                    return None
                raise

    def ping(self) -> bool:
        """Whether the database answers a read. Not readiness: a read-only or full database
        answers; the pipeline's readiness comes from its writes (``probe_write``)."""
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except Exception:
            return False

    def probe_write(self) -> None:
        """One tiny committed write (a row of its own in ``internal_state``); raises what a batch's
        commit would raise now: on a full disk, a read-only file or database, or an outage."""
        self.save_internal(PROBE_KEY, {"at": time.time()})

    def reconnect(self) -> None:
        """Drop every pooled connection: the next operation opens new ones. After a failed
        operation, so that a connection opened while the database was unreachable or read-only
        (SQLite opens a read-only file read-only, and the connection stays so after the file
        becomes writable) is never used again. Connections checked out elsewhere are closed when
        they are returned."""
        self.engine.dispose()

    def close(self) -> None:
        self.engine.dispose()

    @property
    def sqlite_file(self) -> str | None:
        """The database file of a SQLite store on disk (its write-ahead log can be checkpointed
        apart, ``monitor.store.wal``); None for PostgreSQL and in-memory SQLite."""
        if self.dialect != "sqlite":
            return None
        database = sa.engine.make_url(self.url).database
        return None if database in (None, "", ":memory:") else database

    # -- writes ----------------------------------------------------------
    def _insert(self, table: sa.Table) -> Any:
        """The dialect's INSERT, which has ``on_conflict_do_nothing`` and ``on_conflict_do_update``."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table)

    @contextmanager
    def _transaction(self, conn: Connection | None) -> Iterator[Connection]:
        """A transaction of its own: on ``conn`` (none open there), else on a connection of the pool."""
        if conn is None:
            with self.engine.begin() as own:
                yield own
            return
        with conn.begin():
            yield conn

    @contextmanager
    def _writing(self, conn: Connection | None) -> Iterator[Connection]:
        """The caller's connection (its transaction commits the write), else a transaction of its own."""
        if conn is not None:
            yield conn
            return
        with self.engine.begin() as own:
            yield own

    def insert_ignore(self, table: sa.Table, rows: Iterable[Mapping[str, Any]], conn: Connection | None = None) -> None:
        """Insert rows, skipping every one whose key (primary or unique) is already there: how a
        redelivered record or a second writer of the same row becomes a no-op. ``conn``: write in
        the caller's transaction. All rows must have the same keys (one ``executemany``)."""
        batch = list(rows)
        if not batch:
            return
        with self._writing(conn) as c:
            c.execute(self._insert(table).on_conflict_do_nothing(), batch)

    def insert_new(
        self, table: sa.Table, rows: Sequence[Mapping[str, Any]], column: sa.Column[Any], conn: Connection
    ) -> list[Any]:
        """Insert the rows whose key is not there yet and return ``column`` of those inserted: of
        two writers of the same key, exactly one gets it back (a claim). RETURNING, not rowcount:
        drivers report -1 for INSERT .. ON CONFLICT."""
        if not rows:
            return []
        stmt = self._insert(table).on_conflict_do_nothing().returning(column)
        return [r[0] for r in conn.execute(stmt, list(rows))]

    def save_internal(self, key: str, state: Mapping[str, Any], conn: Connection | None = None) -> None:
        """Set the service's keyed state ``key`` (``internal_state``), whatever it was."""
        self._upsert_internal(conn, {key: state}, time.time())

    def cas_internal(self, key: str, expected: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
        """Compare-and-set of a keyed state: set ``new`` only if the state is ``expected`` now
        (``None``: no row yet). False when another writer changed it since the caller read it:
        of two workers that read the same cursor, exactly one moves it and acts."""
        it = t.internal_state
        now = time.time()
        with self.engine.begin() as conn:
            if expected is None:
                # RETURNING, not rowcount: drivers report -1 for INSERT .. ON CONFLICT. A second
                # inserter on PostgreSQL waits for the first's commit, then inserts nothing.
                inserted = conn.execute(
                    self._insert(it).on_conflict_do_nothing().returning(it.c.key),
                    {"key": key, "state": dict(new), "updated_at": now},
                ).first()
                return inserted is not None
            # Locked until the commit (PostgreSQL; SQLite's BEGIN IMMEDIATE holds the whole
            # database), so nobody changes the row between this comparison and the update.
            row = conn.execute(sa.select(it.c.state).where(it.c.key == key).with_for_update()).first()
            if row is None or row.state != _json_value(expected):
                return False
            conn.execute(it.update().where(it.c.key == key).values(state=dict(new), updated_at=now))
        return True

    def _upsert_internal(self, conn: Connection | None, states: Mapping[str, Mapping[str, Any]], now: float) -> None:
        if not states:
            return
        ins = self._insert(t.internal_state)
        stmt = ins.on_conflict_do_update(
            index_elements=["key"], set_={"state": ins.excluded.state, "updated_at": ins.excluded.updated_at}
        )
        # Sorted so two writers lock rows in the same order (no deadlock).
        rows = [{"key": k, "state": dict(st), "updated_at": now} for k, st in sorted(states.items())]
        with self._writing(conn) as c:
            c.execute(stmt, rows)

    def mark_published(
        self, table: sa.Table, rows: Iterable[Mapping[str, Any]], conn: Connection | None = None
    ) -> None:
        """Mark rows of an outbox table (``drift_events``, ``rm_scores``) as published, by their key;
        ``conn``: in a transaction of its own on that connection."""
        # Grouped by the key's other columns (a score's version), each group one IN list of the
        # first: SQLite cannot look a row-value IN list up in the key, and scanned the whole table
        # for every batch published.
        head, *rest = table.primary_key.columns
        groups: dict[tuple[Any, ...], list[Any]] = {}
        for r in rows:
            groups.setdefault(tuple(r[c.name] for c in rest), []).append(r[head.name])
        now = time.time()
        with self._transaction(conn) as c:
            for others, firsts in groups.items():
                where = [head.in_(firsts), *(col == v for col, v in zip(rest, others, strict=True))]
                c.execute(table.update().where(*where).values(published_at=now))

    def record_scores(self, rows: Sequence[RmScoreRow], conn: Connection | None = None) -> None:
        """Reward-model scores (one row per episode and version; a repeat is ignored), and the
        mark on their episodes' rm and human samples that takes them off the score backlog
        (``monitor.store.inference``), in one transaction."""
        if not rows:
            return
        with self._writing(conn) as c:
            present = self._still_stored(sorted({r["episode_id"] for r in rows}), c)
            rows = [r for r in rows if r["episode_id"] in present]
            self.insert_ignore(t.rm_scores, rows, c)
            ids = sorted(present)
            for i in range(0, len(ids), 500):
                c.execute(
                    t.samples.update()
                    .where(t.samples.c.channel.in_(("rm", "human")), t.samples.c.episode_id.in_(ids[i : i + 500]))
                    .values(status="scored")
                )
                # The results an inference worker of its own stored for them (inference.external).
                r = t.inference_results
                c.execute(r.delete().where(r.c.stage == "score", r.c.episode_id.in_(ids[i : i + 500])))

    def _still_stored(self, ids: Sequence[str], conn: Connection) -> set[str]:
        """Of ``ids``, the episodes stored now. A score computed while the retention purge deleted
        its episode (``monitor/store/retention.py``) has nothing to refer to: its insert would fail
        the whole batch. On PostgreSQL the rows are locked (KEY SHARE, as the foreign key check
        would) until the caller commits, so a purge cannot delete them in between; a purge that
        deleted one first is waited for, and the row is not returned."""
        e = t.episodes
        present: set[str] = set()
        for i in range(0, len(ids), 500):
            q = sa.select(e.c.episode_id).where(e.c.episode_id.in_(ids[i : i + 500]))
            if self.dialect == "postgresql":
                q = q.with_for_update(key_share=True)
            present.update(r[0] for r in conn.execute(q))
        return present

    def _insert_episodes(self, rows: Sequence[EpisodeRow], conn: Connection) -> dict[str, str]:
        """Insert the batch's episodes; return the stream that owns each id, read after the insert
        (so an id new to the store belongs to the batch's first row of it).

        An id already stored takes no lock when its insert does nothing, so the retention purge
        could delete it before the batch's samples referred to it: the foreign key failed the
        batch and stopped the pipeline (an old episode sent again: a producer's retry, a rewind,
        re-imported history). The owners are read under KEY SHARE on PostgreSQL, as the foreign
        key check would lock them, until the caller commits; one deleted in between is inserted
        again (ours then, which no purge can see). SQLite's write transaction holds the database."""
        e = t.episodes
        owner: dict[str, str] = {}
        pending = list(rows)
        while pending:
            self.insert_ignore(t.episodes, pending, conn)
            ids = list(dict.fromkeys(row["episode_id"] for row in pending))
            for i in range(0, len(ids), 500):
                q = sa.select(e.c.episode_id, e.c.stream).where(e.c.episode_id.in_(ids[i : i + 500]))
                if self.dialect == "postgresql":
                    q = q.with_for_update(key_share=True)
                owner.update((str(r[0]), str(r[1])) for r in conn.execute(q))
            pending = [row for row in pending if row["episode_id"] not in owner]
        return owner

    @staticmethod
    def _stream_conflicts(rows: Sequence[EpisodeRow], owner: Mapping[str, str]) -> dict[tuple[str, str], str]:
        """The episode rows, (episode id, stream), whose id the store holds for another stream."""
        return {
            (row["episode_id"], row["stream"]): _CONFLICT
            for row in rows
            if owner.get(row["episode_id"], row["stream"]) != row["stream"]
        }

    def commit_batch(self, batch: BatchWrite, *, timeout_s: float | None = None) -> None:
        """Apply a batch atomically; raise :class:`StaleOffsets` if an offset moved under us.

        ``timeout_s``: see :meth:`limit_transaction`."""
        now = time.time()
        with self.engine.begin() as conn:
            self.limit_transaction(conn, timeout_s)
            self._cas_offsets(conn, batch.offsets, batch.commit_id, now)
            # Episodes before the rows that refer to them (foreign keys). Their owners are read after
            # the insert, in its transaction: a row another writer committed since (or holds, on
            # PostgreSQL, until it commits) is seen here, so no race lets a conflict through.
            conflicts = self._stream_conflicts(batch.episodes, self._insert_episodes(batch.episodes, conn))
            if conflicts:
                raise EpisodeIdConflict(conflicts)  # leaving the block rolls the batch back
            self.insert_ignore(t.samples, batch.samples, conn)
            self.insert_ignore(t.review_tasks, batch.tasks, conn)
            self.insert_ignore(t.drift_events, batch.drift_events, conn)
            self.record_scores(batch.rm_scores, conn)
            if batch.embedded:
                conn.execute(
                    t.samples.update()
                    .where(t.samples.c.channel == "drift", t.samples.c.episode_id.in_(batch.embedded))
                    .values(status="embedded")
                )
                r = t.inference_results
                conn.execute(r.delete().where(r.c.stage == "embedding", r.c.episode_id.in_(batch.embedded)))
            if batch.audit_applied:
                conn.execute(
                    t.drift_audit.update().where(t.drift_audit.c.id.in_(batch.audit_applied)).values(applied_at=now)
                )
            if batch.traffic:
                ins = self._insert(t.traffic)
                stmt = ins.on_conflict_do_update(
                    index_elements=["stream", "bucket"], set_={"episodes": t.traffic.c.episodes + ins.excluded.episodes}
                )
                rows = [{"stream": s, "bucket": b, "episodes": n} for (s, b), n in sorted(batch.traffic.items())]
                conn.execute(stmt, rows)
            if batch.states:
                ins = self._insert(t.stream_state)
                stmt = ins.on_conflict_do_update(
                    index_elements=["stream", "component"],
                    set_={"state": ins.excluded.state, "updated_at": ins.excluded.updated_at},
                )
                rows = [
                    {"stream": s, "component": c, "state": st, "updated_at": now}
                    for (s, c), st in sorted(batch.states.items())
                ]
                conn.execute(stmt, rows)
            self._upsert_internal(conn, batch.internal, now)

    def find_rejected(self, batch: BatchWrite) -> dict[str, str]:
        """Episodes of a batch that this database refuses, with the error; changes nothing.

        Raises on an outage (the caller retries the batch): a lost connection must not
        dead-letter every episode after it."""
        rejected: dict[str, str] = {}
        by_id: dict[str, list[SampleRow]] = {}
        for sample in batch.samples:
            by_id.setdefault(sample["episode_id"], []).append(sample)
        conn = self.engine.connect()
        trans = conn.begin()
        try:
            for row in batch.episodes:
                try:
                    with conn.begin_nested():
                        self.insert_ignore(t.episodes, [row], conn)
                        self.insert_ignore(t.samples, by_id.get(row["episode_id"], []), conn)
                except Exception as e:
                    if transient(e):
                        raise  # the database, not the row: the caller retries the whole batch
                    # The database's refusal, or the driver's: SQLAlchemy wraps what a bind
                    # processor raises (a JSON encoder's RecursionError) in a StatementError.
                    orig = e.orig if isinstance(e, sa.exc.StatementError) and e.orig is not None else e
                    rejected[row["episode_id"]] = first_line(orig, 500)
        finally:
            trans.rollback()
            conn.close()
        return rejected

    def limit_transaction(self, conn: Connection, timeout_s: float | None) -> None:
        """PostgreSQL, for the transaction open on ``conn`` only (the pooled connection keeps
        its defaults): the longest any statement may run, lock waits included, and the longest
        the transaction may sit idle; the server then cancels the statement (SQLSTATE 57014, an
        outage to the caller's retry) or ends the session.

        The idle limit matters when the client vanished mid-transaction (its node gone, its
        network cut, its process paused): the server would keep the session, and its locks,
        until its TCP keepalive notices, two hours by default, and every writer that needs them
        (a replica taking over the partitions, the other ingest replicas) would wait. The
        callers send their statements back to back, so they are never idle that long while
        alive. Nothing on SQLite, whose writers wait at most its busy timeout anyway."""
        if timeout_s is None or self.dialect != "postgresql":
            return
        conn.execute(
            sa.text(
                "SELECT set_config('statement_timeout', :ms, true),"
                " set_config('idle_in_transaction_session_timeout', :ms, true)"
            ),
            {"ms": str(max(1, int(timeout_s * 1000)))},
        )

    def committed(self, batch: BatchWrite) -> bool:
        """Whether ``batch`` is what the offsets hold: each at the batch's new value, written
        with its commit id. After a commit whose reply was lost (the connection died between
        COMMIT and its answer), a retry's refused compare-and-set asks this: True means the
        earlier attempt committed every row of the batch (one transaction), and no consumer
        has moved the offsets since. A batch without offsets cannot tell: False."""
        if not batch.offsets:
            return False
        o = t.offsets
        keys = sa.tuple_(o.c.source, o.c.partition).in_(list(batch.offsets))
        q = sa.select(o.c.source, o.c.partition, o.c.next_offset, o.c.commit_id).where(keys)
        with self.engine.connect() as conn:
            held = {(r.source, int(r.partition)): (int(r.next_offset), r.commit_id) for r in conn.execute(q)}
        return all(held.get(k) == (new, batch.commit_id) for k, (_, new) in batch.offsets.items())

    def replication(self) -> Replication | None:
        """The server's streaming replication (None on SQLite). ``pg_stat_replication`` lists its
        standbys to every role (the details only to monitoring roles), and both settings are
        readable by all."""
        if self.dialect != "postgresql":
            return None
        q = sa.text(
            "SELECT (SELECT count(*) FROM pg_stat_replication),"
            " current_setting('synchronous_standby_names'), current_setting('synchronous_commit')"
        )
        with self.engine.connect() as conn:
            standbys, names, commit = conn.execute(q).one()
        return Replication(int(standbys), bool(str(names).strip()) and str(commit) not in ("off", "local"))

    def regressed(self, batch: BatchWrite) -> dict[tuple[str, int], tuple[int, int | None]]:
        """The partitions of ``batch`` whose stored offset is *behind* the one the batch expected
        (``{(source, partition): (expected, stored)}``, ``stored`` None where the row is gone).

        Consumers only ever move an offset forward from the value they read, so an offset behind
        what this consumer committed means the database lost commits it had acknowledged: a
        failover to a standby that was behind (asynchronous replication), a restore from a
        backup, or an operator who rewound it. Another consumer's commit leaves it ahead."""
        o = t.offsets
        expected = {k: e for k, (e, _) in batch.offsets.items() if e is not None}
        if not expected:
            return {}
        q = sa.select(o.c.source, o.c.partition, o.c.next_offset).where(
            sa.tuple_(o.c.source, o.c.partition).in_(list(expected))
        )
        with self.engine.connect() as conn:
            held = {(r.source, int(r.partition)): int(r.next_offset) for r in conn.execute(q)}
        out: dict[tuple[str, int], tuple[int, int | None]] = {}
        for key, want in expected.items():
            stored = held.get(key)
            if stored is None or stored < want:
                out[key] = (want, stored)
        return out

    def _cas_offsets(
        self,
        conn: Connection,
        offsets: Mapping[tuple[str, int], tuple[int | None, int]],
        commit_id: str,
        now: float,
    ) -> None:
        # Sorted so two writers lock rows in the same order (no deadlock).
        for (source, partition), (expected, new) in sorted(offsets.items()):
            if expected is None:
                # RETURNING, not rowcount: drivers report -1 for INSERT .. ON CONFLICT.
                inserted = conn.execute(
                    self._insert(t.offsets).on_conflict_do_nothing().returning(t.offsets.c.partition),
                    {
                        "source": source,
                        "partition": partition,
                        "next_offset": new,
                        "updated_at": now,
                        "commit_id": commit_id,
                    },
                ).first()
                if inserted is None:
                    raise StaleOffsets(f"offset of {source}[{partition}] was created by another consumer")
                continue
            else:
                res = conn.execute(
                    t.offsets.update()
                    .where(
                        t.offsets.c.source == source,
                        t.offsets.c.partition == partition,
                        t.offsets.c.next_offset == expected,
                    )
                    .values(next_offset=new, updated_at=now, commit_id=commit_id)
                )
            if res.rowcount != 1:
                raise StaleOffsets(f"offset of {source}[{partition}] is no longer {expected}")

    # -- reads -----------------------------------------------------------
    def load_offsets(self, source: str, partitions: Iterable[int] | None = None) -> dict[int, int]:
        q = sa.select(t.offsets.c.partition, t.offsets.c.next_offset).where(t.offsets.c.source == source)
        if partitions is not None:
            q = q.where(t.offsets.c.partition.in_(list(partitions)))
        with self.engine.connect() as conn:
            return {int(p): int(o) for p, o in conn.execute(q)}

    def load_state(self, stream: str, component: str) -> dict[str, Any] | None:
        q = sa.select(t.stream_state.c.state).where(
            t.stream_state.c.stream == stream, t.stream_state.c.component == component
        )
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        return None if row is None else dict(row[0])

    def with_state(self, streams: Collection[str], component: str) -> set[str]:
        """Those of ``streams`` for which ``component`` checkpointed state (without reading it): one
        query per 500 names."""
        ss = t.stream_state
        names = sorted(set(streams))
        found: set[str] = set()
        with self.engine.connect() as conn:
            for i in range(0, len(names), 500):
                q = sa.select(ss.c.stream).where(ss.c.component == component, ss.c.stream.in_(names[i : i + 500]))
                found.update(str(s) for s in conn.execute(q).scalars())
        return found

    def streams_with_state(self, component: str) -> list[str]:
        """Every stream for which ``component`` checkpointed state (without reading it)."""
        ss = t.stream_state
        with self.engine.connect() as conn:
            q = sa.select(ss.c.stream).where(ss.c.component == component).order_by(ss.c.stream)
            return [str(s) for s in conn.execute(q).scalars()]

    def load_internal(self, key: str) -> dict[str, Any] | None:
        """The service's keyed state ``key`` (``internal_state``); None if it was never saved."""
        q = sa.select(t.internal_state.c.state).where(t.internal_state.c.key == key)
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        return None if row is None else dict(row[0])

    def drift_events(
        self,
        stream: str | None = None,
        since_id: int | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[DriftEvent]:
        """Stored drift events in the order they were recorded (by id; ``newest_first``: the
        reverse): only ``stream``'s, only those after id ``since_id`` (a consumer's cursor), at
        most ``limit`` (the first ones in that order)."""
        e = t.drift_events
        q = sa.select(e).order_by(e.c.id.desc() if newest_first else e.c.id)
        if stream is not None:
            q = q.where(e.c.stream == stream)
        if since_id is not None:
            q = q.where(e.c.id > since_id)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [cast(DriftEvent, dict(r._mapping)) for r in conn.execute(q)]

    @contextmanager
    def one_at_a_time(self, key: int, name: str) -> Iterator[tuple[bool, Connection | None]]:
        """Whether this process may go on with the work ``(key, name)`` now, none other doing it,
        and the connection to do it on. On PostgreSQL a session advisory lock on ``name`` in the
        current schema (two deployments in one database are two), tried, not waited for, held on
        that connection until the block ends (a process that dies mid-block loses it with its
        connection): the work's reads and writes go on it, so the work needs one connection of
        the pool, not two. On SQLite always True and None (one process owns the file's writers;
        the work takes its own connections, none held open while it waits on something else)."""
        if self.dialect != "postgresql":
            yield True, None
            return
        args = {"k": key, "name": name}
        with self.engine.connect() as conn:
            lock = "SELECT pg_try_advisory_lock(:k, hashtext(current_schema() || '.' || :name))"
            got = bool(conn.execute(sa.text(lock), args).scalar())
            conn.commit()
            failed = False
            try:
                yield got, conn
            except BaseException:
                failed = True
                raise
            finally:
                if got:
                    self._unlock(conn, args, quiet=failed)

    @staticmethod
    def _unlock(conn: Connection, args: Mapping[str, Any], quiet: bool) -> None:
        """Release :meth:`one_at_a_time`'s lock; a session gone or broken is closed for good, which
        releases it. ``quiet``: the work failed already, and its error is the one to raise."""
        try:
            conn.rollback()  # the work's transaction, if it left one open
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k, hashtext(current_schema() || '.' || :name))"), args)
            conn.commit()
        except sa.exc.DBAPIError:
            conn.invalidate()
            if not quiet:
                raise
            log.warning("advisory lock %s: the session could not release it; closed", args["name"], exc_info=True)

    def unpublished(self, table: sa.Table, limit: int, conn: Connection | None = None) -> list[dict[str, Any]]:
        """Rows of an outbox table (``drift_events``, ``rm_scores``) not yet published, in the order
        they committed (``outbox_order``). The read walks a partial index of the unpublished rows
        (migration 0019), so it costs what is waiting, however many rows were published before.
        ``conn``: read on it (its transaction ends with the read: nothing is held while the rows
        are sent)."""
        q = sa.select(table).where(table.c.published_at.is_(None)).order_by(*outbox_order(table)).limit(limit)
        if conn is not None:
            rows = [dict(r._mapping) for r in conn.execute(q)]
            conn.commit()
            return rows
        with self.engine.connect() as own:
            return [dict(r._mapping) for r in own.execute(q)]

    def oldest_unpublished(self, table: sa.Table) -> float | None:
        """When the oldest row of an outbox table still to publish committed (``created_at``), or None
        when every row is published: the outbox's lag, read off the same partial index."""
        first = outbox_order(table)[0]
        q = sa.select(table.c.created_at).where(table.c.published_at.is_(None)).order_by(first).limit(1)
        with self.engine.connect() as conn:
            value = conn.execute(q).scalar()
        return None if value is None else float(value)

    def sample_counts(self) -> dict[str, dict[str, int]]:
        q = sa.select(t.samples.c.stream, t.samples.c.channel, sa.func.count()).group_by(
            t.samples.c.stream, t.samples.c.channel
        )
        out: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for stream, channel, n in conn.execute(q):
                out.setdefault(stream, {})[channel] = int(n)
        return out

    def one_of(self, column: sa.ColumnElement[Any], values: Collection[str]) -> sa.ColumnElement[bool]:
        """``column IN values``. Up to ``IN_LIST_MAX`` values as an IN list; beyond, as one bound
        parameter (``= ANY(array)`` on PostgreSQL, ``IN (SELECT value FROM json_each(...))`` on
        SQLite): an IN list binds a parameter per value, and a statement takes at most 65,535 on
        PostgreSQL (its protocol) and 32,766 on SQLite, fewer than the streams one replica can own."""
        vals = sorted(values)
        if len(vals) <= IN_LIST_MAX:
            return column.in_(vals)
        if self.dialect == "postgresql":
            return column == sa.any_(sa.bindparam(None, vals, type_=ARRAY(sa.String())))
        each = sa.func.json_each(sa.bindparam(None, json.dumps(vals), type_=sa.String())).table_valued("value")
        return column.in_(sa.select(each.c.value))

    def retention_horizon(self, stream: str) -> int | None:
        """The start of a stream's retained window (``monitor/store/retention.py``): the purge has
        deleted, or may be deleting, what is older. None before its first purge."""
        state = self.load_internal(horizon_key(stream))
        return None if state is None else int(state["horizon"])

    def _retained(self, stream: str, since: float | None) -> float | None:
        """``since`` moved up to the stream's retention horizon: the traffic counts and the sampled
        items of an estimate must cover the same episodes, and before the horizon only some of the
        sampled ones are left (the labelled)."""
        horizon = self.retention_horizon(stream)
        if horizon is None:
            return since
        return float(horizon) if since is None else max(since, float(horizon))

    def traffic_count(self, stream: str, since: float | None = None, until: float | None = None) -> int:
        since = self._retained(stream, since)
        q = sa.select(sa.func.coalesce(sa.func.sum(t.traffic.c.episodes), 0)).where(t.traffic.c.stream == stream)
        if since is not None:
            q = q.where(t.traffic.c.bucket >= bucket_of(since))
        if until is not None:
            q = q.where(t.traffic.c.bucket < bucket_of(until))
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def sampled(
        self, stream: str, channel: str, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        """Sampled episodes of a stream and channel with their inclusion probabilities.

        Window bounds are rounded to the traffic buckets so the sampled items
        and the population count cover the same episodes, and start at the stream's retention
        horizon at the earliest (:meth:`retention_horizon`).
        """
        e, s = t.episodes, t.samples
        columns = (e.c.episode_id, e.c.stream, e.c.model, e.c.ts, e.c.prompt, e.c.response, e.c.metadata, e.c.messages)
        q = self._sampled_query(stream, channel, since, until, (*columns, s.c.inclusion_probability))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q.order_by(s.c.ts, s.c.episode_id))]

    def iter_sampled(
        self,
        stream: str,
        channel: str,
        columns: Sequence[sa.ColumnElement[Any]],
        since: float | None = None,
        until: float | None = None,
    ) -> Iterator[sa.Row[*tuple[Any, ...]]]:
        """``columns`` (expressions over ``episodes`` and ``samples``) of the episodes :meth:`sampled`
        returns, read as they are used, in no particular order.

        For estimates over a long window: a day of a busy stream's samples is millions of rows, and
        read whole into a list (texts and all) it took about 2.8 KB and 70 us a row.
        """
        q = self._sampled_query(stream, channel, since, until, columns)
        with self.engine.connect() as conn:
            # A server-side cursor on PostgreSQL; SQLite's cursor reads as it goes anyway.
            yield from conn.execution_options(stream_results=True, yield_per=STREAM_ROWS).execute(q)

    def _sampled_query(
        self,
        stream: str,
        channel: str,
        since: float | None,
        until: float | None,
        columns: Sequence[sa.ColumnElement[Any]],
    ) -> sa.Select[Any]:
        since = self._retained(stream, since)
        e, s = t.episodes, t.samples
        q = sa.select(*columns).join_from(s, e, s.c.episode_id == e.c.episode_id)
        q = q.where(s.c.stream == stream, s.c.channel == channel)
        if since is not None:
            q = q.where(s.c.ts >= bucket_of(since))
        if until is not None:
            q = q.where(s.c.ts < bucket_of(until))
        return q

    def traffic_ends(self, not_after: float | None = None) -> dict[str, int]:
        """Per stream, its latest traffic minute (the bucket, at or before ``not_after``).

        Not a grouped read of every minute kept (:meth:`_latest_per_stream`): the admin summary
        asks at every computation, and a stream keeps 1,440 minutes a day for as long as retention
        keeps them."""
        tr = t.traffic
        return {s: int(b) for s, b in self._latest_per_stream(tr, tr.c.bucket, not_after).items()}

    def sample_ends(self, channel: str, not_after: float | None = None) -> dict[str, float]:
        """Per stream, the event time of its latest episode sampled for ``channel`` (at or before
        ``not_after``), along ``ix_samples_stream_channel_ts``."""
        s = t.samples
        ends = self._latest_per_stream(s, s.c.ts, not_after, s.c.channel == channel)
        return {k: float(v) for k, v in ends.items()}

    def _latest_per_stream(
        self, table: sa.Table, column: sa.Column[Any], not_after: float | None, *where: sa.ColumnElement[bool]
    ) -> dict[str, Any]:
        """Per stream of ``table``, the largest ``column`` (at or before ``not_after``, under
        ``where``): a walk of an index that starts with the stream, two probes a stream (the next
        stream, then its largest value), whatever the rows kept."""
        out: dict[str, Any] = {}
        with self.engine.connect() as conn:
            stream = conn.execute(sa.select(sa.func.min(table.c.stream))).scalar()
            while stream is not None:
                q = sa.select(sa.func.max(column)).where(table.c.stream == stream, *where)
                if not_after is not None:
                    q = q.where(column <= not_after)
                last = conn.execute(q).scalar()
                if last is not None:
                    out[str(stream)] = last
                stream = conn.execute(sa.select(sa.func.min(table.c.stream)).where(table.c.stream > stream)).scalar()
        return out

    def streams(self) -> list[str]:
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(sa.select(t.traffic.c.stream).distinct().order_by(t.traffic.c.stream))]


def _json_value(value: Mapping[str, Any]) -> Any:
    """A value as it reads back from a JSON column (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


@dataclass(frozen=True)
class Replication:
    """A PostgreSQL primary's streaming replication as it reports it: the standbys attached now,
    and whether a commit waits for one (``synchronous_standby_names`` set, ``synchronous_commit``
    neither ``off`` nor ``local``). Storage-level replication (a managed service's) is not seen."""

    standbys: int
    synchronous: bool

    @property
    def failover_can_lose_commits(self) -> bool:
        return self.standbys > 0 and not self.synchronous


@dataclass(frozen=True)
class Pool:
    """PostgreSQL's connection pool of one process (``database.pool_size``, ``max_overflow``,
    ``pool_timeout_s``) and its connections' TCP timeout (``tcp_timeout_s``); SQLite has none."""

    size: int = 5
    overflow: int = 5
    timeout_s: float = 30.0
    tcp_timeout_s: float = 30.0


def _connection_timeouts(tcp_timeout_s: float) -> dict[str, int]:
    """libpq's settings that turn a dead network into an error instead of a wait: a server that
    does not answer the connection (``connect_timeout``), bytes sent and never acknowledged
    (``tcp_user_timeout``: a partition, a host gone, a failover that moved the address) and an
    idle connection whose peer vanished (keepalive probes, failing within about the same time).
    A healthy server acknowledges within milliseconds however long its query runs, so none of
    these limits a long query."""
    ms = int(tcp_timeout_s * 1000)
    return {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "tcp_user_timeout": ms,
        "keepalives": 1,
        "keepalives_idle": max(1, int(tcp_timeout_s / 2)),
        "keepalives_interval": max(1, int(tcp_timeout_s / 6)),
        "keepalives_count": 3,
    }


def _make_engine(url: str, echo: bool, pool: Pool) -> Engine:
    if url.startswith("sqlite"):
        from sqlalchemy.pool import StaticPool

        memory = url in ("sqlite://", "sqlite:///:memory:")
        kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
        if memory:
            kwargs["poolclass"] = StaticPool
        else:
            path = url.split("///", 1)[1] if "///" in url else ""
            if path:
                file = Path(path.split("?", 1)[0]).expanduser()
                if file.is_dir():
                    # SQLite says only "unable to open database file", at the first connection.
                    raise IsADirectoryError(
                        errno.EISDIR, "a folder, not a SQLite database file (database.url)", str(file)
                    )
                file.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, echo=echo, **kwargs)

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
            # pysqlite's own transaction handling defers BEGIN; take control so
            # every transaction starts IMMEDIATE (writers queue, never deadlock).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute(f"PRAGMA wal_autocheckpoint={INLINE_CHECKPOINT_PAGES}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    given = sa.engine.make_url(url).query
    connect_args = {k: v for k, v in _connection_timeouts(pool.tcp_timeout_s).items() if k not in given}
    return sa.create_engine(
        url,
        echo=echo,
        pool_pre_ping=True,
        pool_size=pool.size,
        max_overflow=pool.overflow,
        pool_timeout=pool.timeout_s,
        connect_args=connect_args,
    )
