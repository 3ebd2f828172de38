"""Before the service exists: a database server that is not up yet when a long-running command starts.

``oversight run`` and ``oversight infer`` open the store (and migrate it) before anything else. A
PostgreSQL server still starting, or failing over, when the pod started ended the command at once
("database unavailable"), and Kubernetes restarted it with a growing back-off, up to five minutes
after the database was back. Now the command waits for it: the ops endpoints answer meanwhile
(``/healthz`` 200, ``/readyz`` 503 with ``database`` false, ``oversight_ready`` 0), the wait is
logged once and then once a minute, and a SIGTERM ends it. The server started here is the one the
service goes on with (:meth:`OpsServer.serve`), so the port never closes in between.

A SQLite file that cannot be opened is no outage of a server: it fails the command with its reason,
as before.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Gauge

from monitor.config import DatabaseConfig
from monitor.metrics import NS
from monitor.ops import OpsServer
from monitor.retry import Aborted, first_line, transient
from monitor.store import Store

log = logging.getLogger(__name__)

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 5.0
REMIND_S = 60.0


def starting_server(host: str, port: int) -> OpsServer:
    """The ops endpoints while the database is awaited: alive, not ready (``database`` false)."""
    registry = CollectorRegistry()
    Gauge("ready", "1 when the pipeline can make progress (0: starting)", namespace=NS, registry=registry).set(0)
    check = Gauge("ready_check", "1 when a check of /readyz passes", ["check"], namespace=NS, registry=registry)
    check.labels("database").set(0)
    return OpsServer(host, port, registry, lambda: {"database": False}).start()


def open_store(cfg: DatabaseConfig, stop: threading.Event) -> Store:
    """The store of ``cfg`` (migrated as ``cfg.migrate`` says), once its server answers. An outage
    (:func:`monitor.retry.transient`) is waited out with a back-off of ``FIRST_DELAY_S`` doubling to
    ``MAX_DELAY_S``; any other error, and any error of a SQLite file, is raised. Raises
    :class:`Aborted` when ``stop`` is set while waiting."""
    if cfg.url.startswith("sqlite"):
        return Store.open(cfg)
    started = time.monotonic()
    reminded = started
    attempts = 0
    delay = FIRST_DELAY_S
    while True:
        try:
            store = Store.open(cfg)
        except Exception as e:
            if not transient(e):
                raise
            attempts += 1
            now = time.monotonic()
            if attempts == 1:
                log.warning("database unavailable at start, waiting for it: %s", first_line(e))
            elif now - reminded >= REMIND_S:
                reminded = now
                log.warning(
                    "database still unavailable after %.0fs (%d attempts), waiting: %s",
                    now - started,
                    attempts,
                    first_line(e),
                )
            if stop.wait(delay):
                raise Aborted("stopped while waiting for the database at start") from None
            delay = min(delay * 2, MAX_DELAY_S)
            continue
        if attempts:
            log.warning("database available after %.1fs (%d failed attempts)", time.monotonic() - started, attempts)
        return store
