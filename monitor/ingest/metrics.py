"""Prometheus metrics of the ingest API, on an injectable registry, every known label pre-zeroed."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from monitor.episodes import REASONS

NS = "oversight_ingest"
STATUSES = ("accepted", "duplicate", "rejected")
# Reasons of the API itself besides validation's.
API_REASONS = ("stream_not_allowed", "duplicate_in_request")
# HTTP statuses the API answers with (anything else is counted as "other"); 499 (nginx's "client
# closed request"): the client went away before its body was complete, so nothing was answered.
CODES = ("200", "400", "401", "408", "413", "415", "422", "429", "499", "503")
REFUSALS = ("too_large", "too_many_records", "inflight", "backlog", "unauthorized", "unavailable", "body_timeout")


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.records = Counter("records", "Records by outcome", ["status"], namespace=NS, registry=r)
        self.rejected = Counter(
            "rejected",
            "Records rejected (answered to the caller, not dead-lettered), by reason",
            ["reason"],
            namespace=NS,
            registry=r,
        )
        self.requests = Counter("requests", "Requests by HTTP status", ["code"], namespace=NS, registry=r)
        self.refused = Counter(
            "refused", "Requests refused whole (413, 429, 401, 503), by why", ["why"], namespace=NS, registry=r
        )
        self.handoff_failures = Counter(
            "handoff_failures",
            "Hand-offs that failed (database or broker outage): answered 503",
            namespace=NS,
            registry=r,
        )
        self.handoff_seconds = Histogram(
            "handoff_seconds",
            "Time to hand a request's accepted records off durably",
            namespace=NS,
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.inflight = Gauge("inflight", "Requests being processed", namespace=NS, registry=r)
        self.ready = Gauge(
            "ready", "1 when the hand-off target and the token list are reachable", namespace=NS, registry=r
        )
        for s in STATUSES:
            self.records.labels(s)
        for reason in (*REASONS, *API_REASONS):
            self.rejected.labels(reason)
        for code in (*CODES, "other"):
            self.requests.labels(code)
        for why in REFUSALS:
            self.refused.labels(why)

    def request(self, code: int) -> None:
        label = str(code)
        self.requests.labels(label if label in CODES else "other").inc()

    def reject(self, reason: str) -> None:
        # A reason validation may add later still counts, under its own name (bounded: code, not input).
        self.rejected.labels(reason).inc()
