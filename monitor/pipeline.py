"""The streaming pipeline: source -> validate -> sample -> store, one transaction per batch.

Order of effects for a batch: dead letters are written and flushed, then the
sampled rows, traffic counts, stream-state checkpoints and offsets commit in
one database transaction, then the source is told (Kafka commit). A crash at
any point redelivers the batch and the store ignores what it already has.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
from collections import Counter as TallyCounter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import sqlalchemy as sa

from monitor.config import Settings
from monitor.deadletter import DeadLetter, DeadLetterSink
from monitor.episodes import Episode, InvalidEpisode, parse_episode
from monitor.metrics import Metrics
from monitor.retry import Aborted as Aborted  # noqa: PLC0414 (re-exported: the CLI catches it from here)
from monitor.retry import Health, NoProgress, RetryPolicy, first_line, transient
from monitor.sources.base import ReadAhead, Record, Source
from monitor.store import BatchWrite, StaleOffsets, Store
from monitor.store.store import BUCKET_S
from sampling import CHANNELS, Decision, Sampler, StreamSamplingState, keyed_uniform

if TYPE_CHECKING:
    from monitor.drift import DriftMonitor

log = logging.getLogger(__name__)

SAMPLING_COMPONENT = "sampling"
INDEX_STREAM = "__input__"  # stream_state row holding a non-Kafka source's record count
READY_CHECKS = ("source", "database", "dead_letter")  # the checks of /readyz
PROBE_S = 1.0  # while idle, a write probe this often keeps the database check within seconds of the truth
STALE_LIMIT = 10  # batches rolled back in a row (offsets moved under us) before giving up
READ_AHEAD_DRAIN_S = 1.0  # on a stop, how long a pipe's already-read records are processed


def describe(e: BaseException, limit: int = 300) -> str:
    """``Class: first line of the message``, for a dead letter or a log line about an unexpected
    exception (the class says more than many messages do: ``KeyError: 'x'``)."""
    name = type(e).__name__
    text = first_line(e, limit)
    return name if text == name else f"{name}: {text}"


class EpisodeObserver(Protocol):
    """A later stage that sees every valid episode with its sampling decision."""

    def observe(self, episode: Episode, decision: Decision, index: int) -> None: ...

    def checkpoint(self) -> Mapping[tuple[str, str], dict[str, Any]]:
        """State changed since the last call, keyed by (stream, component)."""
        ...


@dataclass
class StreamStats:
    episodes: int = 0
    invalid: int = 0
    sampled: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 0))
    p_min: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CHANNELS, math.inf))
    p_max: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "episodes": self.episodes,
            "invalid": self.invalid,
            "sampled": dict(self.sampled),
            "inclusion_probability": {
                ch: {"min": self.p_min[ch], "max": self.p_max[ch]} for ch in CHANNELS if self.p_max[ch] > 0
            },
        }


@dataclass
class RunStats:
    records: int = 0
    invalid: int = 0
    sampled: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 0))
    dead_letters: TallyCounter[str] = field(default_factory=TallyCounter)
    streams: dict[str, StreamStats] = field(default_factory=dict)
    batches: int = 0
    stale_batches: int = 0
    drift_events: list[dict[str, Any]] = field(default_factory=list)


def index_component(source_name: str) -> str:
    """The ``stream_state`` component that holds a source's record count: its name, or, for a
    name longer than the column's 64 characters (a file's absolute path), its start and a hash."""
    if len(source_name) <= 64:
        return source_name
    import hashlib

    return f"{source_name[:47]}~{hashlib.sha256(source_name.encode()).hexdigest()[:16]}"


def make_sampler(settings: Settings, store: Store, retry: RetryPolicy | None = None) -> Sampler:
    def load(stream: str) -> StreamSamplingState | None:
        def get() -> dict[str, Any] | None:
            return store.load_state(stream, SAMPLING_COMPONENT)

        # Inside the hot loop: an outage here waits for the database (no decision without state).
        snap = get() if retry is None else retry.call(get, "store")
        return None if snap is None else StreamSamplingState.restore(snap)

    return Sampler(settings.sampling_policy(), settings.sampling_key(), loader=load)


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        source: Source,
        dead_letters: DeadLetterSink,
        metrics: Metrics,
        *,
        sampler: Sampler | None = None,
        observers: Iterable[EpisodeObserver] = (),
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.store = store
        self.source = source
        self.dead_letters = dead_letters
        self.metrics = metrics
        # One retry policy for every database and broker access on the pipeline's path; its
        # health is what /readyz and oversight_ready report. A failed store operation drops the
        # pooled connections: one opened while the database was read-only stays read-only.
        self.health = Health(metrics)
        self.retry = RetryPolicy(self.health, on_failure={"store": store.reconnect})
        self.sampler = sampler if sampler is not None else make_sampler(settings, store, self.retry)
        self.observers = list(observers)
        self.drift: DriftMonitor | None = None
        self.drift_publisher: Any = None  # an OutboxPublisher of drift_events in Kafka mode
        if settings.drift.enabled:
            from monitor.drift import DriftMonitor

            self.drift = DriftMonitor(
                settings.drift,
                store,
                settings.sampling_key(),
                metrics,
                lambda stream, factor, duration, reason: self.sampler.boost(stream, factor, duration, reason=reason),
                drift_rate=settings.sampling.drift.rate,
                retry=self.retry,
            )
            self.observers.append(self.drift)
        self.scorer: Any = None  # a RewardScorer when reward.enabled
        if settings.reward.enabled:
            from monitor.reward.registry import Registry
            from monitor.reward.scorer import RewardScorer

            drift = self.drift
            self.scorer = RewardScorer(
                settings.reward,
                Registry(store, settings.reward.models_dir, settings.reward.stream_set),
                metrics,
                feed=None if drift is None else drift.observe_value,
            )
            # Before drift: its checkpoint feeds rm_score values that drift's checkpoint saves.
            at = self.observers.index(drift) if drift is not None else len(self.observers)
            self.observers.insert(at, self.scorer)
        self.labels_feed: Any = None  # human/reward-model disagreement from new labels
        if self.drift is not None and settings.drift.signals.get("rm_disagreement"):
            from monitor.signals.disagreement import DisagreementFeed

            self.labels_feed = DisagreementFeed(store, self.drift.observe_value, retry=self.retry)
            self.observers.insert(self.observers.index(self.drift), self.labels_feed)
        self.scores_publisher: Any = None  # an OutboxPublisher of rm_scores in Kafka mode
        self.clock = clock
        self.stats = RunStats()
        self.stop_event = threading.Event()
        self._expected: dict[int, int | None] = {}
        self._index = 0
        self._max_bytes = settings.source.max_episode_bytes
        self._key = settings.sampling_key()
        self._last_lag = 0.0
        self._last_store_ok = 0.0  # monotonic time of the last successful store write
        self._stale_in_a_row = 0
        self._index_key = ""  # stream_state component of the input index (set by open)
        self._opened = False
        self._kafka = False
        self._internal_seen: set[str] = set()  # exception classes already logged with a traceback
        self._publish_readiness()

    # -- rebalance protocol (called by the source) ----------------------------
    def assigned(self, partitions: list[int]) -> Mapping[int, int]:
        # Called on the Kafka consumer thread during a rebalance, and on rewinds: an outage
        # waits here (the group's heartbeats go on in kafka-python's own thread).
        stored = self.retry.call(lambda: self.store.load_offsets(self.source.name, partitions), "store")
        for p in partitions:
            self._expected[p] = stored.get(p)
        return stored

    def revoked(self, partitions: list[int]) -> None:
        for p in partitions:
            self._expected.pop(p, None)
        # Streams on the revoked partitions now belong to another replica;
        # whatever we still own is reloaded from the checkpoint on next use.
        self._forget_state()

    def _forget_state(self) -> None:
        """Drop in-memory per-stream state; it reloads from the checkpoint on next use."""
        self.sampler.forget()
        for part in (self.drift, self.scorer, self.labels_feed):
            if part is not None:
                part.forget()

    # -- control -------------------------------------------------------------
    def boost(
        self, stream: str, factor: float, duration: float, channels: Iterable[str] = ("human", "rm"), reason: str = ""
    ) -> None:
        """Raise a stream's sampling rates for a while (used by drift handling)."""
        self.sampler.boost(stream, factor, duration, channels, reason)

    def readiness(self) -> dict[str, bool]:
        """The checks of /readyz: can the pipeline make progress against each target now?

        ``source``: opened and the source says it is live (Kafka: connected to the group
        coordinator and the partition leaders, not merely polling); ``database``: the last
        store operation (a batch, a read on the pipeline's path, or the write probe while idle)
        succeeded; ``dead_letter``: the last dead-letter write succeeded."""
        return {
            "source": self._opened and self.source.ready(),
            "database": self.health.ok("store"),
            "dead_letter": self.health.ok("dead_letter"),
        }

    def ready(self) -> bool:
        return all(self.readiness().values())

    def open(self) -> None:
        if not self._opened:
            # The input index continues across restarts (a file source resumes mid-file);
            # Kafka records are indexed by their partition offset instead.
            self._kafka = self.source.name.startswith("kafka:")
            if not self._kafka:
                key = self._index_key = index_component(self.source.name)
                saved = self.retry.call(lambda: self.store.load_state(INDEX_STREAM, key), "store")
                self._index = int(saved["records"]) if saved else 0
            self.source.open(self)
            self._opened = True
            self._publish_floors()

    def run(self, stop: threading.Event | None = None) -> RunStats:
        """Process until the source is exhausted or ``stop`` is set; then close the source.

        No outage ends it: batches wait in the retry policy and readiness says so. A stop
        processes what a pipe source already read."""
        stop = stop if stop is not None else self.stop_event
        cfg = self.settings.pipeline
        self.retry.stop = stop
        self.open()
        try:
            while not stop.is_set():
                records = self.source.poll(cfg.batch_size, cfg.batch_timeout_ms / 1000.0)
                if records:
                    self._process_with_retry(records, stop)
                elif self.source.exhausted:
                    break
                else:
                    self._probe_store_when_idle()
                self._maybe_update_lag()
                if self.drift is not None:
                    self.drift.poll_rereference()
            if stop.is_set():
                self._drain_read_ahead(stop)
        finally:
            self.close()
        return self.stats

    def _process_with_retry(self, records: list[Record], stop: threading.Event) -> None:
        """``process_batch``, redone from the checkpoint if an outage escapes it anyway.

        Every database access on the batch's path retries in place; this is the net under a
        path that does not (a stage added later). The batch is redone with the same records after
        the in-memory state is dropped (it reloads from the checkpoint, which matches the stored
        offsets), so its effects are still exactly once."""
        index, counted = self._index, self.stats.records
        delay = self.retry.first_delay_s
        while True:
            try:
                self.process_batch(records, stop)
                return
            except Aborted:
                raise
            except Exception as e:
                if not transient(e):
                    raise
                log.warning("batch interrupted by an outage, redoing it: %s", describe(e, 200))
                self.health.failed("store" if isinstance(e, sa.exc.SQLAlchemyError) else "source", e)
                self._index, self.stats.records = index, counted
                self._forget_state()
            self.retry.wait(delay, stop, "stopped during an outage; the batch will be redelivered")
            delay = min(delay * 2, self.retry.max_delay_s)

    def prepare_for_service(self) -> None:
        """Before a long-running service consumes: do now what a batch would otherwise do the
        first time (import torch and load the encoder and the active reward model: seconds, tens
        on a busy machine), and build drift detectors in the background from now on, so that a
        SIGTERM drain never waits for any of it."""
        if self.drift is not None:
            self.drift.arm_in_background()
        if self.scorer is not None:
            self.scorer.checkpoint()  # nothing pending yet: loads the active version, if any

    def _drain_read_ahead(self, stop: threading.Event) -> None:
        """On a stop, process the records a pipe source already took off its input (they cannot
        be read again), in small batches and for at most ``READ_AHEAD_DRAIN_S``: the drain has
        a deadline; what is left then is lost with the pipe, as what the writer had not yet
        written is."""
        if not isinstance(self.source, ReadAhead):
            return
        size = min(self.settings.pipeline.batch_size, 100)
        deadline = time.monotonic() + READ_AHEAD_DRAIN_S
        while time.monotonic() < deadline and (records := self.source.take_read_ahead(size)):
            self._process_with_retry(records, stop)
        left = len(self.source.take_read_ahead(1 << 30))
        if left:
            log.warning("stopped with %d records read from %s but not processed", left, self.source.name)

    def _probe_store_when_idle(self) -> None:
        """While no batch comes, one cheap write every ``PROBE_S`` keeps the ``database`` check
        honest: a plain SELECT succeeds on a full disk or a read-only database. One attempt, no
        retry: the loop must keep polling the source."""
        now = time.monotonic()
        if now - self._last_store_ok < PROBE_S:
            return
        self._last_store_ok = now
        try:
            self.store.probe_write()
        except Exception as e:
            if not transient(e):
                raise
            self.health.failed("store", e)
            self.store.reconnect()
        else:
            self.health.succeeded("store")

    def close(self) -> None:
        if self._opened:
            self._opened = False
            try:
                self.source.close()
            finally:
                self.dead_letters.close()
                if self.drift_publisher is not None:
                    self.drift_publisher.close()
                if self.scores_publisher is not None:
                    self.scores_publisher.close()

    # -- the batch -------------------------------------------------------------
    def process_batch(self, records: list[Record], stop: threading.Event | None = None) -> bool:
        """Validate, sample and commit a batch. Returns False if it was dropped or rolled back as stale."""
        with self.source.guard(records) as current:
            if not current:
                # Fetched before a rebalance or rewind: the records are fetched again.
                self.metrics.stale_batches.inc()
                self.stats.stale_batches += 1
                return False
            return self._process(records, stop)

    def _process(self, records: list[Record], stop: threading.Event | None) -> bool:
        t0 = time.perf_counter()
        now = self.clock()
        sampler = self.sampler
        stats = self.stats
        max_bytes = self._max_bytes
        source_name = self.source.name
        batch = BatchWrite()
        letters: list[DeadLetter] = []
        outcomes: TallyCounter[tuple[str, str]] = TallyCounter()
        sampled_tally: TallyCounter[tuple[str, str]] = TallyCounter()
        next_offsets: dict[int, int] = {}
        observers = self.observers

        traffic = batch.traffic
        streams = stats.streams
        last_probs: dict[str, dict[str, float]] = {}
        idx = self._index - 1
        kafka = self._kafka
        # The hot loop: every record of the deployment's traffic passes here. Nothing in it may
        # stop the batch: a record that fails in a way nobody foresaw (a bug in validation,
        # sampling or an observer) is dead-lettered as internal_error and the batch goes on.
        # Everything that can raise runs before the record touches the batch, so a failed
        # record is in no row and no count. What is not undone: the sampler's clock and budget
        # and the observers before the failing one have seen the episode (drift statistics,
        # a reward-model score queued, dropped below if its episode is not stored).
        failed = False
        for rec in records:
            idx = rec.offset if kafka else idx + 1
            # Records arrive in offset order within a partition: the last one wins.
            next_offsets[rec.partition] = rec.next_offset
            ep: Episode | None = None
            try:
                if rec.full_size is not None:
                    raise InvalidEpisode("oversize", f"record is {rec.full_size} bytes, limit is {max_bytes}")
                ep = parse_episode(rec.value, max_bytes, now)
                stream = ep.stream
                d = sampler.decide(ep.episode_id, stream, ep.timestamp)
                n_tasks = self._overlap(ep.episode_id) if "human" in d.sampled else 0
                # Inline, not after the batch: a drift event's boost must apply from the very
                # next episode, whatever the batch boundaries (replays stay deterministic).
                for obs in observers:
                    obs.observe(ep, d, idx)
            except InvalidEpisode as e:
                letters.append(self._letter(rec, e.reason, e.detail, e.episode_id, e.stream))
                continue
            except Exception as e:
                if transient(e):
                    raise  # the batch is redelivered; dead-lettering would lose a good record
                letters.append(self._internal_error(rec, e, ep))
                failed = True
                continue
            st = streams.get(stream)
            if st is None:
                st = streams[stream] = StreamStats()
                self.metrics.stream_label(stream)  # label slots go to streams in order of arrival
            st.episodes += 1
            probs = d.probabilities
            if last_probs.get(stream) is not probs:  # the sampler reuses one dict until rates change
                last_probs[stream] = probs
                for ch in CHANNELS:
                    p = probs[ch]
                    st.p_min[ch] = min(st.p_min[ch], p)
                    st.p_max[ch] = max(st.p_max[ch], p)
            key = (stream, int(ep.timestamp // BUCKET_S) * BUCKET_S)
            traffic[key] = traffic.get(key, 0) + 1
            if d.sampled:
                batch.episodes.append(
                    {
                        "episode_id": ep.episode_id,
                        "stream": stream,
                        "model": ep.model,
                        "ts": ep.timestamp,
                        "prompt": ep.prompt,
                        "response": ep.response,
                        "metadata": ep.metadata,
                        "source": source_name,
                        "position": f"{rec.partition}:{rec.offset}",
                        "ingested_at": now,
                    }
                )
                for slot in range(n_tasks):
                    batch.tasks.append(
                        {
                            "episode_id": ep.episode_id,
                            "slot": slot,
                            "stream": stream,
                            "status": "pending",
                            "created_at": now,
                        }
                    )
                for ch, p in d.sampled.items():
                    batch.samples.append(
                        {
                            "episode_id": ep.episode_id,
                            "channel": ch,
                            "stream": stream,
                            "ts": ep.timestamp,
                            "inclusion_probability": p,
                            "created_at": now,
                        }
                    )
            else:
                outcomes[(stream, "not_sampled")] += 1

        if not kafka:
            self._index = idx + 1
            batch.states[(INDEX_STREAM, self._index_key)] = {"records": self._index}
        stats.records += len(records)
        streams_seen = set(last_probs)

        for p, nxt in next_offsets.items():
            batch.offsets[(source_name, p)] = (self._expected.get(p), nxt)
        # Observers first: a drift event found at checkpoint time boosts the sampler,
        # and that boost must be in this batch's sampling checkpoint. Through the retry policy:
        # a checkpoint may read the database (new labels, the active reward-model version) and
        # fails before it changes anything, so calling it again after an outage is safe.
        for obs in observers:
            batch.states.update(self.retry.call(obs.checkpoint, "store", stop))
        for stream, snap in sampler.take_dirty().items():
            batch.states[(stream, SAMPLING_COMPONENT)] = snap
        if self.drift is not None:
            batch.drift_events = self.drift.take_events()
            batch.audit_applied = self.drift.take_applied()
        if self.scorer is not None:
            batch.rm_scores = self.scorer.take_rows()
            if failed:  # a score of an episode that failed after the scorer saw it has no row to refer to
                stored = {row["episode_id"] for row in batch.episodes}
                batch.rm_scores = [r for r in batch.rm_scores if r["episode_id"] in stored]

        if not self._commit(batch, letters, stop):
            return False
        for p, nxt in next_offsets.items():
            self._expected[p] = nxt
        self.source.commit(next_offsets)
        if batch.drift_events and self.drift_publisher is not None:
            try:
                self.drift_publisher.publish_pending()
            except Exception as e:  # the outbox keeps them; the next event or restart retries
                log.warning("publishing drift events failed (kept for retry): %s", e)
        if batch.rm_scores and self.scores_publisher is not None:
            try:
                self.scores_publisher.publish_pending()
            except Exception as e:  # the outbox keeps them
                log.warning("publishing reward-model scores failed (kept for retry): %s", e)

        # Bookkeeping after the commit, so stats and metrics count committed work: sampled
        # counts come from the rows committed, without those the store refused (dead letters now).
        done = time.time()
        m = self.metrics
        for row in batch.episodes:
            outcomes[(row["stream"], "sampled")] += 1
        for row in batch.samples:
            sampled_tally[(row["stream"], row["channel"])] += 1
        for (stream, ch), n in sampled_tally.items():
            stats.sampled[ch] += n
            stats.streams[stream].sampled[ch] += n
            m.sampled.labels(m.stream_label(stream), ch).inc(n)
        for (stream, outcome), n in outcomes.items():
            m.episodes.labels(m.stream_label(stream), outcome).inc(n)
        for letter in letters:
            stats.invalid += 1
            stats.dead_letters[letter.reason] += 1
            if letter.stream is not None:
                st = stats.streams.setdefault(letter.stream, StreamStats())
                st.invalid += 1
                if letter.reason == "store_rejected":
                    st.episodes -= 1  # counted as valid in the loop, before the store refused it
            m.dead_letters.labels(letter.reason).inc()
            m.episodes.labels(m.stream_label(letter.stream), "invalid").inc()
        for stream in streams_seen:
            label = m.stream_label(stream)
            rates = sampler.rates(stream)
            st = stats.streams[stream]
            for ch in CHANNELS:
                m.inclusion_probability.labels(label, ch).set(rates[ch])
                m.inclusion_probability_min.labels(label, ch).set(st.p_min[ch])
                m.sampling_floor.labels(label, ch).set(sampler.policy.channel(stream, ch).floor)
                m.boost_factor.labels(label, ch).set(sampler.boost_factor(stream, ch))
        for rec in records:
            m.latency.observe(done - rec.received_at)
        for ev in batch.drift_events:
            stats.drift_events.append(
                {
                    "index": ev["input_index"],
                    "episode_id": ev["episode_id"],
                    "stream": ev["stream"],
                    "signal": ev["signal"],
                    "detector": ev["detector"],
                    "statistic": ev["statistic"],
                    "threshold": ev["threshold"],
                }
            )
            m.drift_events.labels(m.stream_label(ev["stream"]), ev["signal"], ev["detector"]).inc()
        m.batches.inc()
        m.last_checkpoint.set(done)
        m.batch_seconds.observe(time.perf_counter() - t0)
        stats.batches += 1
        return True

    def _overlap(self, episode_id: str) -> int:
        """Reviewers for a human-sampled episode: ``review.overlap``, or 2 for a keyed-random
        ``review.overlap_fraction`` of items (inter-annotator agreement needs pairs)."""
        cfg = self.settings.review
        if cfg.overlap >= 2 or cfg.overlap_fraction <= 0:
            return cfg.overlap
        return 2 if keyed_uniform(self._key, episode_id, "overlap") < cfg.overlap_fraction else 1

    def _internal_error(self, rec: Record, e: Exception, ep: Episode | None) -> DeadLetter:
        """The dead letter of a record whose processing raised unexpectedly, logged: the
        traceback once per exception class (a poison stream must not flood the log), one line
        after that. The message is logged escaped: it may quote the record."""
        name = type(e).__name__
        where = f"{self.source.name}:{rec.partition}:{rec.offset}"
        detail = describe(e)
        if name in self._internal_seen:
            log.error("record %s dead-lettered as internal_error: %r", where, detail)
        else:
            self._internal_seen.add(name)
            frames = "".join(traceback.format_tb(e.__traceback__))
            log.error("record %s dead-lettered as internal_error: %r\n%s", where, detail, frames)
        return self._letter(
            rec, "internal_error", detail, None if ep is None else ep.episode_id, None if ep is None else ep.stream
        )

    def _letter(self, rec: Record, reason: str, detail: str, episode_id: str | None, stream: str | None) -> DeadLetter:
        return DeadLetter(
            reason=reason,
            detail=detail,
            raw=rec.value,
            source=self.source.name,
            partition=rec.partition,
            offset=rec.offset,
            received_at=rec.received_at,
            size=rec.full_size if rec.full_size is not None else len(rec.value),
            key=rec.key,
            episode_id=episode_id,
            stream=stream,
        )

    def _commit(self, batch: BatchWrite, letters: list[DeadLetter], stop: threading.Event | None) -> bool:
        self._retry(lambda: self._send_letters(letters), "dead_letter", stop)
        try:
            self._retry(lambda: self._commit_store(batch, letters, stop), "store", stop)
        except StaleOffsets as e:
            self._rolled_back(e, stop)
            return False
        self._stale_in_a_row = 0
        self._last_store_ok = time.monotonic()
        return True

    def _rolled_back(self, e: StaleOffsets, stop: threading.Event | None) -> None:
        """Another consumer moved the offsets: forget the batch's state, wait, and rewind to the
        stored offsets. A rewind that keeps failing is not progress (a consumer that can never
        win the compare-and-set): counted, backed off, and given up after ``STALE_LIMIT``."""
        self._stale_in_a_row += 1
        n = self._stale_in_a_row
        self.metrics.stale_batches.inc()
        self.stats.stale_batches += 1
        self._forget_state()
        if n > STALE_LIMIT:
            raise NoProgress(
                f"gave up after {STALE_LIMIT} batches in a row were rolled back: {e}. Another consumer keeps"
                f" moving the offsets of {self.source.name}, or this input was already stored by another run"
            )
        log.warning("batch rolled back (%d in a row): %s; rewinding to the stored offsets", n, e)
        # Backoff before the rewind, so that a competing writer can finish and the rewind sees it.
        self.retry.wait(
            min(self.retry.first_delay_s * 2 ** (n - 1), self.retry.max_delay_s),
            stop,
            "stopped while rewinding a rolled-back batch; it will be redelivered",
        )
        self.source.rewind()

    def _send_letters(self, letters: list[DeadLetter]) -> None:
        if not letters:
            return
        for letter in letters:
            self.dead_letters.send(letter)
        self.dead_letters.flush()

    def _commit_store(self, batch: BatchWrite, letters: list[DeadLetter], stop: threading.Event | None) -> None:
        try:
            self.store.commit_batch(batch)
        except Exception as e:
            if transient(e) or isinstance(e, StaleOffsets):
                raise
            # Not transient: some episode is unacceptable to this database (or to the driver's
            # encoder) although it passed validation. Find it, dead-letter it, commit the rest.
            rejected = self.store.find_rejected(batch)
            if not rejected:
                raise
            log.warning("store rejected %d episode(s): %r", len(rejected), describe(e, 200))
            self._reject_rows(batch, rejected, letters, stop)
            self.store.commit_batch(batch)

    def _reject_rows(
        self, batch: BatchWrite, rejected: Mapping[str, str], letters: list[DeadLetter], stop: threading.Event | None
    ) -> None:
        """Dead-letter the rejected episodes (flushed before the commit, as all dead letters) and
        take them out of the batch: rows, and their traffic count, so each record is counted once."""
        extra = []
        for row in batch.episodes:
            if row["episode_id"] in rejected:
                raw = _reencode(row)
                partition, offset = row["position"].split(":")
                extra.append(
                    DeadLetter(
                        reason="store_rejected",
                        detail=rejected[row["episode_id"]][:500],
                        raw=raw,
                        source=row["source"],
                        partition=int(partition),
                        offset=int(offset),
                        received_at=row["ingested_at"],
                        size=len(raw),
                        episode_id=row["episode_id"],
                        stream=row["stream"],
                    )
                )
                key = (row["stream"], int(row["ts"] // BUCKET_S) * BUCKET_S)
                left = batch.traffic.get(key, 0) - 1
                if left > 0:
                    batch.traffic[key] = left
                else:
                    batch.traffic.pop(key, None)
        self._retry(lambda: self._send_letters(extra), "dead_letter", stop)
        letters.extend(extra)
        batch.episodes = [r for r in batch.episodes if r["episode_id"] not in rejected]
        batch.samples = [r for r in batch.samples if r["episode_id"] not in rejected]
        batch.tasks = [r for r in batch.tasks if r["episode_id"] not in rejected]
        batch.rm_scores = [r for r in batch.rm_scores if r["episode_id"] not in rejected]

    def _retry(self, fn: Callable[[], None], target: str, stop: threading.Event | None) -> None:
        self.retry.call(fn, target, stop)

    def _maybe_update_lag(self) -> None:
        t = time.monotonic()
        if t - self._last_lag < 1.0:
            return
        self._last_lag = t
        topic = getattr(getattr(self.source, "cfg", None), "topic", self.source.name)
        for p, lag in self.source.lag().items():
            self.metrics.consumer_lag.labels(topic, str(p)).set(lag)

    def _publish_readiness(self) -> None:
        """``oversight_ready`` and ``oversight_ready_check{check}`` are computed at scrape time
        by the same function as /readyz, so the gauge and the endpoint always agree (a value set
        by the pipeline thread would go stale while that thread waits out an outage)."""

        def check(name: str | None) -> Callable[[], float]:
            def value() -> float:
                try:
                    checks = self.readiness()
                except Exception:  # a scrape must not fail because a check did
                    return 0.0
                return float(all(checks.values()) if name is None else checks.get(name, False))

            return value

        self.metrics.ready.set_function(check(None))
        for name in READY_CHECKS:
            self.metrics.ready_check.labels(name).set_function(check(name))

    def _publish_floors(self) -> None:
        m = self.metrics
        for ch in CHANNELS:
            m.sampling_floor.labels("default", ch).set(self.sampler.policy.channel("default", ch).floor)

    def report(self, drift_events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        s = self.stats
        return {
            "episodes": s.records,
            "invalid": s.invalid,
            "sampled": dict(s.sampled),
            "dead_letters": dict(sorted(s.dead_letters.items())),
            "drift_events": list(drift_events if drift_events is not None else s.drift_events),
            "streams": {name: st.to_dict() for name, st in sorted(s.streams.items())},
        }


def _reencode(row: Mapping[str, Any]) -> bytes:
    import json

    obj = {k: row[k] for k in ("episode_id", "stream", "model", "prompt", "response", "metadata")}
    obj["timestamp"] = row["ts"]
    try:
        return json.dumps(obj, ensure_ascii=True, default=str).encode("ascii")
    except (ValueError, TypeError, RecursionError) as e:
        # The metadata may be what the store refused to encode; the dead letter must still be written.
        obj["metadata"] = {"unencodable": describe(e, 200)}
        return json.dumps(obj, ensure_ascii=True, default=str).encode("ascii")
