"""Prometheus metrics of the pipeline, on an injectable registry.

Names are namespaced ``oversight_``. Stream names come from traffic (untrusted
and unbounded), so the stream label is capped: after ``max_streams``
distinct streams, further ones share the label ``_other``. The streams the
configuration names (``named``) always have their own label, outside the cap: the
places went first come, first served, so fifty junk names right after a start took
them all and the deployment's own streams were counted as ``_other`` for the
process's life.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

NS = "oversight"
# The tables the retention purge deletes from, in its order (monitor/store/retention.py).
RETENTION_TABLES = (
    "rm_scores",
    "samples",
    "inference_results",
    "review_tasks",
    "episodes",
    "traffic",
    "drift_events",
)
OTHER = "_other"
UNKNOWN = "_unknown"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, max_streams: int = 50, named: Iterable[str] = ()):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.max_streams = max_streams
        self._named = frozenset(named)
        self._streams: set[str] = set()
        self._lock = threading.Lock()
        r = self.registry
        self.info = Info("build", "Build information", namespace=NS, registry=r)
        self._ingest_metrics(r)
        self._commits_metrics(r)
        self._drift_metrics(r)
        self._reward_metrics(r)
        self._oversight_metrics(r)
        self._readiness_metrics(r)
        self._inference_metrics(r)
        self._retention_metrics(r)
        self._sqlite_metrics(r)
        self._outbox_metrics(r)
        self._zero_known_labels()

    def _ingest_metrics(self, r: CollectorRegistry) -> None:
        """Ingest: records by outcome, sampling and its inclusion probabilities, consumer lag."""
        self.episodes = Counter(
            "episodes",
            "Records ingested, by stream and outcome (sampled, not_sampled, invalid, duplicate)",
            ["stream", "outcome"],
            namespace=NS,
            registry=r,
        )
        self.sampled = Counter(
            "sampled", "Episodes sampled, by stream and channel", ["stream", "channel"], namespace=NS, registry=r
        )
        self.dead_letters = Counter(
            "dead_letters", "Records dead-lettered, by reason", ["reason"], namespace=NS, registry=r
        )
        self.streams_held = Gauge(
            "streams_held",
            "Streams whose state the pipeline holds in memory (at most pipeline.max_streams)",
            namespace=NS,
            registry=r,
        )
        # Unlabelled counters start at 0 by themselves: the first rotation shows in rate().
        self.dead_letter_rotations = Counter(
            "dead_letter_rotations",
            "Rotations of the dead-letter file (dead_letter.max_bytes)",
            namespace=NS,
            registry=r,
        )
        self.dead_letters_raw_dropped = Counter(
            "dead_letters_raw_dropped",
            "Dead letters sent to the dead-letter topic without their raw bytes: the broker refused their size",
            namespace=NS,
            registry=r,
        )
        self.dead_letters_discarded = Counter(
            "dead_letters_discarded",
            "Dead letters deleted with the oldest rotated file (beyond dead_letter.keep)",
            namespace=NS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "consumer_lag",
            "Records behind the end of each assigned partition",
            ["topic", "partition"],
            namespace=NS,
            registry=r,
        )
        self.inclusion_probability = Gauge(
            "inclusion_probability",
            "Inclusion probability in effect, by stream and channel",
            ["stream", "channel"],
            namespace=NS,
            registry=r,
        )
        self.inclusion_probability_min = Gauge(
            "inclusion_probability_min",
            "Lowest inclusion probability applied to any episode since start (coverage), by stream and channel",
            ["stream", "channel"],
            namespace=NS,
            registry=r,
        )
        self.sampling_floor = Gauge(
            "sampling_floor", "Configured floor probability", ["stream", "channel"], namespace=NS, registry=r
        )
        self.boost_factor = Gauge(
            "sampling_boost_factor",
            "Active boost factor (1 when none)",
            ["stream", "channel"],
            namespace=NS,
            registry=r,
        )

    def _commits_metrics(self, r: CollectorRegistry) -> None:
        """Batches and commits: latency, failures, the last checkpoint."""
        self.latency = Histogram(
            "processing_latency_seconds",
            "Time from receiving a record to committing its effects",
            namespace=NS,
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.batch_seconds = Histogram(
            "batch_duration_seconds",
            "Time to validate, sample and commit one batch",
            namespace=NS,
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.batches = Counter("batches", "Batches committed", namespace=NS, registry=r)
        self.commit_errors = Counter(
            "commit_errors", "Failed commits (retried), by target", ["target"], namespace=NS, registry=r
        )
        self.source_errors = Counter(
            "source_errors",
            "Failed attempts of the source (retried), by operation (read: a poll the broker or the"
            " database refused; commit: an informational Kafka offset commit)",
            ["operation"],
            namespace=NS,
            registry=r,
        )
        self.stale_batches = Counter(
            "stale_batches", "Batches rolled back because another consumer moved the offsets", namespace=NS, registry=r
        )
        self.offset_regressions = Counter(
            "offset_regressions",
            "Partitions whose stored offset went back behind this consumer's last commit (the database lost"
            " acknowledged commits: a failover to a standby that was behind, a restore); re-read from there",
            namespace=NS,
            registry=r,
        )
        self.last_checkpoint = Gauge(
            "last_checkpoint_timestamp_seconds",
            "Unix time of the last committed batch (offsets and state)",
            namespace=NS,
            registry=r,
        )

    def _drift_metrics(self, r: CollectorRegistry) -> None:
        """Drift detectors: events, the statistic against its threshold, disabled detectors."""
        self.drift_events = Counter(
            "drift_events",
            "Drift events, by stream, signal and detector",
            ["stream", "signal", "detector"],
            namespace=NS,
            registry=r,
        )
        self.drift_statistic = Gauge(
            "drift_statistic",
            "Current test statistic of each drift detector",
            ["stream", "signal", "detector"],
            namespace=NS,
            registry=r,
        )
        self.drift_threshold = Gauge(
            "drift_threshold",
            "Current threshold of each drift detector",
            ["stream", "signal", "detector"],
            namespace=NS,
            registry=r,
        )
        self.detector_errors = Counter(
            "drift_detector_errors",
            "Detectors disabled after an error, by detector",
            ["detector"],
            namespace=NS,
            registry=r,
        )
        self.drift_state_refused = Counter(
            "drift_state_refused",
            "Checkpointed drift state not used (the signal warms up again), by reason: unreadable, "
            "version (another release's format), settings (detectors configured differently since)",
            ["reason"],
            namespace=NS,
            registry=r,
        )

    def _reward_metrics(self, r: CollectorRegistry) -> None:
        """Reward model: scores, the active version, updates and agreement with humans."""
        # Reward model (monitor/reward). Scores are unbounded Bradley-Terry logits; the buckets
        # cover the range seen on real traffic, and rate(sum)/rate(count) gives the mean trend.
        self.rm_score = Histogram(
            "rm_score",
            "Reward-model scores of episodes on the rm channel, by stream",
            ["stream"],
            namespace=NS,
            registry=r,
            buckets=(-6.0, -4.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0),
        )
        # The histogram cannot carry the sum: with negative buckets the OpenMetrics exposition
        # omits a histogram's _sum. Two counters carry it, the positive scores' sum and the negative
        # ones' (as a positive number): counters, so that increase() sees through a restart. A gauge of
        # the whole sum fell back to 0 with every restart, and delta() read the fall as a plunge of the
        # mean score that vetoed the reward-hacking alert for hours.
        self.rm_score_positive = Counter(
            "rm_score_positive",
            "Sum of the positive reward-model scores, by stream "
            "(mean = (increase of this - increase of rm_score_negative) / increase of rm_score_count)",
            ["stream"],
            namespace=NS,
            registry=r,
        )
        self.rm_score_negative = Counter(
            "rm_score_negative",
            "Sum of the negative reward-model scores' magnitudes, by stream (see rm_score_positive)",
            ["stream"],
            namespace=NS,
            registry=r,
        )
        self.rm_active_version = Gauge(
            "rm_active_version_info", "1 for the active reward-model version", ["version"], namespace=NS, registry=r
        )
        self.rm_last_training = Gauge(
            "rm_last_training_timestamp_seconds",
            "Unix time of the last finished reward-model training",
            namespace=NS,
            registry=r,
        )
        self.rm_updates = Counter(
            "rm_updates",
            "Reward-model updates, by outcome (promoted, rejected, undecided, failed)",
            ["outcome"],
            namespace=NS,
            registry=r,
        )
        self.rm_agreement = Gauge(
            "rm_human_agreement",
            "Fraction of recent human labels the active reward model agrees with, by stream",
            ["stream"],
            namespace=NS,
            registry=r,
        )
        # Sensitivity per perturbation kind (monitor/reward/sensitivity.py), computed when a version
        # is gated, promoted or first seen active, never per episode. Versions are bounded: one per
        # role (active, candidate), set through set_rm_sensitivity.
        self.rm_sensitivity = Gauge(
            "rm_sensitivity",
            "Share of perturbed/original probe pairs in which a reward-model version scores the worse"
            " version lower, by version and perturbation kind (0 with rm_sensitivity_pairs 0: not measured)",
            ["version", "kind"],
            namespace=NS,
            registry=r,
        )
        self.rm_sensitivity_pairs = Gauge(
            "rm_sensitivity_pairs",
            "Probe pairs behind rm_sensitivity, by version and perturbation kind",
            ["version", "kind"],
            namespace=NS,
            registry=r,
        )
        self._rm_sensitivity_roles: dict[str, tuple[str, tuple[str, ...]]] = {}

    def set_rm_sensitivity(self, role: str, version: str, values: dict[str, tuple[float, int]]) -> None:
        """Publish a version's (rate, pairs) per kind under ``role``, dropping the series of the
        version the role held before (unless another role still holds it)."""
        with self._lock:
            old = self._rm_sensitivity_roles.get(role)
            self._rm_sensitivity_roles[role] = (version, tuple(values))
            self._drop_rm_sensitivity(old)
            for kind, (rate, n) in values.items():
                self.rm_sensitivity.labels(version, kind).set(rate)
                self.rm_sensitivity_pairs.labels(version, kind).set(n)

    def rm_sensitivity_version(self, role: str) -> str | None:
        """The version whose sensitivity ``role`` shows (None: none published)."""
        with self._lock:
            held = self._rm_sensitivity_roles.get(role)
        return None if held is None else held[0]

    def clear_rm_sensitivity(self, role: str) -> None:
        """The role holds no version any more (a candidate decided): drop its series."""
        with self._lock:
            self._drop_rm_sensitivity(self._rm_sensitivity_roles.pop(role, None))

    def _drop_rm_sensitivity(self, old: tuple[str, tuple[str, ...]] | None) -> None:
        """Remove a version's series unless a role still holds it (the caller holds the lock)."""
        if old is None or any(v == old[0] for v, _ in self._rm_sensitivity_roles.values()):
            return
        for kind in old[1]:
            for g in (self.rm_sensitivity, self.rm_sensitivity_pairs):
                with contextlib.suppress(KeyError):
                    g.remove(old[0], kind)

    def _oversight_metrics(self, r: CollectorRegistry) -> None:
        """Oversight: the quality estimate, the reward-hacking flag and action requests."""
        # Human-rated quality over all traffic (Horvitz-Thompson from the labelled sample).
        self.quality_estimate = Gauge(
            "quality_estimate",
            "Horvitz-Thompson estimate of human-rated quality over all traffic, by stream and bound"
            " (estimate, ci_low, ci_high)",
            ["stream", "bound"],
            namespace=NS,
            registry=r,
        )
        self.reward_hacking = Gauge(
            "reward_hacking_suspected",
            "1 while the reward-model score trend rises and the human quality estimate falls or stays flat",
            ["stream"],
            namespace=NS,
            registry=r,
        )
        self.action_requests = Counter(
            "action_requests",
            "Retraining and reward-model update requests, by kind (retrain, rm_update), sink and outcome"
            " (sent, failed)",
            ["kind", "sink", "outcome"],
            namespace=NS,
            registry=r,
        )
        # Incident hygiene (monitor/actions/worker.py): pre-zeroed by the worker for its outcomes.
        self.incidents = Counter(
            "incidents",
            "Drift events taken by the action worker, by what they did to incidents (opened, attached,"
            " rate_limited) and incidents closed (closed_timeout, closed_rereference)",
            ["outcome"],
            namespace=NS,
            registry=r,
        )
        # How long the oversight gauges' last refresh took: actions.gauges_duty paces them by it.
        self.gauges_refresh_seconds = Gauge(
            "gauges_refresh_seconds",
            "Seconds the last refresh of the oversight gauges took (quality, agreement, reward hacking)",
            namespace=NS,
            registry=r,
        )
        # A step of the action worker that raised (retried next round): pre-zeroed by the worker.
        self.action_worker_errors = Counter(
            "action_worker_errors",
            "Rounds of an action-worker step that failed and were retried, by step (incidents, updates,"
            " dispatch, gauges, sensitivity)",
            ["step"],
            namespace=NS,
            registry=r,
        )
        self.incident_limit = Gauge(
            "incident_limit_per_stream_per_day",
            "actions.max_requests_per_stream_per_day: new incidents (with their requests) allowed per stream per 24 h",
            namespace=NS,
            registry=r,
        )
        self.incidents_last_day = Gauge(
            "incidents_last_day",
            "Incidents opened per stream in the last 24 h of event time",
            ["stream"],
            namespace=NS,
            registry=r,
        )

    def _readiness_metrics(self, r: CollectorRegistry) -> None:
        """Readiness, computed at scrape time from the checks of /readyz."""
        self.ready = Gauge(
            "ready",
            "1 when the pipeline can make progress: every check of /readyz passes (computed at scrape time)",
            namespace=NS,
            registry=r,
        )
        self.ready_check = Gauge(
            "ready_check",
            "1 when a check of /readyz passes (source, database, dead_letter; outbox in Kafka mode),"
            " computed at scrape time",
            ["check"],
            namespace=NS,
            registry=r,
        )

    def _inference_metrics(self, r: CollectorRegistry) -> None:
        """The inference workers (embeddings, scores off the ingest path): work, backlog, lag, and
        the rate factor their lag imposes on the model channels."""
        self.inference = inference = InferenceMetrics.on(r)
        self.inference_items = inference.items
        self.inference_backlog = inference.backlog
        self.inference_lag = inference.lag
        self.inference_capacity = inference.capacity
        self.sampling_throttle = Gauge(
            "sampling_throttle",
            "Factor (at most 1) applied to a model channel's rate while its inference workers lag",
            ["channel"],
            namespace=NS,
            registry=r,
        )

    def _retention_metrics(self, r: CollectorRegistry) -> None:
        """The purge of old stored episodes (``monitor/store/retention.py``)."""
        self.retention_deleted = Counter(
            "retention_deleted", "Rows deleted by the retention purge, by table", ["table"], namespace=NS, registry=r
        )
        self.retention_runs = Counter(
            "retention_runs", "Retention purges, by outcome (ok, failed)", ["outcome"], namespace=NS, registry=r
        )
        self.retention_last_success = Gauge(
            "retention_last_success_timestamp_seconds",
            "Unix time of the last retention purge that succeeded",
            namespace=NS,
            registry=r,
        )
        # What the alert reads: purges failed since the last success, whatever retention.every_s is (a
        # count of failures over a fixed window could not reach 2 when purges are 3 hours apart or more).
        self.retention_failures_in_a_row = Gauge(
            "retention_failures_in_a_row",
            "Retention purges failed since the last one that succeeded",
            namespace=NS,
            registry=r,
        )

    def _sqlite_metrics(self, r: CollectorRegistry) -> None:
        """A SQLite store's write-ahead log, checkpointed apart by the service (``monitor/store/wal.py``);
        the checkpointer zeroes its outcomes when it starts, so a PostgreSQL service shows none."""
        self.sqlite_checkpoints = Counter(
            "sqlite_checkpoints",
            "Checkpoints of the SQLite write-ahead log by the service's own thread, by outcome (ok, failed)",
            ["outcome"],
            namespace=NS,
            registry=r,
        )
        self.sqlite_wal_pages = Gauge(
            "sqlite_wal_pages",
            "Pages in the SQLite write-ahead log at the service's last checkpoint",
            namespace=NS,
            registry=r,
        )

    def _outbox_metrics(self, r: CollectorRegistry) -> None:
        """The outboxes of Kafka mode (``monitor/actions/outbox.py``), by table; each relay zeroes its
        own series when it starts, so a service without outboxes shows none."""
        self.outbox_published = Counter(
            "outbox_published", "Rows of an outbox published to Kafka, by outbox", ["outbox"], namespace=NS, registry=r
        )
        self.outbox_errors = Counter(
            "outbox_errors",
            "Failed publishing rounds of an outbox (its rows wait and are retried), by outbox",
            ["outbox"],
            namespace=NS,
            registry=r,
        )
        self.outbox_oldest = Gauge(
            "outbox_oldest_age_seconds",
            "How long the oldest row of an outbox still to publish has waited since its commit (0: none waits)",
            ["outbox"],
            namespace=NS,
            registry=r,
        )

    def _zero_known_labels(self) -> None:
        """Counters with a known, small label set start at 0: a series that first appears with
        value 1 is invisible to rate()/increase(), so the first dead letter or failed update
        would never alert."""
        from monitor.episodes import DEAD_LETTER_REASONS
        from monitor.sources.base import SOURCE_OPERATIONS

        for reason in DEAD_LETTER_REASONS:  # validation's reasons, store_rejected and internal_error
            self.dead_letters.labels(reason)
        for target in ("store", "dead_letter"):
            self.commit_errors.labels(target)
        for operation in SOURCE_OPERATIONS:
            self.source_errors.labels(operation)
        for outcome in ("promoted", "rejected", "undecided", "failed"):
            self.rm_updates.labels(outcome)
        self.inference.zero()
        for channel in ("drift", "rm"):
            self.sampling_throttle.labels(channel).set(1.0)
        for table in RETENTION_TABLES:
            self.retention_deleted.labels(table)
        for outcome in ("ok", "failed"):
            self.retention_runs.labels(outcome)

    def stream_label(self, stream: str | None) -> str:
        if stream is None:
            return UNKNOWN
        if stream in self._streams or stream in self._named:
            return stream
        with self._lock:
            if len(self._streams) < self.max_streams:
                self._streams.add(stream)
                return stream
        return OTHER


@dataclass(frozen=True)
class InferenceMetrics:
    """The inference workers' metrics: those of ``oversight run`` and, alone on a registry of its
    own, those of ``oversight infer`` (a worker process publishes no pipeline series, so no
    pipeline alert reads its zeros).

    >>> registry = CollectorRegistry()
    >>> m = InferenceMetrics.on(registry)
    >>> m.zero(); m.items.labels("embedding", "ok").inc(3)
    >>> registry.get_sample_value("oversight_inference_items_total", {"stage": "embedding", "outcome": "failed"})
    0.0
    """

    items: Counter
    backlog: Gauge
    lag: Gauge
    capacity: Gauge

    @classmethod
    def on(cls, r: CollectorRegistry) -> InferenceMetrics:
        return cls(
            Counter(
                "inference_items",
                "Items the inference workers computed, by stage (embedding, rm_score) and outcome (ok, failed; "
                "embedding shared: taken from the reward-model score's encoder pass, also counted ok; rm_score "
                "given_up: taken off the backlog after reward.backlog_give_up_after failures of its own)",
                ["stage", "outcome"],
                namespace=NS,
                registry=r,
            ),
            Gauge(
                "inference_backlog",
                "Committed samples waiting for an inference worker, by stage",
                ["stage"],
                namespace=NS,
                registry=r,
            ),
            Gauge(
                "inference_lag_seconds",
                "How long the oldest sample waiting for an inference worker has waited, by stage",
                ["stage"],
                namespace=NS,
                registry=r,
            ),
            Gauge(
                "inference_capacity_items_per_second",
                "Items per second of computing time of each inference worker",
                ["stage"],
                namespace=NS,
                registry=r,
            ),
        )

    def zero(self, backlogs: bool = True) -> None:
        """Pre-zeroed, so that the first failure shows in rate(). ``backlogs``: also the backlog
        gauges, which ``oversight run`` publishes and a worker process leaves to it (the same
        database-wide values from every worker would only repeat its series and alerts)."""
        for stage in ("embedding", "rm_score"):
            for outcome in ("ok", "failed"):
                self.items.labels(stage, outcome)
            if backlogs:
                self.backlog.labels(stage)
                self.lag.labels(stage)
        self.items.labels("embedding", "shared")
        self.items.labels("rm_score", "given_up")
