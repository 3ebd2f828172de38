"""The streaming pipeline: source -> validate -> sample -> store, one transaction per batch.

Order of effects for a batch: dead letters are written and flushed, then the
sampled rows, traffic counts, stream-state checkpoints and offsets commit in
one database transaction, then the source is told (Kafka commit), then the
after-commit hooks run (outbox publishers). A crash at any point redelivers the
batch and the store ignores what it already has.

A batch goes through four steps, each a method below: the hot loop
(:meth:`Pipeline._draft`: validate, sample, observe), the checkpoint assembly
(:meth:`Pipeline._assemble`), the commit (:meth:`Pipeline._commit`, in
``monitor.pipeline.commit``) and the accounting of what committed
(:meth:`Pipeline._account`). The stages that watch the episodes (drift, scoring)
are handed in by the composition root as :class:`EpisodeObserver` s.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from monitor.config import Settings
from monitor.episodes import Episode, InvalidEpisode, parse_episode
from monitor.episodes.deadletter import DeadLetter, DeadLetterSink
from monitor.metrics import Metrics
from monitor.pipeline.commit import LATE_REASONS, Committer, describe
from monitor.pipeline.dedup import RecentEpisodes
from monitor.pipeline.held import HeldStreams
from monitor.pipeline.stages import EpisodeObserver
from monitor.pipeline.stats import BatchTally, RunStats
from monitor.retry import Aborted, Health, RetryPolicy, transient
from monitor.sources.base import ReadAhead, Record, Source
from monitor.store import BatchWrite, Store
from monitor.store.store import BUCKET_S
from sampling import CHANNELS, Sampler, StreamSamplingState, keyed_uniform, rewind_clock

log = logging.getLogger(__name__)

SAMPLING_COMPONENT = "sampling"
READY_CHECKS = ("source", "database", "dead_letter")  # the checks of /readyz
PROBE_S = 1.0  # while idle, a write probe this often keeps the database check within seconds of the truth
READ_AHEAD_DRAIN_S = 1.0  # on a stop, how long a pipe's already-read records are processed

AfterCommit = Callable[[BatchWrite], None]


def index_key(source_name: str) -> str:
    """The internal-state key of a non-Kafka source's record count (the input index)."""
    return f"input_index:{source_name}"


def make_sampler(settings: Settings, store: Store, retry: RetryPolicy | None = None) -> Sampler:
    def load(stream: str) -> StreamSamplingState | None:
        def get() -> dict[str, Any] | None:
            return store.load_state(stream, SAMPLING_COMPONENT)

        # Inside the hot loop: an outage here waits for the database (no decision without state).
        snap = get() if retry is None else retry.call(get, "store")
        if snap is None:
            return None
        state = StreamSamplingState.restore(snap)
        limit = settings.source.max_future_s
        if limit is not None and rewind_clock(state, time.time() + limit):
            # Checkpointed before source.max_future_s refused such records, by a version without it.
            log.warning(
                "stream %r: its sampling clock was at %s, beyond source.max_future_s (a record stamped in"
                " the future, accepted before); restarting it from the next episode, without its boosts",
                stream,
                snap.get("clock"),
            )
        return state

    return Sampler(settings.sampling_policy(), settings.sampling_key(), loader=load)


@dataclass
class LoopHooks:
    """How a driver (``oversight run``, replay, simulate) takes part in :meth:`Pipeline.run`."""

    #: After each committed (or dropped) batch, with its records: a progress bar, a simulation round.
    after_batch: Callable[[list[Record]], None] | None = None
    #: When a poll returned nothing (and the source is not exhausted): True ends the loop.
    when_idle: Callable[[], bool] | None = None
    #: The stages' idle work (re-reference polls, detectors built in the background). Off for
    #: drivers whose result must not depend on wall time (replay, simulate).
    stage_idle_work: bool = True
    max_records: int | None = None


@dataclass
class Draft:
    """What the hot loop made of a batch, before anything is committed."""

    batch: BatchWrite
    letters: list[DeadLetter]
    next_offsets: dict[int, int]
    tally: BatchTally = field(default_factory=BatchTally)
    next_index: int = 0
    failed: bool = False  # a record raised unexpectedly after an observer saw it


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        source: Source,
        dead_letters: DeadLetterSink,
        metrics: Metrics,
        *,
        retry: RetryPolicy | None = None,
        sampler: Sampler | None = None,
        observers: Iterable[EpisodeObserver] = (),
        after_commit: Iterable[AfterCommit] = (),
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
        stall_s = settings.pipeline.stall_timeout_s
        self.retry = (
            retry
            if retry is not None
            else RetryPolicy(Health(metrics, stall_s=stall_s), on_failure={"store": store.reconnect})
        )
        self.health = self.retry.health
        self.sampler = sampler if sampler is not None else make_sampler(settings, store, self.retry)
        self.observers: list[EpisodeObserver] = list(observers)
        self._prepare_seen: set[tuple[str, str]] = set()  # (stage, exception class) whose traceback was logged
        self.after_commit: list[AfterCommit] = list(after_commit)
        self.clock = clock
        # At the end of a finite input, wait for the inference workers' backlog (the service
        # with its workers sets it: `oversight run --input FILE` reports on every episode).
        self.settle_at_end = False
        self.stats = RunStats(max_streams=settings.pipeline.max_streams)
        self.stop_event = threading.Event()
        self.recent = RecentEpisodes(settings.pipeline.duplicate_window)
        self.held = HeldStreams(settings.pipeline.max_streams, known=self._known_streams)
        self.committer = Committer(
            store,
            source,
            dead_letters,
            self.retry,
            metrics,
            self.stats,
            self._forget_state,
            statement_timeout_s=stall_s,
        )
        self._expected: dict[int, int | None] = {}
        self._index = 0
        self._max_bytes = settings.source.max_episode_bytes
        self._key = settings.sampling_key()
        self._last_source_publish = 0.0
        self._source_failures: dict[str, int] = {}  # the source's counts already added to the metric
        self._lag_published: set[str] = set()  # partitions whose consumer_lag series this replica set
        self._last_store_ok = 0.0  # monotonic time of the last successful store write
        self._index_key = ""  # internal-state key of the input index (set by open)
        self._opened = False
        self._kafka = False
        self._publish_readiness()

    @property
    def index(self) -> int:
        """Records of a non-Kafka source processed so far, across restarts (the input index)."""
        return self._index

    # -- rebalance protocol (called by the source) ----------------------------
    def assigned(self, partitions: list[int]) -> Mapping[int, int]:
        # Called on the Kafka consumer thread during a rebalance, and on rewinds: an outage
        # waits here (the group's heartbeats go on in kafka-python's own thread).
        stored = self.retry.call(lambda: self.store.load_offsets(self.source.name, partitions), "store")
        for p in partitions:
            self._expected[p] = stored.get(p)
        if self._opened and not self._kafka:
            # A rewind: the input index goes back with the offsets (the same transaction wrote both).
            self._load_index()
        return stored

    def _load_index(self) -> None:
        key = self._index_key
        saved = self.retry.call(lambda: self.store.load_internal(key), "store")
        self._index = int(saved["records"]) if saved else 0

    def revoked(self, partitions: list[int]) -> None:
        for p in partitions:
            self._expected.pop(p, None)
        # Streams on the revoked partitions now belong to another replica;
        # whatever we still own is reloaded from the checkpoint on next use.
        self._forget_state()

    def _known_streams(self, streams: Collection[str]) -> set[str]:
        """Those of ``streams`` whose sampling checkpoint the store holds. In the hot loop, like the
        sampler's own read: an outage waits for the database."""
        return self.retry.call(lambda: self.store.with_state(streams, SAMPLING_COMPONENT), "store")

    def _forget_state(self) -> None:
        """Drop in-memory per-stream state; it reloads from the checkpoint on next use."""
        self.recent.forget()
        self.held.forget()
        self.sampler.forget()
        for obs in self.observers:
            obs.forget()

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
                self._index_key = index_key(self.source.name)
                self._load_index()
            if self._kafka:
                # A broker down when the service starts is an outage like any other: retried (the
                # source check of /readyz red meanwhile) until it is back or the run is stopped. A
                # file that cannot be opened is not: that fails the command with its reason.
                self.retry.call(lambda: self.source.open(self), "source")
            else:
                self.source.open(self)
            self._opened = True
            self._publish_floors()

    def run(self, stop: threading.Event | None = None, hooks: LoopHooks | None = None) -> Any:
        """The loop of every driver: process until the source is exhausted, ``stop`` is set or a
        hook ends it; then close the source. Returns the run's :class:`RunStats`.

        No outage ends it: batches wait in the retry policy and readiness says so. A stop
        processes what a pipe source already read."""
        stop = stop if stop is not None else self.stop_event
        hooks = hooks if hooks is not None else LoopHooks()
        cfg = self.settings.pipeline
        size = cfg.batch_size if hooks.max_records is None else min(cfg.batch_size, hooks.max_records)
        self.retry.stop = stop
        self.open()
        try:
            while not stop.is_set():
                records = self.source.poll(size, cfg.batch_timeout_ms / 1000.0)
                if records:
                    self._process_with_retry(records, stop)
                    if hooks.after_batch is not None:
                        hooks.after_batch(records)
                elif self.source.exhausted:
                    if self.settle_at_end and hooks.stage_idle_work:
                        self._settle(stop)
                    break
                else:
                    self._probe_store_when_idle()
                    if hooks.when_idle is not None and hooks.when_idle():
                        break
                if hooks.stage_idle_work:
                    self._stage_idle_work(stop, idle=not records)
                self._maybe_publish_source()
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
        offsets), so its effects are still exactly once, and nothing was counted (stats and
        metrics count committed batches only)."""
        index = self._index
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
                self.health.failed("store" if type(e).__module__.startswith("sqlalchemy") else "source", e)
                self._index = index
                self._forget_state()
            self.retry.wait(delay, stop, "stopped during an outage; the batch will be redelivered")
            delay = min(delay * 2, self.retry.max_delay_s)

    def _stage_idle_work(self, stop: threading.Event, *, idle: bool) -> None:
        """The stages' work between batches. When the source is quiet and a stage has state to
        commit (detectors built in the background, fed the values that waited for them), commit
        it now: waiting for the stream's next episode could take hours. Under the source's guard,
        so that a rebalance cannot move the streams while their state is written."""
        pending = False
        for obs in self.observers:
            pending = obs.between_batches() or pending
        if pending and idle:
            with self.source.guard([]):
                batch = BatchWrite()
                self._assemble(batch, stop)
                if self.committer.commit(batch, [], stop):
                    self._after_commit(batch)
                    self.stats.add_drift_events(self.committer.account_events(batch))

    def _settle(self, stop: threading.Event) -> None:
        """The input is exhausted: wait for the inference workers to finish what its episodes left
        them (embeddings, scores), committing their results as they come, for at most
        ``inference.settle_timeout_s``. What is left then waits in the store for the next run."""
        deadline = time.monotonic() + self.settings.inference.settle_timeout_s
        while not stop.is_set() and any(obs.outstanding() for obs in self.observers):
            if time.monotonic() > deadline:
                log.warning(
                    "input exhausted; inference work still waiting after %.0f s (inference.settle_timeout_s):"
                    " it waits in the database for the next run",
                    self.settings.inference.settle_timeout_s,
                )
                return
            self._stage_idle_work(stop, idle=True)
            stop.wait(0.05)

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
        if now - max(self._last_store_ok, self.committer.last_ok) < PROBE_S:
            return
        self._last_store_ok = now
        try:
            self.retry.attempt(self.store.probe_write, "store")
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
                self._publish_source_failures()  # the last second's, before the final scrape
                self.source.close()
            finally:
                self.dead_letters.close()

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
        draft = self._draft(records, now)
        batch = draft.batch
        if not self._kafka:
            batch.internal[self._index_key] = {"records": draft.next_index}
        for p, nxt in draft.next_offsets.items():
            batch.offsets[(self.source.name, p)] = (self._expected.get(p), nxt)
        self._assemble(batch, stop)
        if draft.failed:  # a score of an episode that failed after the scorer saw it has no row to refer to
            stored = {row["episode_id"] for row in batch.episodes}
            batch.rm_scores = [r for r in batch.rm_scores if r["episode_id"] in stored]
        if not self._commit(batch, draft.letters, stop):
            return False
        if not self._kafka:
            self._index = draft.next_index
        for p, nxt in draft.next_offsets.items():
            self._expected[p] = nxt
        self.source.commit(draft.next_offsets)
        self._after_commit(batch)
        self._account(records, draft, t0)
        return True

    def _commit(self, batch: BatchWrite, letters: list[DeadLetter], stop: threading.Event | None) -> bool:
        """Commit the batch; its episodes join the window of recent ones only if it committed,
        without those the store refused (dead letters now, appended to ``letters``)."""
        recent = self.recent
        try:
            done = self.committer.commit(batch, letters, stop)
        except BaseException:
            recent.discard()
            raise
        if not done:
            recent.discard()
            return False
        refused = [
            recent.key(x.stream, x.episode_id)
            for x in letters
            if x.reason in LATE_REASONS and x.stream is not None and x.episode_id is not None
        ]
        recent.drop(refused)
        recent.commit()
        return True

    def _draft(self, records: list[Record], now: float) -> Draft:
        """The hot loop: every record of the deployment's traffic passes here, in three steps:
        admit (parse, validate, deduplicate, the replica's streams), prepare (the observers take
        the admitted episodes at once, see :meth:`_prepare`), then sample and observe each.

        Nothing in it may stop the batch: a record that fails in a way nobody foresaw (a bug in
        validation, sampling or an observer) is dead-lettered as internal_error and the batch
        goes on. Everything that can raise runs before the record touches the batch, so a failed
        record is in no row and no count. What is not undone: the sampler's clock and budget
        and the observers before the failing one have seen the episode (drift statistics, a
        reward-model score queued, dropped in ``_process`` if its episode is not stored)."""
        draft = Draft(BatchWrite(), [], {})
        admitted = self._admit(records, draft, now)
        self._rewind_clocks({a[1].stream for a in admitted}, now)
        self._prepare(admitted)
        batch, letters, tally = draft.batch, draft.letters, draft.tally
        traffic = batch.traffic
        sampler, observers, recent = self.sampler, self.observers, self.recent
        source_name = self.source.name
        for rec, ep, key, idx in admitted:
            stream = ep.stream
            try:
                d = sampler.decide(ep.episode_id, stream, ep.timestamp)
                n_tasks = self._overlap(ep.episode_id) if "human" in d.sampled else 0
                # Inline, not after the batch: a drift event's boost must apply from the very
                # next episode, whatever the batch boundaries (replays stay deterministic).
                for obs in observers:
                    obs.observe(ep, d, idx)
            except Exception as e:
                if transient(e):
                    raise  # the batch is redelivered; dead-lettering would lose a good record
                recent.drop([key])
                letters.append(self.committer.internal_error(rec, source_name, e, ep))
                draft.failed = True
                continue
            tally.saw(stream, d.probabilities)
            bucket = (stream, int(ep.timestamp // BUCKET_S) * BUCKET_S)
            traffic[bucket] = traffic.get(bucket, 0) + 1
            if d.sampled:
                self._rows(batch, ep, d.sampled, n_tasks, f"{rec.partition}:{rec.offset}", now)
            else:
                tally.not_sampled[stream] += 1
        return draft

    def _rewind_clocks(self, streams: Iterable[str], now: float) -> None:
        """Bring back the sampling clock of each of ``streams`` that is further ahead of ``now``
        than ``source.max_future_s`` allows (:meth:`Sampler.rewind`), before the batch's decisions.

        Episodes without a timestamp take the host's clock, and a stream's clock only moves
        forward: a wall clock stepped ahead for a moment (a bad NTP answer) left it there, its
        review budget's window frozen (the rate of the step's window held for as long as the step
        was long) and its boosts ended, or made to last that much longer. Once the host's clock is
        set right, no episode can be that far ahead of it (validation refuses one), so the clock is
        restarted from the batch's episodes. Estimates stay unbiased: every sample keeps the
        inclusion probability it was drawn with, only later decisions change."""
        limit = self.settings.source.max_future_s
        if limit is None:
            return
        not_after = now + limit
        for stream in streams:
            clock = self.sampler.rewind(stream, not_after)
            if clock is not None:
                log.warning(
                    "stream %r: its sampling clock was %.0f s ahead of this host's clock (%.0f s past"
                    " source.max_future_s): the clock stepped back, after episodes were stamped with it"
                    " while it was ahead; restarting it from the next episode, without its boosts, the"
                    " review budget's rate as it was before the clock leapt",
                    stream,
                    clock - now,
                    clock - not_after,
                )

    def _admit(self, records: list[Record], draft: Draft, now: float) -> list[tuple[Record, Episode, int, int]]:
        """The batch's episodes that go on to be sampled, in order, with their dedup key and input
        index; the others become dead letters or count as duplicates. Each admitted episode is
        taken in the window of recent ones at once, so a copy later in the batch is a duplicate
        (:meth:`_draft` gives the key back if its episode fails after all; a copy later in the
        same batch has been counted a duplicate by then, and the failed one is a dead letter with
        its raw bytes)."""
        letters, tally, next_offsets = draft.letters, draft.tally, draft.next_offsets
        max_bytes, kafka, recent, held = self._max_bytes, self._kafka, self.recent, self.held
        max_future_s = self.settings.source.max_future_s
        source_name = self.source.name
        admitted: list[tuple[Record, Episode, int, int]] = []
        # Records of streams whose admission needs a read of the store (past pipeline.max_streams),
        # with their place in the batch: decided after the loop, with one read for all their names.
        undecided: list[tuple[int, Record, Episode, int, int]] = []
        idx = self._index - 1
        for rec in records:
            idx = rec.offset if kafka else idx + 1
            # Records arrive in offset order within a partition: the last one wins.
            next_offsets[rec.partition] = rec.next_offset
            ep: Episode | None = None
            try:
                if rec.undecodable is not None:
                    raise InvalidEpisode("undecodable", rec.undecodable)
                if rec.full_size is not None:
                    raise InvalidEpisode("oversize", f"record is {rec.full_size} bytes, limit is {max_bytes}")
                ep = parse_episode(rec.value, max_bytes, now, max_future_s)
                stream = ep.stream
                key = recent.key(stream, ep.episode_id)
                if held.undecided(stream):
                    undecided.append((len(admitted), rec, ep, key, idx))
                    continue
                if recent.seen(key):
                    tally.duplicates[stream] += 1
                    continue
                self._hold(ep)
            except InvalidEpisode as e:
                letters.append(self.committer.letter(rec, source_name, e.reason, e.detail, e.episode_id, e.stream))
                continue
            except Exception as e:
                if transient(e):
                    raise  # the batch is redelivered; dead-lettering would lose a good record
                letters.append(self.committer.internal_error(rec, source_name, e, ep))
                draft.failed = True
                continue
            recent.take(key)
            admitted.append((rec, ep, key, idx))
        draft.next_index = idx + 1
        return self._decide_undecided(undecided, admitted, draft) if undecided else admitted

    def _hold(self, ep: Episode) -> None:
        """The replica holds the episode's stream (at once, or as one the store knows), else ``too_many_streams``."""
        if not self.held.admit(ep.stream):
            raise InvalidEpisode(
                "too_many_streams",
                f"this replica holds {self.held.limit} streams (pipeline.max_streams); {ep.stream!r} is not one",
                ep.episode_id,
                ep.stream,
            )

    def _decide_undecided(
        self,
        undecided: list[tuple[int, Record, Episode, int, int]],
        admitted: list[tuple[Record, Episode, int, int]],
        draft: Draft,
    ) -> list[tuple[Record, Episode, int, int]]:
        """Admit or refuse the records :meth:`_admit` set aside, after one read of the store for all
        their streams (an outage raises: the batch is redelivered). Each goes back where it came in
        the batch (``before``: how many admitted records came before it), so that sampling,
        deduplication and the observers see every stream's episodes in input order. Their streams
        were not held, so no admitted record shares one with them."""
        self.held.learn({ep.stream for _, _, ep, _, _ in undecided})
        recent, tally, letters, source_name = self.recent, draft.tally, draft.letters, self.source.name
        out: list[tuple[Record, Episode, int, int]] = []
        taken = 0  # of ``admitted``, already in ``out``
        for before, rec, ep, key, idx in undecided:
            out.extend(admitted[taken:before])
            taken = before
            if recent.seen(key):
                tally.duplicates[ep.stream] += 1
                continue
            try:
                self._hold(ep)
            except InvalidEpisode as e:
                letters.append(self.committer.letter(rec, source_name, e.reason, e.detail, e.episode_id, e.stream))
                continue
            except Exception as e:  # as in _admit's loop: an outage redelivers the batch, a bug is this record's
                if transient(e):
                    raise
                letters.append(self.committer.internal_error(rec, source_name, e, ep))
                draft.failed = True
                continue
            recent.take(key)
            out.append((rec, ep, key, idx))
        out.extend(admitted[taken:])
        return out

    def _prepare(self, admitted: list[tuple[Record, Episode, int, int]]) -> None:
        """Each observer takes the batch's admitted episodes at once (``EpisodeObserver.prepare``).

        One that fails in a way nobody foresaw drops its in-memory state (``forget``: it reloads
        from the last checkpoint, which no part of this batch has reached) and sees the batch
        one episode at a time instead, where a record that fails is dead-lettered alone."""
        episodes = [(ep, idx) for _, ep, _, idx in admitted]
        for obs in self.observers:
            try:
                obs.prepare(episodes)
            except Exception as e:
                if transient(e):
                    raise  # the batch is redone after the outage
                self._prepare_failed(type(obs).__name__, e)
                obs.forget()

    def _prepare_failed(self, stage: str, e: Exception) -> None:
        """Logged as a record's internal error is: the traceback once per stage and exception
        class (a bug met at every batch must not flood the log), one line after that; the message
        escaped (it may quote a record)."""
        seen = (stage, type(e).__name__)
        frames = "" if seen in self._prepare_seen else "\n" + "".join(traceback.format_tb(e.__traceback__))
        self._prepare_seen.add(seen)
        log.error("%s could not take the batch at once, one episode at a time: %r%s", stage, describe(e), frames)

    def _rows(
        self, batch: BatchWrite, ep: Episode, sampled: Mapping[str, float], n_tasks: int, position: str, now: float
    ) -> None:
        """The rows of a sampled episode: the episode, one sample per channel, its review tasks."""
        stream = ep.stream
        batch.episodes.append(
            {
                "episode_id": ep.episode_id,
                "stream": stream,
                "model": ep.model,
                "ts": ep.timestamp,
                "prompt": ep.prompt,
                "response": ep.response,
                "metadata": ep.metadata,
                "source": self.source.name,
                "position": position,
                "ingested_at": now,
                "messages": ep.messages,
            }
        )
        for slot in range(n_tasks):
            batch.tasks.append(
                {"episode_id": ep.episode_id, "slot": slot, "stream": stream, "status": "pending", "created_at": now}
            )
        for ch, p in sampled.items():
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

    def _assemble(self, batch: BatchWrite, stop: threading.Event | None) -> None:
        """The checkpoint of a batch: what the stages changed, and the sampler's state.

        Observers first: a drift event found at checkpoint time boosts the sampler, and that
        boost must be in this batch's sampling checkpoint. Through the retry policy: a checkpoint
        may read the database (new labels, the active reward-model version) and fails before it
        changes anything, so calling it again after an outage is safe."""
        for obs in self.observers:
            batch.states.update(self.retry.call(obs.checkpoint, "store", stop))
            obs.add_rows(batch)
        for stream, snap in self.sampler.take_dirty().items():
            batch.states[(stream, SAMPLING_COMPONENT)] = snap

    def _after_commit(self, batch: BatchWrite) -> None:
        """The hooks that act on committed rows (outbox publishers). A failure keeps the rows in
        their outbox for the next batch or restart: it never fails the batch."""
        for hook in self.after_commit:
            try:
                hook(batch)
            except Exception as e:
                log.warning("after-commit hook failed (its outbox keeps the rows for retry): %s", describe(e, 200))

    def _account(self, records: list[Record], draft: Draft, t0: float) -> None:
        """Stats and metrics of a committed batch (counted once: after the commit, from the rows
        that committed, without those the store refused, which are dead letters now)."""
        stats, m = self.stats, self.metrics
        batch, tally = draft.batch, draft.tally
        stats.records += len(records)
        for stream in tally.probabilities:  # label slots go to streams in order of arrival
            m.stream_label(stream)
        # Counted as valid in the loop, before the store refused them (the rest never were).
        late = [x for x in draft.letters if x.reason in LATE_REASONS]
        refused = {(x.episode_id, x.stream) for x in late}
        for letter in late:
            if letter.stream is not None:
                tally.valid[letter.stream] -= 1
        for stream, n in tally.valid.items():
            st = stats.stream(stream)
            st.episodes += n
            for probs in tally.probabilities[stream]:
                st.saw_probabilities(probs)
        # After the valid ones: the streams the batch holds have their counts before a letter
        # naming another stream may take a place among RunStats.max_streams.
        self.committer.account_letters(draft.letters)
        self._account_outcomes(batch, tally, refused)
        m.streams_held.set(self.held.count)
        self._publish_rates(tally.probabilities)
        done = time.time()
        for rec in records:
            m.latency.observe(done - rec.received_at)
        stats.add_drift_events(self.committer.account_events(batch))
        m.batches.inc()
        m.last_checkpoint.set(done)
        m.batch_seconds.observe(time.perf_counter() - t0)
        stats.batches += 1

    def _account_outcomes(
        self, batch: BatchWrite, tally: BatchTally, refused: set[tuple[str | None, str | None]]
    ) -> None:
        """The episodes of a committed batch by outcome (sampled, not sampled, duplicate), and its
        samples by channel, without those of the episodes the store refused."""
        stats, m = self.stats, self.metrics
        sampled_episodes: dict[str, int] = {}
        for ep_row in batch.episodes:
            sampled_episodes[ep_row["stream"]] = sampled_episodes.get(ep_row["stream"], 0) + 1
        # Counted per stream and channel first: a labelled series' lookup per sample cost more
        # than the rest of this accounting (a batch boosted after a drift event holds hundreds).
        by_channel: dict[tuple[str, str], int] = {}
        for sample in batch.samples:
            if (sample["episode_id"], sample["stream"]) in refused:
                continue
            key = (sample["stream"], sample["channel"])
            by_channel[key] = by_channel.get(key, 0) + 1
        for (stream, ch), n in by_channel.items():
            stats.sampled[ch] += n
            stats.stream(stream).sampled[ch] += n
            m.sampled.labels(m.stream_label(stream), ch).inc(n)
        for stream, n in sampled_episodes.items():
            m.episodes.labels(m.stream_label(stream), "sampled").inc(n)
        for stream, n in tally.not_sampled.items():
            m.episodes.labels(m.stream_label(stream), "not_sampled").inc(n)
        for stream, n in tally.duplicates.items():
            m.episodes.labels(m.stream_label(stream), "duplicate").inc(n)
            stats.duplicates += n
            stats.stream(stream).duplicates += n

    def _publish_rates(self, streams: Iterable[str]) -> None:
        m, sampler = self.metrics, self.sampler
        for stream in streams:
            label = m.stream_label(stream)
            rates = sampler.rates(stream)
            st = self.stats.stream(stream)
            for ch in CHANNELS:
                m.inclusion_probability.labels(label, ch).set(rates[ch])
                m.inclusion_probability_min.labels(label, ch).set(st.p_min[ch])
                m.sampling_floor.labels(label, ch).set(sampler.policy.channel(stream, ch).floor)
                m.boost_factor.labels(label, ch).set(sampler.boost_factor(stream, ch))

    def _overlap(self, episode_id: str) -> int:
        """Reviewers for a human-sampled episode: ``review.overlap``, or 2 for a keyed-random
        ``review.overlap_fraction`` of items (inter-annotator agreement needs pairs)."""
        cfg = self.settings.review
        if cfg.overlap >= 2 or cfg.overlap_fraction <= 0:
            return cfg.overlap
        return 2 if keyed_uniform(self._key, episode_id, "overlap") < cfg.overlap_fraction else 1

    def _maybe_publish_source(self) -> None:
        """The source's lag and failures, at most once a second (the loop turns at least every
        ``batch_timeout_ms``, also while the source is down: a failed poll is an empty one)."""
        t = time.monotonic()
        if t - self._last_source_publish < 1.0:
            return
        self._last_source_publish = t
        self._publish_lag()
        self._publish_source_failures()

    def _publish_lag(self) -> None:
        """The lag of the partitions held; those no longer held lose their series (another replica
        reports them: a revoked partition's last value, kept, was added to theirs in every sum)."""
        topic = getattr(getattr(self.source, "cfg", None), "topic", self.source.name)
        lag = {str(p): v for p, v in self.source.lag().items()}
        for p in self._lag_published - lag.keys():
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(topic, p)
        for p, v in lag.items():
            self.metrics.consumer_lag.labels(topic, p).set(v)
        self._lag_published = set(lag)

    def _publish_source_failures(self) -> None:
        """Adds what the source counted since the last call to ``oversight_source_errors_total``
        (the source keeps running totals; the counter must only ever grow)."""
        for operation, total in self.source.failures().items():
            new = total - self._source_failures.get(operation, 0)
            if new > 0:
                self.metrics.source_errors.labels(operation).inc(new)
                self._source_failures[operation] = total

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

    def report(self, drift_events: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
        s = self.stats
        return {
            "episodes": s.records,
            "invalid": s.invalid,
            "duplicates": s.duplicates,
            "sampled": dict(s.sampled),
            "dead_letters": dict(sorted(s.dead_letters.items())),
            "drift_events": list(drift_events if drift_events is not None else s.drift_events),
            "streams": {name: st.to_dict() for name, st in sorted(s.streams.items())},
        }
