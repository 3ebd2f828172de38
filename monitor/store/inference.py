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


def _restricted(
    store: Store, q: sa.Select[Any], skip: Collection[str], streams: Collection[str] | None
) -> sa.Select[Any]:
    """A query of samples without those in ``skip``, of ``streams`` when given (each one bound
    parameter however many: a replica can own more streams than a statement takes parameters)."""
    s = t.samples
    if skip:
        q = q.where(sa.not_(store.one_of(s.c.episode_id, skip)))
    if streams is not None:
        q = q.where(store.one_of(s.c.stream, streams))
    return q


def awaiting_score_pass(wait_s: float, now: float) -> sa.Exists:
    """Drift samples whose episode also waits for its reward-model score, sampled for it less than
    ``wait_s`` ago and not scored by an inference worker yet: that score's encoder pass brings
    their embedding (``monitor/inference/shared.py``), so the embedding workers leave them alone
    until it did, or until ``wait_s`` passed (the scorer is behind or failing: encode them anyway)."""
    s, scored, result = t.samples, t.samples.alias("scored_sample"), t.inference_results.alias("score_result")
    stored = sa.exists().where(
        result.c.episode_id == scored.c.episode_id, result.c.stage == SCORE_STAGE, result.c.done == sa.true()
    )
    return sa.exists().where(
        scored.c.episode_id == s.c.episode_id,
        scored.c.channel.in_(SCORED_CHANNELS),
        scored.c.status == PENDING,
        scored.c.created_at > now - wait_s,
        ~stored,
    )


def waiting_for_embedding(
    store: Store,
    limit: int,
    skip: Collection[str] = (),
    streams: Collection[str] | None = None,
    share_wait_s: float = 0.0,
) -> list[ToEmbed]:
    """The oldest ``limit`` waiting drift samples not in ``skip``, of ``streams`` when given
    (the streams this replica holds), in commit order, then event time, within a stream; with
    ``share_wait_s``, not those :func:`awaiting_score_pass`."""
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
    if share_wait_s > 0:
        q = q.where(sa.not_(awaiting_score_pass(share_wait_s, time.time())))
    q = _restricted(store, q, skip, streams)
    with store.engine.connect() as conn:
        return [ToEmbed(r.episode_id, r.stream, float(r.ts), r.prompt, r.response) for r in conn.execute(q)]


def embedding_backlog(store: Store, now: float | None = None, streams: Collection[str] | None = None) -> Backlog:
    """How many drift samples wait for their embedding, and for how long the oldest has waited;
    of ``streams`` when given (a replica's own: another's, or a quiet stream's that no replica
    holds since a restart, are not its workers' lag)."""
    s = t.samples
    q = sa.select(sa.func.count(), sa.func.min(s.c.created_at)).where(s.c.channel == DRIFT, s.c.status == PENDING)
    if streams is not None:
        q = q.where(store.one_of(s.c.stream, streams))
    with store.engine.connect() as conn:
        n, oldest = conn.execute(q).one()
    now = time.time() if now is None else now
    return Backlog(int(n), 0.0 if oldest is None else max(0.0, now - float(oldest)))


# -- the score backlog -----------------------------------------------------------
SCORED_CHANNELS = ("rm", "human")
SCORED = "scored"
UNSCORABLE = "unscorable"  # given up: its score failed again and again while other episodes were scored


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
    s = t.samples
    q = _restricted(
        store,
        sa.select(s.c.episode_id, s.c.channel)
        .where(s.c.channel.in_(SCORED_CHANNELS), s.c.status == PENDING)
        .order_by(s.c.created_at, s.c.ts, s.c.episode_id)
        .limit(2 * limit),  # an episode sampled for both has two rows
        skip,
        streams,
    )
    if stream is not None:
        q = q.where(s.c.stream == stream)
    with store.engine.connect() as conn:
        rm: dict[str, bool] = {}
        for row in conn.execute(q):
            rm[row.episode_id] = rm.get(row.episode_id, False) or row.channel == "rm"
        ids = list(rm)[:limit]
        return _to_score(conn, ids, {i for i in ids if rm[i]})


def _to_score(conn: Any, ids: Sequence[str], rm: Collection[str]) -> list[ToScore]:
    """The episodes ``ids`` to score, in that order (``rm``: those sampled for rm review)."""
    if not ids:
        return []
    e = t.episodes
    eps = conn.execute(
        sa.select(e.c.episode_id, e.c.stream, e.c.ts, e.c.prompt, e.c.response, e.c.messages).where(
            e.c.episode_id.in_(ids)
        )
    ).all()
    by_id = {x.episode_id: x for x in eps}
    return [
        ToScore(i, x.stream, float(x.ts), i in rm, x.prompt, x.response, x.messages)
        for i in ids
        if (x := by_id.get(i)) is not None
    ]


def give_up_scoring(store: Store, episode_ids: Sequence[str]) -> None:
    """Take episodes off the score backlog for good: their rm and human samples still waiting are
    marked ``unscorable`` (an episode scored in the meantime keeps its mark), and an inference
    worker's claim on them that holds no score is dropped."""
    s, r = t.samples, t.inference_results
    with store.engine.begin() as conn:
        for i in range(0, len(episode_ids), 500):
            ids = list(episode_ids[i : i + 500])
            conn.execute(
                s.update()
                .where(s.c.channel.in_(SCORED_CHANNELS), s.c.status == PENDING, s.c.episode_id.in_(ids))
                .values(status=UNSCORABLE)
            )
            conn.execute(r.delete().where(r.c.stage == SCORE_STAGE, r.c.done == sa.false(), r.c.episode_id.in_(ids)))


def score_backlog_stats(
    store: Store, stream: str | None = None, now: float | None = None, streams: Collection[str] | None = None
) -> Backlog:
    """Episodes sampled for rm or human review still without a score, and the oldest one's wait;
    of one ``stream``, or of ``streams`` (a replica's own), when given."""
    s = t.samples
    q = sa.select(sa.func.count(sa.distinct(s.c.episode_id)), sa.func.min(s.c.created_at)).where(
        s.c.channel.in_(SCORED_CHANNELS), s.c.status == PENDING
    )
    if stream is not None:
        q = q.where(s.c.stream == stream)
    if streams is not None:
        q = q.where(store.one_of(s.c.stream, streams))
    with store.engine.connect() as conn:
        n, oldest = conn.execute(q).one()
    now = time.time() if now is None else now
    return Backlog(int(n), 0.0 if oldest is None else max(0.0, now - float(oldest)))


# -- inference workers of their own (``oversight infer``, ``inference.external``) ------------
# The worker claims waiting samples in ``inference_results`` and stores their results there; the
# pipeline reads the stored results of its streams, feeds them, and marks the samples in its
# batch's transaction, which deletes the rows (``Store.commit_batch``, ``Store.record_scores``).
EMBEDDING_STAGE = "embedding"
SCORE_STAGE = "score"


@dataclass(frozen=True)
class Embedded:
    """A drift sample's embedding, stored by an inference worker of its own."""

    episode_id: str
    stream: str
    ts: float
    vector: Any  # numpy float32


@dataclass(frozen=True)
class Scored:
    """An rm or human sample's reward-model score, stored by an inference worker of its own."""

    episode_id: str
    stream: str
    ts: float
    rm: bool
    version: str
    score: float


def _claimable(stage: str, channels: Sequence[str], now: float, share_wait_s: float = 0.0) -> sa.Select[Any]:
    """Waiting samples of ``channels`` whose ``stage`` nobody holds: no row, or a claim that
    expired before it was done (its worker died, or its computation failed); with
    ``share_wait_s``, not those :func:`awaiting_score_pass`."""
    s, r = t.samples, t.inference_results
    joined = s.outerjoin(r, sa.and_(r.c.episode_id == s.c.episode_id, r.c.stage == stage))
    q = (
        sa.select(s.c.episode_id)
        .select_from(joined)
        .where(
            s.c.channel.in_(list(channels)),
            s.c.status == PENDING,
            sa.or_(r.c.episode_id.is_(None), sa.and_(r.c.done == sa.false(), r.c.claimed_until < now)),
        )
        .order_by(s.c.created_at, s.c.ts, s.c.episode_id)
    )
    return q.where(sa.not_(awaiting_score_pass(share_wait_s, now))) if share_wait_s > 0 else q


def _claim(
    store: Store,
    stage: str,
    channels: Sequence[str],
    limit: int,
    worker: str,
    lease_s: float,
    share_wait_s: float = 0.0,
) -> list[str]:
    """Claim up to ``limit`` of the oldest claimable samples for ``worker`` until ``lease_s`` from
    now; of two workers that race for one, exactly one gets it (the insert's conflict, or the
    expired claim's update, decides). Returns the claimed episode ids, oldest first."""
    if limit <= 0:
        return []
    r = t.inference_results
    now = time.time()
    with store.engine.begin() as conn:
        # An episode sampled for rm and human has two rows: distinct ids, in order.
        ids = list(
            dict.fromkeys(x[0] for x in conn.execute(_claimable(stage, channels, now, share_wait_s).limit(2 * limit)))
        )
        ids = ids[:limit]
        row = {"stage": stage, "worker": worker, "claimed_until": now + lease_s, "done": False, "created_at": now}
        got = set(store.insert_new(r, [{**row, "episode_id": i} for i in ids], r.c.episode_id, conn))
        stale = [i for i in ids if i not in got]
        if stale:
            update = (
                r.update()
                .where(r.c.stage == stage, r.c.episode_id.in_(stale), r.c.done == sa.false(), r.c.claimed_until < now)
                .values(worker=worker, claimed_until=now + lease_s, created_at=now)
                .returning(r.c.episode_id)
            )
            got.update(x[0] for x in conn.execute(update))
    return [i for i in ids if i in got]


def claim_for_embedding(
    store: Store, limit: int, worker: str, lease_s: float, share_wait_s: float = 0.0
) -> list[ToEmbed]:
    """Claim the oldest waiting drift samples that no other worker holds, with their texts
    (with ``share_wait_s``, not those :func:`awaiting_score_pass`)."""
    ids = _claim(store, EMBEDDING_STAGE, (DRIFT,), limit, worker, lease_s, share_wait_s)
    if not ids:
        return []
    s, e = t.samples, t.episodes
    q = (
        sa.select(s.c.episode_id, s.c.stream, s.c.ts, e.c.prompt, e.c.response)
        .join(e, e.c.episode_id == s.c.episode_id)
        .where(s.c.channel == DRIFT, s.c.episode_id.in_(ids))
    )
    with store.engine.connect() as conn:
        by_id = {r.episode_id: r for r in conn.execute(q)}
    return [ToEmbed(i, x.stream, float(x.ts), x.prompt, x.response) for i in ids if (x := by_id.get(i)) is not None]


def claim_for_score(store: Store, limit: int, worker: str, lease_s: float) -> list[ToScore]:
    """Claim the oldest episodes sampled for rm or human review that wait for a score."""
    ids = _claim(store, SCORE_STAGE, SCORED_CHANNELS, limit, worker, lease_s)
    if not ids:
        return []
    with store.engine.connect() as conn:
        return _to_score(conn, ids, _rm_sampled(conn, ids))


def _rm_sampled(conn: Any, ids: Sequence[str]) -> set[str]:
    """Which of the episodes ``ids`` were sampled for rm review (the others: human only)."""
    s = t.samples
    return {r[0] for r in conn.execute(sa.select(s.c.episode_id).where(s.c.channel == "rm", s.c.episode_id.in_(ids)))}


def store_results(store: Store, stage: str, worker: str, results: Sequence[Mapping[str, Any]]) -> int:
    """Store results (``episode_id`` with ``vector``, or ``version`` and ``score``) of the items
    ``worker`` still holds; one whose claim expired and went to another worker is left to that
    one. Returns how many were stored."""
    if not results:
        return 0
    r = t.inference_results
    stmt = (
        r.update()
        .where(
            r.c.stage == stage,
            r.c.episode_id == sa.bindparam("b_id"),
            r.c.worker == worker,
            r.c.done == sa.false(),
        )
        .values(
            done=True,
            vector=sa.bindparam("b_vector"),
            version=sa.bindparam("b_version"),
            score=sa.bindparam("b_score"),
        )
    )
    rows = [
        {"b_id": x["episode_id"], "b_vector": x.get("vector"), "b_version": x.get("version"), "b_score": x.get("score")}
        for x in results
    ]
    with store.engine.begin() as conn:
        n = conn.execute(stmt, rows).rowcount
    return len(rows) if n is None or n < 0 else int(n)


def prune_results(store: Store) -> int:
    """Delete result rows whose sample no longer waits (fed by a pipeline that computed inline,
    or marked by a migration): the table holds the backlog in flight only."""
    s, r = t.samples, t.inference_results
    waiting = (
        sa.select(s.c.episode_id)
        .where(s.c.episode_id == r.c.episode_id, s.c.status == PENDING)
        .where(
            sa.or_(
                sa.and_(r.c.stage == EMBEDDING_STAGE, s.c.channel == DRIFT),
                sa.and_(r.c.stage == SCORE_STAGE, s.c.channel.in_(SCORED_CHANNELS)),
            )
        )
    )
    with store.engine.begin() as conn:
        n = conn.execute(r.delete().where(~sa.exists(waiting))).rowcount
    return max(0, int(n or 0))


def _in_order(rows: Sequence[Any], limit: int, hold_s: float, now: float) -> list[Any]:
    """The done rows of each stream up to its first not-done one, so that results feed in commit
    order per stream; a not-done sample older than ``hold_s`` (its computation keeps failing)
    stops holding the ones behind it, and is fed when its result comes."""
    blocked: set[str] = set()
    out: list[Any] = []
    for row in rows:
        if row.stream in blocked:
            continue
        if row.done:
            out.append(row)
            if len(out) >= limit:
                break
        elif now - float(row.created_at) < hold_s:
            blocked.add(row.stream)
    return out


def stored_embeddings(
    store: Store,
    limit: int,
    skip: Collection[str] = (),
    streams: Collection[str] | None = None,
    hold_s: float = 120.0,
) -> list[Embedded]:
    """The stored embeddings of waiting drift samples (of ``streams`` when given), oldest first,
    in commit order per stream (:func:`_in_order`), none in ``skip``."""
    if limit <= 0 or (streams is not None and not streams):
        return []
    s, r = t.samples, t.inference_results
    joined = s.outerjoin(r, sa.and_(r.c.episode_id == s.c.episode_id, r.c.stage == EMBEDDING_STAGE))
    q = (
        sa.select(s.c.episode_id, s.c.stream, s.c.ts, s.c.created_at, r.c.done, r.c.vector)
        .select_from(joined)
        .where(s.c.channel == DRIFT, s.c.status == PENDING)
        .order_by(s.c.created_at, s.c.ts, s.c.episode_id)
        .limit(4 * limit)
    )
    q = _restricted(store, q, skip, streams)
    import numpy as np

    with store.engine.connect() as conn:
        rows = conn.execute(q).all()
    return [
        Embedded(x.episode_id, x.stream, float(x.ts), np.frombuffer(x.vector, dtype="<f4"))
        for x in _in_order(rows, limit, hold_s, time.time())
    ]


def stored_scores(
    store: Store,
    limit: int,
    skip: Collection[str] = (),
    streams: Collection[str] | None = None,
    hold_s: float = 120.0,
) -> list[Scored]:
    """The stored scores of episodes waiting for one (of ``streams`` when given), oldest first,
    in commit order per stream, none in ``skip``."""
    if limit <= 0 or (streams is not None and not streams):
        return []
    s, r = t.samples, t.inference_results
    joined = s.outerjoin(r, sa.and_(r.c.episode_id == s.c.episode_id, r.c.stage == SCORE_STAGE))
    q = (
        sa.select(s.c.episode_id, s.c.channel, s.c.stream, s.c.ts, s.c.created_at, r.c.done, r.c.version, r.c.score)
        .select_from(joined)
        .where(s.c.channel.in_(SCORED_CHANNELS), s.c.status == PENDING)
        .order_by(s.c.created_at, s.c.ts, s.c.episode_id)
        .limit(8 * limit)
    )
    q = _restricted(store, q, skip, streams)
    first: dict[str, Any] = {}
    with store.engine.connect() as conn:
        for x in conn.execute(q):
            first.setdefault(x.episode_id, x)  # an episode sampled for rm and human has two rows
        chosen = _in_order(list(first.values()), limit, hold_s, time.time())
        rm = _rm_sampled(conn, [x.episode_id for x in chosen])
    return [
        Scored(x.episode_id, x.stream, float(x.ts), x.episode_id in rm, str(x.version), float(x.score)) for x in chosen
    ]
