"""Prometheus metrics of the review service (namespaced ``oversight_review_``).

Queue depth and age are read from the database at scrape time by a custom
collector, so every replica reports the same, current numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from monitor.store import Store

NS = "oversight"
LABEL_OUTCOMES = ("labelled", "skipped", "undone")
LOGIN_RESULTS = ("ok", "failed", "rate_limited", "busy")


class QueueCollector(Collector):
    def __init__(self, store: Store, max_streams: int, clock: Callable[[], float] = time.time):
        self._store = store
        self._max_streams = max_streams
        self._clock = clock

    def collect(self) -> Iterator[Any]:
        from monitor.review.queue import queue_depth

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
            rows = queue_depth(self._store, self._clock())
        except Exception:  # a scrape must not fail because the database blinked
            rows = []
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


class ReviewMetrics:
    def __init__(
        self,
        store: Store,
        registry: CollectorRegistry | None = None,
        max_streams: int = 50,
        clock: Callable[[], float] = time.time,
    ):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(QueueCollector(store, max_streams, clock))
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
        # Pre-zeroed: the first failure shows up in rate().
        for outcome in LABEL_OUTCOMES:
            self.labels.labels(outcome)
        for result in LOGIN_RESULTS:
            self.logins.labels(result)

    def login_refused(self, status: int) -> None:
        """Count a refused login by its HTTP status (429 throttled, 503 busy, else failed)."""
        self.logins.labels({429: "rate_limited", 503: "busy"}.get(status, "failed")).inc()
