"""Batched reward-model scoring of the ``rm`` sampling channel, inside the pipeline.

Episodes sampled for ``human`` review are scored too: the reward model's verdict on what
people review is what the human/reward-model disagreement signal compares
(``monitor/signals/disagreement.py``). The two channels share their uniform draw, so while the
human rate is at most the rm rate every human-sampled episode is rm-sampled anyway; this
matters when a budget or override puts human review above the rm rate. The score metrics and
the ``rm_score`` drift signal take the ``rm`` channel only, so they describe the rm sample and
its inclusion probabilities.

Episodes sampled for ``rm`` are collected as they pass and scored in one forward pass at the
batch boundary (the observers' checkpoint), by the version active at that moment; the scores
are committed in the same transaction as the batch's offsets, so a crash re-scores nothing
twice (one row per episode and version) and loses nothing. A newly promoted version is picked
up at a batch boundary: every episode is scored by exactly one version, without a restart. In the
service (:meth:`RewardScorer.score_in_background`) the promoted version loads on a thread of its
own (:class:`VersionLoad`) and is installed at the first boundary after it is ready; until then the
version in hand scores, so a slow load (an ONNX export, a large checkpoint) never holds ingest.
Replay and simulate load at the boundary itself, so that their runs reproduce.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor.config import InferenceConfig, RewardConfig
from monitor.episodes import Episode
from monitor.inference.shared import SharedVectors
from monitor.metrics import Metrics
from monitor.pipeline.background import BackgroundWork, episode_work
from monitor.reward.registry import ActiveChange, Registry, VersionWatch
from monitor.store import BatchWrite, RmScoreRow
from monitor.store.inference import Scored, stored_scores, waiting_for_score
from sampling import Decision

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from monitor.reward.kinds import ScoringBackend

log = logging.getLogger(__name__)

MAX_RETRY_S = 300.0  # the longest wait before a version that failed to load is tried again

# (stream, signal, value, episode_id, event_ts, input_index): DriftMonitor.observe_value
Feed = Callable[[str, str, float, str, float, int], None]


def load_version(
    cfg: RewardConfig, path: str | Path, registry: CollectorRegistry | None, threads: int | None = None
) -> ScoringBackend:
    """The scoring backend of a version folder, as ``reward`` configures it (device, batch,
    the built-in's backend, quantisation and precision), ONNX Runtime on ``threads`` (None: one per
    core); raises what :func:`load_backend` raises."""
    from monitor.reward.kinds import load_backend

    return load_backend(
        path,
        device=cfg.device,
        batch_size=cfg.batch_size,
        registry=registry,
        backend=cfg.backend,
        quantisation=cfg.quantisation,
        precision=cfg.precision,
        threads=threads,
    )


class VersionLoad:
    """A version's scoring backend loading on a thread of its own.

    >>> load = VersionLoad(ActiveChange(("v2", Path("v2"), 3)), lambda: 1 / 0)
    >>> load.wait(5.0), load.name, type(load.error).__name__, load.backend
    (True, 'v2', 'ZeroDivisionError', None)
    """

    def __init__(self, change: ActiveChange, load: Callable[[], ScoringBackend]):
        assert change.active is not None
        self.change = change
        self.name = change.active[0]
        self.backend: ScoringBackend | None = None
        self.error: Exception | None = None
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(load,), name=f"rm-load-{self.name}", daemon=True).start()

    def _run(self, load: Callable[[], ScoringBackend]) -> None:
        try:
            self.backend = load()
        except Exception as e:  # reported by the scorer at its next batch boundary
            self.error = e
        finally:
            self._done.set()

    def wait(self, timeout: float | None) -> bool:
        """Whether the load has finished, waiting up to ``timeout`` seconds (None: until it has)."""
        return self._done.wait(timeout)


class RewardScorer:
    """An :class:`monitor.pipeline.EpisodeObserver` that scores the rm channel.

    The pipeline calls :meth:`observe` per episode and :meth:`checkpoint` at each batch boundary,
    then commits :meth:`take_rows` with the batch. Without an active version (as below, so nothing
    loads the encoder) the sampled episodes are counted as unscored and left to
    ``oversight rm score-backlog``; an episode that no review channel sampled is never held.

    >>> from monitor.config import load_settings
    >>> from monitor.episodes import parse_episode
    >>> from monitor.store import Store
    >>> settings = load_settings(None, ["dev=true", "database.url=sqlite://"])
    >>> registry = Registry.for_settings(Store(settings.database.url), settings)
    >>> scorer = RewardScorer(settings.reward, registry, Metrics())
    >>> episode = parse_episode(b'{"episode_id": "e1", "prompt": "2+2?", "response": "4"}', 1 << 20, now=0.0)
    >>> rates = {"rm": 0.1, "human": 0.01}
    >>> scorer.observe(episode, Decision({"rm": 0.1}, rates, u_review=0.05, u_drift=0.5), index=0)
    >>> scorer.observe(episode, Decision({}, rates, u_review=0.5, u_drift=0.5), index=1)
    >>> scorer.checkpoint()
    {}
    >>> scorer.version, scorer.scored, scorer.unscored, scorer.take_rows()
    (None, 0, 1, [])
    """

    def __init__(self, cfg: RewardConfig, registry: Registry, metrics: Metrics, feed: Feed | None = None):
        self.cfg = cfg
        self.registry = registry
        self._metrics = metrics
        self._feed = feed
        self._pending: list[tuple[Episode, int, bool]] = []  # (episode, input index, rm-sampled?)
        self._rows: list[RmScoreRow] = []
        self._model: Any = None
        self._watch = VersionWatch(registry, cfg.swap_poll_s)  # the active version, checked at batch boundaries
        self._warned = False
        self.scored = 0
        self.unscored = 0
        self._background: Any = None  # a BackgroundScorer while a remote kind is active (any kind, in the service)
        self._offload = False  # every kind on the background scorer (score_in_background)
        self._shared: SharedVectors | None = None
        self._external = False  # scores come from `oversight infer` (inference.external): no model here
        self._active: str | None = None  # the active version, as last read (external: no model holds it)
        self._streams: Callable[[], Collection[str] | None] | None = None
        self._loading: VersionLoad | None = None  # a promoted version loading off the ingest thread
        # A version that failed to load: when it may be tried again (generation -> (monotonic time, the
        # wait that set it)). Tried at every poll, a checkpoint that cannot load (a 2 GB one changed in
        # place, re-hashed each time) took three quarters of the ingest thread, for good.
        self._retry: dict[int, tuple[float, float]] = {}
        # ONNX Runtime threads of the versions loaded from now on (None: one per core, as inline
        # scoring wants). The service sets it before its first load: its scorer runs beside the
        # ingest loop, and a session on every core, spinning between runs, took the loop's core.
        self.threads: int | None = None

    @property
    def version(self) -> str | None:
        return self._active if self._model is None else self._model.version

    def prepare(self, episodes: Sequence[tuple[Episode, int]]) -> None:
        pass  # what it scores depends on the sampling decisions: it queues them in observe

    def observe(self, episode: Episode, decision: Decision, index: int) -> None:
        rm = "rm" in decision.sampled
        if rm or "human" in decision.sampled:
            self._pending.append((episode, index, rm))

    def checkpoint(self) -> Mapping[tuple[str, str], dict[str, Any]]:
        self._maybe_swap()
        self._take_background()
        if not self._pending:
            return {}
        pending, self._pending = self._pending, []
        if self._background is not None:
            # A background scorer never holds the batch: the episodes wait in the store (sampled,
            # no score) and its scores commit with a later batch.
            self._metrics_backend().deferred.inc(len(pending))
            self._background.nudge()
            return {}
        if self._model is None:
            # Kept in the samples table (channel rm): `oversight rm score-backlog` scores them later.
            self.unscored += len(pending)
            if not self._warned:
                log.warning("no active reward-model version: rm-sampled episodes stay unscored")
                self._warned = True
            return {}
        from monitor.reward.kinds import Item

        try:
            scores = self._model.score([Item(ep.prompt, ep.response, ep.messages) for ep, _, _ in pending])
        except Exception as e:
            # A backend that fails in a way its own guards did not foresee: the episodes stay in the
            # samples table for the backlog, and the batch, and the replay or run, go on. It used to
            # end `oversight replay` with the whole file's work lost.
            self.unscored += len(pending)
            log.error(
                "reward model %s: scoring %d episodes failed, left for the backlog: %s: %r",
                self._model.version,
                len(pending),
                type(e).__name__,
                str(e)[:200],
            )
            return {}
        for (ep, index, rm), s in zip(pending, scores, strict=True):
            if s.ok:
                self._accept(ep.episode_id, ep.stream, ep.timestamp, index, rm, float(s.value), self._model.version)
            else:  # left in the samples table: the backlog scores it later
                self.unscored += 1
        return {}

    def _accept(
        self, episode_id: str, stream: str, ts: float, index: int, rm: bool, score: float, version: str
    ) -> None:
        self._rows.append(
            {
                "episode_id": episode_id,
                "version": str(version),
                "stream": stream,
                "score": score,
                "ts": ts,
                "created_at": time.time(),
            }
        )
        self.scored += 1
        if not rm:
            return
        label = self._metrics.stream_label(stream)
        self._metrics.rm_score.labels(label).observe(score)
        # Both series touched: the mean's rule subtracts one from the other, stream by stream.
        self._metrics.rm_score_positive.labels(label).inc(max(score, 0.0))
        self._metrics.rm_score_negative.labels(label).inc(max(-score, 0.0))
        if self._feed is not None:
            self._feed(stream, "rm_score", score, episode_id, ts, index)

    def _take_background(self) -> None:
        if self._background is None:
            return
        version = None if self._model is None else self._model.version
        for w, score in self._background.take():
            # index -1: an episode of an earlier batch, fed in the order its score arrived. A
            # stored result carries the version that computed it (inference.external).
            if isinstance(w, Scored):
                self._accept(w.episode_id, w.stream, w.ts, -1, w.rm, w.score, w.version)
            else:
                self._accept(w.episode_id, w.stream, w.ts, -1, w.rm, float(score.value or 0.0), str(version))

    def score_in_background(
        self,
        streams: Callable[[], Collection[str] | None] | None = None,
        icfg: InferenceConfig | None = None,
        shared: SharedVectors | None = None,
    ) -> None:
        """Score every kind on a worker thread from now on (the service: ``inference.workers``),
        not only the remote ones: the batch commits its rm and human samples as waiting and a
        later batch commits their scores, so ingest never waits for a forward pass. ``streams``:
        the streams this replica holds (see :class:`BackgroundScorer`). With
        ``icfg.external``, no model loads here: the scores ``oversight infer`` stored are fed.
        ``shared``: where a version whose encoder pass computes the drift embeddings leaves them
        for the embedding worker (``monitor/inference/shared.py``)."""
        self._offload = True
        self._streams = streams
        self._shared = shared
        if icfg is not None and icfg.external:
            self._external = True
            self._model = None
            self._background = self._stored_results(icfg)
            self._maybe_swap(force=True)
            return
        self._maybe_swap(force=True)
        if self._model is not None and self._background is None:
            self._start_background()

    def capacity(self) -> float | None:
        """Episodes per second of the background scorer's computing time (None before its first score)."""
        background = self._background
        return None if background is None else background.capacity()

    def _stored_results(self, icfg: InferenceConfig) -> BackgroundWork[Scored, float]:
        store = self.registry.store

        def fetch(limit: int, skip: frozenset[str]) -> list[Scored]:
            return stored_scores(store, limit, skip, self._owned(), hold_s=icfg.max_lag_s)

        def waiting(skip: frozenset[str]) -> bool:
            # Scored or not yet: a finite input's run waits for the other process, while a version is active.
            return self.scoring and bool(waiting_for_score(store, 1, skip, streams=self._owned()))

        def scores(items: Sequence[Scored]) -> list[float]:
            return [w.score for w in items]

        return episode_work("rm-score-results", fetch, scores, icfg, batch=icfg.max_pending, waiting=waiting).start()

    def _owned(self) -> Collection[str] | None:
        return None if self._streams is None else self._streams()

    @property
    def scoring(self) -> bool:
        """Scores are being computed off the pipeline's thread: a background scorer runs (a version
        is active), or an external worker's scores are fed and a version is active."""
        if self._external:
            return self._active is not None
        return self._background is not None

    def outstanding(self) -> bool:
        """Samples waiting for the background scorer, or scores taken and not yet committed."""
        return bool(self._rows) or (self._background is not None and self._background.outstanding())

    def _metrics_backend(self) -> Any:
        from monitor.reward.kinds.resilience import BackendMetrics

        return BackendMetrics.on(self._metrics.registry)

    def close(self) -> None:
        """Stop the background scorer, if any (what it scored but did not hand over waits in the
        store); a version still loading is abandoned to its thread."""
        if self._background is not None:
            self._background.stop()
            self._background = None
        loading, self._loading = self._loading, None
        if loading is not None and loading.wait(0.0) and loading.backend is not None:
            loading.backend.close()

    def take_rows(self) -> list[RmScoreRow]:
        rows, self._rows = self._rows, []
        return rows

    def add_rows(self, batch: BatchWrite) -> None:
        """The scores of this batch (one row per episode and version) commit with it."""
        batch.rm_scores.extend(self.take_rows())

    def between_batches(self) -> bool:
        # Background scores commit through the idle commit when no record comes.
        return self._background is not None and self._background.pending() > 0

    def forget(self) -> None:
        if self._background is not None:
            self._background.release([r["episode_id"] for r in self._rows])
        self._pending.clear()
        self._rows.clear()

    def _maybe_swap(self, force: bool = False) -> None:
        if self._loading is not None and not self._finish_loading(self._loading, force):
            return
        change = self._watch.changed(force)
        if change is not None:
            self._swap_to(change, force)

    def _swap_to(self, change: ActiveChange, force: bool) -> None:
        active = change.active
        wait = self._retry.get(change.generation)
        if wait is not None and not force and time.monotonic() < wait[0]:
            return  # failed to load: tried again when its wait is over
        if active is None:
            self._model, self._active = None, None
            self._watch.accept(change)
            return
        if self._external:  # `oversight infer` loads it: keep the name for the metrics
            self._swap_label(active[0])
            self._watch.accept(change)
            return
        load = partial(load_version, self.cfg, active[1], self._metrics.registry, self.threads)
        if self._offload and not force:
            # The service: a load can take tens of seconds (an ONNX export, a large checkpoint)
            # and the batch boundary is on the ingest thread. The version in hand keeps scoring
            # until the new one is ready (with none in hand, the samples wait in the backlog: a
            # load that fails again and again must not run on the ingest thread either). Replay and
            # simulate swap at once, reproducibly.
            self._loading = VersionLoad(change, load)
            log.info("reward model: loading %s in the background (scoring with %s)", active[0], self.version)
            return
        try:
            model = load()
        except Exception as e:  # keep scoring with the old version rather than stop ingest
            self._failed(change.generation)
            log.error("cannot load reward-model version %s (keeping %s): %s", active[0], self.version, e)
            return
        self._install(change, model)

    def _failed(self, generation: int) -> None:
        """Wait before trying a version that failed to load again: the poll period, doubling up to
        ``MAX_RETRY_S`` (a promotion, a new generation, is tried at once)."""
        last = self._retry.get(generation)
        wait = min(MAX_RETRY_S, self.cfg.swap_poll_s if last is None else 2 * last[1])
        self._retry = {generation: (time.monotonic() + wait, wait)}

    def _finish_loading(self, loading: VersionLoad, force: bool) -> bool:
        """Install a background load that has finished (``force``: wait for it). Returns whether
        the active version may be read again (False: still loading)."""
        if not loading.wait(None if force else 0.0):
            return False
        if loading.error is not None or loading.backend is None:
            self._loading = None
            # Not accepted: the watch reports the version again and it is tried after a wait.
            self._failed(loading.change.generation)
            log.error("cannot load reward-model version %s (keeping %s): %s", loading.name, self.version, loading.error)
            return True
        # Read before letting go of the load: a database error here leaves it for the next boundary.
        latest = ActiveChange(self.registry.active())
        self._loading = None
        if latest.generation != loading.change.generation:
            # Promoted or retired again while it loaded: never install a version no longer active.
            loading.backend.close()
            return True
        self._install(loading.change, loading.backend)
        return True

    def _install(self, change: ActiveChange, model: ScoringBackend) -> None:
        assert change.active is not None
        version, _, gen = change.active
        old = self.version
        self._retry = {}
        self._model = model
        self._watch.accept(change)
        self._start_background()
        self._swap_label(version)
        log.info("reward model: scoring with %s (generation %d, was %s)", version, gen, old)

    def _swap_label(self, version: str) -> None:
        old, self._active = self._active, version
        if old is not None and old != version:
            self._metrics.rm_active_version.remove(old)
        self._metrics.rm_active_version.labels(version).set(1)

    def _start_background(self) -> None:
        """A remote kind scores on a worker thread; a local one inline (and stops the worker)."""
        from monitor.reward.kinds.background import BackgroundScorer
        from monitor.reward.kinds.base import share_drift_pass

        if self._background is not None:
            self._background.stop()
            self._background = None
        shared = self._shared
        if shared is not None:
            # Only a version whose pass computes them (the built-in, over the drift encoder's
            # weights and limits) makes the drift samples wait for its scores.
            shared.active = self._offload and self._model is not None and share_drift_pass(self._model, shared.spec)
        if getattr(self._model, "remote", False) or self._offload:
            m = self._metrics

            def counted(ok: int, failed: int) -> None:
                m.inference_items.labels("rm_score", "ok").inc(ok)
                m.inference_items.labels("rm_score", "failed").inc(failed)

            self._background = BackgroundScorer(
                self.registry.store,
                self._model,
                self._metrics_backend(),
                batch=self.cfg.batch_size,
                poll_s=self.cfg.backlog_poll_s,
                max_pending=self.cfg.backlog_max,
                give_up_after=self.cfg.backlog_give_up_after,
                counted=counted,
                streams=self._streams,
                shared=shared,
            ).start()
