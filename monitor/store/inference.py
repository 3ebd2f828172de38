"""The embedding backlog: drift-sampled episodes whose embedding has not been fed to the detectors.

A drift sample is committed with ``status = 'pending'``; the batch that feeds its embedding to the
stream's detectors sets it to ``'embedded'`` in the same transaction as the detectors' new state
(:attr:`BatchWrite.embedded`). So the pending rows are the inference workers' queue, and the
marker, not a cursor, says what is done: a worker restarted by kill -9 finds exactly what no
commit took.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from monitor.store import tables as t
from monitor.store.store import Store

DRIFT = "drift"
PENDING = "pending"
EMBEDDED = "embedded"


@dataclass(frozen=True)
class ToEmbed:
    """A drift-sampled episode waiting for its embedding."""

    episode_id: str
    stream: str
    ts: float
    prompt: str
    response: str


@dataclass(frozen=True)
class Backlog:
    waiting: int
    oldest_s: float  # seconds since the oldest waiting sample committed (0 when none waits)


def waiting_for_embedding(
    store: Store, limit: int, skip: Collection[str] = (), streams: Collection[str] | None = None
) -> list[ToEmbed]:
    """The oldest ``limit`` waiting drift samples not in ``skip``, of ``streams`` when given
    (the streams this replica holds), in commit order, then event time, within a stream."""
    if limit <= 0 or (streams is not None and not streams):
        return []
    s, e = t.samples, t.episodes
    q = (
        sa.select(s.c.episode_id, s.c.stream, s.c.ts, e.c.prompt, e.c.response)
        .join(e, e.c.episode_id == s.c.episode_id)
        .where(s.c.channel == DRIFT, s.c.status == PENDING)
        .order_by(s.c.created_at, s.c.ts, s.c.episode_id)
        .limit(limit)
    )
    if skip:
        q = q.where(s.c.episode_id.not_in(list(skip)))
    if streams is not None:
        q = q.where(s.c.stream.in_(list(streams)))
    with store.engine.connect() as conn:
        return [ToEmbed(r.episode_id, r.stream, float(r.ts), r.prompt, r.response) for r in conn.execute(q)]


def embedding_backlog(store: Store, now: float | None = None) -> Backlog:
    """How many drift samples wait for their embedding, and for how long the oldest has waited."""
    s = t.samples
    q = sa.select(sa.func.count(), sa.func.min(s.c.created_at)).where(s.c.channel == DRIFT, s.c.status == PENDING)
    with store.engine.connect() as conn:
        n, oldest = conn.execute(q).one()
    now = time.time() if now is None else now
    return Backlog(int(n), 0.0 if oldest is None else max(0.0, now - float(oldest)))


# -- the score backlog -----------------------------------------------------------
SCORED_CHANNELS = ("rm", "human")
SCORED = "scored"


@dataclass(frozen=True)
class ToScore:
    """An rm- or human-sampled episode waiting for a reward-model score (``rm``: rm-sampled)."""

    episode_id: str
    stream: str
    ts: float
    rm: bool
    prompt: str
    response: str
    messages: Sequence[Mapping[str, Any]] | None  # schema v2's conversation


def waiting_for_score(
    store: Store,
    limit: int,
    skip: Collection[str] = (),
    stream: str | None = None,
    streams: Collection[str] | None = None,
) -> list[ToScore]:
    """The oldest ``limit`` episodes sampled for rm or human review without a score, not in
    ``skip`` (of ``stream``, or of ``streams``, if given), oldest sample first. A score marks its
    episode's samples ``scored`` (:meth:`Store.record_scores`), so this reads an index, not every
    sample ever."""
    if limit <= 0 or (streams is not None and not streams):
        return []
    s, e = t.samples, t.episodes
    q = (
        sa.select(s.c.episode_id, s.c.channel)
        .where(s.c.channel.in_(SCORED_CHANNELS), s.c.status == PENDING)
        .order_by(s.c.created_at, s.c.ts, s.c.episode_id)
        .limit(2 * limit)  # an episode sampled for both has two rows
    )
    if skip:
        q = q.where(s.c.episode_id.not_in(list(skip)))
    if stream is not None:
        q = q.where(s.c.stream == stream)
    if streams is not None:
        q = q.where(s.c.stream.in_(list(streams)))
    with store.engine.connect() as conn:
        rm: dict[str, bool] = {}
        for row in conn.execute(q):
            rm[row.episode_id] = rm.get(row.episode_id, False) or row.channel == "rm"
        ids = list(rm)[:limit]
        if not ids:
            return []
        eps = conn.execute(
            sa.select(e.c.episode_id, e.c.stream, e.c.ts, e.c.prompt, e.c.response, e.c.messages).where(
                e.c.episode_id.in_(ids)
            )
        ).all()
    by_id = {x.episode_id: x for x in eps}
    return [
        ToScore(i, x.stream, float(x.ts), rm[i], x.prompt, x.response, x.messages)
        for i in ids
        if (x := by_id.get(i)) is not None
    ]


def score_backlog_stats(store: Store, stream: str | None = None, now: float | None = None) -> Backlog:
    """Episodes sampled for rm or human review still without a score, and the oldest one's wait."""
    s = t.samples
    q = sa.select(sa.func.count(sa.distinct(s.c.episode_id)), sa.func.min(s.c.created_at)).where(
        s.c.channel.in_(SCORED_CHANNELS), s.c.status == PENDING
    )
    if stream is not None:
        q = q.where(s.c.stream == stream)
    with store.engine.connect() as conn:
        n, oldest = conn.execute(q).one()
    now = time.time() if now is None else now
    return Backlog(int(n), 0.0 if oldest is None else max(0.0, now - float(oldest)))
