"""The span of traffic the estimates over all traffic cover: each stream's last
``quality.window_days`` days (event time).

Labels are what people made, and retention keeps them for ever (:mod:`monitor.store.retention`):
five reviewers at 500 labels a day make 900,000 in a year. Estimates over every label cost the
admin summary 10 s and 280 MB of the review service per computation at 200,000 labels, and grew
without end; they also mixed a stream's quality of last year into its quality now. A window
bounds what is read by the reviewers' pace over the window, whatever has been kept.

A stream's window ends at the end of its latest traffic minute, as retention measures its horizon
(:func:`monitor.store.retention.horizons`): event time, so that a replay of last year's traffic
is estimated over its own last days, and a stream that went quiet keeps its last window. Traffic
minutes past the wall clock plus ``source.max_future_s`` do not count (a far-future timestamp
would move the window past every label). Every ingested episode counts in its stream's traffic; a
stream with human samples and no traffic counts (rows written by other means) ends its window at
its latest sampled episode instead.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import sqlalchemy as sa

from monitor.config import Settings
from monitor.store import Store
from monitor.store import tables as t
from monitor.store.retention import horizons
from monitor.store.store import BUCKET_S, bucket_of

__all__ = ["Windows", "in_window", "quality_windows", "stream_windows"]

#: Stream -> the event time its window starts at (seconds, on a traffic minute's boundary).
Windows = Mapping[str, float]


def stream_windows(
    store: Store, days: float | None, *, now: float | None = None, max_future_s: float | None = None
) -> dict[str, float] | None:
    """Each stream's window start for ``days`` (None: no window, every label counts)."""
    if days is None:
        return None
    not_after = None if max_future_s is None else (time.time() if now is None else now) + max_future_s
    out = {stream: float(start) for stream, start in horizons(store, days, not_after).items()}
    for stream, last in store.sample_ends("human", not_after).items():
        if stream not in out:  # no traffic counts: the window ends at its latest human sample
            out[stream] = float(bucket_of(bucket_of(last) + BUCKET_S - days * 86400.0))
    return out


def quality_windows(store: Store, settings: Settings, now: float | None = None) -> dict[str, float] | None:
    """The windows ``quality.window_days`` sets (None when it is null)."""
    return stream_windows(store, settings.quality.window_days, now=now, max_future_s=settings.source.max_future_s)


def in_window(windows: Windows, samples: sa.Table | sa.FromClause = t.samples) -> sa.ColumnElement[bool]:
    """Rows of ``samples`` (or an alias) inside their stream's window: one range per stream, which
    the index ``ix_samples_stream_channel_ts`` serves. No stream at all: no row."""
    ranges = [sa.and_(samples.c.stream == s, samples.c.ts >= start) for s, start in sorted(windows.items())]
    return sa.or_(sa.false(), *ranges)
