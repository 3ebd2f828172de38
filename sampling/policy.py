"""Channel policies, floors, budgets and boosts, and the per-episode decision.

Channels:

- ``human`` and ``rm`` share one keyed uniform draw per episode, and the
  effective ``rm`` probability is never below the ``human`` one, so every
  human-sampled episode is also reward-model scored (the two can be compared
  on the same items).
- ``drift`` uses an independent draw.

Every channel has a floor probability > 0: no episode is ever unsupervisable.
Time is the stream's event time (the largest episode timestamp seen), so a
replay of the same input gives the same decisions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sampling.hashing import keyed_uniforms

CHANNELS: tuple[str, ...] = ("human", "rm", "drift")


@dataclass(frozen=True)
class ChannelPolicy:
    """Base rate and floor of one channel."""

    rate: float
    floor: float = 0.001
    max_rate: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.floor <= 1.0:
            raise ValueError(f"floor must be in (0, 1], got {self.floor}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")
        if not self.floor <= self.max_rate <= 1.0:
            raise ValueError("max_rate must be in [floor, 1]")

    def clamp(self, p: float) -> float:
        return min(self.max_rate, max(self.floor, p))


@dataclass(frozen=True)
class SamplingPolicy:
    """Rates for every stream, with per-stream overrides and review budgets.

    ``budgets`` maps a stream (or ``"*"`` for every stream) to a target number
    of human reviews per hour; the human rate of that stream then follows
    ``target / traffic_per_hour`` (never below the floor) instead of its base
    rate. Traffic is measured over windows of ``budget_window_s`` seconds of
    event time and smoothed with ``budget_smoothing``.
    """

    channels: Mapping[str, ChannelPolicy]
    streams: Mapping[str, Mapping[str, ChannelPolicy]] = field(default_factory=dict)
    budgets: Mapping[str, float] = field(default_factory=dict)
    budget_window_s: float = 300.0
    budget_smoothing: float = 0.5

    def __post_init__(self) -> None:
        missing = [c for c in CHANNELS if c not in self.channels]
        if missing:
            raise ValueError(f"missing channel policies: {missing}")
        if self.budget_window_s <= 0 or not 0 < self.budget_smoothing <= 1:
            raise ValueError("budget_window_s must be > 0 and budget_smoothing in (0, 1]")

    def channel(self, stream: str, channel: str) -> ChannelPolicy:
        override = self.streams.get(stream)
        if override is not None and channel in override:
            return override[channel]
        return self.channels[channel]

    def budget(self, stream: str) -> float | None:
        if stream in self.budgets:
            return self.budgets[stream]
        return self.budgets.get("*")


@dataclass
class Boost:
    factor: float
    until: float
    channels: tuple[str, ...]
    reason: str = ""


@dataclass
class StreamSamplingState:
    """Everything a stream's decisions depend on besides the policy and key.

    Checkpointed with the consumed offsets so that a restarted or reassigned
    replica makes the same decisions as the one before it.
    """

    clock: float = -math.inf
    window_start: float | None = None
    window_count: int = 0
    traffic_per_hour: float | None = None
    budget_rate: float | None = None
    boosts: list[Boost] = field(default_factory=list)
    #: The review budget's last window that spanned more than two windows of the clock (a stream
    #: that was quiet, or a clock that leapt): (its start, its end, the traffic per hour and the
    #: budget rate before it closed). :func:`rewind_clock` puts the budget back as it was before
    #: that window when the window ended past ``not_after`` (the clock leapt into the future).
    leap: tuple[float, float, float | None, float | None] | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "version": 1,
            "clock": None if math.isinf(self.clock) else self.clock,
            "window_start": self.window_start,
            "window_count": self.window_count,
            "traffic_per_hour": self.traffic_per_hour,
            "budget_rate": self.budget_rate,
            "boosts": [
                {"factor": b.factor, "until": b.until, "channels": list(b.channels), "reason": b.reason}
                for b in self.boosts
            ],
            "leap": None if self.leap is None else list(self.leap),
        }

    @classmethod
    def restore(cls, snap: Mapping[str, Any]) -> StreamSamplingState:
        if snap.get("version") != 1:
            raise ValueError(f"unknown sampling state version {snap.get('version')!r}")
        clock = snap.get("clock")
        leap = snap.get("leap")
        return cls(
            clock=-math.inf if clock is None else float(clock),
            window_start=snap.get("window_start"),
            window_count=int(snap.get("window_count", 0)),
            traffic_per_hour=snap.get("traffic_per_hour"),
            budget_rate=snap.get("budget_rate"),
            boosts=[
                Boost(float(b["factor"]), float(b["until"]), tuple(b["channels"]), str(b.get("reason", "")))
                for b in snap.get("boosts", [])
            ],
            leap=None if leap is None else (float(leap[0]), float(leap[1]), leap[2], leap[3]),
        )


def rewind_clock(state: StreamSamplingState, not_after: float) -> bool:
    """Undo a clock moved past ``not_after``: True if it did. A record stamped in the far future
    moves it there, and so does every record stamped with the ingesting host's clock while that
    clock is stepped ahead (a bad NTP answer, an RTC read as local time): the clock stays there
    when the host's clock is set right, since it only moves forward.

    Such a clock ended every boost (a boost lasts until the clock passes its end), froze the
    review budget's window (it never closes again) and made every later boost last until after
    that date. So the clock starts again from the next episode, the budget's window with it, and
    the boosts go: each one left was made after the bad record. The budget's rate is kept, or,
    when the window that closed across the leap is known (:attr:`StreamSamplingState.leap`), put
    back as it was before that window: its traffic per hour counted the leap as hours without
    traffic. Only later decisions change: each sample keeps the probability it was drawn with.

    >>> st = StreamSamplingState(clock=253402300799.0, window_start=253402300000.0, window_count=5)
    >>> st.boosts.append(Boost(4.0, 253402304399.0, ("human",), "drift"))
    >>> rewind_clock(st, not_after=1_767_225_900.0), st.clock, st.window_start, st.boosts
    (True, -inf, None, [])
    >>> rewind_clock(StreamSamplingState(clock=1_767_225_600.0), not_after=1_767_225_900.0)
    False
    >>> st = StreamSamplingState(clock=1_767_254_430.0, window_start=1_767_254_400.0, window_count=300,
    ...     traffic_per_hour=18_010.0, budget_rate=0.02, leap=(1_767_225_590.0, 1_767_254_400.0, 36_000.0, 0.01))
    >>> rewind_clock(st, not_after=1_767_225_900.0), st.traffic_per_hour, st.budget_rate, st.leap
    (True, 36000.0, 0.01, None)
    """
    if not state.clock > not_after:
        return False
    leap = state.leap
    if leap is not None and leap[0] <= not_after < leap[1]:
        state.traffic_per_hour, state.budget_rate = leap[2], leap[3]
    state.clock = -math.inf
    state.window_start = None
    state.window_count = 0
    state.boosts = []
    state.leap = None
    return True


class Decision:
    """Which channels sampled an episode, and the probabilities in effect.

    ``sampled`` maps each selected channel to its inclusion probability;
    ``probabilities`` holds the probability of every channel, selected or not.
    """

    __slots__ = ("probabilities", "sampled", "u_drift", "u_review")

    def __init__(self, sampled: dict[str, float], probabilities: dict[str, float], u_review: float, u_drift: float):
        self.sampled = sampled
        self.probabilities = probabilities
        self.u_review = u_review
        self.u_drift = u_drift

    def __repr__(self) -> str:
        return f"Decision(sampled={self.sampled!r}, probabilities={self.probabilities!r})"


_UNSET = object()

StateLoader = Callable[[str], "StreamSamplingState | None"]


class Sampler:
    """Per-episode sampling decisions for every stream.

    ``decide`` is a pure function of (key, policy, stream state, episode id);
    it also advances the stream's event-time clock and review budget, which
    only affect later episodes. ``loader`` fetches a stream's checkpointed
    state the first time the stream is seen (after a restart or rebalance).
    """

    def __init__(self, policy: SamplingPolicy, key: bytes, loader: StateLoader | None = None):
        if not key:
            raise ValueError("the sampling key must not be empty")
        self.policy = policy
        self._key = key
        self._loader = loader
        self._states: dict[str, StreamSamplingState] = {}
        self._rates: dict[str, tuple[dict[str, float], float]] = {}
        self._dirty: set[str] = set()
        self._targets: dict[str, float | object | None] = {}
        self._throttle: dict[str, float] = {}

    # -- state -----------------------------------------------------------
    def state(self, stream: str) -> StreamSamplingState:
        st = self._states.get(stream)
        if st is None:
            st = self._loader(stream) if self._loader is not None else None
            if st is None:
                st = StreamSamplingState()
            self._states[stream] = st
        return st

    @property
    def streams(self) -> list[str]:
        return sorted(self._states)

    def take_dirty(self) -> dict[str, dict[str, Any]]:
        """Snapshots of the streams changed since the last call."""
        out = {s: self._states[s].snapshot() for s in self._dirty if s in self._states}
        self._dirty.clear()
        return out

    def forget(self, streams: Iterable[str] | None = None) -> None:
        """Drop cached state (after a rebalance it is reloaded from the checkpoint). Every per-stream
        cache goes: the budget targets kept theirs, and grew by every stream ever met."""
        if streams is None:
            self._states.clear()
            self._rates.clear()
            self._dirty.clear()
            self._targets.clear()
            return
        for s in streams:
            self._states.pop(s, None)
            self._rates.pop(s, None)
            self._dirty.discard(s)
            self._targets.pop(s, None)

    def rewind(self, stream: str, not_after: float) -> float | None:
        """:func:`rewind_clock` on the stream's state, its cached rates dropped and the state
        checkpointed with the next batch. Returns the clock it undid, None when it was not past
        ``not_after``."""
        st = self.state(stream)
        clock = st.clock
        if not rewind_clock(st, not_after):
            return None
        self._rates.pop(stream, None)
        self._dirty.add(stream)
        return clock

    # -- rates -----------------------------------------------------------
    def rates(self, stream: str) -> dict[str, float]:
        """Inclusion probability of every channel for the stream's next episode."""
        cached = self._rates.get(stream)
        st = self.state(stream)
        if cached is not None and st.clock < cached[1]:
            return cached[0]
        rates, valid_until = self._compute_rates(stream, st)
        self._rates[stream] = (rates, valid_until)
        return rates

    def _compute_rates(self, stream: str, st: StreamSamplingState) -> tuple[dict[str, float], float]:
        active = [b for b in st.boosts if b.until > st.clock]
        if len(active) != len(st.boosts):
            st.boosts = active
            self._dirty.add(stream)
        out: dict[str, float] = {}
        for ch in CHANNELS:
            pol = self.policy.channel(stream, ch)
            base = pol.rate
            if ch == "human" and st.budget_rate is not None and self.policy.budget(stream) is not None:
                base = st.budget_rate
            factor = max([b.factor for b in active if ch in b.channels], default=1.0)
            out[ch] = pol.clamp(base * factor * self._throttle.get(ch, 1.0))
        out["rm"] = max(out["rm"], out["human"])
        valid_until = min([b.until for b in active], default=math.inf)
        return out, valid_until

    def throttle(self, channel: str, factor: float) -> None:
        """Scale a channel's rate on every stream by ``factor`` (at most 1) until told otherwise:
        what the model channels' inference workers can serve. The floor still holds (a channel's
        rate never goes below it), every decision records the probability in effect, and a
        channel keeps ``rm >= human`` (the human rate is never throttled), so estimates stay
        unbiased. Not checkpointed: it follows the workers, measured again after a restart.

        >>> from sampling import ChannelPolicy, Sampler, SamplingPolicy
        >>> rates = {"human": ChannelPolicy(0.01), "rm": ChannelPolicy(0.2), "drift": ChannelPolicy(0.1, floor=0.02)}
        >>> sampler = Sampler(SamplingPolicy(rates), key=b"an example key, never this one")
        >>> sampler.throttle("drift", 0.5)
        >>> sampler.rates("chat")["drift"]
        0.05
        >>> sampler.throttle("drift", 0.01)  # never below the floor
        >>> sampler.rates("chat")["drift"]
        0.02
        """
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"a throttle factor must be in (0, 1], got {factor}")
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}")
        if self._throttle.get(channel, 1.0) == factor:
            return
        self._throttle[channel] = factor
        self._rates.clear()

    def throttle_factor(self, channel: str) -> float:
        return self._throttle.get(channel, 1.0)

    def boost_factor(self, stream: str, channel: str) -> float:
        st = self.state(stream)
        return max([b.factor for b in st.boosts if channel in b.channels and b.until > st.clock], default=1.0)

    def boost(
        self,
        stream: str,
        factor: float,
        duration: float,
        channels: Iterable[str] = ("human", "rm"),
        reason: str = "",
        now: float | None = None,
    ) -> None:
        """Multiply the stream's rates on ``channels`` by ``factor`` for ``duration`` seconds.

        Duration is measured on the stream's event-time clock from ``now``
        (default: the latest episode seen). Overlapping boosts do not stack:
        the largest active factor applies.
        """
        if factor < 1.0 or duration <= 0:
            raise ValueError("a boost needs factor >= 1 and duration > 0")
        chans = tuple(channels)
        unknown = set(chans) - set(CHANNELS)
        if unknown:
            raise ValueError(f"unknown channels {sorted(unknown)}")
        st = self.state(stream)
        start = st.clock if now is None else now
        if math.isinf(start):
            start = 0.0 if now is None else now
        st.boosts.append(Boost(float(factor), start + float(duration), chans, reason))
        self._rates.pop(stream, None)
        self._dirty.add(stream)

    # -- decisions -------------------------------------------------------
    def decide(self, episode_id: str, stream: str, event_time: float) -> Decision:
        """The channels that sample the episode, and every channel's inclusion probability.

        >>> from sampling import ChannelPolicy, Sampler, SamplingPolicy
        >>> rates = {"human": ChannelPolicy(0.05), "rm": ChannelPolicy(0.2), "drift": ChannelPolicy(0.1)}
        >>> policy = SamplingPolicy(rates)
        >>> sampler = Sampler(policy, key=b"an example key, never this one")
        >>> sampler.decide("episode-26", "chat", event_time=1000.0)
        Decision(sampled={'rm': 0.2, 'human': 0.05}, probabilities={'human': 0.05, 'rm': 0.2, 'drift': 0.1})

        The same key, episode and stream state give the same decision (a redelivered episode is
        not sampled twice over), and a human-sampled episode is always in the ``rm`` sample too:

        >>> Sampler(policy, key=b"an example key, never this one").decide("episode-26", "chat", 1000.0).sampled
        {'rm': 0.2, 'human': 0.05}

        A boost multiplies the rates (``human`` and ``rm`` by default) for a span of event time:

        >>> sampler.boost("chat", factor=4.0, duration=600.0)
        >>> sampler.decide("episode-27", "chat", event_time=1001.0).probabilities
        {'human': 0.2, 'rm': 0.8, 'drift': 0.1}
        """
        # Runs for every episode of the deployment: kept flat on purpose.
        st = self._states.get(stream)
        if st is None:
            st = self.state(stream)
        if event_time > st.clock:  # noqa: PLR1730 (hot loop: no call)
            st.clock = event_time
        self._dirty.add(stream)
        target = self._targets.get(stream, _UNSET)
        if target is _UNSET:
            target = self._targets[stream] = self.policy.budget(stream)
        if target is not None:
            self._observe_budget(stream, st, target)  # type: ignore[arg-type]
        cached = self._rates.get(stream)
        rates = cached[0] if cached is not None and st.clock < cached[1] else self.rates(stream)
        u, v = keyed_uniforms(self._key, episode_id)
        sampled: dict[str, float] = {}
        if u < rates["rm"]:
            sampled["rm"] = rates["rm"]
            if u < rates["human"]:
                sampled["human"] = rates["human"]
        if v < rates["drift"]:
            sampled["drift"] = rates["drift"]
        return Decision(sampled, rates, u, v)

    def _observe_budget(self, stream: str, st: StreamSamplingState, target: float) -> None:
        if st.window_start is None:
            st.window_start = st.clock
        st.window_count += 1
        elapsed = st.clock - st.window_start
        if elapsed >= self.policy.budget_window_s:
            if elapsed > 2.0 * self.policy.budget_window_s:  # a leap of the clock: see rewind_clock
                st.leap = (st.window_start, st.clock, st.traffic_per_hour, st.budget_rate)
            per_hour = st.window_count * 3600.0 / elapsed
            a = self.policy.budget_smoothing
            st.traffic_per_hour = (
                per_hour if st.traffic_per_hour is None else a * per_hour + (1 - a) * st.traffic_per_hour
            )
            st.budget_rate = min(1.0, target / st.traffic_per_hour) if st.traffic_per_hour > 0 else 1.0
            st.window_start = st.clock
            st.window_count = 0
            self._rates.pop(stream, None)
