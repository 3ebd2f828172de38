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

``oversight serve`` (review) and ``oversight ingest serve`` wait the same way (:func:`open_store_answering`):
their listening socket, bound first, answers ``/healthz`` 200 and anything else 503 (``/readyz``:
``database`` false) during the wait, and is then handed to uvicorn as it is, so no connection is
refused in between.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from monitor.config import DatabaseConfig
from monitor.metrics import NS
from monitor.ops import OpsServer, signals_handled
from monitor.retry import Aborted, first_line, transient
from monitor.store import Store

log = logging.getLogger(__name__)

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 5.0
REMIND_S = 60.0


class StartingServer:
    """The ops endpoints before the service exists: alive, and not ready. ``database`` is false
    until :meth:`database_open`; then ``service`` is false until the service takes the server over
    (loading the models and building the detectors take seconds, and the database is not to blame)."""

    def __init__(self, host: str, port: int) -> None:
        registry = CollectorRegistry()
        ready = "1 when the pipeline can make progress (0: starting)"
        Gauge("ready", ready, namespace=NS, registry=registry).set(0)
        self._check = Gauge(
            "ready_check", "1 when a check of /readyz passes", ["check"], namespace=NS, registry=registry
        )
        self._check.labels("database").set(0)
        self._checks = {"database": False}
        self.server = OpsServer(host, port, registry, lambda: dict(self._checks)).start()

    def database_open(self) -> None:
        self._checks = {"database": True, "service": False}
        self._check.labels("database").set(1)
        self._check.labels("service").set(0)

    def stop(self) -> None:
        self.server.stop()


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


def open_store_answering(cfg: DatabaseConfig, sock: socket.socket) -> Store:
    """:func:`open_store` for a web server whose listening socket ``sock`` is bound: while the
    database is awaited the socket answers (``/healthz`` 200, anything else 503) and a SIGTERM or
    SIGINT ends the wait (:class:`Aborted`). ``sock`` is left open, listening, for the server."""
    try:
        return Store.open(cfg)  # the common case: the database answers at once
    except Exception as e:
        if cfg.url.startswith("sqlite") or not transient(e):
            raise
    stop = threading.Event()
    with _stopped_by_signals(stop), _answering(sock):
        return open_store(cfg, stop)


class _Waiting(BaseHTTPRequestHandler):
    server_version = "oversight"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(200, {"status": "ok"})
        elif path == "/readyz":
            self._send(503, {"ready": False, "checks": {"database": False}})
        else:
            self._send(503, {"error": "starting: waiting for the database"})

    def do_POST(self) -> None:
        self._send(503, {"error": "starting: waiting for the database"})

    def _send(self, code: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Retry-After", "5")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return


class _WaitingServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A probe that gave up while the database was awaited (a reset, a broken pipe): socketserver's
        # default printed its traceback on stderr. One debug line, as the ops server's (monitor/ops.py).
        log.debug("waiting server: request from %s failed: %s", client_address, sys.exc_info()[1])


@contextlib.contextmanager
def _answering(sock: socket.socket) -> Iterator[None]:
    """Serve :class:`_Waiting` on the bound, listening ``sock`` until the block ends; the socket
    stays open (the server that follows takes it)."""
    httpd = _WaitingServer(sock.getsockname()[:2], _Waiting, bind_and_activate=False)
    httpd.socket.close()  # its own, never bound: ours replaces it
    httpd.socket = sock
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.1,), name="waiting-http", daemon=True)
    thread.start()
    try:
        yield
    finally:
        httpd.shutdown()  # not server_close(): that would close the socket
        thread.join(5)


def _stopped_by_signals(stop: threading.Event) -> contextlib.AbstractContextManager[None]:
    """SIGTERM and SIGINT set ``stop`` during the block (the main thread only; elsewhere nothing is
    changed), and the handlers before it are put back after it."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: no longer waiting for the database", signal.Signals(signum).name)
        stop.set()

    return signals_handled(handler)
