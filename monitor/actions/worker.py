"""The action worker: drift events -> incidents -> reward-model updates and retraining requests.

It runs beside the pipeline (a thread in ``oversight run``; ``run_once`` in tests and the
simulation) and meets the pipeline only through the database:

1. New drift events (past a cursor kept in ``internal_state`` under ``actions:cursor``, advanced
   by compare-and-set so two workers cannot both act on an event) are grouped into **incidents**:
   while a stream's incident is open, every further event of the stream, on whatever signal,
   attaches to it (no new request). It closes after ``max(actions.incident_gap_s,
   actions.incident_timeout_s)`` of event time without an event, or when a re-reference of the
   stream (acknowledgement, promotion) has been applied. The first event of an incident creates
   one ``rm_update`` request (if its signal is in ``reward.update.trigger_signals``); at most
   ``actions.max_requests_per_stream_per_day`` incidents open per stream per 24 h of event time
   (further events are counted as ``rate_limited`` and create nothing).
2. ``rm_update`` requests with the ``local`` sink run here once ``reward.update.min_labels``
   fresh human labels of the stream exist (labels of episodes at or after the first event):
   train -> gate -> promote or reject (``monitor.reward.update``). A verdict the gate could not
   reach (undecided) puts the request back to wait for the labels it asked for, and it trains and
   is gated again, up to ``reward.update.regates`` times. After a promotion the
   stream's detectors are re-referenced (audited in ``drift_audit``): the new regime is the
   new normal. Other sinks hand the request to an external trainer.
3. When an incident's update has finished (or at once, without updates), one ``retrain``
   request carries the drift events, the label window and the active reward-model version
   to the configured sinks.

It works on three threads (``LANES``), each a round every ``reward.update.poll_s``, and they meet
only through the database. The **control** thread (incidents, the quality gauges) does quick
database work; the gauges' part grows with the labels people made, so they take at most
``actions.gauges_duty`` of its time (``run_round``; ``run_once`` is not paced). The **dispatch**
thread waits on the sinks (a Kafka broker that is down holds a round for its bootstrap timeout, a
webhook for its retries). The **model** thread (updates, the active version's sensitivity) loads
and runs reward models: an update trains for minutes. Neither may freeze the quality estimates,
the agreement and the reward-hacking alarm. Each step is isolated: one that raises is counted
(``oversight_action_worker_errors_total{step}``), logged and retried next round, and the steps
after it in the round still run.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from monitor.config import Settings
from monitor.metrics import Metrics
from monitor.pace import Pace
from monitor.retry import first_line, transient
from monitor.store import DriftEvent, Store
from monitor.store import requests as rq

log = logging.getLogger(__name__)
CURSOR_KEY = "actions:cursor"  # internal_state: the id of the last drift event taken
INGEST_LIMIT = 1000  # drift events taken per round
# Drift events an incident's request carries: its first ones (what set it off) and its newest. An
# incident stays open while events keep coming, and every one used to be appended and the whole
# payload written again: 3,000 events made a 0.74 MB payload and a 16 s round, quadratic in the
# events, and past about 130 the Kubernetes sink refused the request (32 KB of environment).
INCIDENT_EVENTS_FIRST = 10
INCIDENT_EVENTS_NEWEST = 30
#: What a drift event did to incidents (``oversight_incidents_total{outcome}``).
INCIDENT_OUTCOMES = ("opened", "attached", "rate_limited", "closed_timeout", "closed_rereference")
#: The worker's threads and the steps of each, in round order (``oversight_action_worker_errors_total{step}``).
LANES: dict[str, tuple[str, ...]] = {
    "action-worker": ("incidents", "gauges"),
    "action-dispatch": ("dispatch",),
    "action-models": ("updates", "sensitivity"),
}


def _close(reason: str, payload: dict[str, Any]) -> dict[str, Any] | None:
    """The incident's payload closed for ``reason``, or None when it is closed already."""
    return None if payload.get("closed") else {**payload, "closed": reason}


def attach(payload: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any] | None:
    """The incident's payload with one more drift event, or None when it holds the event already
    (a redelivery). The events carried are bounded: the first ``INCIDENT_EVENTS_FIRST`` and the
    newest ``INCIDENT_EVENTS_NEWEST``; ``events_total`` counts them all.

    >>> p = {"drift_events": [{"id": 1}], "last_event_ts": 0.0, "events_total": 1, "last_event_id": 1}
    >>> for i in range(2, 101):
    ...     p = attach(p, {"id": i, "event_ts": float(i)})
    >>> len(p["drift_events"]), p["events_total"], p["drift_events"][9]["id"], p["drift_events"][10]["id"]
    (40, 100, 10, 71)
    >>> attach(p, {"id": 100, "event_ts": 100.0}) is None
    True
    """
    events = list(payload.get("drift_events") or [])
    newest = payload.get("last_event_id")
    if (int(newest) >= int(summary["id"])) if newest is not None else any(x["id"] == summary["id"] for x in events):
        return None
    events.append(summary)
    if len(events) > INCIDENT_EVENTS_FIRST + INCIDENT_EVENTS_NEWEST:
        events = events[:INCIDENT_EVENTS_FIRST] + events[-INCIDENT_EVENTS_NEWEST:]
    payload["drift_events"] = events
    payload["events_total"] = int(payload.get("events_total", len(events) - 1)) + 1
    payload["last_event_id"] = int(summary["id"])
    payload["last_event_ts"] = max(float(payload["last_event_ts"]), float(summary["event_ts"]))
    return payload


class ActionWorker:
    def __init__(self, settings: Settings, store: Store, metrics: Metrics | None = None):
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._sinks: dict[str, list[Any]] = {}  # per kind, built once: a Kafka sink holds a producer
        self._errors_lock = threading.Lock()
        self.oversight: dict[str, dict[str, Any]] = {}
        if metrics is not None:
            # Series exist from the start (rate() and alerts see the first request).
            a = settings.actions
            plan = [("retrain", s) for s in a.retrain_sinks] + [("rm_update", s) for s in a.rm_update_sinks]
            for kind, sink in plan:
                for outcome in ("sent", "failed"):
                    metrics.action_requests.labels(kind, sink, outcome)
            for outcome in INCIDENT_OUTCOMES:
                metrics.incidents.labels(outcome)
            metrics.incident_limit.set(a.max_requests_per_stream_per_day)
            for steps in LANES.values():
                for step in steps:
                    metrics.action_worker_errors.labels(step)
        self.errors = 0
        # The gauges' refreshes, by the monotonic clock (actions.gauges_duty; run_once ignores it).
        self._gauges_pace = Pace(settings.actions.gauges_duty)
        self.sensitivity_failed: set[str] = set()  # versions whose sensitivity could not be measured
        # In run_once's order: incidents make requests, updates finish them, dispatch sends them.
        self._steps: dict[str, Callable[[], object]] = {
            "incidents": self.ingest_events,
            "updates": self.run_updates,
            "dispatch": self.dispatch,
            "gauges": self.refresh_gauges,
            "sensitivity": self.refresh_sensitivity,
        }

    # -- incidents ------------------------------------------------------------------
    def ingest_events(self) -> int:
        """Turn new drift events into incidents and requests; returns how many were taken."""
        saved = self.store.load_internal(CURSOR_KEY)
        cursor = int(saved["last_event_id"]) if saved is not None else 0
        taken = 0
        for ev in self.store.drift_events(since_id=cursor, limit=INGEST_LIMIT):
            # Act first, then move the cursor past the event. Moved first (the whole round at once),
            # an outage or a kill while acting lost every later event of the round for good: no
            # incident, no update, no retraining request. Now such an event is acted on again, which
            # is safe: requests are keyed by their incident, and an incident skips an event it holds.
            self._on_event(ev)
            # Compare-and-set from the state read (None: no cursor yet): of two workers that read the
            # same cursor, the one whose move fails stops here (the other is ahead of it).
            moved = {"last_event_id": int(ev["id"])}
            if not self.store.cas_internal(CURSOR_KEY, saved, moved):
                break
            saved, taken = moved, taken + 1
        return taken

    def _on_event(self, ev: DriftEvent) -> None:
        stream = str(ev["stream"])
        summary: dict[str, Any] = {
            k: ev[k] for k in ("id", "signal", "detector", "statistic", "threshold", "episode_id", "event_ts")
        }
        summary["detail"] = ev.get("detail")  # the size of the shift travels with the retraining request
        inc = self._incident(stream, ev)
        if inc is not None:
            if rq.modify_payload(self.store, inc["id"], lambda payload: attach(payload, summary)):
                self._count("attached")
            return
        if self._rate_limited(stream, float(ev["event_ts"])):
            log.warning(
                "drift event %s on %s: %d incidents in 24 h, the limit; no new requests",
                ev["id"],
                stream,
                self.settings.actions.max_requests_per_stream_per_day,
            )
            self._count("rate_limited")
            return
        ucfg = self.settings.reward.update
        triggers = ucfg.trigger_signals
        wants_update = self.settings.reward.enabled and ucfg.enabled and ("*" in triggers or ev["signal"] in triggers)
        incident = f"{stream}:{ev['id']}"
        payload: dict[str, Any] = {
            "stream": stream,
            "incident": incident,
            "since": float(ev["event_ts"]),
            "last_event_ts": float(ev["event_ts"]),
            "drift_events": [summary],
            "events_total": 1,
            "last_event_id": int(ev["id"]),
        }
        if wants_update:
            created = rq.create(self.store, "rm_update", incident, stream, payload)[1]
        else:
            created = self._request_retrain(payload, None)
        if created:  # not again for an event acted on twice (a restart, two workers)
            self._count("opened")

    def _incident(self, stream: str, ev: DriftEvent) -> dict[str, Any] | None:
        """The stream's latest incident request (rm_update, else retrain) if it is still open.

        Open until no event came for ``max(incident_gap_s, incident_timeout_s)`` of event time, or
        until a re-reference of the stream (an acknowledgement or a promotion) was applied by the
        drift monitor before this event was found: alarms after it are against the new reference."""
        a = self.settings.actions
        for kind in ("rm_update", "retrain"):
            reqs = [r for r in rq.listing(self.store, kind=kind, limit=50) if r["stream"] == stream]
            if not reqs:
                continue
            req = reqs[0]  # newest first
            payload = req["payload"]
            if payload.get("closed"):
                return None
            closed = None
            if self._rereferenced(stream, float(req["created_at"]), float(ev["created_at"])):
                closed = "rereference"
            elif float(ev["event_ts"]) - float(payload["last_event_ts"]) > max(a.incident_gap_s, a.incident_timeout_s):
                closed = "timeout"
            if closed is None:
                return req
            if rq.modify_payload(self.store, req["id"], functools.partial(_close, closed)):
                self._count(f"closed_{closed}")
            return None
        return None

    def _rereferenced(self, stream: str, after: float, before: float) -> bool:
        """Whether a re-reference of the stream was applied between two wall-clock times."""
        import sqlalchemy as sa

        from monitor.store import tables as t

        d = t.drift_audit
        q = sa.select(sa.func.count()).where(
            d.c.stream == stream,
            d.c.action == "rereference",
            d.c.applied_at.is_not(None),
            d.c.applied_at > after,
            d.c.applied_at < before,
        )
        with self.store.engine.connect() as conn:
            return int(conn.execute(q).scalar_one()) > 0

    def _rate_limited(self, stream: str, event_ts: float) -> bool:
        """Whether the stream already opened ``max_requests_per_stream_per_day`` incidents in the
        24 h (event time) before this event."""
        opened = {
            r["payload"]["incident"]
            for kind in ("rm_update", "retrain")
            for r in rq.listing(self.store, kind=kind, limit=200)
            if r["stream"] == stream and event_ts - float(r["payload"]["since"]) < 86400.0
        }
        if self.metrics is not None:
            self.metrics.incidents_last_day.labels(self.metrics.stream_label(stream)).set(len(opened))
        return len(opened) >= self.settings.actions.max_requests_per_stream_per_day

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.incidents.labels(outcome).inc()

    # -- reward-model updates ----------------------------------------------------------
    def run_updates(self) -> list[dict[str, Any]]:
        from monitor.reward.update import fresh_label_count

        done: list[dict[str, Any]] = []
        if "local" not in self.settings.actions.rm_update_sinks:
            return done  # dispatched to the configured sinks instead
        ucfg = self.settings.reward.update
        # A worker killed mid-update leaves its request running; once its heartbeat is older
        # than the lease, this one takes it over (one winner: compare-and-set on attempts).
        cutoff = time.time() - ucfg.lease_s
        for req in rq.listing(self.store, kind="rm_update", state="running"):
            if float(req["updated_at"]) < cutoff and rq.take_over(self.store, req, cutoff):
                log.warning("reward-model update %s was abandoned by its worker; running it again", req["id"])
                done.append(self._run_update(req))
        for req in sorted(rq.listing(self.store, kind="rm_update", state="pending"), key=lambda r: r["created_at"]):
            p = req["payload"]
            have = fresh_label_count(self.store, p["stream"], float(p["since"]))
            # A request the gate left undecided carries its own, higher target (see _regate).
            if have < int(p.get("min_labels", ucfg.min_labels)):
                expired = time.time() - float(req["created_at"]) > ucfg.max_wait_s
                if expired and rq.claim(self.store, req["id"]):
                    self._expire(req, have)
                continue
            if not rq.claim(self.store, req["id"]):
                continue
            done.append(self._run_update(req))
        return done

    def _run_update(self, req: dict[str, Any]) -> dict[str, Any]:
        from monitor.drift import request_rereference
        from monitor.reward.update import run_update

        p = req["payload"]
        try:
            with rq.held(self.store, req["id"], self.settings.reward.update.lease_s):
                result = run_update(
                    self.settings,
                    self.store,
                    stream=p["stream"],
                    since=float(p["since"]),
                    metrics=self.metrics,
                    request_id=req["id"],
                )
        except Exception as e:
            log.exception("reward-model update %s failed", req["id"])
            if self.metrics is not None:
                self.metrics.rm_updates.labels("failed").inc()
                self.metrics.action_requests.labels("rm_update", "local", "failed").inc()
            rq.finish(self.store, req["id"], "failed", error=str(e))
            self._request_retrain(p, None)
            return {"request": req["id"], "error": str(e)}
        if self._regate(req, result):
            return {"request": req["id"], **result}
        rq.finish(self.store, req["id"], "done", result=result)
        if self.metrics is not None:
            self.metrics.action_requests.labels("rm_update", "local", "sent").inc()
        if result["promoted"]:
            request_rereference(
                self.store,
                p["stream"],
                None,
                f"reward model {result['version']} promoted after incident {p['incident']}",
                "rm-update",
            )
        self._request_retrain(p, result)
        return {"request": req["id"], **result}

    def _regate(self, req: dict[str, Any], result: dict[str, Any]) -> bool:
        """After an undecided verdict: put the request back to wait for the labels the gate asked
        for (``needs_more``; at least ``min_labels`` more, at most as many again as there are, so
        one round never waits for an estimate made on a handful of pairs), then train and gate
        again on every label; at most ``reward.update.regates`` times. The incident's retraining
        request goes out now, with this verdict, as after any finished round (it is created once
        per incident). False when this verdict is final."""
        from monitor.reward.update import fresh_label_count

        ucfg = self.settings.reward.update
        p = req["payload"]
        gate = result.get("gate") or {}
        done = int(p.get("round", 0))
        if gate.get("verdict") != "undecided" or done >= ucfg.regates:
            return False
        have = fresh_label_count(self.store, p["stream"], float(p["since"]))
        needs = int((gate.get("needs_more") or {}).get("labels") or 0)
        target = have + min(max(needs, ucfg.min_labels), max(have, ucfg.min_labels))
        if not rq.requeue(self.store, req["id"], {**p, "round": done + 1, "min_labels": target}, result):
            return False
        log.info(
            "rm update %s undecided on %d fresh labels (%s): trained and gated again at %d (round %d of %d)",
            req["id"],
            have,
            gate.get("rule"),
            target,
            done + 1,
            ucfg.regates,
        )
        self._request_retrain(p, result)
        return True

    def _expire(self, req: dict[str, Any], have: int) -> None:
        """A claimed request whose labels did not come within ``max_wait_s``: failed when it never
        ran; after an undecided round, done with that round's verdict (the active version stays)."""
        p = req["payload"]
        if p.get("round"):
            rq.finish(self.store, req["id"], "done", result=req.get("result"))
            self._request_retrain(p, req.get("result"))
            return
        rq.finish(self.store, req["id"], "failed", error=f"only {have} fresh labels")
        self._request_retrain(p, None)

    # -- retraining requests -----------------------------------------------------------------
    def _request_retrain(self, incident: dict[str, Any], update: dict[str, Any] | None) -> bool:
        """Create the incident's retraining request; whether it is new."""
        from monitor.reward.registry import Registry

        active = Registry.for_settings(self.store, self.settings).active()
        payload = {
            **incident,
            "label_window": {"stream": incident["stream"], "since": incident["since"], "until": time.time()},
            "rm_version": None if active is None else active[0],
            "rm_update": None if update is None else {k: update.get(k) for k in ("version", "promoted", "gate")},
        }
        rid, created = rq.create(self.store, "retrain", incident["incident"], incident["stream"], payload)
        if created:
            log.info("retraining request %s for incident %s", rid, incident["incident"])
        return created

    def dispatch(self) -> int:
        """Send pending requests to their sinks (everything but the local worker)."""
        from monitor.actions.dispatch import dispatch_pending

        n = 0
        a = self.settings.actions
        for kind, names in (
            ("retrain", a.retrain_sinks),
            ("rm_update", [s for s in a.rm_update_sinks if s != "local"]),
            ("rm_training", a.rm_training_sinks),
        ):
            if names and not (kind == "rm_update" and "local" in a.rm_update_sinks):
                n += dispatch_pending(self.store, self.settings, kind, self._sinks_for(kind, names), self.metrics)
        return n

    def _sinks_for(self, kind: str, names: Sequence[str]) -> list[Any]:
        """The kind's sinks, built on first use and kept until :meth:`stop`: built per round, a
        Kafka sink would leave a producer (a thread and its sockets) behind every round. A sink
        that cannot be built (a broker down at start) raises here and is built again next round."""
        from monitor.actions.sinks import make_sinks

        if kind not in self._sinks:
            self._sinks[kind] = make_sinks(names, self.settings)
        return self._sinks[kind]

    # -- oversight gauges ------------------------------------------------------------------------
    def refresh_gauges(self) -> dict[str, dict[str, Any]]:
        """Quality estimates, reward-model/human agreement and the reward-hacking alarm (metrics)."""
        from monitor.quality import oversight
        from monitor.quality.window import quality_windows
        from monitor.reward.registry import Registry

        active = Registry.for_settings(self.store, self.settings).active()
        self.oversight = oversight.compute(
            self.store,
            None if active is None else active[0],
            window=self.settings.actions.oversight_window,
            reliability_weighting=self.settings.quality.reliability_weighting,
            prior_labels=self.settings.quality.reliability_prior_labels,
            windows=quality_windows(self.store, self.settings),
        )
        if self.metrics is not None:
            oversight.publish(self.metrics, self.oversight)
        return self.oversight

    def _paced_gauges(self) -> None:
        """:meth:`refresh_gauges` when due: at most ``actions.gauges_duty`` of the time. Their
        database work grows with the labels (every one of them is kept); without a pace, a store
        of years of labels, or a database slowed by something else, would spend the control
        thread on them round after round, and with it the database's time. A refresh that fails
        paces the next all the same."""
        start = time.monotonic()
        if not self._gauges_pace.due(start):
            return
        try:
            self.refresh_gauges()
        finally:
            took = time.monotonic() - start
            self._gauges_pace.ran(start, took)
            if self.metrics is not None:
                self.metrics.gauges_refresh_seconds.set(took)

    def refresh_sensitivity(self) -> None:
        """The active version's sensitivity per perturbation kind, once per version (gate record,
        else measured: a model thread step). A version that cannot be measured is logged once,
        not retried each round."""
        from monitor.reward import sensitivity
        from monitor.reward.registry import Registry

        if self.metrics is None:
            return
        active = Registry.for_settings(self.store, self.settings).active()
        if active is None or active[0] in self.sensitivity_failed:
            return
        version = active[0]
        try:
            sensitivity.refresh_active(self.metrics, self.settings, self.store, active)
        except Exception as e:  # a broken version folder must not stop the other gauges
            self.sensitivity_failed.add(version)
            log.warning("cannot measure the sensitivity of reward-model version %s: %s", version, first_line(e))

    # -- rounds ------------------------------------------------------------------------------
    def run_once(self) -> None:
        """Every step once, in order (``_steps``), on the caller's thread; the first that raises
        ends it (tests and the simulation drive the worker this way)."""
        for step in self._steps.values():
            step()

    def run_round(self, steps: tuple[str, ...]) -> int:
        """``steps`` once each, a failure counted and logged and the next step run all the same;
        returns how many failed."""
        failed = 0
        for name in steps:
            try:
                if name == "gauges":
                    self._paced_gauges()
                    continue
                self._steps[name]()
            except Exception as e:  # keep the worker alive; the next round retries
                failed += 1
                self._failed(name, e)
        return failed

    def _failed(self, step: str, e: Exception) -> None:
        with self._errors_lock:
            self.errors += 1
        if self.metrics is not None:
            self.metrics.action_worker_errors.labels(step).inc()
        if transient(e):  # an outage: one line per round, not a traceback per round
            log.warning("action worker step %s failed (retried next round): %s", step, first_line(e))
        else:
            log.exception("action worker step %s failed (retried next round)", step)

    def start(self) -> ActionWorker:
        """A thread per lane (module docstring), each a round every ``reward.update.poll_s``."""

        def loop(steps: tuple[str, ...]) -> None:
            while not self._stop.wait(self.settings.reward.update.poll_s):
                self.run_round(steps)

        for name, steps in LANES.items():
            th = threading.Thread(target=loop, args=(steps,), name=name, daemon=True)
            th.start()
            self._threads.append(th)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads (a step in progress, a training, is not interrupted: the threads are
        daemons and a request's lease lets another worker take it over), then close the sinks."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for th in self._threads:
            th.join(max(0.0, deadline - time.monotonic()))
        for sinks in self._sinks.values():
            for sink in sinks:
                try:
                    sink.close()
                except Exception as e:  # one sink that cannot close must not keep the others open
                    log.warning("cannot close the %s sink: %s", sink.name, first_line(e))
        self._sinks.clear()


def incident_overview(store: Store, settings: Settings) -> list[dict[str, Any]]:
    """Per stream: the open incident (since, drift events attached), the incidents opened in the
    24 h of event time before the stream's latest traffic against
    ``actions.max_requests_per_stream_per_day``, and the drift false-alarm budget in time.

    For the admin page. An incident counts as open as the worker would judge it at the stream's
    latest traffic: not closed, and its last event no longer ago than ``max(incident_gap_s,
    incident_timeout_s)`` (the worker itself closes it only when the next event comes)."""
    import sqlalchemy as sa

    from monitor.store import tables as t

    a = settings.actions
    incidents = _incidents_by_stream(store)
    with store.engine.connect() as conn:
        q = sa.select(t.traffic.c.stream, sa.func.max(t.traffic.c.bucket)).group_by(t.traffic.c.stream)
        latest = {str(s): float(b) + 60.0 for s, b in conn.execute(q)}  # end of the last traffic minute
    out = []
    for stream in sorted(set(latest) | set(incidents)):
        mine = incidents.get(stream, [])
        newest = max(mine, key=lambda p: float(p["since"]), default=None)
        now = latest.get(stream, 0.0)
        if newest is not None:
            now = max(now, float(newest.get("last_event_ts", newest["since"])))
        is_open = (
            newest is not None
            and not newest.get("closed")
            and now - float(newest.get("last_event_ts", newest["since"])) <= max(a.incident_gap_s, a.incident_timeout_s)
        )
        out.append(
            {
                "stream": stream,
                "open_incident_since": float(newest["since"]) if is_open and newest is not None else None,
                "events_attached": int(newest.get("events_total", len(newest.get("drift_events") or [])))
                if is_open and newest is not None
                else 0,
                "incidents_24h": sum(1 for p in mine if now - float(p["since"]) < 86400.0),
                "incident_limit_24h": a.max_requests_per_stream_per_day,
                "false_alarms_per_30d": settings.drift.false_alarms_per_30d,
            }
        )
    return out


def _incidents_by_stream(store: Store) -> dict[str, list[dict[str, Any]]]:
    """Each incident's payload once per stream (an incident has an rm_update and/or a retrain
    request; the newest payload of the two is the one events attach to)."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for kind in ("retrain", "rm_update"):  # rm_update last: it is the one the worker attaches events to
        for r in rq.listing(store, kind=kind, limit=500):
            p = r["payload"] or {}
            if r["stream"] is None or "since" not in p or "incident" not in p:
                continue
            seen[(str(r["stream"]), str(p["incident"]))] = p
    out: dict[str, list[dict[str, Any]]] = {}
    for (stream, _), p in seen.items():
        out.setdefault(stream, []).append(p)
    return out
