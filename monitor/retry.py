"""Outages: which errors are an outage, how an operation is retried through one, and what is down.

Every database or broker access on the pipeline's path goes through one :class:`RetryPolicy`
(the pipeline's): an outage of the database, the broker or the disk is retried with capped
exponential backoff until it ends or the service is stopped (then :class:`Aborted`: nothing of
the batch was committed, it is redelivered). The policy also keeps :class:`Health`, one entry
per target the pipeline must make progress against (``source``, ``store``, ``dead_letter``):
the outcome of the last operation on it. ``/readyz``, ``oversight_ready`` and
``oversight_ready_check`` are computed from the same entries at request time, and every failed
attempt counts in ``oversight_commit_errors_total{target}``, so the three cannot disagree.

Kept below the pipeline and its stages (drift, disagreement, sources) so that all of them can use
one policy without import cycles.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import sqlalchemy as sa

if TYPE_CHECKING:
    from monitor.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What the pipeline must make progress against; the checks of ``/readyz``.
TARGETS = ("source", "store", "dead_letter")

# SQLSTATEs of PostgreSQL errors that are an outage although psycopg does not raise them as
# OperationalError: a read-only transaction (a demoted primary, a database in maintenance),
# and classes 08 (connection), 53 (insufficient resources: disk full), 57 (operator
# intervention: shutdown) and 58 (system error: I/O).
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "58")
_READ_ONLY_SQLSTATE = "25006"
# Classes that describe the data of the statement, never the server's availability: 22 (data
# exception), 23 (integrity), 54 (program limit exceeded). Not 42: a revoked grant or a missing
# table is an operator's problem, and dead-lettering every record through it would lose traffic.
_RECORD_SQLSTATE_CLASSES = ("22", "23", "54")


class Aborted(RuntimeError):
    """Stopped while a batch could not be committed; it was not (it will be redelivered)."""


class NoProgress(Aborted):
    """A retry loop gave up after a bound without progress (nothing of the batch was committed)."""


def sqlstate(e: sa.exc.DBAPIError) -> str:
    """The database's SQLSTATE of a driver error (psycopg's ``sqlstate``, psycopg2's ``pgcode``); "" for
    none (SQLite)."""
    return str(getattr(e.orig, "sqlstate", None) or getattr(e.orig, "pgcode", None) or "")


def transient(e: BaseException) -> bool:
    """An outage of the database, the broker or the disk, not a property of the record at hand:
    retried or redelivered, never dead-lettered. :class:`Aborted` counts: a batch stopped during
    an outage is redelivered, so none of its records may be dead-lettered on the way out."""
    if isinstance(e, sa.exc.DBAPIError) and not e.connection_invalidated:
        state = sqlstate(e)
        # psycopg raises some per-statement refusals as OperationalError (class 54: "stack depth
        # limit exceeded" on a deeply nested value). Retrying them would spin on one record
        # forever; they are the record's fault and go to find_rejected instead.
        if state[:2] in _RECORD_SQLSTATE_CLASSES:
            return False
    if isinstance(e, Aborted | sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.TimeoutError):
        return True
    if isinstance(e, OSError | TimeoutError):
        return True
    if isinstance(e, sa.exc.DBAPIError):
        if e.connection_invalidated:
            return True
        state = sqlstate(e)
        return state == _READ_ONLY_SQLSTATE or state[:2] in _TRANSIENT_SQLSTATE_CLASSES
    # kafka-python raises its own hierarchy for broker trouble.
    return type(e).__module__.startswith("kafka")


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an error for a log line (a driver's message can span many)."""
    try:
        text = str(e)
    except Exception:  # some messages fail to render (a parameter too deep to print)
        text = ""
    return text.splitlines()[0][:limit] if text else type(e).__name__


@dataclass
class TargetHealth:
    ok: bool = True
    since: float = 0.0  # monotonic time of the last change
    failures: int = 0  # failed attempts since the last success
    error: str = ""
    reminded: float = 0.0  # monotonic time of the last warning while down


class Health:
    """The last outcome of the operations on each target, shared by the pipeline's threads and
    read by the ops server's. Changes are logged once per transition, not per attempt, and an
    outage that lasts is warned about again every ``remind_s``: a command without ``/readyz``
    (``oversight replay`` writing to a full disk) would otherwise say it once and then retry in
    silence, indistinguishable from a hang.

    An operation that neither succeeds nor fails (a database frozen, or a lock held elsewhere:
    the server still acknowledges the bytes, so no timeout of the connection fires) would keep
    the last outcome green forever. So an operation in flight for longer than ``stall_s`` counts
    as its target down until it ends (:meth:`begin`, :meth:`end`)."""

    def __init__(self, metrics: Metrics | None = None, *, stall_s: float = 10.0, remind_s: float = 60.0):
        self._metrics = metrics
        self.remind_s = remind_s
        self._lock = threading.Lock()
        now = time.monotonic()
        self._targets = {t: TargetHealth(since=now) for t in TARGETS}
        self.stall_s = stall_s
        # The operations in flight, by a token of their own (threads of the pipeline share the
        # policy, and a retried operation may nest another's): target and start time.
        self._started: dict[object, tuple[str, float]] = {}
        self._stalled: set[str] = set()  # targets whose stall was logged, until one ends

    def begin(self, target: str) -> object:
        """An operation on ``target`` starts; pass the token to :meth:`end`."""
        token = object()
        self._started[token] = (target, time.monotonic())
        return token

    def end(self, token: object) -> None:
        """The operation ended, however (its outcome is :meth:`failed` or :meth:`succeeded`)."""
        target, started = self._started.pop(token, ("", 0.0))
        if target in self._stalled and not self.stalled(target):
            self._stalled.discard(target)
            log.warning("%s operation ended after %.1fs in flight", target, time.monotonic() - started)

    def stalled(self, target: str) -> bool:
        """Whether an operation on ``target`` has been in flight for longer than ``stall_s``."""
        limit = time.monotonic() - self.stall_s
        # A copy: other threads add and remove operations (list() of a dict is atomic).
        if not any(t == target and started < limit for t, started in list(self._started.values())):
            return False
        if target not in self._stalled:
            self._stalled.add(target)
            log.warning(
                "%s operation in flight for over %.1fs: counted as an outage until it ends", target, self.stall_s
            )
        return True

    def failed(self, target: str, e: BaseException) -> None:
        if self._metrics is not None and target != "source":
            self._metrics.commit_errors.labels(target).inc()
        with self._lock:
            h = self._targets[target]
            h.failures += 1
            h.error = first_line(e)
            now = time.monotonic()
            went_down = h.ok
            if went_down:
                h.ok, h.since, h.reminded = False, now, now
            remind = not went_down and now - h.reminded >= self.remind_s
            if remind:
                h.reminded = now
            down_s, failures, error = now - h.since, h.failures, h.error
        if went_down:
            log.warning("%s unavailable, retrying: %s", target, error)
        elif remind:
            log.warning(
                "%s still unavailable after %.0fs (%d failed attempts), retrying: %s", target, down_s, failures, error
            )
        else:
            log.debug("%s still unavailable (attempt %d): %s", target, failures, error)

    def succeeded(self, target: str) -> None:
        h = self._targets[target]
        if h.ok:  # the common case, without the lock: one attribute read per operation
            return
        with self._lock:
            if h.ok:
                return
            down_s = time.monotonic() - h.since
            failures = h.failures
            h.ok, h.since, h.failures, h.error = True, time.monotonic(), 0, ""
        log.warning("%s available again after %.1fs (%d failed attempts)", target, down_s, failures)

    def ok(self, target: str) -> bool:
        return self._targets[target].ok and not self.stalled(target)

    def error(self, target: str) -> str:
        return self._targets[target].error


class RetryPolicy:
    """Calls an operation until it succeeds, sleeping ``first_delay_s`` doubling up to
    ``max_delay_s`` between attempts while it fails with an outage (:func:`transient`).

    ``stop``: the event that ends the wait (then :class:`Aborted`); the pipeline sets it when its
    run starts, so stages that only hold the policy stop with it. ``on_failure``: per target, what
    to do before the next attempt (the store drops its pooled connections, so that a connection
    opened while the database was read-only or unreachable is never reused).
    The cap stays well under the 5 s in which ``/readyz`` must see a recovery.
    """

    def __init__(
        self,
        health: Health,
        *,
        first_delay_s: float = 0.1,
        max_delay_s: float = 2.0,
        on_failure: Mapping[str, Callable[[], None]] | None = None,
    ):
        self.health = health
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self.on_failure = dict(on_failure or {})
        self.stop: threading.Event | None = None

    def call(self, fn: Callable[[], T], target: str, stop: threading.Event | None = None) -> T:
        stop = stop if stop is not None else self.stop
        delay = self.first_delay_s
        while True:
            try:
                out = self.attempt(fn, target)
            except Aborted:
                raise  # a nested retry already gave up: not an outage of this operation
            except Exception as e:
                if not transient(e):
                    raise
                self.health.failed(target, e)
                hook = self.on_failure.get(target)
                if hook is not None:
                    try:
                        hook()
                    except Exception as he:  # a failing reset must not turn an outage into a crash
                        log.warning("resetting %s after a failure failed: %s", target, first_line(he))
            else:
                self.health.succeeded(target)
                return out
            self.wait(delay, stop, f"stopped while the {target} was unavailable; the batch will be redelivered")
            delay = min(delay * 2, self.max_delay_s)

    def attempt(self, fn: Callable[[], T], target: str) -> T:
        """One attempt, no retry: in flight for :meth:`Health.stalled` while it runs."""
        token = self.health.begin(target)
        try:
            return fn()
        finally:
            self.health.end(token)

    @staticmethod
    def wait(seconds: float, stop: threading.Event | None, message: str) -> None:
        """Sleep, or raise :class:`Aborted` with ``message`` as soon as ``stop`` is set."""
        if stop is None:
            time.sleep(seconds)
        elif stop.is_set() or stop.wait(seconds):
            raise Aborted(message)
