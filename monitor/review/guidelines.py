"""Reviewer guidelines per stream: Markdown, versioned, never overwritten.

Each save is a new version (1, 2, ...); the review task records the stream's version when it is
claimed and the label copies it (:func:`monitor.review.queue.submit`), so a label can always be
read against the text its reviewer was given. Guidelines are written by administrators but shown
with the same escaping Markdown renderer as model text (:mod:`monitor.review.markdown`): a pasted
``<script>`` stays text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from monitor.episodes.validate import stream_name_error
from monitor.review.auth import User
from monitor.store import Store
from monitor.store import tables as t

MAX_GUIDELINES = 50_000
MAX_STREAM = 128
SAVE_ATTEMPTS = 5  # tries at the next version number before GuidelinesBusy
GUIDELINES_LOCK = 7163528  # first key of the per-stream pg_advisory_xact_lock(int, int) of save()


class GuidelinesError(ValueError):
    """Refused guidelines (empty, too long, a NUL, a bad stream name): a 422."""


class GuidelinesBusy(Exception):
    """Guidelines that could not be given a version number (concurrent saves took every number
    tried): a 503 with Retry-After, never a 500; saving again succeeds."""


@dataclass(frozen=True)
class Guidelines:
    stream: str
    version: int
    markdown: str
    created_at: float
    created_by: str

    def to_json(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "version": self.version,
            "markdown": self.markdown,
            "created_at": self.created_at,
            "created_by": self.created_by,
        }


def check(stream: str, markdown: str) -> None:
    if not stream.strip() or len(stream) > MAX_STREAM:
        raise GuidelinesError(f"stream must be 1 to {MAX_STREAM} characters")
    # A name no episode can carry (an escape sequence, a bidi override: "chat\u202e" reads as a real
    # stream) saved guidelines that looked like a stream's and never applied to it.
    if (why := stream_name_error(stream)) is not None:
        raise GuidelinesError(why)
    if not markdown.strip():
        raise GuidelinesError("guidelines must not be empty")
    if len(markdown) > MAX_GUIDELINES:
        raise GuidelinesError(f"guidelines are longer than {MAX_GUIDELINES} characters")
    if "\x00" in markdown or "\x00" in stream:
        raise GuidelinesError("NUL characters are not allowed")


def save(store: Store, stream: str, markdown: str, user: User, now: float | None = None) -> Guidelines:
    """Store ``markdown`` as the stream's next version; raises :class:`GuidelinesError` (refused
    text) or :class:`GuidelinesBusy` (no version number could be taken: try again).

    Concurrent saves of one stream are numbered one after the other: PostgreSQL holds a
    transaction-scoped advisory lock on the stream while it reads ``max(version)`` and inserts
    the next one, and SQLite's ``BEGIN IMMEDIATE`` runs one writer at a time (without the lock,
    concurrent saves read the same maximum and the primary key refused all but one: a 500). A
    save that still meets a taken number (a writer that does not take the lock) is retried with a
    fresh one, at most :data:`SAVE_ATTEMPTS` times."""
    check(stream, markdown)
    now = time.time() if now is None else now
    g = t.guidelines
    for _ in range(SAVE_ATTEMPTS):
        try:
            with store.engine.begin() as conn:
                if store.dialect == "postgresql":
                    # Two int4 keys: a key space apart from the one-bigint locks of the migrations
                    # and the inbox; streams whose hashes collide merely wait for each other.
                    conn.execute(
                        sa.text("SELECT pg_advisory_xact_lock(:k, hashtext(:stream))"),
                        {"k": GUIDELINES_LOCK, "stream": stream},
                    )
                top = conn.execute(sa.select(sa.func.max(g.c.version)).where(g.c.stream == stream)).scalar()
                version = int(top or 0) + 1
                conn.execute(
                    g.insert().values(
                        stream=stream, version=version, markdown=markdown, created_at=now, created_by=user.name
                    )
                )
            return Guidelines(stream, version, markdown, now, user.name)
        except sa.exc.IntegrityError:
            continue
    raise GuidelinesBusy(
        f"guidelines not saved: other saves of stream {stream!r} took each version number tried; try again"
    )


def get(store: Store, stream: str, version: int | None = None) -> Guidelines | None:
    """A stream's guidelines: ``version``, or the newest; None if there are none."""
    g = t.guidelines
    q = sa.select(g).where(g.c.stream == stream)
    q = q.where(g.c.version == version) if version is not None else q.order_by(g.c.version.desc()).limit(1)
    with store.engine.connect() as conn:
        row = conn.execute(q).first()
    if row is None:
        return None
    return Guidelines(row.stream, int(row.version), row.markdown, float(row.created_at), row.created_by)


def current_versions(store: Store) -> list[dict[str, Any]]:
    """Per stream with guidelines: the newest version, when and by whom it was saved."""
    g = t.guidelines
    newest = sa.select(g.c.stream, sa.func.max(g.c.version).label("v")).group_by(g.c.stream).subquery()
    q = (
        sa.select(g.c.stream, g.c.version, g.c.created_at, g.c.created_by)
        .join(newest, sa.and_(newest.c.stream == g.c.stream, newest.c.v == g.c.version))
        .order_by(g.c.stream)
    )
    with store.engine.connect() as conn:
        return [
            {"stream": r.stream, "version": int(r.version), "created_at": float(r.created_at), "by": r.created_by}
            for r in conn.execute(q)
        ]
