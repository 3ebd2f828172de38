"""How a remote scorer is called: a timeout per request, retries with backoff, a concurrency limit,
a circuit breaker, and the metrics (latency, outcomes, tokens, breaker state, backlog).

The breaker counts *endpoint* failures (timeouts, connection errors, 429 and 5xx after their
retries): ``breaker_failures`` in a row open it, and while open every call fails at once without a
request ("rejected"), so a dead judge costs nothing per item. After ``breaker_reset_s`` one call
is let through (half-open): its success closes the circuit, its failure opens it again. A
malformed answer or a 4xx says something about the item, not a failure of the endpoint: it is
not retried, and to the breaker it is an answer (the endpoint is up: a half-open circuit closes).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from monitor.deadline_http import DeadlineClient, DeadlineExceeded
from monitor.reward.kinds.base import Score
from monitor.reward.kinds.config import ResilienceConfig

log = logging.getLogger(__name__)
NS = "oversight"
REMOTE = ("judge", "http")
OUTCOMES = ("ok", "timeout", "transport_error", "http_error", "malformed", "rejected")
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
T = TypeVar("T")
R = TypeVar("R")


def redact(text: str, headers: Mapping[str, str]) -> str:
    """``text`` without the header values of the request (the API key), however quoted.

    >>> redact("Illegal header value b'Bearer sk-123456789\\n'", {"Authorization": "Bearer sk-123456789"})
    "Illegal header value b'<redacted>\\n'"
    """
    for value in headers.values():
        # The whole value first, then its words (a scheme and a key), longest first: deterministic.
        for part in sorted({value, *value.split()}, key=lambda p: (-len(p), p)):
            if len(part) >= 8:
                for form in (part, repr(part.encode())[2:-1], repr(part)[1:-1]):
                    text = text.replace(form, "<redacted>")
    return text


class RemoteError(RuntimeError):
    """One request failed; ``outcome`` is its metric label, ``endpoint`` whether the breaker counts it."""

    def __init__(self, message: str, outcome: str, *, endpoint: bool = True):
        super().__init__(message)
        self.outcome = outcome
        self.endpoint = endpoint

    def score(self) -> Score:
        """The failed score of an item this request was for. The item may be at fault only when the
        endpoint answered and refused it (a 4xx but 408 and 429) or answered what cannot be
        parsed: a timeout, a transport error, a 429 or 5xx or an open circuit is the endpoint's,
        and counted against the item, it gave up on items an overloaded judge never refused."""
        return Score.failed(f"{self.outcome}: {self}", own_fault=not self.endpoint and self.outcome != "rejected")


class BackendMetrics:
    """The reward-model backends' metrics, pre-zeroed for the known kinds and outcomes. One set per
    Prometheus registry (:meth:`on`), so every backend and the background scorer share it."""

    _by_registry: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, BackendMetrics]] = weakref.WeakKeyDictionary()
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.latency = Histogram(
            "rm_backend_request_seconds",
            "Reward-model backend request latency (one HTTP request, or one local forward batch)",
            ["kind"],
            namespace=NS,
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.requests = Counter(
            "rm_backend_requests",
            "Reward-model backend requests by outcome",
            ["kind", "outcome"],
            namespace=NS,
            registry=r,
        )
        self.tokens = Counter(
            "rm_backend_tokens",
            "Tokens the backend reported or counted, by direction",
            ["kind", "direction"],
            namespace=NS,
            registry=r,
        )
        self.truncated = Counter(
            "rm_backend_truncated", "Items scored on a truncated text", ["kind"], namespace=NS, registry=r
        )
        self.breaker = Gauge(
            "rm_backend_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open",
            ["kind"],
            namespace=NS,
            registry=r,
        )
        self.backlog = Gauge(
            "rm_backlog", "Sampled episodes waiting for a remote reward-model score", namespace=NS, registry=r
        )
        self.deferred = Counter(
            "rm_deferred",
            "Episodes left for the background scorer instead of scored in the batch",
            namespace=NS,
            registry=r,
        )
        self.async_scored = Counter(
            "rm_async_scored",
            "Episodes scored by the background scorer, by outcome",
            ["outcome"],
            namespace=NS,
            registry=r,
        )
        for kind in ("builtin", "hf", *REMOTE):
            self.latency.labels(kind)
            self.truncated.labels(kind)
            for d in ("input", "output"):
                self.tokens.labels(kind, d)
        for kind in REMOTE:
            self.breaker.labels(kind).set(0)
            for o in OUTCOMES:
                self.requests.labels(kind, o)
        for o in ("ok", "failed", "given_up"):
            self.async_scored.labels(o)

    @classmethod
    def on(cls, registry: CollectorRegistry | None) -> BackendMetrics:
        reg = registry if registry is not None else CollectorRegistry()
        with cls._lock:
            m = cls._by_registry.get(reg)
            if m is None:
                m = cls._by_registry[reg] = cls(reg)
            return m


class CircuitBreaker:
    def __init__(
        self,
        failures: int,
        reset_s: float,
        on_state: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.failures = failures
        self.reset_s = reset_s
        self._on_state = on_state
        self._clock = clock
        self._lock = threading.Lock()
        self._consecutive = 0
        self._opened_at: float | None = None
        self._probe = False
        self.state = "closed"

    def _set(self, state: str) -> None:
        if state != self.state:
            log.warning("reward-model backend circuit %s -> %s", self.state, state)
        self.state = state
        if self._on_state is not None:
            self._on_state(state)

    def allow(self) -> bool:
        """May a request go out now? In half-open only one probe at a time."""
        with self._lock:
            if self.state == "closed":
                return True
            if self.state == "open" and self._opened_at is not None and self._clock() - self._opened_at >= self.reset_s:
                self._set("half_open")
            if self.state == "half_open" and not self._probe:
                self._probe = True
                return True
            return False

    def record(self, ok: bool) -> None:
        with self._lock:
            self._probe = False
            if ok:
                self._consecutive = 0
                self._set("closed")
                return
            self._consecutive += 1
            if self.state == "half_open" or self._consecutive >= self.failures:
                self._opened_at = self._clock()
                self._set("open")

    def release(self) -> None:
        """The probe's call ended in neither an answer nor an endpoint failure (an interrupt, a
        bug): its slot is free again, the state unchanged. Kept taken, the circuit stayed
        half-open for good and rejected every later call."""
        with self._lock:
            self._probe = False

    def answered(self) -> None:
        """The endpoint answered, though not with a score (a 4xx, a malformed answer): it is up.
        A half-open circuit closes. Freeing the probe's slot alone left it half-open, and the next
        probe went to the same item: the oldest waiting one, first in every fetch. So a judge that
        refused that item never closed its circuit again after an outage, and every other
        request was rejected."""
        with self._lock:
            self._probe = False
            self._consecutive = 0
            self._set("closed")


class Resilient:
    """POSTs JSON with the policy of :class:`ResilienceConfig`; thread-safe."""

    def __init__(self, cfg: ResilienceConfig, kind: str, metrics: BackendMetrics, client: DeadlineClient | None = None):
        self.cfg = cfg
        self.kind = kind
        self.metrics = metrics
        self.client = client if client is not None else DeadlineClient(f"rm-{kind}", max_connections=cfg.concurrency)
        self.breaker = CircuitBreaker(
            cfg.breaker_failures,
            cfg.breaker_reset_s,
            on_state=lambda s: metrics.breaker.labels(kind).set(BREAKER_STATES[s]),
        )
        self._slots = threading.BoundedSemaphore(cfg.concurrency)
        self._closed = threading.Event()

    def post_json(self, url: str, body: Mapping[str, Any], headers: Mapping[str, str], parse: Callable[[Any], R]) -> R:
        """``parse(response JSON)`` of the first successful attempt; raises :class:`RemoteError`."""
        if not self.breaker.allow():
            self.metrics.requests.labels(self.kind, "rejected").inc()
            raise RemoteError("circuit open: the endpoint failed repeatedly", "rejected", endpoint=False)
        try:
            data = self._attempts(url, body, headers)
        except RemoteError as e:
            self.metrics.requests.labels(self.kind, e.outcome).inc()
            if e.endpoint:
                self.breaker.record(False)
            else:
                self.breaker.answered()
            raise
        except BaseException:
            self.breaker.release()
            raise
        try:
            out = parse(data)
        except Exception as e:
            # Whatever an answer makes the parser raise (a null where an object goes, a logprob of
            # 1000, nesting past the recursion limit) is the answer's fault, not the endpoint's.
            # Only four kinds were caught before: the others escaped with the probe's slot taken
            # and failed the item's whole batch.
            self.metrics.requests.labels(self.kind, "malformed").inc()
            self.breaker.answered()
            detail = redact(f"malformed answer: {type(e).__name__}: {e}", headers)[:300]
            raise RemoteError(detail, "malformed", endpoint=False) from None
        self.metrics.requests.labels(self.kind, "ok").inc()
        self.breaker.record(True)
        return out

    def _attempts(self, url: str, body: Mapping[str, Any], headers: Mapping[str, str]) -> Any:
        last: RemoteError | None = None
        for attempt in range(self.cfg.max_attempts):
            if attempt:
                delay = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** (attempt - 1))
                if self._closed.wait(delay * (0.5 + random.random() / 2)):
                    break
            try:
                return self._once(url, body, headers)
            except RemoteError as e:
                if not e.endpoint:
                    raise
                last = e
        raise last if last is not None else RemoteError("closed", "transport_error")

    def _once(self, url: str, body: Mapping[str, Any], headers: Mapping[str, str]) -> Any:
        import httpx

        with self._slots:
            t0 = time.perf_counter()
            try:
                answer = self.client.post(
                    url,
                    json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(),
                    {"Content-Type": "application/json", **headers},
                    timeout_s=self.cfg.timeout_s,
                    max_bytes=self.cfg.max_response_bytes,
                )
            except (httpx.TimeoutException, DeadlineExceeded):
                raise RemoteError(f"timed out after {self.cfg.timeout_s} s", "timeout") from None
            except Exception as e:
                # httpx.HTTPError, and what it raises outside that class (InvalidURL); the message
                # is redacted: the HTTP library quotes a header value it refuses, the API key's.
                raise RemoteError(redact(f"{type(e).__name__}: {e}", headers)[:300], "transport_error") from None
            finally:
                self.metrics.latency.labels(self.kind).observe(time.perf_counter() - t0)
        status, location, content = answer.status, answer.headers.get("location"), answer.body
        if answer.undecodable is not None:
            detail = f"answer in Content-Encoding {answer.undecodable!r}: identity, gzip or deflate are read"
            raise RemoteError(detail, "malformed", endpoint=False)
        if not answer.complete:
            raise RemoteError(f"answer larger than {self.cfg.max_response_bytes} bytes", "malformed", endpoint=False)
        if status == 429 or status >= 500:
            raise RemoteError(f"HTTP {status}", "http_error")
        if 300 <= status < 400:
            # Redirects are not followed (the API key would go with them): the configured URL is not
            # the endpoint's. Not retried; the endpoint answered.
            # Redacted whole, then cut: cut first, a key across the cut kept its beginning.
            where = redact(str(location or ""), headers)[:200]
            raise RemoteError(
                f"HTTP {status}: redirected to {where!r}; configure that URL", "http_error", endpoint=False
            )
        if status >= 400:
            # The item or the request is wrong (400, 401, 413): retrying will not help.
            text = redact(content.decode("utf-8", "replace"), headers)[:200]
            raise RemoteError(f"HTTP {status}: {text}", "http_error", endpoint=False)
        try:
            return json.loads(content)
        except (ValueError, RecursionError):
            raise RemoteError("answer is not JSON", "malformed", endpoint=False) from None

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``fn`` over ``items`` with at most ``concurrency`` in flight, results in order."""
        if len(items) <= 1:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    def close(self) -> None:
        self._closed.set()
        self.client.close()
