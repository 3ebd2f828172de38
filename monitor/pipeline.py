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
from collections import Counter as TallyCounter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import sqlalchemy as sa

from monitor.config import Settings
from monitor.deadletter import DeadLetter, DeadLetterSink
from monitor.episodes import Episode, InvalidEpisode, parse_episode
from monitor.metrics import Metrics
from monitor.sources.base import Record, Source
from monitor.store import BatchWrite, StaleOffsets, Store
from monitor.store.store import BUCKET_S
from sampling import CHANNELS, Decision, Sampler, StreamSamplingState, keyed_uniform

if TYPE_CHECKING:
    from monitor.drift import DriftMonitor

log = logging.getLogger(__name__)

SAMPLING_COMPONENT = "sampling"
INDEX_STREAM = "__input__"  # stream_state row holding a non-Kafka source's record count


class Aborted(RuntimeError):
    """Stopped while a batch could not be committed; it was not (it will be redelivered)."""


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


def make_sampler(settings: Settings, store: Store) -> Sampler:
    def load(stream: str) -> StreamSamplingState | None:
        snap = store.load_state(stream, SAMPLING_COMPONENT)
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
        self.sampler = sampler if sampler is not None else make_sampler(settings, store)
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

            self.labels_feed = DisagreementFeed(store, self.drift.observe_value)
            self.observers.insert(self.observers.index(self.drift), self.labels_feed)
        self.scores_publisher: Any = None  # an OutboxPublisher of rm_scores in Kafka mode
        self.clock = clock
        self.stats = RunStats()
        self.stop_event = threading.Event()
        self._expected: dict[int, int | None] = {}
        self._index = 0
        self._max_bytes = settings.source.max_episode_bytes
        self._key = settings.sampling_key()
        self._db_ok = True
        self._last_lag = 0.0
        self._opened = False
        self._kafka = False

    # -- rebalance protocol (called by the source) ----------------------------
    def assigned(self, partitions: list[int]) -> Mapping[int, int]:
        stored = self.store.load_offsets(self.source.name, partitions)
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

    def ready(self) -> bool:
        return self._opened and self._db_ok and self.source.ready()

    def open(self) -> None:
        if not self._opened:
            # The input index continues across restarts (a file source resumes mid-file);
            # Kafka records are indexed by their partition offset instead.
            self._kafka = self.source.name.startswith("kafka:")
            if not self._kafka:
                saved = self.store.load_state(INDEX_STREAM, self.source.name)
                self._index = int(saved["records"]) if saved else 0
            self.source.open(self)
            self._opened = True
            self._publish_floors()

    def run(self, stop: threading.Event | None = None) -> RunStats:
        """Process until the source is exhausted or ``stop`` is set; then close the source."""
        stop = stop if stop is not None else self.stop_event
        cfg = self.settings.pipeline
        self.open()
        try:
            while not stop.is_set():
                records = self.source.poll(cfg.batch_size, cfg.batch_timeout_ms / 1000.0)
                if records:
                    self.process_batch(records, stop)
                elif self.source.exhausted:
                    break
                self._maybe_update_lag()
                if self.drift is not None:
                    self.drift.poll_rereference()
        finally:
            self.close()
        return self.stats

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
        # The hot loop: every record of the deployment's traffic passes here.
        for rec in records:
            idx = rec.offset if kafka else idx + 1
            # Records arrive in offset order within a partition: the last one wins.
            next_offsets[rec.partition] = rec.next_offset
            try:
                if rec.full_size is not None:
                    raise InvalidEpisode("oversize", f"record is {rec.full_size} bytes, limit is {max_bytes}")
                ep = parse_episode(rec.value, max_bytes, now)
            except InvalidEpisode as e:
                letters.append(self._letter(rec, e.reason, e.detail, e.episode_id, e.stream))
                continue
            stream = ep.stream
            d = sampler.decide(ep.episode_id, stream, ep.timestamp)
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
                outcomes[(stream, "sampled")] += 1
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
                if "human" in d.sampled:
                    for slot in range(self._overlap(ep.episode_id)):
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
                    sampled_tally[(stream, ch)] += 1
            else:
                outcomes[(stream, "not_sampled")] += 1
            # Inline, not after the batch: a drift event's boost must apply from the very
            # next episode, whatever the batch boundaries (replays stay deterministic).
            for obs in observers:
                obs.observe(ep, d, idx)

        if not kafka:
            self._index = idx + 1
            batch.states[(INDEX_STREAM, source_name)] = {"records": self._index}
        stats.records += len(records)
        streams_seen = set(last_probs)

        for p, nxt in next_offsets.items():
            batch.offsets[(source_name, p)] = (self._expected.get(p), nxt)
        # Observers first: a drift event found at checkpoint time boosts the sampler,
        # and that boost must be in this batch's sampling checkpoint.
        for obs in observers:
            batch.states.update(obs.checkpoint())
        for stream, snap in sampler.take_dirty().items():
            batch.states[(stream, SAMPLING_COMPONENT)] = snap
        if self.drift is not None:
            batch.drift_events = self.drift.take_events()
            batch.audit_applied = self.drift.take_applied()
        if self.scorer is not None:
            batch.rm_scores = self.scorer.take_rows()

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

        # Bookkeeping after the commit, so stats and metrics count committed work.
        done = time.time()
        m = self.metrics
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
            log.warning("batch rolled back: %s; rewinding to the stored offsets", e)
            self.metrics.stale_batches.inc()
            self.stats.stale_batches += 1
            self._forget_state()
            self.source.rewind()
            return False
        return True

    def _send_letters(self, letters: list[DeadLetter]) -> None:
        if not letters:
            return
        for letter in letters:
            self.dead_letters.send(letter)
        self.dead_letters.flush()

    def _commit_store(self, batch: BatchWrite, letters: list[DeadLetter], stop: threading.Event | None) -> None:
        try:
            self.store.commit_batch(batch)
        except (sa.exc.DataError, sa.exc.IntegrityError, sa.exc.ProgrammingError) as e:
            # Not transient: some episode is unacceptable to this database
            # although it passed validation. Find it, dead-letter it, commit the rest.
            rejected = self.store.find_rejected(batch)
            if not rejected:
                raise
            log.warning("store rejected %d episode(s): %s", len(rejected), str(e).splitlines()[0][:200])
            extra = []
            for row in batch.episodes:
                if row["episode_id"] in rejected:
                    extra.append(
                        DeadLetter(
                            reason="store_rejected",
                            detail=rejected[row["episode_id"]][:500],
                            raw=_reencode(row),
                            source=row["source"],
                            partition=int(row["position"].split(":")[0]),
                            offset=int(row["position"].split(":")[1]),
                            received_at=row["ingested_at"],
                            size=0,
                            episode_id=row["episode_id"],
                            stream=row["stream"],
                        )
                    )
            for letter in extra:
                letter.size = len(letter.raw)
            self._retry(lambda: self._send_letters(extra), "dead_letter", stop)
            letters.extend(extra)
            batch.episodes = [r for r in batch.episodes if r["episode_id"] not in rejected]
            batch.samples = [r for r in batch.samples if r["episode_id"] not in rejected]
            batch.tasks = [r for r in batch.tasks if r["episode_id"] not in rejected]
            self.store.commit_batch(batch)
        self._db_ok = True

    def _retry(self, fn: Callable[[], None], target: str, stop: threading.Event | None) -> None:
        delay = 0.1
        while True:
            try:
                fn()
                return
            except StaleOffsets:
                raise
            except (sa.exc.OperationalError, sa.exc.InterfaceError, OSError, TimeoutError) as e:
                self._on_transient(target, e)
            except Exception as e:
                # kafka-python raises its own hierarchy for broker trouble.
                if type(e).__module__.startswith("kafka"):
                    self._on_transient(target, e)
                else:
                    raise
            if stop is not None and stop.wait(delay):
                raise Aborted(f"stopped while the {target} was unavailable; the batch will be redelivered")
            if stop is None:
                time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _on_transient(self, target: str, e: BaseException) -> None:
        self.metrics.commit_errors.labels(target).inc()
        if target == "store":
            self._db_ok = False
        log.warning(
            "%s unavailable, retrying: %s", target, str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        )

    def _maybe_update_lag(self) -> None:
        t = time.monotonic()
        if t - self._last_lag < 1.0:
            return
        self._last_lag = t
        topic = getattr(getattr(self.source, "cfg", None), "topic", self.source.name)
        for p, lag in self.source.lag().items():
            self.metrics.consumer_lag.labels(topic, str(p)).set(lag)
        self.metrics.ready.set(1 if self.ready() else 0)

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
    return json.dumps(obj, ensure_ascii=True, default=str).encode("ascii")
