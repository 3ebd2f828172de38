"""Builds a running service from settings: store, source, dead letters, metrics, pipeline, ops server."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

from monitor import __version__
from monitor.config import Settings
from monitor.deadletter import DeadLetterSink, JsonlDeadLetterSink
from monitor.metrics import Metrics
from monitor.pipeline import Pipeline
from monitor.server import OpsServer
from monitor.sources.base import Source
from monitor.store import Store

log = logging.getLogger(__name__)


def build_source(settings: Settings, *, resume: bool = True, name: str | None = None) -> Source:
    kind = settings.source.kind
    if kind == "kafka":
        from monitor.sources.kafka import KafkaSource

        return KafkaSource(settings.kafka, client_id=f"oversight-{os.getpid()}")
    from monitor.sources.file import FileSource

    path = None if kind == "stdin" else settings.source.path
    if kind == "file" and not path:
        from monitor.config import ConfigError

        raise ConfigError("source.path is required when source.kind is file")
    src = FileSource(path, settings.source.max_episode_bytes, resume=resume)
    if name is not None:
        src.name = name
    return src


def build_dead_letters(settings: Settings) -> DeadLetterSink:
    if settings.source.kind == "kafka":
        from monitor.deadletter import KafkaDeadLetterSink

        return KafkaDeadLetterSink(settings.kafka, settings.dead_letter.max_raw_bytes)
    return JsonlDeadLetterSink(
        settings.dead_letter.path, settings.dead_letter.max_raw_bytes, settings.dead_letter.fsync
    )


@dataclass
class Service:
    settings: Settings
    store: Store
    metrics: Metrics
    pipeline: Pipeline
    server: OpsServer | None

    def readiness(self) -> dict[str, bool]:
        """The checks of /readyz (``oversight_ready`` is computed from the same function)."""
        return self.pipeline.readiness()


def build_service(
    settings: Settings,
    *,
    source: Source | None = None,
    serve: bool = True,
    resume: bool = True,
    registry: Any = None,
    background_calibration: bool | None = None,
) -> Service:
    """The service: store (migrated), metrics, source, dead letters, pipeline, ops server.

    ``background_calibration``: drift detectors are built (calibrated by simulation, seconds)
    on a worker thread while their signals keep their values, so that a batch, and a SIGTERM
    drain, never waits for a calibration. Default: on for the long-running service (``serve``
    and the source from the settings: ``oversight run``), off for drivers that bring their own
    source (replay, simulate), whose reports must not depend on how fast a calibration ran.
    """
    settings.sampling_key()  # refuse to start without a real key outside dev mode, before touching anything
    store = Store(settings.database.url, migrate=settings.database.migrate)
    metrics = Metrics(registry, max_streams=settings.metrics.max_streams)
    metrics.info.info({"version": __version__, "source": settings.source.kind})
    src = source if source is not None else build_source(settings, resume=resume)
    pipeline = Pipeline(settings, store, src, build_dead_letters(settings), metrics)
    if background_calibration is None:
        background_calibration = serve and source is None
    if background_calibration:
        pipeline.prepare_for_service()
    if settings.source.kind == "kafka":
        from monitor.outbox import drift_publisher, scores_publisher

        # Whatever a previous run committed but did not publish goes out first. The outbox keeps
        # it through an outage of the broker or the database: start anyway, the next batch retries.
        if settings.drift.enabled:
            pipeline.drift_publisher = drift_publisher(settings.kafka, store)
            _publish_pending(pipeline.drift_publisher, "drift events")
        if settings.reward.enabled:
            pipeline.scores_publisher = scores_publisher(settings.kafka, store)
            _publish_pending(pipeline.scores_publisher, "reward-model scores")
    svc = Service(settings, store, metrics, pipeline, None)
    if serve:
        svc.server = OpsServer(settings.server.host, settings.server.port, metrics.registry, svc.readiness).start()
    return svc


def _publish_pending(publisher: Any, what: str) -> None:
    from monitor.retry import first_line, transient

    try:
        publisher.publish_pending()
    except Exception as e:
        if not transient(e):
            raise
        log.warning("publishing %s left over by the last run failed (kept for retry): %s", what, first_line(e))


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
