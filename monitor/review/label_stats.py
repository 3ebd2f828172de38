"""What the admin page and its API compute from the labels: the agreement between reviewers, the
estimates over all traffic and the chart of the estimates over time.

Labels are kept for ever, and these read every one of them: at 200,000 labels (five reviewers, the
default overlap) one computation took 10 s of the review service's interpreter and 280 MB on SQLite
(``bench/review_scale.py``), and every view of the page, every call of the summary and every chart
paid it again, at once if several admins (or one, refreshing) asked together. The reviewers, served
by the same process, waited meanwhile. They now read the labels of each stream's window
(``quality.window_days``, :mod:`monitor.quality.window`): what the reviewers made in that span,
however long the service has run.

:class:`LabelStatsCache` computes them once for all who ask at the same time (the others wait for
that result), and serves a result for ``took / duty`` seconds after a computation that took ``took``
(:class:`monitor.pace.Pace`), so they take at most ``duty`` of the time however often they are asked.
A computation under ``min_paced_s`` is never reused: a small store shows every label as soon as it
is made, as before. Each result says when it was computed (the page shows it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from monitor.config import Settings
from monitor.pace import Pace
from monitor.quality.adjudication import finals
from monitor.quality.estimates import estimate_series, estimates
from monitor.quality.labels import agreement, label_rows
from monitor.quality.window import quality_windows
from monitor.review.chart import MAX_STREAMS
from monitor.store import Store

__all__ = ["CHART_BUCKET_S", "LABEL_STATS_DUTY", "MIN_PACED_S", "LabelStats", "LabelStatsCache", "compute"]

LABEL_STATS_DUTY = 0.1
MIN_PACED_S = 1.0
CHART_BUCKET_S = 3600


@dataclass(frozen=True)
class LabelStats:
    agreement: dict[str, Any]
    estimates: list[dict[str, Any]]
    series: dict[str, list[dict[str, Any]]]  # the chart: the first streams it holds, hourly
    computed_at: float  # wall clock
    window_days: float | None = None  # quality.window_days: what the labels read cover


def compute(store: Store, settings: Settings, now: float, *, chart: bool = True) -> LabelStats:
    """Every label of each stream's window (``quality.window_days``, :mod:`monitor.quality.window`)
    read once, for the agreement, the estimates and (``chart``) the chart."""
    flags = list(settings.review.flags)
    windows = quality_windows(store, settings, now)
    rows = label_rows(store, windows=windows)
    final = finals(store)
    est = estimates(
        store,
        flags,
        rows,
        reliability_weighting=settings.quality.reliability_weighting,
        prior_labels=settings.quality.reliability_prior_labels,
        final=final,
        windows=windows,
    )
    streams = [e["stream"] for e in est][:MAX_STREAMS] if chart else []
    series = {s: estimate_series(store, s, CHART_BUCKET_S, rows, final) for s in streams}
    return LabelStats(agreement(rows, flags), est, series, now, settings.quality.window_days)


class LabelStatsCache:
    """One computation at a time, reused as the module docstring says.

    >>> clock = [0.0]
    >>> def slow() -> LabelStats:
    ...     clock[0] += 2.0  # a computation of 2 s
    ...     return LabelStats({}, [], {}, clock[0])
    >>> cache = LabelStatsCache(slow, duty=0.1, clock=lambda: clock[0])
    >>> cache.get().computed_at, cache.get().computed_at  # the second within 20 s: the same
    (2.0, 2.0)
    >>> clock[0] = 20.0; cache.get().computed_at
    22.0
    """

    def __init__(
        self,
        compute: Callable[[], LabelStats],
        *,
        duty: float = LABEL_STATS_DUTY,
        min_paced_s: float = MIN_PACED_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._compute = compute
        self._pace = Pace(duty)
        self._min_paced_s = min_paced_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: LabelStats | None = None

    def get(self) -> LabelStats:
        # The lock is the single flight: whoever asks meanwhile waits for this result.
        with self._lock:
            start = self._clock()
            if self._last is not None and not self._pace.due(start):
                return self._last
            try:
                # A failure is raised to its caller; the others keep the last result until due.
                self._last = self._compute()
            finally:
                took = self._clock() - start
                # A cheap computation is done afresh each time: not worth a stale answer.
                self._pace.ran(start, took if took >= self._min_paced_s else 0.0)
            return self._last
