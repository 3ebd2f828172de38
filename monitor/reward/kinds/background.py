"""Scoring off the pipeline's thread: remote kinds always (they may be slow or down), every kind in
the service (``inference.workers``), so that ingest never waits for a model.

The backlog is the database itself: an episode sampled for ``rm`` or ``human`` review whose batch
committed and which has no score yet is waiting (``monitor.store.inference``). A worker thread
(``monitor.pipeline.background``) reads the oldest waiting episodes, scores them, and hands the
scores back; the pipeline's scorer takes them at its next checkpoint and commits them with that
batch (or, when no record comes, through the pipeline's idle commit), so rows, the outbox and the
drift feed go exactly where inline scores go. Nothing is lost: a restart finds the same episodes
waiting; an item whose score failed (timeout, open circuit, malformed answer) stays waiting and is
tried again after a backoff, until ``give_up_after`` failures that the backend's other scores
show to be the item's own take it off the backlog (``monitor.pipeline.background``). Ingest never
waits for any of it; the worker holds at most
``max_pending`` scores not yet committed, and waits when it has that many.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from monitor.inference.shared import SharedVectors
from monitor.pipeline.background import LATER, BackgroundWork, Later
from monitor.reward.kinds.base import Item, Score, ScoringBackend
from monitor.reward.kinds.resilience import BackendMetrics
from monitor.store import Store
from monitor.store.inference import ToScore, give_up_scoring, score_backlog_stats, waiting_for_score

log = logging.getLogger(__name__)


def backlog_count(store: Store, stream: str | None = None) -> int:
    """Sampled episodes (rm or human) without any reward-model score (of ``stream`` if given)."""
    return score_backlog_stats(store, stream).waiting


def failure(score: Score) -> Later | None:
    """A failed score as a background worker's result: ``None`` (counted toward giving up on the
    item) when it may be the item's own, ``LATER`` when it is only the scorer's (see ``Score.own_fault``)."""
    return None if score.own_fault else LATER


class BackgroundScorer(BackgroundWork[ToScore, Score]):
    """One worker thread scoring the backlog with ``backend``; :meth:`take` hands (item, score) over.

    ``streams``: when given, called at each fetch for the streams this replica holds (``None``:
    all); a score feeds its stream's drift detectors, which only the stream's owner may write.
    ``shared``: where the drift embeddings that ``backend``'s pass computed go (``embedding`` of
    its scores, ``monitor/inference/shared.py``)."""

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
        counted: Callable[[int, int], None] | None = None,
        streams: Callable[[], Collection[str] | None] | None = None,
        shared: SharedVectors | None = None,
        give_up_after: int = 0,
    ):
        self.store = store
        self.backend = backend
        self.metrics = metrics
        self.stream = stream
        self._also_counted = counted

        def fetch(limit: int, skip: frozenset[str]) -> list[ToScore]:
            items = waiting_for_score(store, limit, skip, stream, None if streams is None else streams())
            metrics.backlog.set(backlog_count(store))
            return items

        def compute(items: Sequence[ToScore]) -> list[Score | Later | None]:
            scores = backend.score([Item(w.prompt, w.response, w.messages) for w in items])
            if shared is not None:
                shared.put(
                    (w.episode_id, sc.embedding)
                    for w, sc in zip(items, scores, strict=True)
                    if sc.embedding is not None
                )
            return [sc if sc.ok else failure(sc) for sc in scores]

        super().__init__(
            f"rm-{backend.kind}",
            fetch,
            compute,
            key=lambda w: w.episode_id,
            batch=batch,
            poll_s=poll_s,
            max_pending=max_pending,
            retry_after_s=retry_after_s,
            counted=self._count,
            give_up_after=give_up_after,
            give_up=self._give_up,
        )

    def _give_up(self, items: Sequence[ToScore]) -> None:
        give_up_scoring(self.store, [w.episode_id for w in items])
        self.metrics.async_scored.labels("given_up").inc(len(items))

    def _count(self, ok: int, failed: int) -> None:
        self.metrics.async_scored.labels("ok").inc(ok)
        self.metrics.async_scored.labels("failed").inc(failed)
        if self._also_counted is not None:
            self._also_counted(ok, failed)

    def stop(self, timeout: float = 5.0) -> None:
        super().stop(timeout)
        self.backend.close()

    def __enter__(self) -> BackgroundScorer:
        return self


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
        rows: list[Any] = [
            {
                "episode_id": w.episode_id,
                "version": str(backend.version),
                "stream": w.stream,
                "score": float(sc.value or 0.0),
                "ts": w.ts,
                "created_at": time.time(),
            }
            for w, sc in worker.take()
        ]
        store.record_scores(rows)
        scored += len(rows)
        if progress is not None:
            progress({"scored": scored, "failed": worker.failed})
    left = backlog_count(store, stream)
    return {"scored": scored, "failed": worker.failed, "deferred": max(0, left - worker.failed), "waiting": left}
