"""What a run has done, counted from committed batches only.

The hot loop tallies a batch into a :class:`BatchTally`; the tally is added to the run's
:class:`RunStats` and to the metrics after the batch commits. A batch that is rolled back or
redone after an outage therefore counts once.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sampling import CHANNELS


@dataclass
class StreamStats:
    episodes: int = 0
    invalid: int = 0
    duplicates: int = 0  # copies of an episode taken within the window (monitor.pipeline.dedup)
    sampled: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 0))
    p_min: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CHANNELS, math.inf))
    p_max: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "episodes": self.episodes,
            "invalid": self.invalid,
            "duplicates": self.duplicates,
            "sampled": dict(self.sampled),
            "inclusion_probability": {
                ch: {"min": self.p_min[ch], "max": self.p_max[ch]} for ch in CHANNELS if self.p_max[ch] > 0
            },
        }

    def saw_probabilities(self, probs: dict[str, float]) -> None:
        for ch in CHANNELS:
            p = probs[ch]
            self.p_min[ch] = min(self.p_min[ch], p)
            self.p_max[ch] = max(self.p_max[ch], p)


@dataclass
class RunStats:
    records: int = 0
    invalid: int = 0
    duplicates: int = 0
    sampled: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 0))
    dead_letters: Counter[str] = field(default_factory=Counter)
    streams: dict[str, StreamStats] = field(default_factory=dict)
    batches: int = 0
    stale_batches: int = 0
    offset_regressions: int = 0  # partitions whose stored offset went back (the database lost commits)
    #: The run's drift events as its report lists them: every one for a replay or an import, the
    #: last ``max_drift_events`` for a service that runs for months (they are in the database).
    drift_events: list[dict[str, Any]] = field(default_factory=list)
    drift_event_count: int = 0
    max_drift_events: int | None = None
    #: Streams an invalid record may add to ``streams`` (``pipeline.max_streams``; valid records
    #: come only from the streams the pipeline holds, which that setting bounds already).
    max_streams: int | None = None

    def add_drift_events(self, events: list[dict[str, Any]]) -> None:
        """Count and keep a committed batch's drift events (the oldest dropped beyond the cap).

        >>> stats = RunStats(max_drift_events=2)
        >>> stats.add_drift_events([{"index": 1}, {"index": 2}, {"index": 3}])
        >>> stats.drift_event_count, [ev["index"] for ev in stats.drift_events]
        (3, [2, 3])
        """
        self.drift_event_count += len(events)
        self.drift_events.extend(events)
        cap = self.max_drift_events
        if cap is not None and len(self.drift_events) > cap:
            del self.drift_events[: len(self.drift_events) - cap]

    def count_invalid(self, stream: str | None) -> None:
        """One more invalid record. Counted under its stream too, unless that would take the
        streams counted past ``max_streams``: an invalid record names any stream it likes, and a
        stream counted here stays in memory for the run.

        >>> stats = RunStats(max_streams=2)
        >>> for s in ("a", "b", "c", "a"):
        ...     stats.count_invalid(s)
        >>> stats.invalid, {name: st.invalid for name, st in stats.streams.items()}
        (4, {'a': 2, 'b': 1})
        """
        self.invalid += 1
        if stream is not None and (
            stream in self.streams or self.max_streams is None or len(self.streams) < self.max_streams
        ):
            self.stream(stream).invalid += 1

    def stream(self, name: str) -> StreamStats:
        st = self.streams.get(name)
        if st is None:
            st = self.streams[name] = StreamStats()
        return st


@dataclass
class BatchTally:
    """Per-stream counts of one batch, before it commits."""

    valid: Counter[str] = field(default_factory=Counter)
    not_sampled: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    #: The distinct probability dicts each stream's decisions used (the sampler reuses one dict
    #: until a stream's rates change), in order: min and max over them are the batch's range.
    probabilities: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def saw(self, stream: str, probs: dict[str, float]) -> None:
        self.valid[stream] += 1
        seen = self.probabilities.get(stream)
        if seen is None:
            self.probabilities[stream] = [probs]
        elif seen[-1] is not probs:
            seen.append(probs)
