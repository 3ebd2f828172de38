"""Scoring off the pipeline's thread, for backends that may be slow or down (the remote kinds).

The backlog is the database itself: an episode sampled for ``rm`` or ``human`` review whose batch
committed and which has no row in ``rm_scores`` is waiting for a score. A worker thread reads the
oldest waiting episodes, scores them, and hands the scores back; the pipeline's scorer takes them
at its next checkpoint and commits them with that batch (or, when no record comes, through the
pipeline's idle commit), so rows, the outbox and the drift feed go exactly where the built-in's go.
Nothing is lost: a restart finds the same episodes waiting; an item whose score failed (timeout,
open circuit, malformed answer) stays waiting and is tried again after a backoff. Ingest never
waits for any of it; the worker holds at most ``max_pending`` scores not yet committed, and waits
when it has that many.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from monitor.reward.kinds.base import Item, Score, ScoringBackend
from monitor.reward.kinds.resilience import BackendMetrics
from monitor.store import Store
from monitor.store import tables as t

log = logging.getLogger(__name__)
CHANNELS = ("rm", "human")


@dataclass(frozen=True)
class Waiting:
    episode_id: str
    stream: str
    ts: float
    rm: bool
    item: Item


@dataclass(frozen=True)
class Scored:
    waiting: Waiting
    score: Score


def backlog_count(store: Store, stream: str | None = None) -> int:
    """Sampled episodes (rm or human) without any reward-model score (of ``stream`` if given)."""
    s, r = t.samples, t.rm_scores
    q = sa.select(sa.func.count(sa.distinct(s.c.episode_id))).where(
        s.c.channel.in_(CHANNELS), ~sa.exists().where(r.c.episode_id == s.c.episode_id)
    )
    if stream is not None:
        q = q.where(s.c.stream == stream)
    with store.engine.connect() as conn:
        return int(conn.execute(q).scalar_one())


def waiting(store: Store, limit: int, skip: frozenset[str] = frozenset(), stream: str | None = None) -> list[Waiting]:
    """The oldest ``limit`` waiting episodes not in ``skip`` (of ``stream`` if given), oldest sample first."""
    s, r, e = t.samples, t.rm_scores, t.episodes
    q = (
        sa.select(s.c.episode_id, s.c.channel)
        .where(s.c.channel.in_(CHANNELS), ~sa.exists().where(r.c.episode_id == s.c.episode_id))
        .order_by(s.c.created_at, s.c.episode_id)
        .limit(2 * (limit + len(skip)))
    )
    if stream is not None:
        q = q.where(s.c.stream == stream)
    with store.engine.connect() as conn:
        rows = conn.execute(q).all()
        rm: dict[str, bool] = {}
        for row in rows:
            if row.episode_id not in skip:
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
        Waiting(i, x.stream, float(x.ts), rm[i], Item(x.prompt, x.response, x.messages))
        for i in ids
        if (x := by_id.get(i)) is not None
    ]


class BackgroundScorer:
    """One worker thread scoring the backlog with ``backend``; :meth:`take` hands results over."""

    def __init__(
        self,
        store: Store,
        backend: ScoringBackend,
        metrics: BackendMetrics,
        *,
        batch: int = 32,
        poll_s: float = 1.0,
        max_pending: int = 1000,
        retry_after_s: float = 30.0,
        stream: str | None = None,
    ):
        self.store = store
        self.backend = backend
        self.metrics = metrics
        self.batch = batch
        self.poll_s = poll_s
        self.max_pending = max_pending
        self.retry_after_s = retry_after_s
        self.stream = stream
        self.failed = 0  # items whose score failed (they stay waiting), over the worker's life
        self.attempted = 0
        self._lock = threading.Lock()
        self._done: list[Scored] = []
        self._claimed: dict[str, float] = {}  # handed out or failed recently: not fetched again before the time
        self._taken: list[str] = []  # handed over at the last take: committed (or released) by the next
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> BackgroundScorer:
        self._thread = threading.Thread(target=self._loop, name=f"rm-{self.backend.kind}", daemon=True)
        self._thread.start()
        return self

    def nudge(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self.backend.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def pending(self) -> int:
        with self._lock:
            return len(self._done)

    def take(self) -> list[Scored]:
        """The scores ready to commit. The pipeline calls this once per batch, so those of the
        previous call are committed by now (or were released): they need no claim any more."""
        with self._lock:
            for i in self._taken:
                self._claimed.pop(i, None)
            out, self._done = self._done, []
            self._taken = [s.waiting.episode_id for s in out]
        return out

    def run_once(self) -> int:
        """One round: fetch, score, hand over. Returns how many episodes got a score."""
        now = time.monotonic()
        with self._lock:
            self._claimed = {k: v for k, v in self._claimed.items() if v > now}
            room = self.max_pending - len(self._done)
            skip = frozenset(self._claimed)
        if room <= 0:
            return 0
        items = waiting(self.store, min(self.batch, room), skip, self.stream)
        self.metrics.backlog.set(backlog_count(self.store))
        if not items:
            return 0
        scores = self.backend.score([w.item for w in items])
        return self._hand_over(items, scores)

    def _hand_over(self, items: Sequence[Waiting], scores: Sequence[Score]) -> int:
        now = time.monotonic()
        good = [Scored(w, s) for w, s in zip(items, scores, strict=True) if s.ok]
        with self._lock:
            self._done.extend(good)
            for w, s in zip(items, scores, strict=True):
                # A scored item waits for its commit; a failed one for its retry.
                self._claimed[w.episode_id] = now + (3600.0 if s.ok else self.retry_after_s)
        self.metrics.async_scored.labels("ok").inc(len(good))
        self.metrics.async_scored.labels("failed").inc(len(items) - len(good))
        self.failed += len(items) - len(good)
        self.attempted += len(items)
        return len(good)

    def release(self, episode_ids: Sequence[str]) -> None:
        """Scores that were dropped before their commit (the pipeline forgot its batch): fetch again."""
        with self._lock:
            for i in episode_ids:
                self._claimed.pop(i, None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                n = self.run_once()
            except Exception as e:  # the database or the backend: keep the thread, try again later
                log.warning("background reward-model scoring failed (retrying): %s", str(e).splitlines()[0][:200])
                n = 0
            if n == 0:
                self._wake.wait(self.poll_s)
                self._wake.clear()

    def __enter__(self) -> BackgroundScorer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def score_backlog(
    store: Store,
    backend: ScoringBackend,
    metrics: BackendMetrics,
    *,
    batch: int = 32,
    stream: str | None = None,
    limit: int | None = None,
    progress: Callable[[dict[str, int]], None] | None = None,
) -> dict[str, int]:
    """Score the waiting episodes now and commit each round's scores (outside a pipeline: after a
    restart, or from ``oversight rm score-backlog``). Each episode is tried once per call: one whose
    score fails stays waiting (``failed``); those beyond ``limit`` are not tried (``deferred``).
    Returns the counts and what still waits (``waiting``)."""
    worker = BackgroundScorer(store, backend, metrics, batch=batch, retry_after_s=1e9, stream=stream)
    scored = 0
    while True:
        if limit is not None:
            if worker.attempted >= limit:
                break
            worker.batch = min(batch, limit - worker.attempted)
        before = worker.attempted
        worker.run_once()
        if worker.attempted == before and not worker.pending():
            break
        rows = [
            {
                "episode_id": d.waiting.episode_id,
                "version": str(backend.version),
                "stream": d.waiting.stream,
                "score": float(d.score.value or 0.0),
                "ts": d.waiting.ts,
                "created_at": time.time(),
            }
            for d in worker.take()
        ]
        store.insert_ignore(t.rm_scores, rows)
        scored += len(rows)
        if progress is not None:
            progress({"scored": scored, "failed": worker.failed})
    left = backlog_count(store, stream)
    return {"scored": scored, "failed": worker.failed, "deferred": max(0, left - worker.failed), "waiting": left}
