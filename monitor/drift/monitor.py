"""Drift monitoring inside the pipeline: signals -> per-stream detectors -> drift events.

For every stream and every configured (signal, detector):

1. *Warm-up*: the first ``drift.reference_size`` values form the reference
   (the stream as it was when monitoring started, or after a re-reference).
2. *Watching*: each value updates the detectors, which are calibrated to the
   configured ERT (mean episodes between false alarms).
3. *Event*: when any detector of a signal fires, one drift event is recorded
   for that signal (the first detector that fired names it) and the signal
   re-references: it warms up again on the traffic that follows (plus
   ``drift.cooldown`` quiet updates), so one change gives one event per
   signal, not a burst, and later alarms are relative to the new regime. The
   stream's human and rm sampling rates are boosted at once (the next episode
   already sees the higher rates, whatever the batch boundaries).

Detector state is checkpointed with the offsets (component ``drift``), as
pickles signed with HMAC-SHA256 under the sampling key: a database write
alone cannot make the monitor unpickle attacker-chosen bytes.

Building a signal's detectors can take seconds (a river-style detector is
calibrated to its ERT by simulation; binary and point-mass references each need
their own). Offline (replays, ``process_batch``) the build runs where the
reference fills, so reports are deterministic. In the service loop
(:meth:`DriftMonitor.arm_in_background`) a worker thread builds them, after
warming the calibrations that the configuration alone determines: the signal
keeps its values meanwhile (``waiting``, checkpointed with the state) and feeds
them to its detectors, in order, as soon as they are built; no value is lost and
the batch in flight never waits for a simulation, so a stop drains in
milliseconds. An alarm among the waiting values boosts sampling from the moment
it is found, not from the episode that raised it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlalchemy as sa

from monitor.config import DriftConfig, InferenceConfig
from monitor.drift.reference import pack_reference, ref_component, unpack_reference
from monitor.drift.static import pack_static, static_component, unpack_static
from monitor.drift.waiting import At, WaitingValues, chunk_component
from monitor.episodes import Episode
from monitor.inference.shared import DriftPass, SharedVectors, embed_sharing
from monitor.metrics import Metrics
from monitor.pipeline.background import BackgroundWork, episode_work
from monitor.retry import RetryPolicy, first_line, transient
from monitor.signals import (
    CONVERSATION_SIGNALS,
    FED_SIGNALS,
    TEXT_SIGNALS,
    conversation_stats,
    text_stats,
    text_stats_many,
)
from monitor.signals.normalise import (
    NormalScores,
    conservative_binary_reference,
    has_point_mass,
    tail_augmented_reference,
)
from monitor.store import BatchWrite, DriftEventRow, Store
from monitor.store import tables as t
from monitor.store.inference import Embedded, ToEmbed, stored_embeddings, waiting_for_embedding
from sampling import Decision

log = logging.getLogger(__name__)

#: A detecting stretch shorter than this goes one value at a time: numpy's calls would cost more.
MANY_MIN = 16
COMPONENT = "drift"
STATE_VERSION = 2
EMBEDDING = "embedding"
WINDOWED = "windowed"  # the time-budgeted detector (detectors/windowed.py)

Boost = Callable[[str, float, float, str], None]
#: Where what fires at value ``i`` of a run goes: ``emit(i, fired)``.
Emit = Callable[[int, list[tuple[str, str, dict[str, Any], At]]], None]
#: Values that waited for a build, replayed into its detectors per call of the batch path.
REPLAY_RUN = 4096
_T = TypeVar("_T")


@dataclass
class SignalState:
    ref: list[float] | None = field(default_factory=list)  # None once the detectors are built
    detectors: dict[str, Any] = field(default_factory=dict)  # name -> Detector (None: failed, disabled)
    cooldown: int = 0
    n: int = 0
    transform: NormalScores | None = None
    # Not None while the detectors are being built from the full reference: the values that
    # arrived since, with where each arrived, fed to the detectors in order once they are built.
    waiting: WaitingValues | None = None
    # The SHA-256 of the static part (transform, references) as stored, once the first checkpoint
    # after the build wrote it (monitor/drift/static.py); None: still to be written.
    static: str | None = None
    # Chunks of ``ref`` handed to a checkpoint (or read from one): not written again
    # (monitor/drift/reference.py).
    ref_sealed: int = 0
    # ``static`` and its signature, which every checkpoint writes: signed once, not per batch.
    static_signed: tuple[str, str] | None = None


REFUSED_REASONS = ("unreadable", "version", "settings")


class RefusedState(ValueError):
    """A signal's checkpoint that this configuration or release cannot use, and why (``reason``:
    a ``drift_state_refused`` label)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Build:
    """Building one signal's detectors from its full reference (on the worker, or inline)."""

    stream: str
    signal: str
    kind: str
    raw: list[Any]
    names: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    transform: NormalScores | None = None
    detectors: dict[str, Any] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (detector, error) of the failed ones


@dataclass
class StreamDrift:
    signals: dict[str, SignalState] = field(default_factory=dict)
    # Values fed per signal over the stream's life (re-references included): what a replica
    # restarted by kill -9 must continue, neither repeating nor skipping a value.
    fed: dict[str, int] = field(default_factory=dict)


@dataclass
class PreparedBatch:
    """What :meth:`DriftMonitor.prepare` found in a batch, for :meth:`DriftMonitor.observe` to
    apply at each episode: the drift events by the position of the episode that raised them."""

    position: dict[int, int] = field(default_factory=dict)  # id(episode) -> position in the batch
    errors: dict[int, Exception] = field(default_factory=dict)  # position -> its statistics' error
    fires: dict[int, tuple[str, list[tuple[str, str, dict[str, Any], At]]]] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)  # the positions in ``fires``, in order
    next: int = 0  # ``order[next:]`` are still to record

    def fire(self, pos: int, stream: str, fired: list[tuple[str, str, dict[str, Any], At]]) -> None:
        if fired:
            self.fires.setdefault(pos, (stream, []))[1].extend(fired)


def detector_ert(cfg: DriftConfig) -> float:
    """The ERT each detector of a stream runs at: the stream's false-alarm budget (one alarm per
    ``cfg.ert`` episodes) split evenly over its detectors (a union bound). The time-budgeted
    ``windowed`` detectors have their own budget (:func:`windowed_ert_s`)."""
    n = sum(len([x for x in d if x != WINDOWED]) for d in cfg.signals.values())
    n += len(cfg.embedding.detectors) if cfg.embedding.enabled else 0
    return cfg.ert * max(1, n)


def windowed_ert_s(cfg: DriftConfig) -> float:
    """Event-time seconds between false alarms of each ``windowed`` detector: the stream's budget
    (``drift.false_alarms_per_30d``) split evenly over its windowed detectors (a union bound)."""
    n = sum(d.count(WINDOWED) for d in cfg.signals.values())
    return 30 * 86400.0 * max(1, n) / cfg.false_alarms_per_30d


class DriftMonitor:
    """An :class:`monitor.pipeline.EpisodeObserver` that runs drift detection per stream."""

    def __init__(
        self,
        cfg: DriftConfig,
        store: Store,
        key: bytes,
        metrics: Metrics,
        boost: Boost,
        drift_rate: float = 1.0,
        retry: RetryPolicy | None = None,
    ):
        known = {**TEXT_SIGNALS, **CONVERSATION_SIGNALS, **FED_SIGNALS}
        unknown = set(cfg.signals) - set(known)
        if unknown:
            from monitor.config import ConfigError

            raise ConfigError(f"drift.signals: unknown signals {sorted(unknown)}; known: {sorted(known)}")
        self.cfg = cfg
        self._kinds = {name: spec.kind for name, spec in known.items()}
        # Signals computed here on every episode: the text statistics and the conversation signals.
        self._text_watch = {s: d for s, d in cfg.signals.items() if s in TEXT_SIGNALS or s in CONVERSATION_SIGNALS}
        # Conversation signals only when one is watched: they are off by default, and v1 traffic pays nothing.
        self._conversation = any(s in CONVERSATION_SIGNALS for s in cfg.signals)
        # Embedding detectors see only drift-sampled episodes, so their ERT in updates is
        # scaled by the drift sampling rate.
        self.ert_each = detector_ert(cfg)
        self.ert_embedding = max(50.0, self.ert_each * drift_rate)
        names = {n for d in cfg.signals.values() for n in d} | set(cfg.embedding.detectors)
        for name in sorted(names):
            metrics.detector_errors.labels(name)  # a series from the start: the first error is visible
        for reason in REFUSED_REASONS:
            metrics.drift_state_refused.labels(reason)
        self._store = store
        self._key = key
        self._metrics = metrics
        self._boost = boost
        self._streams: dict[str, StreamDrift] = {}
        self._settings: dict[str, str] = {}  # signal -> build_settings
        self._dirty: set[str] = set()
        self._events: list[DriftEventRow] = []
        self._applied: list[int] = []
        self._last_poll = 0.0
        # Drift-sampled episodes waiting to be embedded at the end of the batch (one batched forward
        # pass), when the embeddings are computed inline (replay, simulate: deterministic reports).
        self._pending: list[tuple[Episode, int]] = []
        self._embedder: Any = None
        # In the service, an inference worker embeds the committed drift samples off the ingest
        # path (:meth:`embed_in_background`); their embeddings are fed here at a checkpoint.
        self._worker: BackgroundWork[ToEmbed, Any] | BackgroundWork[Embedded, Any] | None = None
        self._external = False  # the embeddings come from `oversight infer` (inference.external)
        self._marked: list[str] = []  # drift samples fed since the last batch: marked embedded by the next
        self._owned: frozenset[str] = frozenset()  # the streams this replica holds: the worker embeds only these
        self._every_stream = False
        self._params: dict[tuple[Any, ...], float] = {}
        # Database reads on the pipeline's path wait out an outage in the pipeline's retry policy.
        self._retry = retry
        self._builds: dict[tuple[str, str], Build] = {}
        self._background = False
        self._work: queue.Queue[Callable[[], None]] | None = None
        self._calibrator: Any = None  # a detectors.calibration.CalibrationProcess in the background
        self._batch = PreparedBatch()  # the batch :meth:`prepare` took, until its checkpoint

    # -- observer protocol ------------------------------------------------------
    def prepare(self, episodes: Sequence[tuple[Episode, int]]) -> None:
        """The batch's episodes that :meth:`observe` will see, in order, before they are sampled.

        Their text signals go through the detectors now: per stream and signal, the batch's values
        in one call (``Detector.update_until_drift``; a CUSUM's is one numpy pass), where one
        episode at a time costs a few Python calls per value, signal and detector (8 signals by
        default, on every episode of the traffic). Nothing here depends on a sampling decision,
        and what depends on the order waits for :meth:`observe`: a drift event is recorded, and
        its stream boosted, when observe reaches the episode that raised it, so the boost applies
        from the next episode exactly as one episode at a time. An episode whose statistics raise
        keeps its error, which observe raises (the pipeline dead-letters that record alone); the
        events of episodes observe never reaches (a record that failed before it) are recorded at
        the checkpoint."""
        self._batch = batch = PreparedBatch()
        for pos, (ep, _) in enumerate(episodes):
            batch.position[id(ep)] = pos
        kept, columns = self._signal_columns(episodes, batch.errors)
        by_stream: dict[str, list[int]] = {}  # stream -> indices into kept
        for i, pos in enumerate(kept):
            by_stream.setdefault(episodes[pos][0].stream, []).append(i)
        for stream, rows in by_stream.items():
            sd = self._streams.get(stream)
            if sd is None:
                sd = self._load(stream)
            self._dirty.add(stream)
            positions = [kept[i] for i in rows]
            ats: list[At] = []
            for pos in positions:
                ep, index = episodes[pos]
                ats.append((ep.episode_id, ep.timestamp, index))
            whole = len(rows) == len(kept)  # one stream in the batch: its columns as they are
            for signal, names in self._text_watch.items():
                sd.fed[signal] = sd.fed.get(signal, 0) + len(rows)
                column = columns[signal]
                xs = column if whole else [column[i] for i in rows]
                self._feed_many(
                    stream, sd, signal, names, xs, ats, self._at_positions(stream, positions), self.cfg.reference_size
                )
        batch.order = sorted(batch.fires)

    def _signal_columns(
        self, episodes: Sequence[tuple[Episode, int]], errors: dict[int, Exception]
    ) -> tuple[list[int], dict[str, list[float]]]:
        """The batch's text (and, when watched, conversation) signals, one list per signal, and the
        positions they are of: every episode but those whose statistics raised (their errors go
        to ``errors``, for :meth:`observe` to raise for them alone)."""
        kept = list(range(len(episodes)))
        try:
            columns = text_stats_many([ep.prompt for ep, _ in episodes], [ep.response for ep, _ in episodes])
        except Exception:  # one episode's text broke it: one at a time, to know which
            kept, rows = [], []
            for pos, (ep, _) in enumerate(episodes):
                try:
                    rows.append(text_stats(ep.prompt, ep.response))
                except Exception as e:
                    errors[pos] = e
                    continue
                kept.append(pos)
            columns = {signal: [v[signal] for v in rows] for signal in TEXT_SIGNALS}
        if self._conversation:
            good, conv = [], []
            for i, pos in enumerate(kept):
                try:
                    conv.append(conversation_stats(episodes[pos][0].messages))
                except Exception as e:
                    errors[pos] = e
                    continue
                good.append(i)
            if len(good) < len(kept):
                columns = {signal: [column[i] for i in good] for signal, column in columns.items()}
                kept = [kept[i] for i in good]
            columns.update({signal: [v[signal] for v in conv] for signal in CONVERSATION_SIGNALS})
        return kept, columns

    def _feed_many(
        self,
        stream: str,
        sd: StreamDrift,
        signal: str,
        names: list[str],
        xs: list[float],
        ats: list[At],
        emit: Emit,
        ref_size: int,
    ) -> None:
        """Values of one signal of one stream, in order (:meth:`_feed`'s effects, with the
        detecting stretches in one call); what fires at value ``i`` goes to ``emit(i, fired)``;
        ``ref_size``: the signal's reference size (:meth:`_watch_of`)."""
        i, m = 0, len(xs)
        while i < m:
            st = sd.signals.get(signal)
            if st is None:
                st = sd.signals[signal] = SignalState()
            fired: list[tuple[str, str, dict[str, Any], At]] = []
            if st.waiting is not None:
                installed = self._install(stream, sd, signal, names, ref_size, fired)
                emit(i, fired)  # found now: recorded at this value's episode
                if not installed:
                    for j in range(i, m):
                        st.waiting.append(xs[j], ats[j])
                    return
                continue  # detecting now, or warming up again after an alarm among the waiting values
            if st.ref is not None:
                take = max(1, min(ref_size - len(st.ref), m - i))
                st.ref.extend(xs[i : i + take])
                st.n += take
                i += take
                if len(st.ref) >= ref_size:
                    self._arm(stream, sd, signal, names, ref_size, fired)
                    emit(i - 1, fired)
                continue
            if st.cooldown > 0 or len(names) != 1 or m - i < MANY_MIN:
                # One value the way one episode at a time goes (several detectors must stop at
                # the same alarm; a few values do not pay numpy's calls).
                self._feed(stream, sd, signal, names, ref_size, xs[i], ats[i], fired)
                emit(i, fired)
                i += 1
                continue
            i = self._detect_many(stream, sd, signal, names[0], xs, ats, emit, i)

    def _at_positions(self, stream: str, positions: list[int]) -> Emit:
        """What fires at value ``i`` of a batch's column is recorded at that value's episode."""
        return lambda i, fired: self._batch.fire(positions[i], stream, fired)

    def _detect_many(
        self,
        stream: str,
        sd: StreamDrift,
        signal: str,
        name: str,
        xs: list[float],
        ats: list[At],
        emit: Emit,
        i: int,
    ) -> int:
        """``xs[i:]`` into a built signal's one detector, up to its first alarm; where it stopped."""
        st = sd.signals[signal]
        det = st.detectors.get(name)
        if det is None:  # disabled: the values only count
            st.n += len(xs) - i
            return len(xs)
        try:
            z = xs[i:] if st.transform is None else st.transform.many(xs[i:])
            taken = det.update_until_drift(z, [a[1] for a in ats[i:]])
        except Exception as e:  # a detector must never stop ingest
            log.error("detector %s on %s/%s failed, disabled: %s", name, stream, signal, e)
            self._metrics.detector_errors.labels(name).inc()
            st.detectors[name] = None
            st.n += len(xs) - i
            return len(xs)
        st.n += taken
        i += taken
        if det.drift_detected:
            res: dict[str, Any] = dict(det.result())
            if getattr(det, "last_test", None) is not None:  # windowed: the shift and its interval
                res["window"] = dict(det.last_test)
            res["detail"] = event_detail(det, res, st.n)
            emit(i - 1, [(signal, name, res, ats[i - 1])])
            # Re-reference, as _feed does: the signal warms up again on what follows.
            sd.signals[signal] = SignalState(cooldown=self.cfg.cooldown)
        return i

    def _record_prepared(self, upto: int | None) -> None:
        """The events of the prepared batch's episodes up to position ``upto`` (None: all of them)."""
        batch = self._batch
        while batch.next < len(batch.order) and (upto is None or batch.order[batch.next] <= upto):
            stream, fired = batch.fires[batch.order[batch.next]]
            batch.next += 1
            self._record(stream, fired)

    def observe(self, episode: Episode, decision: Decision, index: int) -> None:
        pos = self._batch.position.get(id(episode))
        if pos is not None:  # prepared: its signals are in; its events (and any skipped before it) now
            self._record_prepared(pos)
            err = self._batch.errors.get(pos)
            if err is not None:
                raise err
        else:
            self._observe_one(episode, index)
        if self.cfg.embedding.enabled and "drift" in decision.sampled and self._worker is None:
            self._pending.append((episode, index))

    def _observe_one(self, episode: Episode, index: int) -> None:
        """One episode's text signals through the detectors (a batch not prepared)."""
        values = text_stats(episode.prompt, episode.response)
        if self._conversation:
            values.update(conversation_stats(episode.messages))
        self._update(
            episode.stream,
            episode.episode_id,
            episode.timestamp,
            index,
            values,
            self._text_watch,
            self.cfg.reference_size,
        )

    def observe_value(
        self, stream: str, signal: str, value: float, episode_id: str, event_ts: float, index: int
    ) -> None:
        """Feed a signal computed by a later stage (reward-model score, human/model disagreement).

        Signals not configured in ``drift.signals`` are ignored, so producers need not know the
        configuration."""
        names = self.cfg.signals.get(signal)
        if names:
            self._update(
                stream, episode_id, event_ts, index, {signal: value}, {signal: names}, self.cfg.fed_reference_size
            )

    def _update(
        self,
        stream: str,
        episode_id: str,
        event_ts: float,
        index: int,
        values: Mapping[str, Any],
        watch: Mapping[str, list[str]],
        ref_size: int,
    ) -> None:
        sd = self._streams.get(stream)
        if sd is None:
            sd = self._load(stream)
        self._dirty.add(stream)
        fired: list[tuple[str, str, dict[str, Any], At]] = []
        at = (episode_id, event_ts, index)
        for signal, names in watch.items():
            sd.fed[signal] = sd.fed.get(signal, 0) + 1
            self._feed(stream, sd, signal, names, ref_size, values[signal], at, fired)
        self._record(stream, fired)

    def _feed(
        self,
        stream: str,
        sd: StreamDrift,
        signal: str,
        names: list[str],
        ref_size: int,
        x: Any,
        at: At,
        fired: list[tuple[str, str, dict[str, Any], At]],
    ) -> None:
        """One value of one signal: into the reference, the waiting list, or the detectors."""
        st = sd.signals.get(signal)
        if st is None:  # not setdefault: that would build a SignalState for every value
            st = sd.signals[signal] = SignalState()
        if st.waiting is not None:
            if not self._install(stream, sd, signal, names, ref_size, fired):
                st.waiting.append(x, at)
                return
            st = sd.signals[signal]  # the waiting values may have fired and re-referenced it
        st.n += 1
        if st.ref is not None:
            st.ref.append(x)
            if len(st.ref) >= ref_size:
                self._arm(stream, sd, signal, names, ref_size, fired)
            return
        if st.transform is not None:
            x = st.transform(x)
        hit = self._update_detectors(stream, signal, st, names, x, at[1])
        if st.cooldown > 0:
            st.cooldown -= 1
            return
        if hit is not None:
            fired.append((signal, hit[0], hit[1], at))
            # Re-reference on the new traffic: the signal warms up again on what follows the
            # change, so the same change cannot fire again (no bursts), and later alarms are
            # relative to the new regime. The cool-down covers detectors that need no warm-up.
            sd.signals[signal] = SignalState(cooldown=self.cfg.cooldown)

    def _update_detectors(
        self, stream: str, signal: str, st: SignalState, names: list[str], x: Any, event_ts: float
    ) -> tuple[str, dict[str, Any]] | None:
        """One value into each detector of a signal: the first that fired, with its result."""
        hit = None
        for name in names:
            det = st.detectors.get(name)
            if det is None:
                continue
            try:
                det.update(x, event_ts)  # event time: the windowed detector's clock; the others ignore it
                if det.drift_detected and hit is None:
                    res: dict[str, Any] = dict(det.result())
                    if getattr(det, "last_test", None) is not None:  # windowed: the shift and its interval
                        res["window"] = dict(det.last_test)
                    res["detail"] = event_detail(det, res, st.n)
                    hit = (name, res)
            except Exception as e:  # a detector must never stop ingest
                log.error("detector %s on %s/%s failed, disabled: %s", name, stream, signal, e)
                self._metrics.detector_errors.labels(name).inc()
                st.detectors[name] = None
        return hit

    def _record(self, stream: str, fired: list[tuple[str, str, dict[str, Any], At]]) -> None:
        """Drift events for the signals that fired, and one boost of the stream."""
        m = self._metrics
        for signal, name, res, (episode_id, event_ts, index) in fired:
            data = res["data"]
            # The gauges show the alarm itself: the signal re-references at once, so the next
            # checkpoint may find no detector to read them from (detectors built in the background
            # are fed their waiting values, alarm included, between two checkpoints).
            label = m.stream_label(stream)
            if data.get("distance") is not None:
                m.drift_statistic.labels(label, signal, name).set(float(data["distance"]))
            if data.get("threshold") is not None:
                m.drift_threshold.labels(label, signal, name).set(float(data["threshold"]))
            if "window" in res:
                self._log_shift(stream, signal, res["window"])
            self._events.append(
                {
                    "stream": stream,
                    "signal": signal,
                    "detector": name,
                    "statistic": _num(data.get("distance")),
                    "threshold": _num(data.get("threshold")),
                    "p_val": _num(data.get("p_val")),
                    "episode_id": episode_id,
                    "input_index": index,
                    "event_ts": event_ts,
                    "created_at": time.time(),
                    "detail": res.get("detail"),
                }
            )
        if fired:
            self._boost(stream, self.cfg.boost_factor, self.cfg.boost_duration_s, f"drift:{fired[0][0]}")

    @staticmethod
    def _log_shift(stream: str, signal: str, w: Mapping[str, float]) -> None:
        log.warning(
            "drift on %r/%s: shift %.3f reference SDs (95%% interval %.3f to %.3f), %d values in %.0f s",
            stream,
            signal,
            w["shift_sd"],
            w["ci_low"],
            w["ci_high"],
            w["n"],
            w["window_s"],
        )

    def _embed_pending(self) -> None:
        """Embed the batch's drift-sampled episodes in one pass and feed them, in input order."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._load_embedder()
        vectors = self._embedder.embed_episodes([ep.prompt for ep, _ in pending], [ep.response for ep, _ in pending])
        for (ep, index), vec in zip(pending, vectors, strict=True):
            self._feed_embedding(ep.stream, ep.episode_id, ep.timestamp, index, vec)

    def _feed_embedding(self, stream: str, episode_id: str, event_ts: float, index: int, vec: Any) -> None:
        ecfg = self.cfg.embedding
        self._update(
            stream, episode_id, event_ts, index, {EMBEDDING: vec}, {EMBEDDING: ecfg.detectors}, ecfg.reference_size
        )
        self._marked.append(episode_id)

    # -- the inference worker ------------------------------------------------------
    def embed_in_background(
        self, icfg: InferenceConfig, *, every_stream: bool, shared: SharedVectors | None = None
    ) -> None:
        """Embed drift samples on a worker thread from now on: the batch commits its drift samples
        as waiting, the worker embeds the oldest waiting ones of the streams this replica holds,
        and a later checkpoint feeds their embeddings to the detectors and marks them embedded in
        its batch's transaction (``monitor/pipeline/background.py`` says why that is exactly once).

        ``every_stream``: this replica holds every stream (a file, stdin or the inbox). Otherwise
        (Kafka) it holds the streams of its partitions, known by their episodes: a stream's backlog
        is embedded once this replica has seen an episode of it since its last assignment, so that
        two replicas never feed the same stream's detectors.

        ``shared``: the drift embeddings that the reward-model scorer's encoder pass computed
        (``monitor/inference/shared.py``); while its version computes them, a drift sample whose
        score is still to come waits for it (at most ``inference.share_wait_s``)."""
        self._every_stream = every_stream
        if self._worker is not None or not self.cfg.embedding.enabled:
            return
        if icfg.external:
            self._worker = self._stored_results(icfg)
            return
        # Before arm_in_background loads it: the worker's encoder leaves a core to the ingest loop.
        self._load_embedder(icfg.worker_threads())
        embedder, store = self._embedder, self._store
        m = self._metrics

        def fetch(limit: int, skip: frozenset[str]) -> list[ToEmbed]:
            wait = icfg.share_wait_s if shared is not None and shared.active else 0.0
            return waiting_for_embedding(store, limit, skip, self.owned_streams(), wait)

        def compute(items: Sequence[ToEmbed]) -> list[Any]:
            vectors, held = embed_sharing(shared, items, embedder.embed_episodes)
            m.inference_items.labels(EMBEDDING, "shared").inc(held)
            return vectors

        def counted(ok: int, failed: int) -> None:
            m.inference_items.labels(EMBEDDING, "ok").inc(ok)
            m.inference_items.labels(EMBEDDING, "failed").inc(failed)

        self._worker = episode_work("inference-embedding", fetch, compute, icfg, counted=counted).start()

    def _stored_results(self, icfg: InferenceConfig) -> BackgroundWork[Embedded, Any]:
        """The embeddings that ``oversight infer`` (a process of its own) stored: this replica
        loads no encoder, and feeds them exactly as the thread's (``monitor.store.inference``)."""
        store = self._store
        self._external = True

        def fetch(limit: int, skip: frozenset[str]) -> list[Embedded]:
            return stored_embeddings(store, limit, skip, self.owned_streams(), hold_s=icfg.max_lag_s)

        def waiting(skip: frozenset[str]) -> bool:
            # Stored or not yet: a finite input's run waits for the other process too.
            return bool(waiting_for_embedding(store, 1, skip, self.owned_streams()))

        def vectors(items: Sequence[Embedded]) -> list[Any]:
            return [w.vector for w in items]

        return episode_work(
            "inference-embedding-results", fetch, vectors, icfg, batch=icfg.max_pending, waiting=waiting
        ).start()

    def _take_embedded(self) -> None:
        """Feed the worker's embeddings, oldest first (index -1: an episode of an earlier batch)."""
        if self._worker is None:
            return
        gone = []
        for w, vec in self._worker.take():
            if self._every_stream or w.stream in self._streams:
                self._feed_embedding(w.stream, w.episode_id, w.ts, -1, vec)
            else:  # its stream moved to another replica while it was being embedded
                gone.append(w.episode_id)
        self._worker.release(gone)

    def outstanding(self) -> bool:
        """Drift samples of this replica's streams still waiting for the worker, or fed and not
        committed, or detectors still being built (the values waiting for them are fed when they
        are installed: a finite run that exited first left them for a next value that may never come)."""
        return bool(self._marked) or bool(self._builds) or (self._worker is not None and self._worker.outstanding())

    def resume_builds(self) -> int:
        """Start again the builds a checkpoint says were running: every stream whose checkpoint
        holds a signal waiting for its detectors is loaded now; returns how many builds started.
        For a replica that holds every stream (a file, stdin, the inbox), at the start of a
        service. A build cut short (kill -9 during a calibration) was otherwise started again only
        by its stream's next value: a stream gone quiet, or an input already consumed, left the
        waiting values (a policy swap's, perhaps) unexamined for good."""
        started = 0
        for stream in self._read(lambda: self._store.streams_with_state(COMPONENT)):
            sd = self._streams.get(stream) or self._load(stream)
            fired: list[tuple[str, str, dict[str, Any], At]] = []
            for signal, st in list(sd.signals.items()):
                if st.waiting is None or (stream, signal) in self._builds:
                    continue
                names, ref_size = self._watch_of(signal)
                self._install(stream, sd, signal, names, ref_size, fired)  # starts the build
                started += 1
                self._dirty.add(stream)
            self._record(stream, fired)
        if started:
            log.info("drift: %d detector builds cut short by the last stop started again", started)
        return started

    def owned_streams(self) -> frozenset[str] | None:
        """The streams this replica holds, as of the last checkpoint (``None``: every stream)."""
        return None if self._every_stream else self._owned

    @property
    def worker(self) -> BackgroundWork[ToEmbed, Any] | BackgroundWork[Embedded, Any] | None:
        return self._worker

    @property
    def embeds(self) -> bool:
        """This process computes embeddings (not when ``oversight infer`` does)."""
        return self.cfg.embedding.enabled and not self._external

    def close(self) -> None:
        """Stop the inference worker (what it embedded but did not hand over waits in the store)."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def _load_embedder(self, threads: int | None = None) -> None:
        if self._embedder is None:
            from monitor.signals.embeddings import embedder_for

            self._embedder = embedder_for(self.cfg.embedding, threads)

    def checkpoint(self) -> Mapping[tuple[str, str], dict[str, Any]]:
        # Before anything that can fail: a retried checkpoint records nothing twice.
        self._record_prepared(None)
        self._batch = PreparedBatch()
        self._embed_pending()
        self._take_embedded()
        self._install_built()
        self._owned = frozenset(self._streams)
        out: dict[tuple[str, str], dict[str, Any]] = {}
        streams = [s for s in self._dirty if s in self._streams]
        for stream in streams:
            state, chunks = self._snapshot(self._streams[stream])
            out[(stream, COMPONENT)] = state
            out.update(((stream, component), chunk) for component, chunk in chunks.items())
        self._dirty.clear()
        self._publish_gauges(streams)
        return out

    def take_events(self) -> list[DriftEventRow]:
        events, self._events = self._events, []
        return events

    def take_applied(self) -> list[int]:
        applied, self._applied = self._applied, []
        return applied

    def add_rows(self, batch: BatchWrite) -> None:
        """The events found and the re-reference requests applied since the last batch."""
        batch.drift_events.extend(self.take_events())
        batch.audit_applied.extend(self.take_applied())
        batch.embedded.extend(self._marked)
        self._marked = []

    def between_batches(self) -> bool:
        """Idle work of the service loop: apply re-reference requests (every
        ``drift.rereference_poll_s``). True when detectors built in the background are ready, so
        that the values which waited for them are fed and committed now."""
        self.poll_rereference()
        ready = self._worker is not None and self._worker.pending() > 0
        return ready or any(b.done.is_set() for b in self._builds.values())

    def forget(self) -> None:
        """After a rebalance: reload state from the checkpoint on next use."""
        # Builds in flight finish on the worker (their calibrations stay cached) but are not
        # installed: a reloaded signal that still waits starts its own.
        self._builds.clear()
        # Fed and not committed: fetched again (those of a batch that failed are, from the next
        # take, as the worker's claims end there).
        if self._worker is not None:
            self._worker.release(self._marked)
        self._marked = []
        self._owned = frozenset()
        self._batch = PreparedBatch()
        self._streams.clear()
        self._dirty.clear()
        self._events.clear()
        self._applied.clear()
        self._pending.clear()

    # -- building detectors -----------------------------------------------------------
    def arm_in_background(self) -> None:
        """Build detectors on a worker thread from now on (the service loop, where a stop must
        never wait for a calibration), after warming every calibration that the configuration
        alone determines: the Gaussian null of the continuous signals, shared by all streams.
        Call it from the thread that starts the service: it starts the calibration process."""
        if self._background:
            return
        from detectors.calibration import CalibrationProcess

        work: queue.Queue[Callable[[], None]] = queue.Queue()
        self._work = work
        self._background = True
        # The simulations run in a child process: in a thread they would hold the interpreter
        # lock for up to a second at a time, stalling ingest and the exit after a SIGTERM.
        self._calibrator = CalibrationProcess()
        # A daemon thread, not an executor: the interpreter's exit must not wait for a simulation.
        threading.Thread(target=_work_loop, args=(work,), name="drift-calibration", daemon=True).start()
        for job in self._warm_jobs():
            work.put(job)
        if self.embeds:
            # Now, not in the first batch: importing torch and loading the encoder takes seconds
            # (tens on a busy machine), and a drain would wait for the batch that does it.
            self._load_embedder()
            self._embedder.embed([])  # the encoder loads on first use: this is the first use

    def _warm_jobs(self) -> list[Callable[[], None]]:
        import detectors

        jobs: list[Callable[[], None]] = []
        seen: set[tuple[Any, ...]] = set()
        for signal, names in self.cfg.signals.items():
            if self._kinds.get(signal) != "continuous":
                continue
            for name in names:
                try:
                    calibrated = getattr(detectors.detector_class(name), "param_name", None) is not None
                except ValueError:
                    continue  # an unknown detector: its build reports it
                params = self._params_for(signal, name)
                key = (name, tuple(sorted(params.items())))
                if calibrated and key not in seen:
                    seen.add(key)
                    jobs.append(functools.partial(self._warm, name, params))
        return jobs

    def _warm(self, name: str, params: Mapping[str, Any]) -> None:
        try:
            self._river_param(name, "continuous", None, self.ert_each, params)
        except Exception as e:  # the build that needs it reports the error
            log.debug("warming the calibration of %s failed: %s", name, e)

    def _params_for(self, signal: str, name: str) -> dict[str, Any]:
        params: dict[str, Any] = dict(self.cfg.detector_params.get(name, {}))
        params.update(self.cfg.signal_params.get(signal, {}).get(name, {}))
        return params

    def _watch_of(self, signal: str) -> tuple[list[str], int]:
        """(detector names, reference size) of a signal, as ``_update`` is called with them."""
        if signal == EMBEDDING:
            return self.cfg.embedding.detectors, self.cfg.embedding.reference_size
        if signal in self._text_watch:
            return self._text_watch[signal], self.cfg.reference_size
        return self.cfg.signals.get(signal, []), self.cfg.fed_reference_size

    def _arm(
        self,
        stream: str,
        sd: StreamDrift,
        signal: str,
        names: list[str],
        ref_size: int,
        fired: list[tuple[str, str, dict[str, Any], At]],
    ) -> None:
        """The reference is full: build the detectors (here, or on the worker: the values that
        arrive meanwhile wait) and install them as soon as they are built."""
        st = sd.signals[signal]
        st.waiting = WaitingValues()
        self._start_build(stream, signal, st, names)
        self._install(stream, sd, signal, names, ref_size, fired)

    def _start_build(self, stream: str, signal: str, st: SignalState, names: list[str]) -> Build:
        kind = "multivariate" if signal == EMBEDDING else self._kinds[signal]
        b = Build(stream, signal, kind, list(st.ref or []), list(names))
        self._builds[(stream, signal)] = b
        if self._background and self._work is not None:
            self._work.put(lambda: self._build(b))
        else:
            self._build(b)
        return b

    def _install(
        self,
        stream: str,
        sd: StreamDrift,
        signal: str,
        names: list[str],
        ref_size: int,
        fired: list[tuple[str, str, dict[str, Any], At]],
    ) -> bool:
        """Install a waiting signal's detectors and feed them the values that waited, in order;
        False while they are still being built."""
        st = sd.signals[signal]
        b = self._builds.get((stream, signal))
        if b is None:  # restored from a checkpoint taken while the build ran: build again
            b = self._start_build(stream, signal, st, names)
        if not b.done.is_set():
            return False
        del self._builds[(stream, signal)]
        for name, err in b.errors:
            log.error("cannot build detector %s for %s/%s: %s", name, stream, signal, err)
            self._metrics.detector_errors.labels(name).inc()
        st.transform, st.detectors, st.ref, st.static = b.transform, b.detectors, None, None
        waiting, st.waiting = st.waiting or WaitingValues(), None
        try:
            self._replay(stream, sd, signal, names, ref_size, waiting, fired)
        except Exception as e:  # a chunk the store does not have (whole), or malformed: the values are lost
            if transient(e):
                raise
            self._refuse(stream, signal, "unreadable", f"its waiting values: {type(e).__name__}: {first_line(e)}")
            sd.signals[signal] = SignalState()
        return True

    def _replay(
        self,
        stream: str,
        sd: StreamDrift,
        signal: str,
        names: list[str],
        ref_size: int,
        waiting: WaitingValues,
        fired: list[tuple[str, str, dict[str, Any], At]],
    ) -> None:
        """The values that waited for a build, into its detectors in order, what fires into ``fired``.

        Scalars in runs through the batch path (:meth:`_feed_many`: the same events and state as
        one at a time, ``tests/drift/test_batch_path.py``). One at a time, the backlog of a build
        (the stream's rate times the build's seconds, for every signal of the stream) stopped
        ingest in the batch that installed it: 11 batches took 27 s at 2,000 episodes/s, and at
        eight streams single batches took over a minute. Vectors (the embedding) go one at a time,
        as they arrived."""
        load = functools.partial(self._load_chunk, stream, signal)
        for xs, ats in waiting.runs(load, REPLAY_RUN):
            if hasattr(xs[0], "shape"):
                for x, at in zip(xs, ats, strict=True):
                    self._feed(stream, sd, signal, names, ref_size, x, at, fired)
            else:
                self._feed_many(stream, sd, signal, names, xs, ats, lambda _i, f: fired.extend(f), ref_size)

    def _load_chunk(self, stream: str, signal: str, j: int) -> dict[str, Any] | None:
        """Chunk ``j`` of a signal's waiting values, from the store (written by an earlier checkpoint)."""
        return self._read(functools.partial(self._store.load_state, stream, chunk_component(COMPONENT, signal, j)))

    def _load_ref_chunk(self, stream: str, signal: str, j: int) -> Any:
        """Chunk ``j`` of a signal's reference, from the store (written by an earlier checkpoint)."""
        chunk = self._read(functools.partial(self._store.load_state, stream, ref_component(COMPONENT, signal, j)))
        return chunk.get("ref") if isinstance(chunk, dict) else None

    def _install_built(self) -> None:
        """At the batch boundary: install what the worker finished, so that a signal whose
        stream went quiet does not wait for its next value."""
        for (stream, signal), b in list(self._builds.items()):
            if not b.done.is_set():
                continue
            sd = self._streams.get(stream)
            st = None if sd is None else sd.signals.get(signal)
            if sd is None or st is None or st.waiting is None:
                self._builds.pop((stream, signal), None)  # re-referenced or forgotten meanwhile
                continue
            names, ref_size = self._watch_of(signal)
            fired: list[tuple[str, str, dict[str, Any], At]] = []
            self._install(stream, sd, signal, names, ref_size, fired)
            self._dirty.add(stream)
            self._record(stream, fired)

    def _build(self, b: Build) -> None:
        """The detectors of a full reference (seconds when a calibration is not cached). Touches
        nothing but ``b`` and the calibration caches: it may run on the worker thread."""
        import numpy as np

        import detectors

        try:
            raw = b.raw
            ert = self.ert_embedding if b.signal == EMBEDDING else self.ert_each
            if b.kind == "continuous":
                b.transform = NormalScores.fit(raw, self.cfg.tail_clip)
                ref = np.asarray([b.transform(x) for x in raw], dtype=float)
            else:
                ref = np.asarray(raw, dtype=float)
            for name in b.names:
                try:
                    params = self._params_for(b.signal, name)
                    x_ref = ref
                    if name == WINDOWED:
                        b.detectors[name] = self._make_windowed(b.kind, ref, params)
                        continue
                    if getattr(detectors.detector_class(name), "param_name", None) is not None:
                        cal_ref = None  # the Gaussian null: right for normal scores of a continuous sample
                        if b.kind == "binary":
                            # Calibrated on a conservative rate, not on the noisy estimate of a rare event.
                            x_ref = np.asarray(conservative_binary_reference(raw), dtype=float)
                            cal_ref = x_ref
                        elif has_point_mass(raw):
                            # A point mass (e.g. mostly zero): normal scores are discrete, not Gaussian;
                            # calibrate on the bootstrap of the transformed reference instead, with the
                            # out-of-range values that a bootstrap cannot produce added back (the
                            # detector standardises by the same sample it was calibrated on).
                            augmented = tail_augmented_reference(ref.tolist(), raw, self.cfg.tail_clip)
                            x_ref = cal_ref = np.asarray(augmented, dtype=float)
                        params.update(self._river_param(name, b.kind, cal_ref, ert, params))
                    b.detectors[name] = detectors.make(name, ert=ert, x_ref=x_ref, **params)
                except Exception as e:
                    b.errors.append((name, str(e)))
                    b.detectors[name] = None
        except Exception as e:  # the reference itself is unusable: every detector is disabled
            for name in b.names:
                if name not in b.detectors:
                    b.errors.append((name, str(e)))
                    b.detectors[name] = None
        finally:
            b.done.set()

    def _make_windowed(self, kind: str, ref: Any, params: Mapping[str, Any]) -> Any:
        """A time-budgeted detector from the drift settings (``detector_params.windowed`` override them)."""
        import detectors

        c = self.cfg
        args: dict[str, Any] = {
            "windows_s": tuple(c.windows_s),
            "min_shift_sd": c.min_shift_sd,
            "min_rate_change": c.min_rate_change,
            "warmup_s": c.seasonal_warmup_s,
            "half_life_folds": c.reference_half_life_days,
            "timezone": c.seasonal_timezone,
            "binary": kind == "binary",
            **params,
        }
        return detectors.make(WINDOWED, ert=windowed_ert_s(c), x_ref=ref, **args)

    def _river_param(self, name: str, kind: str, x_ref: Any, ert: float, params: Mapping[str, Any]) -> dict[str, float]:
        """river detectors take a sensitivity parameter, calibrated to the ERT by simulation
        (seconds). Continuous signals arrive as normal scores, so one calibration on the
        Gaussian null serves every stream; binary ones, and continuous ones with a point mass, on
        the bootstrap of their conservative or transformed reference. Cached for the process."""
        import detectors

        param = detectors.detector_class(name).param_name  # type: ignore[attr-defined]
        summary = None if x_ref is None else tuple(sorted(round(float(v), 3) for v in x_ref))
        key = (name, kind, ert, summary, tuple(sorted(params.items())))
        if key not in self._params:
            if self._calibrator is not None:
                self._params[key] = self._calibrator.param(name, ert=ert, x_ref=x_ref, params=params)
            else:
                det = detectors.make(name, ert=ert, x_ref=x_ref, **params)
                self._params[key] = float(det.param_value)  # type: ignore[attr-defined]
        return {param: self._params[key]}

    def _sign(self, data: bytes) -> str:
        mac = hmac.new(self._key, data, hashlib.sha256).digest()
        return base64.b64encode(mac + data).decode("ascii")

    def _unsign(self, text: Any) -> bytes | None:
        """The signed data, or None when it is not what :meth:`_sign` wrote (or its signature fails)."""
        try:
            raw = base64.b64decode(text, validate=True)
        except (TypeError, ValueError):  # not a string, or not base64 (binascii.Error is a ValueError)
            return None
        mac, data = raw[:32], raw[32:]
        if not hmac.compare_digest(mac, hmac.new(self._key, data, hashlib.sha256).digest()):
            return None
        return data

    def _snapshot(self, sd: StreamDrift) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """A stream's state, and the components written apart from it (by state component, each
        written once): the chunks of waiting values filled since the last snapshot
        (``monitor/drift/waiting.py``) and the static part of a signal built since (``static.py``)."""
        signals: dict[str, dict[str, Any]] = {}
        chunks: dict[str, dict[str, Any]] = {}
        shared: list[tuple[str, WaitingValues]] = []  # signals whose state holds their arrivals
        for signal, st in sd.signals.items():
            signals[signal] = {"ref": None, "cooldown": st.cooldown, "n": st.n}
            if st.ref is not None:
                ref, sealed = pack_reference(st.ref, st.ref_sealed)
                signals[signal].update(ref)
                chunks.update((ref_component(COMPONENT, signal, j), {"ref": c}) for j, c in sealed)
                st.ref_sealed = int(ref["ref_sealed"])
            if signal == EMBEDDING:
                signals[signal]["embedding"] = self.embedding_id
            if st.detectors:
                signals[signal].update(self._snapshot_built(signal, st, chunks))
            else:
                signals[signal]["detectors"] = {}
                signals[signal]["transform"] = None if st.transform is None else st.transform.to_dict()
            if st.waiting is not None:  # detectors being built: the next owner builds them again
                waiting = st.waiting
                # The full chunks first, so that every signal compared below holds only its tail.
                chunks.update((chunk_component(COMPONENT, signal, j), c) for j, c in waiting.new_chunks())
                twin = next((name for name, w in shared if w.same_arrivals(waiting)), None)
                signals[signal]["waiting"] = waiting.to_state(arrivals=twin is None)
                if twin is None:
                    shared.append((signal, waiting))
                else:
                    signals[signal]["waiting"]["arrivals_of"] = twin
        return {"version": STATE_VERSION, "signals": signals, "fed": dict(sd.fed)}, chunks

    def _snapshot_built(self, signal: str, st: SignalState, chunks: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """A built signal's detectors: their online state, signed, and the hash of their static part,
        which goes to ``chunks`` (written in the same transaction) the first time only."""
        dets: dict[str, str | None] = {}
        static: dict[str, dict[str, Any]] = {}
        for name, det in st.detectors.items():
            if det is None:
                dets[name] = None
                continue
            data, static[name] = det.snapshot_parts()
            dets[name] = self._sign(data)
        if st.static is None:
            transform = None if st.transform is None else st.transform.to_dict()
            content, st.static = pack_static(transform, static)
            chunks[static_component(COMPONENT, signal)] = content
        if st.static_signed is None or st.static_signed[0] != st.static:
            st.static_signed = (st.static, self._sign(st.static.encode()))
        return {"detectors": dets, "static": st.static_signed[1], "settings": self.build_settings(signal)}

    def _load(self, stream: str) -> StreamDrift:
        """A stream's drift state from its checkpoint; what cannot be used of it warms up again.

        A checkpoint is data the store hands back, possibly written by another release or edited
        by hand: a part of it this release cannot use is refused (one log line, counted in
        ``drift_state_refused``) and that signal learns a new reference. Raising instead would fail
        every episode of the stream, on every run, since the row would never be rewritten. Only
        an outage propagates (retried, never a reason to drop state)."""
        sd = StreamDrift()
        snap = self._read(lambda: self._store.load_state(stream, COMPONENT))
        if snap is not None:
            try:
                self._restore(stream, snap, sd)
            except Exception as e:
                if transient(e):
                    raise
                self._refuse(stream, "*", "unreadable", e)
                sd = StreamDrift()
        self._streams[stream] = sd
        self._apply_rereference(stream)
        return sd

    def _restore(self, stream: str, snap: Mapping[str, Any], sd: StreamDrift) -> None:
        """Fill ``sd`` from a checkpoint's content, signal by signal."""
        if snap.get("version") != STATE_VERSION:
            # An older format, or a newer release's after a rollback: not read, and said so.
            self._refuse(stream, "*", "version", f"format version {snap.get('version')!r}, read {STATE_VERSION}")
            return
        sd.fed = {str(k): int(v) for k, v in dict(snap.get("fed") or {}).items()}
        signals = dict(snap.get("signals") or {})
        for signal, s in signals.items():
            if signal not in self.cfg.signals and not (signal == EMBEDDING and self.cfg.embedding.enabled):
                continue
            try:
                sd.signals[signal] = self._restore_signal(stream, signal, s, signals)
            except RefusedState as e:
                self._refuse(stream, signal, e.reason, str(e))
                sd.signals[signal] = SignalState()
            except Exception as e:
                if transient(e):
                    raise
                self._refuse(stream, signal, "unreadable", e)
                sd.signals[signal] = SignalState()

    def _refuse(self, stream: str, signal: str, reason: str, e: BaseException | str) -> None:
        detail = e if isinstance(e, str) else f"{type(e).__name__}: {first_line(e)}"
        log.error("drift state of %r/%s not used (%s: %s): warming up again", stream, signal, reason, detail)
        self._metrics.drift_state_refused.labels(reason).inc()

    def _restore_signal(
        self, stream: str, signal: str, s: Mapping[str, Any], signals: Mapping[str, Any]
    ) -> SignalState:
        """One signal's state from its checkpoint entry; :class:`RefusedState` (or any error of
        malformed content) when it cannot be used."""
        if signal == EMBEDDING and s.get("embedding") != self.embedding_id:
            # Built on other embeddings (an upgrade to the pair encoding, another encoder or
            # token limit): compared with this one's they would all look like drift.
            raise RefusedState("settings", "the drift embedding changed since the checkpoint")
        try:
            ref = unpack_reference(s, functools.partial(self._load_ref_chunk, stream, signal))
        except ValueError as e:  # a chunk the store does not have (whole)
            raise RefusedState("unreadable", f"its reference: {e}") from e
        st = SignalState(ref=ref, cooldown=int(s.get("cooldown", 0)), n=int(s.get("n", 0)))
        st.ref_sealed = int(s.get("ref_sealed", 0))
        if s.get("transform") is not None:
            st.transform = NormalScores.from_dict(s["transform"])
        if s.get("waiting") is not None:
            st.waiting = self._load_waiting(signals, signal)
        return self._load_detectors(stream, signal, s, st)

    @functools.cached_property
    def drift_pass(self) -> DriftPass | None:
        """What the drift embedding is, for a reward model's pass to compute it too (None: the
        ``text`` encoding). Reads the weights' digest once (~90 MB); loads no model."""
        from monitor.signals.embeddings import embedder_for

        return embedder_for(self.cfg.embedding).drift_pass()

    @property
    def embedding_id(self) -> str | None:
        """What the embedding signal's detectors are built on, saved with them (None: the ``text``
        encoding, unchecked as before the ``pair`` encoding existed)."""
        spec = self.drift_pass
        return None if spec is None else f"pair {spec.weights_sha256} {spec.max_length} {spec.max_prompt_tokens}"

    def _load_detectors(self, stream: str, signal: str, s: Mapping[str, Any], st: SignalState) -> SignalState:
        """A signal's detectors from its checkpoint (and its static part, when it has one);
        :class:`RefusedState` when a signature fails, the static part is missing or another's, or
        the detectors were built with other settings than this configuration's."""
        import detectors

        dets = dict(s.get("detectors") or {})
        if dets:
            self._check_settings(signal, s, dets)
        static: dict[str, dict[str, Any]] = {}
        if s.get("static") is not None:
            sha = self._unsign(s["static"])
            if sha is None:
                raise RefusedState("unreadable", "the static part's hash fails its signature")
            component = static_component(COMPONENT, signal)
            stored = self._read(lambda: self._store.load_state(stream, component))
            try:
                transform, static = unpack_static(stored, sha.decode())
            except ValueError as e:
                raise RefusedState("unreadable", f"its static part: {e}") from e
            st.transform = None if transform is None else NormalScores.from_dict(transform)
            st.static = sha.decode()
        for name, blob in dets.items():
            data = None if blob is None else self._unsign(blob)
            if blob is not None and data is None:
                raise RefusedState("unreadable", f"detector {name} fails its signature")
            st.detectors[name] = None if data is None else detectors.restore_parts(data, static.get(name, {}))
        return st

    def _check_settings(self, signal: str, s: Mapping[str, Any], dets: Mapping[str, Any]) -> None:
        """Detectors built under other settings (``drift.signals``, their parameters, the ERT, the
        windowed settings) are not restored: with another detector configured, the checkpoint's
        would keep watching and the configured one never would. A checkpoint from before the
        settings were recorded is compared by its detector names."""
        names, _ = self._watch_of(signal)
        saved = s.get("settings")
        if saved is None:
            if sorted(dets) != sorted(names):
                raise RefusedState("settings", f"detectors {sorted(dets)} built, {sorted(names)} configured")
        elif saved != self.build_settings(signal):
            raise RefusedState("settings", "built with other detector settings than configured")

    def build_settings(self, signal: str) -> str:
        """A digest of what a signal's detectors are built from, saved with them (the configuration
        does not change while the process runs: computed once per signal)."""
        known = self._settings.get(signal)
        if known is not None:
            return known
        names, _ = self._watch_of(signal)
        c = self.cfg
        what = {
            "detectors": {name: self._params_for(signal, name) for name in names},
            "ert": self.ert_embedding if signal == EMBEDDING else self.ert_each,
            "tail_clip": c.tail_clip,
        }
        if WINDOWED in names:
            windowed: list[Any] = [
                c.windows_s,
                c.min_shift_sd,
                c.min_rate_change,
                c.seasonal_warmup_s,
                c.reference_half_life_days,
                windowed_ert_s(c),
            ]
            if c.seasonal_timezone != "UTC":  # appended only then: UTC checkpoints keep their digest
                windowed.append(c.seasonal_timezone)
            what["windowed"] = windowed
        digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self._settings[signal] = digest
        return digest

    @staticmethod
    def _load_waiting(signals: Mapping[str, Any], signal: str) -> WaitingValues:
        """A signal's waiting values from its checkpoint: the tail (whose arrivals may be in another
        signal's state), and how many chunks before it are in the store."""
        w = signals[signal]["waiting"]
        twin = w.get("arrivals_of")
        return WaitingValues.from_state(w, None if twin is None else signals[twin]["waiting"])

    # -- re-reference -------------------------------------------------------------
    def poll_rereference(self) -> None:
        """Apply pending re-reference requests for streams this replica holds (every few seconds).

        One query for all of them, whatever the number of streams held: a query per stream made
        the poll cost grow with the streams (20,000 streams: 20,000 queries, six seconds every
        five). Between batches, so one attempt: during an outage it tries again at the next poll
        instead of holding the loop (a stop while idle must not wait for the database)."""
        now = time.monotonic()
        if now - self._last_poll < self.cfg.rereference_poll_s:
            return
        self._last_poll = now
        if not self._streams:
            return
        try:
            rows = self._pending_rereferences(None)
        except Exception as e:
            if self._retry is None or not transient(e):
                raise
            self._retry.health.failed("store", e)
            return
        for row in rows:
            if row.stream in self._streams:
                self._rereference(row)

    def _apply_rereference(self, stream: str) -> None:
        """Apply a stream's pending re-reference requests (when its state is loaded)."""
        for row in self._read(lambda: self._pending_rereferences(stream)):
            self._rereference(row)

    def _pending_rereferences(self, stream: str | None) -> list[Any]:
        """Re-reference requests not applied yet, of ``stream`` (None: of every stream). The
        requests are operators' actions: a few rows, whatever the traffic."""
        a = t.drift_audit
        q = sa.select(a.c.id, a.c.stream, a.c.signal).where(a.c.action == "rereference", a.c.applied_at.is_(None))
        if stream is not None:
            q = q.where(a.c.stream == stream)
        with self._store.engine.connect() as conn:
            return list(conn.execute(q.order_by(a.c.id)).all())

    def _rereference(self, row: Any) -> None:
        sd = self._streams[row.stream]
        for signal in list(sd.signals):
            if row.signal is None or row.signal == signal:
                sd.signals[signal] = SignalState()
        self._dirty.add(row.stream)
        self._applied.append(int(row.id))
        log.info("re-referencing %s (%s)", row.stream, row.signal or "all signals")

    def _read(self, fn: Callable[[], _T]) -> _T:
        """A database read on the pipeline's path: through the retry policy when there is one."""
        return fn() if self._retry is None else self._retry.call(fn, "store")

    def _publish_gauges(self, streams: Sequence[str]) -> None:
        m = self._metrics
        for stream in streams:
            label = m.stream_label(stream)
            for signal, st in self._streams[stream].signals.items():
                for name, det in st.detectors.items():
                    if det is None:
                        continue
                    data = det.result()["data"]
                    if data.get("distance") is not None:
                        m.drift_statistic.labels(label, signal, name).set(float(data["distance"]))
                    if data.get("threshold") is not None:
                        m.drift_threshold.labels(label, signal, name).set(float(data["threshold"]))


#: The windowed test's fields an event keeps (detectors/windowed.py, ``last_test``).
WINDOW_FIELDS = ("shift_sd", "ci_low", "ci_high", "min_shift", "window_s", "window_end", "n", "p_val", "alpha")


def bucket_label(b: float) -> str:
    """A seasonal reference bucket in words: ``weekday 14:00 UTC`` (0-23 weekdays, 24-47 weekends)."""
    i = int(b)
    return f"{'weekend' if i >= 24 else 'weekday'} {i % 24:02d}:00 UTC"


def event_detail(det: Any, res: Mapping[str, Any], n: int) -> dict[str, Any]:
    """What a drift event stores about its size (``drift_events.detail``), JSON-safe.

    ``windowed``: the shift in reference SDs with its 95% interval, the window (length, end,
    values in it), the minimum shift of interest and the reference buckets compared with.
    Count detectors (CUSUM & co.): their statistic, threshold and the ERT (episodes) they ran at,
    and the values seen since the signal's warm-up began."""
    data = res.get("data") or {}
    out: dict[str, Any] = {"kind": "count", "ert": _num(getattr(det, "ert", None)), "n": n}
    out["statistic"], out["threshold"] = _num(data.get("distance")), _num(data.get("threshold"))
    w = res.get("window")
    if isinstance(w, Mapping):
        out = {"kind": "windowed", "ert_s": out["ert"], **{k: _num(w.get(k)) for k in WINDOW_FIELDS}}
        if w.get("bucket_first") is not None:
            first, last = float(w["bucket_first"]), float(w.get("bucket_last", w["bucket_first"]))
            ref = bucket_label(first) if first == last else f"{bucket_label(first)} to {bucket_label(last)}"
            out["reference"] = ref if getattr(det, "seasonal", True) else "rolling (not seasonal)"
    return out


def detail_text(detail: Mapping[str, Any] | None) -> str:
    """A drift event's size in one line for people (CLI, admin page); "" when it has no detail."""
    if not isinstance(detail, Mapping):
        return ""
    if detail.get("kind") == "windowed" and isinstance(detail.get("shift_sd"), (int, float)):
        text = f"shift {detail['shift_sd']:+.2f} SD"
        if isinstance(detail.get("ci_low"), (int, float)) and isinstance(detail.get("ci_high"), (int, float)):
            text += f" (95% {detail['ci_low']:+.2f} to {detail['ci_high']:+.2f})"
        if isinstance(detail.get("min_shift"), (int, float)):
            text += f", minimum {detail['min_shift']:.2f}"
        if isinstance(detail.get("n"), (int, float)) and isinstance(detail.get("window_s"), (int, float)):
            text += f", {detail['n']:.0f} values in {detail['window_s'] / 60:.0f} min"
        ref = detail.get("reference")
        return f"{text}, vs {ref}" if isinstance(ref, str) else text
    parts = []
    for key, fmt in (("statistic", "statistic {:.3g}"), ("threshold", "threshold {:.3g}"), ("ert", "ERT {:.0f}")):
        if isinstance(detail.get(key), (int, float)):
            parts.append(fmt.format(detail[key]))
    return ", ".join(parts)


def _work_loop(work: queue.Queue[Callable[[], None]]) -> None:
    """The drift worker: builds detectors (each job catches its own errors) for the process's life."""
    while True:
        job = work.get()
        try:
            job()
        except Exception:
            log.exception("a drift detector build failed")


def request_rereference(store: Store, stream: str, signal: str | None, reason: str, actor: str) -> int:
    """Record an acknowledged change (e.g. a new policy version): the stream's detectors warm up again."""
    with store.engine.begin() as conn:
        return int(
            conn.execute(
                t.drift_audit.insert()
                .values(
                    stream=stream,
                    signal=signal,
                    action="rereference",
                    reason=reason[:500],
                    actor=actor[:64],
                    created_at=time.time(),
                )
                .returning(t.drift_audit.c.id)
            ).scalar_one()
        )


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
