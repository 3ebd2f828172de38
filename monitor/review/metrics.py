"""Prometheus metrics of the review service (namespaced ``oversight_review_``).

Queue depth and age are read from the database at scrape time by a custom
collector, so every replica reports the same, current numbers: at most ``QUEUE_DUTY`` of the
time, since counting the queue grows with it (a scrape between two counts reports the last).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from monitor.assist import registered
from monitor.config import CanaryConfig
from monitor.pace import Pace
from monitor.quality.adjudication import Rule, waiting_per_stream
from monitor.store import Store

NS = "oversight"
LABEL_OUTCOMES = ("labelled", "skipped", "undone")
ADJUDICATION_OUTCOMES = ("adjudicated", "refused")
LOGIN_RESULTS = ("ok", "failed", "rate_limited", "busy")
#: The largest share of time the queue's depth may be counted. Counting reads every task (the
#: database has no cheaper way to count): at 2,000,000 waiting 0.28 s on PostgreSQL and 1.2 s on
#: SQLite, and retention keeps a pending task for its whole horizon. A count that took t seconds
#: is used for t / QUEUE_DUTY seconds: every scrape of a small queue counts it afresh.
QUEUE_DUTY = 0.05


class QueueCollector(Collector):
    def __init__(self, store: Store, max_streams: int, clock: Callable[[], float] = time.time):
        self._store = store
        self._max_streams = max_streams
        self._clock = clock
        self._counted: list[dict[str, Any]] = []
        self._pace = Pace(QUEUE_DUTY)  # by the monotonic clock

    def _rows(self) -> list[dict[str, Any]]:
        """The queue's depth, counted afresh when due (``QUEUE_DUTY``); the ages of the oldest
        waiting items move on with the clock in between."""
        from monitor.review.queue import queue_depth

        start = time.monotonic()
        if not self._pace.due(start):
            return self._counted
        try:
            now = self._clock()
            self._counted = [{**r, "counted_at": now} for r in queue_depth(self._store, now)]
        except Exception:
            self._counted = []  # the scrapes until the next count show what this one shows: nothing
            raise
        finally:
            self._pace.ran(start, time.monotonic() - start)
        return self._counted

    def collect(self) -> Iterator[Any]:
        waiting = GaugeMetricFamily(
            f"{NS}_review_queue_waiting", "Review items waiting (pending or lease expired)", labels=["stream"]
        )
        leased = GaugeMetricFamily(f"{NS}_review_queue_leased", "Review items under a live lease", labels=["stream"])
        done = GaugeMetricFamily(f"{NS}_review_queue_done", "Review items labelled", labels=["stream"])
        oldest = GaugeMetricFamily(
            f"{NS}_review_queue_oldest_seconds", "Age of the oldest waiting review item", labels=["stream"]
        )
        error = GaugeMetricFamily(
            f"{NS}_review_queue_error", "Review items set aside because they could not be shown", labels=["stream"]
        )
        try:
            counted = self._rows()
        except Exception:  # a scrape must not fail because the database blinked
            counted = []
        now = self._clock()
        rows = [
            {**r, "oldest_wait_s": None if r["oldest_wait_s"] is None else r["oldest_wait_s"] + now - r["counted_at"]}
            for r in counted
        ]
        # Bounded label set: the busiest streams by name order, the rest summed as _other.
        head, tail = rows[: self._max_streams], rows[self._max_streams :]
        if tail:
            head.append(
                {
                    "stream": "_other",
                    "waiting": sum(r["waiting"] for r in tail),
                    "leased": sum(r["leased"] for r in tail),
                    "done": sum(r["done"] for r in tail),
                    "error": sum(r["error"] for r in tail),
                    "oldest_wait_s": max((r["oldest_wait_s"] or 0.0) for r in tail),
                }
            )
        for r in head:
            waiting.add_metric([r["stream"]], r["waiting"])
            leased.add_metric([r["stream"]], r["leased"])
            done.add_metric([r["stream"]], r["done"])
            oldest.add_metric([r["stream"]], r["oldest_wait_s"] or 0.0)
            error.add_metric([r["stream"]], r["error"])
        yield from (waiting, leased, done, oldest, error)


class QualityCollector(Collector):
    """Reviewer quality from canaries (:mod:`monitor.quality.canaries`), read at scrape time.

    Bounded: at most ``max_metric_reviewers`` reviewers (most canary labels first, then by name;
    the rest summed as ``_other``) times the configured kinds. Pre-zeroed: every active reviewer
    has every kind's series from the first scrape (``canaries`` 0, ``low`` 0, the rate NaN: no
    measurement yet is not a detection rate of 0)."""

    def __init__(self, store: Store, cfg: CanaryConfig, clock: Callable[[], float] = time.time):
        self._store = store
        self._cfg = cfg
        self._clock = clock

    def collect(self) -> Iterator[Any]:
        from monitor.perturb import NAMES
        from monitor.quality.canaries import low, outcomes, summarise, window_start
        from monitor.review.auth import list_users

        labels = ["reviewer", "kind"]
        rate = GaugeMetricFamily(
            f"{NS}_reviewer_detection_rate",
            "Canaries of a kind a reviewer detected, corrected for chance (window), NaN: none",
            labels=labels,
        )
        upper = GaugeMetricFamily(
            f"{NS}_reviewer_detection_upper", "Upper 95% bound of the detection rate (NaN: none)", labels=labels
        )
        low_g = GaugeMetricFamily(
            f"{NS}_reviewer_detection_low",
            "1 when the detection rate's upper bound is below review.canaries.min_detection_rate",
            labels=labels,
        )
        count = GaugeMetricFamily(f"{NS}_reviewer_canaries", "Scored canary labels (window)", labels=labels)
        kinds = list(self._cfg.kinds or NAMES)
        try:
            items = outcomes(self._store, window_start(self._cfg.window_days, self._clock()))
            names = [u.name for u in list_users(self._store)]
        except Exception:  # a scrape must not fail because the database blinked
            items, names = [], []
        per: dict[str, list[Any]] = {n: [] for n in names}
        for o in items:
            per.setdefault(o.reviewer, []).append(o)
        order = sorted(per, key=lambda n: (-len(per[n]), n))
        head, tail = order[: self._cfg.max_metric_reviewers], order[self._cfg.max_metric_reviewers :]
        groups = {n: per[n] for n in head}
        if tail:
            groups["_other"] = [o for n in tail for o in per[n]]
        for name, outs in groups.items():
            for k in kinds:
                # A kind's detection baseline is the reviewer's originals of every kind, as in the API.
                s = summarise((o for o in outs if o.kind == k), outs)
                d = s["detection"]
                rate.add_metric([name, k], d["rate"] if d["rate"] is not None else math.nan)
                upper.add_metric([name, k], d["ci"][1] if d["ci"] is not None else math.nan)
                low_g.add_metric([name, k], 1.0 if low(s, self._cfg.min_detection_rate) else 0.0)
                count.add_metric([name, k], d["n"])
        yield from (rate, upper, low_g, count)


class DisagreementCollector(Collector):
    """Items whose reviewers disagree and that no administrator has adjudicated yet, per stream.

    Counted by the database in one grouped scan of the labels (about 1 us per label on SQLite:
    ``bench/adjudication.py``), at most once per ``cache_s``: every replica's every scrape would
    otherwise repeat it. Every stream of the review queue is read at each scrape (an index) and
    reports 0 when it has none, so a new stream's series exists from its first review task."""

    def __init__(
        self, store: Store, rule: Rule, max_streams: int, clock: Callable[[], float] = time.time, cache_s: float = 60.0
    ):
        self._store = store
        self._rule = rule
        self._max_streams = max_streams
        self._clock = clock
        self._cache_s = cache_s
        self._cached: tuple[float, dict[str, int]] | None = None

    def _counts(self) -> dict[str, int]:
        now = self._clock()
        if self._cached is not None and now - self._cached[0] < self._cache_s:
            return self._cached[1]
        counts = waiting_per_stream(self._store, self._rule)
        self._cached = (now, counts)
        return counts

    def collect(self) -> Iterator[Any]:
        g = GaugeMetricFamily(
            f"{NS}_review_disagreements_waiting",
            "Items whose reviewers disagree (review.adjudication) waiting for an adjudicator",
            labels=["stream"],
        )
        try:
            counts = self._counts()
            # Not cached: a stream's series exists from its first review item. A loose index scan,
            # one seek per stream: the DISTINCT it replaces read every review item at every scrape
            # (10 ms a scrape at 100,000 items, 101 ms at 1.6 million).
            with self._store.engine.connect() as conn:
                queued = queued_streams(conn)
        except Exception:  # a scrape must not fail because the database blinked
            counts, queued = {}, []
        counts = {**dict.fromkeys(queued, 0), **counts}
        names = sorted(counts)
        head, tail = names[: self._max_streams], names[self._max_streams :]
        for s in head:
            g.add_metric([s], counts[s])
        if tail:
            g.add_metric(["_other"], sum(counts[s] for s in tail))
        yield g


def queued_streams(conn: sa.Connection) -> list[str]:
    """The streams with review items: one seek per stream on ``ix_review_tasks_stream_status`` (a
    loose index scan), where ``DISTINCT`` reads every item."""
    q = sa.text(
        "WITH RECURSIVE s(stream) AS ("
        " SELECT MIN(stream) FROM review_tasks"
        " UNION ALL"
        " SELECT (SELECT MIN(r.stream) FROM review_tasks r WHERE r.stream > s.stream) FROM s WHERE s.stream IS NOT NULL"
        ") SELECT stream FROM s WHERE stream IS NOT NULL"
    )
    return [str(x) for x in conn.execute(q).scalars()]


class ReviewMetrics:
    def __init__(
        self,
        store: Store,
        registry: CollectorRegistry | None = None,
        max_streams: int = 50,
        clock: Callable[[], float] = time.time,
        canaries: CanaryConfig | None = None,
        disagreement: Rule | None = None,
    ):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(QueueCollector(store, max_streams, clock))
        # Reviewer quality from canaries (the defaults when none are given: the series exist either way).
        self.registry.register(QualityCollector(store, canaries if canaries is not None else CanaryConfig(), clock))
        self.registry.register(
            DisagreementCollector(store, disagreement if disagreement is not None else Rule(), max_streams, clock)
        )
        self.adjudications = Counter(
            "review_adjudications",
            "Adjudications of disagreeing labels, by outcome (adjudicated, refused)",
            ["outcome"],
            namespace=NS,
            registry=self.registry,
        )
        self.labels = Counter(
            "review_labels",
            "Labels submitted, by outcome (labelled, skipped; undone: withdrawn by their reviewer)",
            ["outcome"],
            namespace=NS,
            registry=self.registry,
        )
        self.conflicts = Counter(
            "review_stale_submits", "Submits refused because the lease was stale", namespace=NS, registry=self.registry
        )
        self.logins = Counter(
            "review_logins",
            "Login attempts, by result (ok, failed, rate_limited, busy: no password-hashing slot free)",
            ["result"],
            namespace=NS,
            registry=self.registry,
        )
        self.claim_errors = Counter(
            "review_claim_errors",
            "Claimed items that could not be shown and were set aside",
            namespace=NS,
            registry=self.registry,
        )
        self.assist_errors = Counter(
            "assist_errors",
            "Assistants that failed, timed out or returned no valid hints for an item (it showed none of theirs)",
            ["assistant"],
            namespace=NS,
            registry=self.registry,
        )
        # Pre-zeroed: the first failure shows up in rate().
        for name in registered():
            self.assist_errors.labels(name)
        for outcome in LABEL_OUTCOMES:
            self.labels.labels(outcome)
        for outcome in ADJUDICATION_OUTCOMES:
            self.adjudications.labels(outcome)
        for result in LOGIN_RESULTS:
            self.logins.labels(result)

    def login_refused(self, status: int) -> None:
        """Count a refused login by its HTTP status (429 throttled, 503 busy, else failed)."""
        self.logins.labels({429: "rate_limited", 503: "busy"}.get(status, "failed")).inc()
