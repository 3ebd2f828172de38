"""``oversight infer``: the inference workers as a process of their own.

With ``inference.external`` the pipeline (``oversight run``) loads no model. This process does
the model work instead, and scales on its own (its own Deployment in the chart, on GPU nodes
where there are any): it claims the oldest waiting drift samples and rm/human samples in the
store (``monitor.store.inference``), embeds them with the drift encoder and scores them with the
active reward-model version, and stores the results. The pipeline replica that holds a stream
feeds its stored results to the detectors, in commit order, and marks the samples in its
batch's transaction. So the effects stay exactly once whatever happens to this process:

* a result that was computed and not stored (kill -9, a database error) is computed again once
  its claim expires (``inference.retry_after_s``);
* a stored result is fed once, by the commit that marks its sample and deletes it;
* two workers never hold one item at once (the claim is a row of its own); a claim that expired
  while its computation still ran may be computed twice, and only its holder's result is stored.

Reward-model versions are picked up as the pipeline picks them up (every ``reward.swap_poll_s``);
each score records the version that computed it.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter

from monitor.config import Settings
from monitor.inference.shared import SharedVectors, embed_sharing
from monitor.metrics import NS, InferenceMetrics
from monitor.pipeline.background import BackgroundWork, GiveUp, Later, episode_work, lower_thread_priority
from monitor.retry import first_line
from monitor.reward.kinds.background import failure
from monitor.reward.kinds.base import share_drift_pass
from monitor.reward.registry import Registry, VersionWatch
from monitor.reward.scorer import load_version
from monitor.store import Store
from monitor.store.inference import (
    EMBEDDING_STAGE,
    SCORE_STAGE,
    ToEmbed,
    ToScore,
    claim_for_embedding,
    claim_for_score,
    give_up_scoring,
    prune_results,
    store_results,
)

if TYPE_CHECKING:
    from monitor.signals.embeddings import Embedder

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 300.0  # result rows left by a mode switch (see prune_results): rare, cheap


@dataclass
class Stage:
    """One kind of model work: what computes it, and how its results are stored."""

    name: str  # the metrics' stage label: embedding, rm_score
    work: BackgroundWork[Any, Any]
    store: Callable[[Sequence[tuple[Any, Any]]], int]


class InferenceWorker:
    """The embedding and scoring workers of one ``oversight infer`` process.

    :meth:`round` runs one claim -> compute -> store round of a stage (the tests drive it);
    :meth:`run` runs every stage on a thread of its own until ``stop``.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        registry: CollectorRegistry | None = None,
        worker_id: str | None = None,
    ):
        self.settings = settings
        self.store = store
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = InferenceMetrics.on(self.registry)
        self.metrics.zero(backlogs=False)
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        icfg = settings.inference
        # A claim outlives a round by far (a batch is seconds); one whose worker died or failed
        # is taken again after this.
        self.lease_s = icfg.retry_after_s
        self._watch = VersionWatch(Registry.for_settings(store, settings), settings.reward.swap_poll_s)
        self._embedder: Any = None
        self._backend: Any = None  # the active reward-model version's scoring backend
        self._version: str | None = None
        self._swap_lock = threading.Lock()
        embedding = self._embedding_stage()
        # One encoder pass per episode: the scoring stage leaves the drift embeddings its pass
        # computed here, for the embedding stage (monitor/inference/shared.py).
        spec = None if self._embedder is None or not settings.reward.enabled else self._embedder.drift_pass()
        self.shared = None if spec is None else SharedVectors(spec)
        self.stages = [s for s in (embedding, self._scoring_stage()) if s is not None]
        # A round that raised: its claims or its results did not reach the database. Pre-zeroed,
        # so that the first one shows in rate(); /readyz is red while a stage's last round failed.
        self.errors = Counter(
            "inference_worker_errors",
            "Rounds of an inference worker process that failed on the database (claims, results), by stage",
            ["stage"],
            namespace=NS,
            registry=self.registry,
        )
        for stage in self.stages:
            self.errors.labels(stage.name)
        self._failing: set[str] = set()

    # -- the stages ----------------------------------------------------------------
    def _embedding_stage(self) -> Stage | None:
        ecfg = self.settings.drift.embedding
        if not (self.settings.drift.enabled and ecfg.enabled):
            return None
        import numpy as np

        from monitor.signals.embeddings import embedder_for

        # A process of its own: every core is the encoder's (``inference.threads`` to cap it).
        self._embedder = embedder_for(ecfg, self.settings.inference.threads or None)
        embedder, store, icfg = self._embedder, self.store, self.settings.inference

        def fetch(limit: int, skip: frozenset[str]) -> list[ToEmbed]:
            shared = self.shared
            wait = icfg.share_wait_s if shared is not None and shared.active else 0.0
            return claim_for_embedding(store, limit, self.id, self.lease_s, wait)

        def compute(items: Sequence[ToEmbed]) -> list[Any]:
            vectors, held = embed_sharing(self.shared, items, embedder.embed_episodes)
            self.metrics.items.labels("embedding", "shared").inc(held)
            return vectors

        def write(done: Sequence[tuple[ToEmbed, Any]]) -> int:
            rows = [{"episode_id": w.episode_id, "vector": np.asarray(v, dtype="<f4").tobytes()} for w, v in done]
            return store_results(store, EMBEDDING_STAGE, self.id, rows)

        return Stage("embedding", self._work("inference-embedding", fetch, compute, "embedding"), write)

    def _scoring_stage(self) -> Stage | None:
        if not self.settings.reward.enabled:
            return None
        store = self.store

        def fetch(limit: int, skip: frozenset[str]) -> list[ToScore]:
            self.check_version()
            # Without an active version nothing is claimed: the samples wait for one.
            return [] if self._backend is None else claim_for_score(store, limit, self.id, self.lease_s)

        def compute(items: Sequence[ToScore]) -> list[tuple[str, float] | Later | None]:
            from monitor.reward.kinds import Item

            with self._swap_lock:
                backend, version = self._backend, self._version
            if backend is None or version is None:
                return [None] * len(items)
            scores = backend.score([Item(w.prompt, w.response, w.messages) for w in items])
            if self.shared is not None:
                self.shared.put(
                    (w.episode_id, sc.embedding)
                    for w, sc in zip(items, scores, strict=True)
                    if sc.embedding is not None
                )
            # A failure that is only the scorer's (a 429, a timeout) never counts toward giving up.
            return [(version, float(sc.value)) if sc.ok else failure(sc) for sc in scores]

        def write(done: Sequence[tuple[ToScore, tuple[str, float]]]) -> int:
            rows = [{"episode_id": w.episode_id, "version": v, "score": sc} for w, (v, sc) in done]
            return store_results(store, SCORE_STAGE, self.id, rows)

        def give_up(items: Sequence[ToScore]) -> None:
            give_up_scoring(store, [w.episode_id for w in items])
            self.metrics.items.labels("rm_score", "given_up").inc(len(items))

        work = self._work("inference-rm-score", fetch, compute, "rm_score", give_up)
        return Stage("rm_score", work, write)

    def _work(
        self, name: str, fetch: Any, compute: Any, stage: str, give_up: GiveUp[Any] | None = None
    ) -> BackgroundWork[Any, Any]:
        icfg = self.settings.inference
        m = self.metrics

        def counted(ok: int, failed: int) -> None:
            m.items.labels(stage, "ok").inc(ok)
            m.items.labels(stage, "failed").inc(failed)

        # An item the model keeps failing while it computes others leaves the backlog (rm_score).
        after = self.settings.reward.backlog_give_up_after if give_up is not None else 0
        return episode_work(name, fetch, compute, icfg, counted=counted, give_up_after=after, give_up=give_up)

    def check_version(self, force: bool = False) -> None:
        """Load the active reward-model version when it changed (every ``reward.swap_poll_s``).
        A version that does not load leaves the previous one scoring, as in the pipeline."""
        change = self._watch.changed(force)
        if change is None:
            return
        backend: Any = None
        version: str | None = None
        if change.active is not None:
            version, path, _ = change.active
            try:
                backend = load_version(self.settings.reward, path, self.registry)
            except Exception as e:
                log.error("cannot load reward-model version %s (keeping %s): %s", version, self._version, e)
                return
        if self.shared is not None:
            # Before it scores: a drift sample waits for this version's pass only if it computes them.
            self.shared.active = backend is not None and share_drift_pass(backend, self.shared.spec)
        with self._swap_lock:
            old, self._backend, self._version = self._backend, backend, version
        self._watch.accept(change)
        if old is not None:
            old.close()
        log.info("inference worker %s: scoring with %s", self.id, version)

    @property
    def embedder(self) -> Embedder | None:
        """The drift encoder of the embedding stage (None without one)."""
        return self._embedder  # type: ignore[no-any-return]

    # -- running -------------------------------------------------------------------
    def round(self, stage: Stage) -> int:
        """One round: claim the oldest waiting items, compute, store. Returns how many it computed.
        A store that fails loses nothing: the claims expire and the items are computed again."""
        n = stage.work.run_once()
        done = stage.work.take()
        if done:
            stage.store(done)
        return n

    def publish(self) -> None:
        """This worker's capacity (items per second of compute). The backlogs and their lag are
        the pipeline's to publish (and to act on: the throttle)."""
        for s in self.stages:
            capacity = s.work.capacity()
            if capacity is not None:
                self.metrics.capacity.labels(s.name).set(capacity)

    def readiness(self) -> dict[str, bool]:
        """/readyz: the database answers and takes this worker's claims and results (a read-only
        one answers a read), and the encoder loaded."""
        checks = {"database": self.store.ping(), "writes": not self._failing}
        if self._embedder is not None:
            checks["encoder"] = self._embedder.resolved is not None
        return checks

    def warm(self) -> None:
        """Load the models now (seconds), before /readyz says ready."""
        if self._embedder is not None:
            self._embedder.embed([])
        if self.settings.reward.enabled:
            self.check_version(force=True)

    def run(self, stop: threading.Event) -> None:
        """Every stage on a thread of its own until ``stop``; this thread publishes the metrics."""
        threads = [
            threading.Thread(target=self._serve, args=(s, stop), name=s.work.name, daemon=True) for s in self.stages
        ]
        for th in threads:
            th.start()
        last_prune = time.monotonic()
        while not stop.wait(self.settings.inference.adapt_every_s):
            try:
                self.publish()
                if time.monotonic() - last_prune > PRUNE_EVERY_S:
                    prune_results(self.store)
                    last_prune = time.monotonic()
            except Exception as e:  # the database: the next tick tries again
                log.warning("inference worker %s: publishing failed: %s", self.id, first_line(e))
        for th in threads:
            th.join(self.settings.pipeline.drain_timeout_s / 2)

    def _serve(self, stage: Stage, stop: threading.Event) -> None:
        poll_s = self.settings.inference.poll_s
        # Below the metrics thread and /readyz, and below ingest where `infer` shares a host with `run`.
        lower_thread_priority(stage.work.nice, stage.name)  # the level its worker was built with
        while not stop.is_set():
            try:
                n = self.round(stage)
                self._failing.discard(stage.name)
            except Exception as e:  # the database: the claims expire, nothing is lost
                log.warning("inference %s failed (retrying): %s", stage.name, first_line(e))
                self.errors.labels(stage.name).inc()
                self._failing.add(stage.name)
                n = 0
            if n == 0:
                stop.wait(poll_s)

    def close(self) -> None:
        with self._swap_lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()
