"""Handing pending action requests to their sinks.

``dispatch_pending`` takes each ``pending`` request of a kind, claims it (compare-and-set
``pending`` -> ``running``, so of two workers or replicas exactly one gets it), sends it to every
sink and finishes it ``sent`` (result: ``{sink: sink's result}``) or ``failed`` (``last_error``:
``"<sink>: <why>"`` for each failed sink; transient failures say how many attempts were made).

Redelivery: each sink retries a few times within one delivery (the webhook's ``max_attempts``,
seconds apart), which does not outlast a receiver that is down for minutes (a deploy of the
user's training pipeline). A request whose sinks failed only transiently goes back to
``pending`` (its ``last_error`` says why) and is sent again to the sinks that failed once
:func:`redelivery_delay` has passed since the last try (``actions.redeliver_backoff_s``,
doubling, at most :data:`MAX_REDELIVERY_DELAY_S`), until it is ``actions.redeliver_for_s`` old
(a day): then it is ``failed``. A permanent refusal (a 4xx, a bad manifest) fails it at once.

Delivery: at most once per request and sink while the monitor runs normally. A worker that
dies after a sink accepted the request but before that was recorded leaves the request
``running``; once its lease (``lease_s``) has passed without progress, the next dispatch
re-claims it and sends it again to the sinks without a recorded result. So after a crash a
receiver can get a request twice, always with the same idempotency key (the request id) to
drop the repeat by. Each sink's result is recorded as soon as it has one (which also renews
the lease), and every write is fenced by the claim's ``attempts`` value: a worker that lost its
lease cannot overwrite the state written by the one that took the request over.

The worker that runs ``dispatch_pending`` for a kind owns that kind's ``running`` requests: do
not run it for a kind the embedded rm_update worker (``rm_update_sinks: [local]``) handles.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from monitor.actions.sinks import MAX_RETRY_DELAY_S, Sink, SinkError
from monitor.store import Store, requests
from monitor.store import tables as t

if TYPE_CHECKING:
    from monitor.config import Settings
    from monitor.metrics import Metrics

log = logging.getLogger("monitor.actions")

# Longer than any one delivery can take, so that a live worker never loses its request.
MIN_LEASE_S = 900.0
#: The longest wait between two deliveries of a request whose sinks failed transiently.
MAX_REDELIVERY_DELAY_S = 3600.0


def redelivery_delay(attempts: int, backoff_s: float) -> float:
    """Seconds after its ``attempts``-th delivery before a transiently failed request is sent again.

    >>> [redelivery_delay(a, 60.0) for a in (1, 2, 3, 7, 30)]
    [60.0, 120.0, 240.0, 3600.0, 3600.0]
    """
    return min(backoff_s * 2.0 ** min(max(attempts - 1, 0), 30), MAX_REDELIVERY_DELAY_S)


def lease_seconds(settings: Settings) -> float:
    """How long a ``running`` request may go without progress before another worker takes it over."""
    wh = settings.actions.webhook
    worst = wh.max_attempts * wh.timeout_s + (wh.max_attempts - 1) * MAX_RETRY_DELAY_S
    return max(MIN_LEASE_S, 2 * worst)


def dispatch_pending(
    store: Store,
    settings: Settings,
    kind: str,
    sinks: Sequence[Sink],
    metrics: Metrics | None = None,
    *,
    limit: int = 1000,
    lease_s: float | None = None,
) -> int:
    """Deliver the pending (and abandoned running) requests of ``kind``; returns how many this call finished.

    The caller owns ``sinks`` (build them once with ``make_sinks``, close them at shutdown).
    """
    if not sinks:
        raise ValueError("dispatch_pending needs at least one sink")
    lease = lease_seconds(settings) if lease_s is None else lease_s
    backoff = settings.actions.redeliver_backoff_s
    finished = 0
    for request, fence in _claims(store, kind, lease, limit, backoff):
        if _deliver(store, request, fence, sinks, metrics, settings.actions.redeliver_for_s):
            finished += 1
    return finished


def _due(row: dict[str, Any], now: float, backoff_s: float) -> bool:
    """Whether a pending request may be sent now: a new one at once, one waiting to be sent again
    (an earlier delivery failed transiently: ``last_error`` set) once its delay has passed."""
    if not row["attempts"] or row["last_error"] is None:
        return True
    return float(row["updated_at"]) + redelivery_delay(int(row["attempts"]), backoff_s) <= now


def _claims(
    store: Store, kind: str, lease_s: float, limit: int, backoff_s: float
) -> Iterator[tuple[dict[str, Any], int]]:
    """(request, fence) for every request this worker won, abandoned ones first (they are older)."""
    n = 0
    now = time.time()
    cutoff = now - lease_s
    for row in sorted(requests.listing(store, kind, "running", limit), key=lambda r: r["created_at"]):
        if n >= limit:
            return
        if row["updated_at"] < cutoff and requests.take_over(store, row, cutoff):
            log.warning("action request %s was abandoned by a worker; sending it again", row["id"])
            n += 1
            yield {**row, "attempts": row["attempts"] + 1}, row["attempts"] + 1
    waiting: set[str] = set()  # pending, not due yet: left alone this call
    while n < limit:
        want = limit - n + len(waiting)  # the listing is newest first: past the waiting ones
        listed = requests.listing(store, kind, "pending", want)
        waiting.update(str(r["id"]) for r in listed if not _due(r, now, backoff_s))
        rows = sorted((r for r in listed if str(r["id"]) not in waiting), key=lambda r: r["created_at"])
        if not rows:
            if len(listed) < want:
                return
            continue  # a whole page of newer requests waiting: an older one may be due
        for row in rows:
            if not requests.claim(store, row["id"]):
                continue  # another worker has it
            # Nobody but this worker writes the row until its lease passes, so this read is its claim.
            got = requests.get(store, row["id"])
            if got is None or got["state"] != "running":
                continue
            n += 1
            yield got, int(got["attempts"])


def _fenced_update(store: Store, rid: str, fence: int, **values: Any) -> bool:
    r = t.action_requests
    values["updated_at"] = time.time()
    with store.engine.begin() as conn:
        res = conn.execute(
            r.update().where(r.c.id == rid, r.c.state == "running", r.c.attempts == fence).values(**values)
        )
    return res.rowcount == 1


def _deliver(
    store: Store,
    request: dict[str, Any],
    fence: int,
    sinks: Sequence[Sink],
    metrics: Metrics | None,
    redeliver_for_s: float,
) -> bool:
    rid, kind = str(request["id"]), str(request["kind"])
    prior = request.get("result")
    # Results recorded before a crash: those sinks already have the request.
    results: dict[str, Any] = dict(prior) if isinstance(prior, dict) else {}
    errors: dict[str, SinkError] = {}
    for sink in sinks:
        if isinstance(results.get(sink.name), dict) and "error" not in results[sink.name]:
            continue
        results.pop(sink.name, None)
        try:
            results[sink.name] = sink.send(request)
        except SinkError as err:
            errors[sink.name] = err
        except Exception as err:  # a sink bug must not stop the other sinks or requests
            log.exception("action sink %s failed on request %s", sink.name, rid)
            errors[sink.name] = SinkError(f"{type(err).__name__}: {err}", permanent=False)
        outcome = "failed" if sink.name in errors else "sent"
        if metrics is not None:
            metrics.action_requests.labels(kind, sink.name, outcome).inc()
        if outcome == "sent" and not _fenced_update(store, rid, fence, result=results):
            log.warning("action request %s was taken over by another worker; leaving it to that one", rid)
            return False
    for name, e in errors.items():
        results[name] = {"error": str(e), "permanent": e.permanent}
        log.warning("action request %s: sink %s failed: %s", rid, name, e)
    state = _outcome(request, errors, redeliver_for_s)
    last_error = "; ".join(f"{n}: {e}" for n, e in errors.items()) or None
    # A request sent at last keeps no error of an earlier try; one waiting keeps why it waits.
    values: dict[str, Any] = {"state": state, "result": results, "last_error": last_error and last_error[:1000]}
    if not _fenced_update(store, rid, fence, **values):
        log.warning("action request %s was taken over by another worker before it finished", rid)
        return False
    if state == "pending":
        log.warning("action request %s (%s) will be sent again to %s", rid, kind, ", ".join(errors))
    else:
        log.info("action request %s (%s): %s", rid, kind, state)
    return state != "pending"


def _outcome(request: dict[str, Any], errors: Mapping[str, SinkError], redeliver_for_s: float) -> str:
    """``sent``; ``pending`` again (to be sent again later) when every failure was transient and the
    request is younger than ``redeliver_for_s``; else ``failed``."""
    if not errors:
        return "sent"
    transient = not any(e.permanent for e in errors.values())
    young = time.time() - float(request["created_at"]) < redeliver_for_s
    return "pending" if transient and young else "failed"
