"""The HTTP ingest API's tables, by meaning: the inbox (the embedded hand-off) and the ingest tokens.

The inbox is consumed in id order and the consumer's position is an id, so ids must become
visible in the order they were given out: on PostgreSQL every inbox insert holds one
transaction-scoped advisory lock, so a transaction that got lower ids always commits before one
that got higher ids (without it a reader could see id 11 committed while id 10 is still in
flight, move past 10 and never read it). SQLite's BEGIN IMMEDIATE serialises writers already.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from monitor.store import tables as t
from monitor.store.store import Store

INBOX_LOCK = 7163527  # pg_advisory_xact_lock key of inbox inserts (the migrations hold 7163526)
INBOX_SOURCE = "inbox"  # the inbox source's name: its position is offsets[("inbox", 0)]
INSERT_CHUNK = 500  # rows per INSERT statement (5 parameters each: under SQLite's 32,766)


#: How far ahead of the purge's clock a consumed inbox row's time may be and still wait for its
#: retention: a day of clock skew between the writer and the purging replica. Past it (NaN and
#: Infinity included), the time is not one, and the consumed row goes at the next purge.
FUTURE_SLACK_S = 86_400.0


@dataclass(frozen=True, slots=True)
class InboxRow:
    episode_id: str
    stream: str
    raw: bytes
    received_at: float


@dataclass(frozen=True, slots=True)
class InboxRecord:
    id: int
    raw: bytes
    received_at: float
    #: Set when ``raw`` holds only the first bytes of a row larger than the reader's limit.
    full_size: int | None = None
    #: Set when the row cannot be read as an inbox row (a value of the wrong type, which a writer
    #: other than this build can leave in SQLite): why. ``raw`` is then empty.
    undecodable: str | None = None


@dataclass(frozen=True, slots=True)
class TokenRow:
    name: str
    token_hash: str
    streams: tuple[str, ...] | None
    created_at: float
    revoked_at: float | None


def _insert(store: Store, table: sa.Table) -> Any:
    if store.dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


class Inbox:
    """The ``inbox`` table of a store. ``timeout_s``: the limits of an insert's transaction
    (:meth:`Store.limit_transaction`): a writer that stopped while holding the ordering lock
    must not hold every other writer for hours."""

    def __init__(self, store: Store, timeout_s: float | None = None):
        self.store = store
        self.timeout_s = timeout_s

    def insert(self, rows: Sequence[InboxRow]) -> set[tuple[str, str]]:
        """Insert rows in one transaction, skipping (stream, episode id) pairs already there; the
        pairs inserted. Raises (nothing committed) on an outage."""
        inserted: set[tuple[str, str]] = set()
        if not rows:
            return inserted
        with self.store.engine.begin() as conn:
            self.store.limit_transaction(conn, self.timeout_s)
            if self.store.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": INBOX_LOCK})
            for start in range(0, len(rows), INSERT_CHUNK):
                values = [
                    {"episode_id": r.episode_id, "stream": r.stream, "raw": r.raw, "received_at": r.received_at}
                    for r in rows[start : start + INSERT_CHUNK]
                ]
                stmt = (
                    _insert(self.store, t.inbox)
                    .values(values)
                    .on_conflict_do_nothing(index_elements=["stream", "episode_id"])
                    .returning(t.inbox.c.stream, t.inbox.c.episode_id)
                )
                inserted.update((r[0], r[1]) for r in conn.execute(stmt))
        return inserted

    def read(self, from_id: int, limit: int, max_bytes: int | None = None) -> list[InboxRecord]:
        """Up to ``limit`` rows with id >= ``from_id``, in id order; of a row longer than
        ``max_bytes`` only its first ``max_bytes + 1`` bytes (and its size), as the Kafka and file
        sources keep of an oversize record: read whole, 60 rows of 6 MiB doubled the reader's memory.

        Each row is converted on its own: one the reader cannot convert (a raw value stored as
        text, a time that is not a number) is returned with ``undecodable`` set, for a dead letter.
        It used to fail the whole read, as an outage retried for ever, so that nothing after it,
        nor before it in its read, was ever processed."""
        i = t.inbox
        raw: Any = i.c.raw if max_bytes is None else sa.func.substr(i.c.raw, 1, max_bytes + 1)
        size: Any = sa.literal(None) if max_bytes is None else sa.func.length(i.c.raw)
        q = (
            sa.select(i.c.id, raw.label("raw"), size.label("size"), i.c.received_at)
            .where(i.c.id >= from_id)
            .order_by(i.c.id)
            .limit(limit)
        )
        with self.store.engine.connect() as conn:
            return [_inbox_record(r, max_bytes) for r in conn.execute(q)]

    def position(self) -> int:
        """The consumer's committed position (the next id it reads), 0 before its first batch."""
        return int(self.store.load_offsets(INBOX_SOURCE, [0]).get(0, 0))

    def backlog(self, cap: int) -> int:
        """Rows not consumed yet, counted up to ``cap`` + 1 (enough to say "above cap")."""
        pos = self.position()
        sub = sa.select(t.inbox.c.id).where(t.inbox.c.id >= pos).limit(cap + 1).subquery()
        with self.store.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(sub)).scalar_one())

    def purge(self, older_than_s: float, now: float | None = None) -> int:
        """Delete consumed rows (below the committed position) received more than ``older_than_s``
        ago, and consumed rows whose time is past :data:`FUTURE_SLACK_S` ahead of ``now``; the
        number deleted.

        The second kind: no writer of this build leaves such a time, but a row written by hand or
        by a tool with NaN or Infinity (PostgreSQL orders NaN above every number) was never older
        than any cutoff, and stayed for good; its episode was read at its own time as now
        (``_inbox_record``)."""
        now = time.time() if now is None else now
        cutoff = now - older_than_s
        pos = self.position()
        received = t.inbox.c.received_at
        with self.store.engine.begin() as conn:
            res = conn.execute(
                t.inbox.delete().where(t.inbox.c.id < pos, sa.or_(received < cutoff, received > now + FUTURE_SLACK_S))
            )
        return int(res.rowcount or 0)

    def count(self) -> int:
        with self.store.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(t.inbox)).scalar_one())


def _inbox_record(row: Any, max_bytes: int | None) -> InboxRecord:
    rid = int(row.id)
    try:
        raw = bytes(row.raw)
        received_at = float(row.received_at)
    except (TypeError, ValueError) as e:
        return InboxRecord(rid, b"", time.time(), undecodable=f"inbox row {rid}: {type(e).__name__}: {e}"[:300])
    if not math.isfinite(received_at):
        received_at = time.time()  # a time no writer of this build leaves: the row itself may be fine
    full = int(row.size) if max_bytes is not None and row.size is not None and int(row.size) > max_bytes else None
    return InboxRecord(rid, raw, received_at, full_size=full)


class IngestTokens:
    """The ``ingest_tokens`` table of a store (hashes only)."""

    def __init__(self, store: Store):
        self.store = store

    def add(self, name: str, token_hash: str, streams: Iterable[str] | None) -> bool:
        """False when the name is taken (revoked names stay taken: the log keeps meaning one token)."""
        row = {
            "name": name,
            "token_hash": token_hash,
            "streams": None if streams is None else sorted(set(streams)),
            "created_at": time.time(),
            "revoked_at": None,
        }
        stmt = _insert(self.store, t.ingest_tokens).on_conflict_do_nothing().returning(t.ingest_tokens.c.name)
        with self.store.engine.begin() as conn:
            return conn.execute(stmt, row).first() is not None

    def all(self) -> list[TokenRow]:
        k = t.ingest_tokens
        with self.store.engine.connect() as conn:
            rows = conn.execute(sa.select(k).order_by(k.c.name)).all()
        return [
            TokenRow(
                r.name,
                r.token_hash,
                None if r.streams is None else tuple(str(s) for s in r.streams),
                float(r.created_at),
                None if r.revoked_at is None else float(r.revoked_at),
            )
            for r in rows
        ]

    def revoke(self, name: str) -> bool:
        """False when there is no such active token."""
        k = t.ingest_tokens
        with self.store.engine.begin() as conn:
            res = conn.execute(
                k.update().where(k.c.name == name, k.c.revoked_at.is_(None)).values(revoked_at=time.time())
            )
        return bool(res.rowcount == 1)
