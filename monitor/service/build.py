"""The composition root: every part of the running service is built here, from ``Settings``.

``build_service`` wires the stages in the order an episode travels: the store and the retry
policy every database access shares, the source and the dead-letter sink, the sampler, the
stages that watch the episodes (the disagreement feed and the scorer before the drift monitor:
their values feed it, and they must reach it in the same checkpoint), the pipeline, the outbox
relays that publish committed rows, the ops server, and, when asked, the review app and the
action worker. Nothing else builds these: ``oversight run``, ``replay``, ``simulate`` and the demo
all get a :class:`Service` and drive it through :meth:`Service.run`.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from monitor import __version__
from monitor.config import ConfigError, InferenceConfig, Settings
from monitor.episodes.deadletter import DeadLetterSink, JsonlDeadLetterSink
from monitor.metrics import Metrics
from monitor.ops import OpsServer
from monitor.pipeline import AfterCommit, EpisodeObserver, LoopHooks, Pipeline, RunStats, make_sampler
from monitor.retry import Health, RetryPolicy, first_line
from monitor.sources.base import Source
from monitor.store import BatchWrite, Store

if TYPE_CHECKING:
    from monitor.actions.outbox import OutboxRelay
    from monitor.actions.worker import ActionWorker
    from monitor.drift import DisagreementFeed, DriftMonitor
    from monitor.inference.shared import SharedVectors
    from monitor.pipeline.throttle import ModelChannelThrottle
    from monitor.review.server import BackgroundServer
    from monitor.reward.scorer import RewardScorer
    from monitor.store.retention import RetentionJob
    from monitor.store.wal import WalCheckpointer
    from sampling import Sampler

log = logging.getLogger(__name__)

KEPT_DRIFT_EVENTS = 1000  # the drift events a long-running service's stats keep in memory


def build_source(
    settings: Settings, *, resume: bool = True, name: str | None = None, store: Store | None = None
) -> Source:
    kind = settings.source.kind
    if kind == "inbox":
        return build_inbox_source(settings, store)
    if kind == "kafka":
        from monitor.sources.kafka import KafkaSource

        return KafkaSource(settings.kafka, client_id=f"oversight-{os.getpid()}")
    from monitor.sources.file import FileSource

    path = None if kind == "stdin" else settings.source.path
    if kind == "file" and not path:
        raise ConfigError("source.path is required when source.kind is file")
    src = FileSource(path, settings.source.max_episode_bytes, resume=resume)
    if name is not None:
        src.name = name
    return src


def build_inbox_source(settings: Settings, store: Store | None) -> Source:
    """The ingest API's inbox (``source.kind: inbox``), read through the pipeline's store."""
    from monitor.sources.inbox import InboxSource
    from monitor.store.ingest import Inbox

    if store is None:
        raise ConfigError("source.kind inbox reads the database: build it with the service's store")
    return InboxSource(
        Inbox(store),
        settings.ingest.inbox_retention_s,
        max_bytes=settings.source.max_episode_bytes,
        stall_s=settings.pipeline.stall_timeout_s,
    )


def build_dead_letters(settings: Settings, metrics: Metrics | None = None) -> DeadLetterSink:
    """The sink the settings describe; ``metrics``: where the file sink counts its rotations and
    the Kafka sink the letters sent without their raw bytes (without them, as in ``oversight
    import``, both are only logged)."""
    if settings.source.kind == "kafka":
        from monitor.episodes.deadletter import KafkaDeadLetterSink

        dropped = None if metrics is None else metrics.dead_letters_raw_dropped.inc
        return KafkaDeadLetterSink(settings.kafka, settings.dead_letter.max_raw_bytes, dropped)
    cfg = settings.dead_letter
    try:
        return JsonlDeadLetterSink(
            cfg.path, cfg.max_raw_bytes, cfg.fsync, cfg.max_bytes, cfg.keep, _rotated(cfg.path, cfg.keep, metrics)
        )
    except OSError as e:  # a folder, an unwritable place: the setting named, not only the path
        raise ConfigError(f"dead_letter.path {cfg.path}: {e.strerror or e}") from None


def _rotated(path: str, keep: int, metrics: Metrics | None) -> Callable[[int], None]:
    def rotated(discarded: int) -> None:
        if metrics is not None:
            metrics.dead_letter_rotations.inc()
            metrics.dead_letters_discarded.inc(discarded)
        if discarded:
            # Only counts and the configured path: the letters themselves are attacker-controlled.
            log.warning(
                "dead-letter file %s rotated: %d dead letters beyond the %d kept files deleted", path, discarded, keep
            )

    return rotated


@dataclass
class Stages:
    """The stages that watch the pipeline's episodes, in the order they see them."""

    drift: DriftMonitor | None = None
    scorer: RewardScorer | None = None
    labels_feed: DisagreementFeed | None = None

    def observers(self) -> list[EpisodeObserver]:
        # The feed and the scorer before drift: their checkpoints feed values that drift's
        # checkpoint saves in the same batch.
        return [s for s in (self.labels_feed, self.scorer, self.drift) if s is not None]


def build_stages(settings: Settings, store: Store, metrics: Metrics, sampler: Sampler, retry: RetryPolicy) -> Stages:
    stages = Stages()
    if settings.drift.enabled:
        from monitor.drift import DriftMonitor

        stages.drift = DriftMonitor(
            settings.drift,
            store,
            settings.sampling_key(),
            metrics,
            lambda stream, factor, duration, reason: sampler.boost(stream, factor, duration, reason=reason),
            drift_rate=settings.sampling.drift.rate,
            retry=retry,
        )
    if settings.reward.enabled:
        from monitor.reward.registry import Registry
        from monitor.reward.scorer import RewardScorer

        drift = stages.drift
        stages.scorer = RewardScorer(
            settings.reward,
            Registry.for_settings(store, settings),
            metrics,
            feed=None if drift is None else drift.observe_value,
        )
    if stages.drift is not None and settings.drift.signals.get("rm_disagreement"):
        from monitor.drift import DisagreementFeed

        stages.labels_feed = DisagreementFeed(store, stages.drift.observe_value, retry=retry)
    return stages


def build_outboxes(settings: Settings, store: Store, metrics: Metrics) -> list[OutboxRelay]:
    """Kafka mode: the outboxes of drift events and scores, each published by a relay thread of its
    own (started here), so that no broker wait is ingest's. Whatever a previous run committed but
    did not publish goes out first; through an outage of the broker or the database the outbox
    keeps it and the relay retries."""
    if settings.source.kind != "kafka":
        return []
    from monitor.actions.outbox import OutboxRelay, drift_publisher, scores_publisher

    publishers = []
    if settings.drift.enabled:
        publishers.append(drift_publisher(settings.kafka, store))
    if settings.reward.enabled:
        publishers.append(scores_publisher(settings.kafka, store))
    stall_s = settings.pipeline.stall_timeout_s
    return [OutboxRelay(p, store, metrics, stall_s=stall_s).start() for p in publishers]


def _after_commit(relay: OutboxRelay) -> AfterCommit:
    rows = relay.publisher.name  # the BatchWrite field of the outbox table's rows

    def hook(batch: BatchWrite) -> None:
        if getattr(batch, rows):
            relay.notify()

    return hook


@dataclass
class Service:
    """The running service. A context manager: leaving it stops and closes every part it holds,
    in the reverse order of their start."""

    settings: Settings
    store: Store
    metrics: Metrics
    retry: RetryPolicy
    sampler: Sampler
    stages: Stages
    pipeline: Pipeline
    outboxes: list[OutboxRelay] = field(default_factory=list)
    server: OpsServer | None = None
    review: BackgroundServer | None = None
    worker: ActionWorker | None = None
    retention: RetentionJob | None = None
    checkpointer: WalCheckpointer | None = None
    owns_store: bool = True  # False: the caller gave the store, and closes it

    # The stages by name (tests and the simulation read them).
    @property
    def drift(self) -> DriftMonitor | None:
        return self.stages.drift

    @property
    def scorer(self) -> RewardScorer | None:
        return self.stages.scorer

    @property
    def labels_feed(self) -> DisagreementFeed | None:
        return self.stages.labels_feed

    def readiness(self) -> dict[str, bool]:
        """The checks of /readyz (``oversight_ready`` is computed from the same function): the
        pipeline's, and in Kafka mode ``outbox`` (every outbox's last round published)."""
        checks = self.pipeline.readiness()
        if self.outboxes:
            checks["outbox"] = all(relay.ready() for relay in self.outboxes)
        return checks

    def prepare_for_service(self) -> None:
        """Before a long-running service consumes: do now what a batch would otherwise do the
        first time (import torch and load the encoder and the active reward model: seconds, tens
        on a busy machine), and build drift detectors in the background from now on, so that a
        SIGTERM drain never waits for any of it."""
        icfg = self.settings.inference
        self._checkpoint_in_background()
        drift = self.drift
        shared = self._shared_vectors(icfg)
        if drift is not None and icfg.workers:
            # The models off the ingest path: the batch commits its samples as waiting and the
            # inference workers' results commit with later batches (monitor/pipeline/background.py).
            drift.embed_in_background(icfg, every_stream=self.settings.source.kind != "kafka", shared=shared)
        if drift is not None:
            drift.arm_in_background()
            if self.settings.source.kind != "kafka":
                # This replica holds every stream: builds a kill cut short start now, not when
                # (if ever) their stream's next episode comes. A Kafka replica learns its streams
                # from their episodes.
                drift.resume_builds()
        streams = None if drift is None else drift.owned_streams
        if self.scorer is not None and icfg.workers and icfg.external:
            # Before the first checkpoint, which would load the active version: `oversight infer` does.
            self.scorer.score_in_background(streams, icfg)
        elif self.scorer is not None and icfg.workers:
            # Before the first checkpoint loads the active version: it will score on a worker.
            self.scorer.threads = icfg.worker_threads()
        if self.scorer is not None:
            self.scorer.checkpoint()  # nothing pending yet: loads the active version, if any
        if not icfg.workers:
            return
        if self.scorer is not None and not icfg.external:
            self.scorer.score_in_background(streams, shared=shared)
        self.pipeline.observers.append(self._throttle(icfg))
        self.pipeline.settle_at_end = True

    def _checkpoint_in_background(self) -> None:
        """A SQLite store's write-ahead log checkpointed on a thread of its own, not inside the
        ingest loop's commits (``monitor/store/wal.py``)."""
        path = self.store.sqlite_file
        if path is None or self.checkpointer is not None:
            return
        from monitor.store.wal import WalCheckpointer

        self.checkpointer = WalCheckpointer(path, self.metrics).start()

    def _shared_vectors(self, icfg: InferenceConfig) -> SharedVectors | None:
        """One encoder pass per episode on this process's workers: where the scorer leaves the
        drift embeddings its pass computed (``monitor/inference/shared.py``); None when the
        workers are not both here, or the drift embedding is not one a reward model computes."""
        drift = self.drift
        if not icfg.workers or icfg.external or drift is None or self.scorer is None:
            return None
        if not self.settings.drift.embedding.enabled or drift.drift_pass is None:
            return None
        from monitor.inference.shared import SharedVectors

        return SharedVectors(drift.drift_pass)

    def _throttle(self, icfg: InferenceConfig) -> ModelChannelThrottle:
        """The model channels' rates follow the workers' lag (only channels that have a worker)."""
        from monitor.pipeline.throttle import ModelChannelThrottle
        from monitor.store.inference import Backlog, embedding_backlog, score_backlog_stats

        store = self.store
        backlogs = {}
        capacities: dict[str, Callable[[], float | None]] = {}
        drift = self.drift
        worker = None if drift is None else drift.worker
        # The streams this replica feeds (Kafka: those it holds; None: every stream). A backlog of
        # streams it does not feed is not its workers' lag: a stream quiet since a restart, which no
        # replica holds, waited forever and halved every stream's model rates down to their floors.
        owned = (lambda: None) if drift is None else drift.owned_streams
        # With external workers (`oversight infer`) the capacity is theirs to publish: here it would
        # be the rate of reading stored results.
        local = not icfg.external
        if worker is not None:
            backlogs["drift"] = ("embedding", lambda: embedding_backlog(store, streams=owned()))
            if local:
                capacities["embedding"] = worker.capacity
        scorer = self.scorer
        if scorer is not None:
            # No version active, nothing scores: the backlog waits for one (or `rm score-backlog`)
            # and says nothing about the workers.
            backlogs["rm"] = (
                "rm_score",
                lambda: score_backlog_stats(store, streams=owned()) if scorer.scoring else Backlog(0, 0.0),
            )
            if local:
                capacities["rm_score"] = scorer.capacity
        return ModelChannelThrottle(self.sampler, self.metrics, icfg, backlogs, capacities=capacities)

    def serve_review(self, port: int | None = None, *, metrics_listener: bool = True) -> BackgroundServer:
        """The review UI and API in this process, on the service's store."""
        from monitor.review.app import create_app
        from monitor.review.server import BackgroundServer

        s = self.settings
        self.review = BackgroundServer(
            create_app(s, self.store),
            s.review.host,
            s.review.port if port is None else port,
            metrics=(s.review.metrics_host, s.review.metrics_port) if metrics_listener else None,
        ).start()
        return self.review

    def action_worker(self, *, start: bool) -> ActionWorker:
        """The action worker on the service's store and metrics: a thread of its own (``start``),
        or driven round by round by the caller (the simulation)."""
        from monitor.actions.sinks import check_sinks
        from monitor.actions.worker import ActionWorker

        check_sinks(self.settings)  # a sink the settings cannot make: exit 2 now, not a failure every round
        self.worker = ActionWorker(self.settings, self.store, self.metrics)
        if start:
            self.worker.start()
        return self.worker

    def retention_job(self) -> RetentionJob:
        """The purge of stored episodes past ``database.retention.days``, on a thread of its own."""
        from monitor.store.retention import RetentionJob

        s = self.settings
        job = RetentionJob(self.store, s.database.retention, self.metrics, s.source.max_future_s)
        self.retention = job.start()
        return self.retention

    def run(self, stop: threading.Event | None = None, hooks: LoopHooks | None = None) -> RunStats:
        """The pipeline's loop until the source is exhausted, ``stop`` is set or a hook ends it."""
        stats: RunStats = self.pipeline.run(stop, hooks)
        return stats

    def close(self) -> None:
        """Stop and close everything, the last started first; one failure does not keep the rest open."""
        parts = [
            self.retention.stop if self.retention is not None else None,
            self.worker.stop if self.worker is not None else None,
            self.review.stop if self.review is not None else None,
            self.pipeline.close,
            self.scorer.close if self.scorer is not None else None,  # the background scorer
            self.drift.close if self.drift is not None else None,  # the embedding worker
            *(relay.stop for relay in self.outboxes),
            self.checkpointer.stop if self.checkpointer is not None else None,
            self.server.stop if self.server is not None else None,
            self.store.close if self.owns_store else None,
        ]
        for close in parts:
            if close is None:
                continue
            try:
                close()
            except Exception as e:
                log.warning("closing the service: %s", first_line(e))

    def __enter__(self) -> Service:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def warn_of_asynchronous_replication(store: Store) -> None:
    """Say at start when a failover could lose what the database acknowledged: a primary with
    standbys that its commits do not wait for. The pipeline reads such a loss again from Kafka
    or a file (``oversight_offset_regressions_total``), but review labels, inbox records and
    action requests written in that window are gone. Advisory: a server that cannot say (an
    outage at start, a restricted role) is not a reason to stop."""
    try:
        replication = store.replication()
    except Exception as e:  # the pipeline's own retries meet any outage
        log.debug("could not read the database's replication: %s", first_line(e))
        return
    if replication is not None and replication.failover_can_lose_commits:
        log.warning(
            "the database replicates asynchronously to %d standby(s): a failover to one can lose the last"
            " batches it acknowledged (Kafka and files are read again; review labels, inbox records and action"
            " requests in that window are lost); set synchronous_standby_names on the primary"
            " (README, 'Database failover')",
            replication.standbys,
        )


def build_service(
    settings: Settings,
    *,
    source: Source | None = None,
    serve: bool = True,
    resume: bool = True,
    registry: Any = None,
    background_calibration: bool | None = None,
    dead_letters: DeadLetterSink | None = None,
    store: Store | None = None,
    server: OpsServer | None = None,
) -> Service:
    """The service: store (migrated), metrics, source, dead letters, stages, pipeline, outbox relays,
    ops server (``serve``). ``source``, ``dead_letters`` and ``store``: given ones instead of those
    the settings describe (tests, drivers); ``registry``: the Prometheus registry (a fresh one per
    service in tests).

    ``background_calibration``: drift detectors are built (calibrated by simulation, seconds)
    on a worker thread while their signals keep their values, so that a batch, and a SIGTERM
    drain, never waits for a calibration. Default: on for the long-running service (``serve``
    and the source from the settings: ``oversight run``), off for drivers that bring their own
    source (replay, simulate), whose reports must not depend on how fast a calibration ran.

    ``server``: an ops server already answering (``monitor.startup``) that the service
    takes over with ``serve``, instead of starting its own; the service stops it when it closes.
    """
    settings.sampling_key()  # refuse to start without a real key outside dev mode, before touching anything
    given_store = store is not None
    store = store if store is not None else Store.open(settings.database)
    warn_of_asynchronous_replication(store)
    named = {*settings.sampling.streams, *settings.review.streams}  # configured: their own labels, always
    metrics = Metrics(registry, max_streams=settings.metrics.max_streams, named=named)
    metrics.info.info({"version": __version__, "source": settings.source.kind})
    # One retry policy for every database and broker access on the pipeline's path; its health
    # is what /readyz reports. A failed store operation drops the pooled connections.
    health = Health(metrics, stall_s=settings.pipeline.stall_timeout_s)
    retry = RetryPolicy(health, on_failure={"store": store.reconnect})
    sampler = make_sampler(settings, store, retry)
    stages = build_stages(settings, store, metrics, sampler, retry)
    outboxes = build_outboxes(settings, store, metrics)
    pipeline = Pipeline(
        settings,
        store,
        source if source is not None else build_source(settings, resume=resume, store=store),
        dead_letters if dead_letters is not None else build_dead_letters(settings, metrics),
        metrics,
        retry=retry,
        sampler=sampler,
        observers=stages.observers(),
        after_commit=[_after_commit(relay) for relay in outboxes],
    )
    svc = Service(settings, store, metrics, retry, sampler, stages, pipeline, outboxes, owns_store=not given_store)
    if serve and source is None:
        # `oversight run` runs for months: its stats keep the last events, not every one (a leak of
        # about a kilobyte per drift event; the events are in the database).
        pipeline.stats.max_drift_events = KEPT_DRIFT_EVENTS
    if background_calibration is None:
        background_calibration = serve and source is None
    if background_calibration:
        svc.prepare_for_service()
    if server is not None:
        server.serve(metrics.registry, svc.readiness)
        svc.server = server
    elif serve:
        svc.server = OpsServer(settings.server.host, settings.server.port, metrics.registry, svc.readiness).start()
    return svc


def install_signal_handlers(stop: threading.Event, drain_timeout_s: float) -> None:
    """SIGTERM/SIGINT: stop after the batch in flight; a watchdog exits if draining hangs."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            return
        log.info("signal %s: draining", signal.Signals(signum).name)
        stop.set()

        def watchdog() -> None:
            time.sleep(drain_timeout_s)
            log.error("drain took longer than %.1fs; exiting (uncommitted work is redelivered)", drain_timeout_s)
            os._exit(3)

        threading.Thread(target=watchdog, daemon=True, name="drain-watchdog").start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    # The interpreter's last garbage collection walks the whole heap (torch, transformers, scipy):
    # over a second on a busy machine, after the drain is done. Nothing needs collecting at exit
    # (sinks, store and consumer are closed explicitly), so the heap is frozen out of it.
    atexit.register(gc.freeze)
