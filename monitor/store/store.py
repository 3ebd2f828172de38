"""Durable state of the pipeline, written one transaction per batch.

A batch's sampled rows, traffic counts, stream-state checkpoints and the
source offsets it consumed commit together, so after any crash the database
holds exactly the effects of the offsets it records: redelivered records are
either already counted (offset stored) or not at all. Offsets are written
with compare-and-set, so a zombie replica that lost its partition cannot
commit the same range twice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from monitor.retry import first_line, transient
from monitor.store import tables as t

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
BUCKET_S = 60
PROBE_ROW = ("__health__", "write_probe")  # the stream_state row of the pipeline's idle write probe
CONNECT_TIMEOUT_S = 5  # a database host that drops packets must not hang the pipeline for minutes


class StaleOffsets(RuntimeError):
    """Another consumer committed these partitions since we read them; the batch was rolled back."""


def normalize_url(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def bucket_of(ts: float) -> int:
    return math.floor(ts / BUCKET_S) * BUCKET_S


@dataclass
class BatchWrite:
    """Everything one batch changes. ``offsets`` maps (source, partition) to (expected, new)."""

    episodes: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    traffic: dict[tuple[str, int], int] = field(default_factory=dict)
    offsets: dict[tuple[str, int], tuple[int | None, int]] = field(default_factory=dict)
    states: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    drift_events: list[dict[str, Any]] = field(default_factory=list)
    audit_applied: list[int] = field(default_factory=list)
    rm_scores: list[dict[str, Any]] = field(default_factory=list)


class Store:
    def __init__(self, url: str, *, migrate: bool = True, echo: bool = False):
        self.url = normalize_url(url)
        self.engine: Engine = _make_engine(self.url, echo)
        self.dialect = self.engine.dialect.name
        if migrate:
            self.migrate()

    # -- lifecycle -------------------------------------------------------
    def migrate(self) -> None:
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def revision(self) -> str | None:
        with self.engine.connect() as conn:
            try:
                return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
            except sa.exc.DBAPIError:
                return None

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
        """One tiny committed write (a row of its own in ``stream_state``); raises what a batch's
        commit would raise now: on a full disk, a read-only file or database, or an outage."""
        ins = self._insert(t.stream_state)
        now = time.time()
        stmt = ins.on_conflict_do_update(
            index_elements=["stream", "component"], set_={"state": ins.excluded.state, "updated_at": now}
        )
        with self.engine.begin() as conn:
            conn.execute(
                stmt, [{"stream": PROBE_ROW[0], "component": PROBE_ROW[1], "state": {"at": now}, "updated_at": now}]
            )

    def reconnect(self) -> None:
        """Drop every pooled connection: the next operation opens new ones. After a failed
        operation, so that a connection opened while the database was unreachable or read-only
        (SQLite opens a read-only file read-only, and the connection stays so after the file
        becomes writable) is never used again. Connections checked out elsewhere are closed when
        they are returned."""
        self.engine.dispose()

    def close(self) -> None:
        self.engine.dispose()

    # -- writes ----------------------------------------------------------
    def _insert(self, table: sa.Table) -> Any:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table)

    def commit_batch(self, batch: BatchWrite) -> None:
        """Apply a batch atomically; raise :class:`StaleOffsets` if an offset moved under us."""
        now = time.time()
        with self.engine.begin() as conn:
            self._cas_offsets(conn, batch.offsets, now)
            if batch.episodes:
                conn.execute(self._insert(t.episodes).on_conflict_do_nothing(), batch.episodes)
            if batch.samples:
                conn.execute(self._insert(t.samples).on_conflict_do_nothing(), batch.samples)
            if batch.tasks:
                conn.execute(self._insert(t.review_tasks).on_conflict_do_nothing(), batch.tasks)
            if batch.drift_events:
                conn.execute(self._insert(t.drift_events).on_conflict_do_nothing(), batch.drift_events)
            if batch.rm_scores:
                conn.execute(self._insert(t.rm_scores).on_conflict_do_nothing(), batch.rm_scores)
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

    def find_rejected(self, batch: BatchWrite) -> dict[str, str]:
        """Episodes of a batch that this database refuses, with the error; changes nothing.

        Raises on an outage (the caller retries the batch): a lost connection must not
        dead-letter every episode after it."""
        rejected: dict[str, str] = {}
        by_id: dict[str, list[dict[str, Any]]] = {}
        for row in batch.samples:
            by_id.setdefault(row["episode_id"], []).append(row)
        conn = self.engine.connect()
        trans = conn.begin()
        try:
            for row in batch.episodes:
                try:
                    with conn.begin_nested():
                        conn.execute(self._insert(t.episodes).on_conflict_do_nothing(), [row])
                        rows = by_id.get(row["episode_id"])
                        if rows:
                            conn.execute(self._insert(t.samples).on_conflict_do_nothing(), rows)
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

    def _cas_offsets(
        self, conn: Connection, offsets: Mapping[tuple[str, int], tuple[int | None, int]], now: float
    ) -> None:
        # Sorted so two writers lock rows in the same order (no deadlock).
        for (source, partition), (expected, new) in sorted(offsets.items()):
            if expected is None:
                # RETURNING, not rowcount: drivers report -1 for INSERT .. ON CONFLICT.
                inserted = conn.execute(
                    self._insert(t.offsets).on_conflict_do_nothing().returning(t.offsets.c.partition),
                    {"source": source, "partition": partition, "next_offset": new, "updated_at": now},
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
                    .values(next_offset=new, updated_at=now)
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

    def sample_counts(self) -> dict[str, dict[str, int]]:
        q = sa.select(t.samples.c.stream, t.samples.c.channel, sa.func.count()).group_by(
            t.samples.c.stream, t.samples.c.channel
        )
        out: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for stream, channel, n in conn.execute(q):
                out.setdefault(stream, {})[channel] = int(n)
        return out

    def traffic_count(self, stream: str, since: float | None = None, until: float | None = None) -> int:
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
        and the population count cover the same episodes.
        """
        e, s = t.episodes, t.samples
        q = (
            sa.select(
                e.c.episode_id,
                e.c.stream,
                e.c.model,
                e.c.ts,
                e.c.prompt,
                e.c.response,
                e.c.metadata,
                s.c.inclusion_probability,
            )
            .join(s, s.c.episode_id == e.c.episode_id)
            .where(s.c.stream == stream, s.c.channel == channel)
            .order_by(s.c.ts, s.c.episode_id)
        )
        if since is not None:
            q = q.where(s.c.ts >= bucket_of(since))
        if until is not None:
            q = q.where(s.c.ts < bucket_of(until))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def streams(self) -> list[str]:
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(sa.select(t.traffic.c.stream).distinct().order_by(t.traffic.c.stream))]


def _make_engine(url: str, echo: bool) -> Engine:
    if url.startswith("sqlite"):
        from sqlalchemy.pool import StaticPool

        memory = url in ("sqlite://", "sqlite:///:memory:")
        kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
        if memory:
            kwargs["poolclass"] = StaticPool
        else:
            path = url.split("///", 1)[1] if "///" in url else ""
            if path:
                Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
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
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in sa.engine.make_url(url).query:
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
    return sa.create_engine(url, echo=echo, pool_pre_ping=True, pool_size=5, max_overflow=5, connect_args=connect_args)
