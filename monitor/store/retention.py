"""Retention: a stream's stored episodes older than ``database.retention.days`` of its event time
are deleted, with what refers to them, so that the database stops growing with traffic.

The service stores every sampled episode (all channels), its samples, its reward-model scores and
a traffic count per minute. At 1,000 episodes/s and the floors alone that is millions of rows a
day, for as long as the service runs. What is kept past the horizon is what people made: an
episode with a label (a skip is a label), an adjudication or a canary, and one whose review task
a reviewer holds now. A task still pending there goes with its episode. Everything the model
channels stored, the traffic counts and the drift events go; incidents, requests and the
re-reference audit stay.

**Estimates stay consistent.** Before the horizon only the labelled episodes are left, so a
Horvitz-Thompson estimate there would count kept items against a population that lost its
counts. The horizon is saved *before* anything is deleted, and :meth:`Store.sampled` and
:meth:`Store.traffic_count` start every window at it: an estimate covers the retained window,
whatever ``since`` it was asked for.

**Event time, not the wall clock.** A stream's horizon is ``retention.days`` before the end of
its latest traffic minute, so a replay of last year's traffic is not deleted as it is stored,
and a stream that went quiet keeps its last window. The horizon only moves forward.

**A leap waits for the next purge.** Episodes without a timestamp take the ingesting host's
clock, and the purge's limit on future traffic (``source.max_future_s``) reads that clock too: a
clock stepped a year ahead for a moment would put the horizon 275 days past today (90 days kept),
saved for good, deleting everything stored for nine months and starting every estimate there. So a
horizon more than ``retention.every_s`` plus an hour past the one the previous purge computed for
the stream is held (logged, counted in :attr:`Purged.held`): the purge goes to the previous one,
and the leap is taken when the next purge, ``every_s`` later by a timer that the wall clock does not
move, computes it again. A stream catching up (a backlog, a replay, traffic after a quiet day)
purges one round later; a clock stepped for less than a round leaves no trace. A horizon saved
before this rule is undone with ``oversight db purge --reset-horizon STREAM``.

**Small transactions.** Episodes are deleted ``retention.chunk`` at a time, oldest first, each
chunk in a transaction of its own that deletes the rows referring to them first (foreign keys).
A chunk that meets a concurrent writer (a score written for one of its episodes a moment
before) fails alone and is tried again next round; replicas that purge at once delete the same
rows once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import sqlalchemy as sa

from monitor.config import RetentionConfig
from monitor.metrics import RETENTION_TABLES, Metrics
from monitor.retry import first_line, sqlstate, transient
from monitor.store import tables as t
from monitor.store.periodic import PeriodicJob
from monitor.store.store import BUCKET_S, Store, bucket_of, horizon_key

log = logging.getLogger(__name__)

# A task a reviewer holds is kept; a pending one before the horizon goes with its episode. The queue
# serves the oldest first, and without a human budget 1% of 1,000 episodes/s is 864,000 tasks a day
# that nobody reaches: kept, they grew the database without end and held reviewers in the past.
HELD_TASKS = ("claimed",)
#: The tables whose rows go with a deleted episode, in the order they are deleted.
DEPENDENTS = ("rm_scores", "samples", "inference_results", "review_tasks")
DEADLOCK_SQLSTATE = "40P01"  # PostgreSQL's deadlock_detected
#: A horizon may move this much more than ``retention.every_s`` past the previous purge's at once.
LEAP_MARGIN_S = 3600.0


@dataclass
class Purged:
    """What one purge deleted, per table, and the horizon of each stream it purged."""

    deleted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RETENTION_TABLES, 0))
    horizons: dict[str, int] = field(default_factory=dict)
    failed_chunks: int = 0
    #: Per stream, a horizon that leapt past the previous purge's and waits for the next one.
    held: dict[str, int] = field(default_factory=dict)

    def add(self, table: str, n: int) -> None:
        self.deleted[table] += n


def horizons(store: Store, days: float, not_after: float | None = None) -> dict[str, int]:
    """Per stream: ``days`` before the end of its latest traffic minute, on a minute boundary
    (:func:`purge_stream` keeps the horizon a stream already has when it is later).

    ``not_after``: traffic minutes after it do not count (the wall clock plus
    ``source.max_future_s``). A bucket stamped in the far future, stored before that limit
    existed, would otherwise put the horizon there and delete the stream's whole window."""
    span = days * 86400.0
    return {s: bucket_of(float(b) + BUCKET_S - span) for s, b in sorted(store.traffic_ends(not_after).items())}


def _candidates(stream: str, horizon: int, after: tuple[float, str] | None, chunk: int) -> sa.Select[str, float]:
    """The next ``chunk`` episodes of ``stream`` before ``horizon`` that nothing people made refers
    to, oldest first, after the keyset ``after`` (the kept ones are passed over once)."""
    e = t.episodes

    def refers(table: sa.Table, *extra: sa.ColumnElement[bool]) -> sa.Exists:
        return sa.exists().where(table.c.episode_id == e.c.episode_id, *extra)

    q = sa.select(e.c.episode_id, e.c.ts).where(
        e.c.stream == stream,
        e.c.ts < horizon,
        ~refers(t.labels),
        ~refers(t.adjudications),
        ~refers(t.canaries),
        ~refers(t.review_tasks, t.review_tasks.c.status.in_(HELD_TASKS)),
    )
    if after is not None:
        q = q.where(sa.tuple_(e.c.ts, e.c.episode_id) > sa.tuple_(sa.literal(after[0]), sa.literal(after[1])))
    return q.order_by(e.c.ts, e.c.episode_id).limit(chunk)


def _delete_chunk(store: Store, stream: str, horizon: int, ids: list[str], purged: Purged) -> None:
    """The episodes of ``ids`` that may still go, and the rows that refer to them, in one transaction.

    The candidates were read before, outside it: what keeps an episode is checked again here,
    with the episodes locked first (PostgreSQL; SQLite's write transaction holds the database).
    Locks are skipped, not waited for: a batch storing an episode again holds it (KEY SHARE,
    ``Store.commit_batch``) and may wait for this transaction's rows, and the opposite orders
    deadlocked. A review task is deleted only while nobody holds it: one claimed since the
    check keeps its episode (the foreign key then fails the chunk, retried next round) instead of
    taking the reviewer's item from under them."""
    e = t.episodes
    counts = {}
    with store.engine.begin() as conn:
        store.limit_transaction(conn, 60.0)
        q = _candidates(stream, horizon, None, len(ids)).where(e.c.episode_id.in_(ids))
        if store.dialect == "postgresql":
            q = q.with_for_update(skip_locked=True, of=e)
        locked = [str(r[0]) for r in conn.execute(q)]
        for name in (*DEPENDENTS, "episodes"):
            table = t.metadata.tables[name]
            where: sa.ColumnElement[bool] = table.c.episode_id.in_(locked)
            if name == "review_tasks":
                where = sa.and_(where, table.c.status.not_in(HELD_TASKS))
            counts[name] = int(conn.execute(table.delete().where(where)).rowcount or 0)
    for name, n in counts.items():
        purged.add(name, n)


def _deadlock(e: sa.exc.DBAPIError) -> bool:
    return sqlstate(e) == DEADLOCK_SQLSTATE


def purge_stream(
    store: Store, stream: str, horizon: int, chunk: int, purged: Purged, leap_s: float | None = None
) -> None:
    """Delete what ``stream`` stored before ``horizon``, or before the horizon it already has
    when that is later (a horizon never moves back); the horizon saved first, with ``horizon`` as
    the one this purge computed.

    ``leap_s``: a ``horizon`` more than this past the one the previous purge computed is held at
    that one (counted in ``purged.held``) until a purge computes it again."""
    saved = store.load_internal(horizon_key(stream))
    computed = horizon
    if saved is not None:
        had = int(saved["horizon"])
        last = int(saved.get("computed", had))
        if leap_s is not None and horizon > last + leap_s:
            purged.held[stream] = horizon
            log.warning(
                "retention: stream %r: the horizon would move %.1f days past the one the last purge"
                " computed, to %d: held there until the next purge computes it again (traffic stamped by"
                " a host clock stepped ahead puts it in the future; a backlog or a replay catching up"
                " is purged one round later)",
                stream,
                (horizon - last) / 86400.0,
                horizon,
            )
            horizon = last
        horizon = max(horizon, had)
    state = {"horizon": horizon, "computed": computed}
    if saved != state:
        store.save_internal(horizon_key(stream), state)
    purged.horizons[stream] = horizon
    after: tuple[float, str] | None = None
    while True:
        with store.engine.connect() as conn:
            rows = [(str(r[0]), float(r[1])) for r in conn.execute(_candidates(stream, horizon, after, chunk))]
        if not rows:
            break
        after = (rows[-1][1], rows[-1][0])
        try:
            _delete_chunk(store, stream, horizon, [eid for eid, _ in rows], purged)
        except sa.exc.DBAPIError as e:
            # A row referring to one of them came meanwhile, or a writer's locks crossed ours: this
            # chunk waits for the next round, the others go on (an outage still fails the purge).
            if not (isinstance(e, sa.exc.IntegrityError) or _deadlock(e)):
                raise
            purged.failed_chunks += 1
            log.info("retention: a chunk of %s met a concurrent writer; retried next round: %s", stream, first_line(e))
        if len(rows) < chunk:
            break
    tr, de = t.traffic, t.drift_events
    with store.engine.begin() as conn:
        n = conn.execute(tr.delete().where(tr.c.stream == stream, tr.c.bucket < horizon)).rowcount
        # At the default per-episode budget a stream at 1,000 episodes/s raises thousands a day.
        m = conn.execute(de.delete().where(de.c.stream == stream, de.c.event_ts < horizon)).rowcount
    purged.add("traffic", int(n or 0))
    purged.add("drift_events", int(m or 0))


def purge(store: Store, cfg: RetentionConfig, max_future_s: float | None = None, now: float | None = None) -> Purged:
    """One purge of every stream (nothing when ``cfg.days`` is None). ``max_future_s``: the
    source's limit (``source.max_future_s``): traffic stamped further ahead of ``now`` is ignored."""
    purged = Purged()
    if cfg.days is None:
        return purged
    not_after = None if max_future_s is None else (time.time() if now is None else now) + max_future_s
    for stream, horizon in horizons(store, cfg.days, not_after).items():
        purge_stream(store, stream, horizon, cfg.chunk, purged, leap_s=cfg.every_s + LEAP_MARGIN_S)
    return purged


def reset_horizon(store: Store, stream: str) -> int | None:
    """Forget ``stream``'s retention horizon (its estimates cover everything stored again, and the
    next purge computes it from the traffic, moving it back if need be): the way back from a
    horizon that a clock stepped into the future saved. Returns the horizon it had."""
    had = store.retention_horizon(stream)
    with store.engine.begin() as conn:
        conn.execute(t.internal_state.delete().where(t.internal_state.c.key == horizon_key(stream)))
    return had


class RetentionJob(PeriodicJob):
    """The purge every ``retention.every_s`` on a thread of its own (``oversight run``). A failed
    purge (an outage) is counted and logged, and the next round tries again.

    Metrics: ``oversight_retention_deleted_total{table}``, ``oversight_retention_runs_total{outcome}``
    (``ok``, ``failed``), both pre-zeroed, ``oversight_retention_last_success_timestamp_seconds`` and
    ``oversight_retention_failures_in_a_row`` (what the alert reads)."""

    name = "retention"
    stop_timeout_s = 5.0

    def __init__(
        self, store: Store, cfg: RetentionConfig, metrics: Metrics | None = None, max_future_s: float | None = None
    ):
        super().__init__(cfg.every_s)
        self.store = store
        self.cfg = cfg
        self.max_future_s = max_future_s
        self.metrics = metrics

    def run_once(self) -> Purged | None:
        """One purge; None when it failed (counted and logged)."""
        m = self.metrics
        try:
            purged = purge(self.store, self.cfg, self.max_future_s)
        except Exception as e:
            if m is not None:
                m.retention_runs.labels("failed").inc()
                m.retention_failures_in_a_row.inc()
            if transient(e):
                log.warning("retention: purge failed (retried in %.0f s): %s", self.cfg.every_s, first_line(e))
            else:
                log.exception("retention: purge failed (retried in %.0f s)", self.cfg.every_s)
            return None
        if m is not None:
            m.retention_runs.labels("ok").inc()
            m.retention_last_success.set(time.time())
            m.retention_failures_in_a_row.set(0)
            for table, n in purged.deleted.items():
                m.retention_deleted.labels(table).inc(n)
        if purged.deleted["episodes"]:
            log.info("retention: deleted %s", purged.deleted)
        return purged
