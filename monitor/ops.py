"""Operational HTTP endpoints: ``/metrics``, ``/healthz`` (alive), ``/readyz`` (source and database).

A small threaded stdlib server: the pipeline's ops surface must not depend on
the review app's web stack, and it must answer while the pipeline is busy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

ReadyCheck = Callable[[], dict[str, bool]]


class ReadinessCollector:
    """``oversight_ready`` and ``oversight_ready_check{check}`` computed at scrape time from a
    process's /readyz check, for the processes whose metrics do not hold them already: the review
    service and the inference workers. Without them ``OversightNotReady`` could never fire for
    those pods, whose /readyz alone said they were not ready.

    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> registry = CollectorRegistry()
    >>> registry.register(ReadinessCollector(lambda: {"database": False}))
    >>> sorted(line for line in generate_latest(registry).decode().splitlines() if not line.startswith("#"))
    ['oversight_ready 0.0', 'oversight_ready_check{check="database"} 0.0']
    """

    def __init__(self, ready: ReadyCheck) -> None:
        self._ready = ready

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            checks = self._ready()
        except Exception:  # a scrape must not fail because a check did
            checks = {"check": False}
        ready = GaugeMetricFamily("oversight_ready", "1 when every check of /readyz passes (computed at scrape time)")
        ready.add_metric([], float(all(checks.values())))
        per = GaugeMetricFamily("oversight_ready_check", "1 when a check of /readyz passes", labels=["check"])
        for name, ok in sorted(checks.items()):
            per.add_metric([name], float(bool(ok)))
        yield ready
        yield per

    def describe(self) -> list[Any]:
        # Nothing described: registering does not run the check (a database ping) once ahead of time.
        return []


log = logging.getLogger(__name__)


def listening_socket(host: str, port: int, setting: str) -> socket.socket:
    """A socket bound and listening on ``host:port`` for a foreground web server (uvicorn takes it;
    the caller closes it, ``with listening_socket(...) as sock``).

    Bound here, before the server starts, so that a port in use or an address that is not this
    host's is one clear error naming ``setting`` (the CLI prints it on one line and exits 2); left to
    uvicorn, the bind failed after the address had been logged as served, and uvicorn ended the
    process itself with its own log line."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family)
    except OSError as e:
        from monitor.config import ConfigError

        raise ConfigError(f"{setting}: cannot listen on {host}:{port}: {e.strerror or e}") from None


def socket_url(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket (the port the system chose for port 0)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


SignalHandler = Callable[[int, FrameType | None], None]


@contextlib.contextmanager
def signals_handled(handler: SignalHandler) -> Iterator[None]:
    """``handler`` takes SIGTERM and SIGINT during the block, and the handlers before it are put
    back after it; on a thread other than the main one (where Python allows no handlers) nothing
    is changed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in before.items():
            signal.signal(sig, old)


#: How often a process out of file descriptors says so (asyncio's accept loop says it per connection).
ACCEPT_FLOOD_EVERY_S = 60.0


class AcceptFlood(logging.Filter):
    """Lets one of asyncio's "socket.accept() out of system resource" records through a minute,
    with the count of those held back, and none of their tracebacks.

    A server at its file-descriptor limit (``RLIMIT_NOFILE``) logs that record, with a traceback, for
    every connection its accept loop tries: up to the listen backlog (uvicorn's 2,048) each time
    the loop wakes. ``oversight serve`` under ``ulimit -n 64`` with 300 clients wrote 47,000
    tracebacks, 22 MB of log, in 25 s, the disk the logs share filling while it recovered on
    its own once descriptors were free.

    >>> f = AcceptFlood(clock=iter([0.0, 1.0, 2.0, 61.0]).__next__)
    >>> def rec(msg: str) -> logging.LogRecord:
    ...     return logging.LogRecord("asyncio", logging.ERROR, "", 0, msg, None, None)
    >>> [f.filter(rec("socket.accept() out of system resource")) for _ in range(3)]
    [True, False, False]
    >>> r = rec("socket.accept() out of system resource"); f.filter(r), r.getMessage()[-45:]
    (True, '(the cause unknown; 2 more held back in 61 s)')
    >>> f.filter(rec("Task exception was never retrieved"))
    True
    """

    MARK = "out of system resource"
    #: asyncio schedules a retry of the accept for every accept that failed (thousands in a flood);
    #: those still pending when the server closes its socket at shutdown each fail on it ("Invalid
    #: file descriptor") with a traceback: dropped, they only echo the flood already said.
    RETRY = "BaseSelectorEventLoop._start_serving"

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__()
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._last: float | None = None
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if self.RETRY in msg and record.exc_info is not None and isinstance(record.exc_info[1], ValueError | OSError):
            return False
        if self.MARK not in msg:
            return True
        now = self._clock()
        with self._lock:
            if self._last is not None and now - self._last < ACCEPT_FLOOD_EVERY_S:
                self._held += 1
                return False
            held, since = self._held, None if self._last is None else now - self._last
            self._last, self._held = now, 0
        # The same words for EMFILE, ENFILE, ENOBUFS and ENOMEM: say which, the traceback going.
        err = record.exc_info[1] if record.exc_info else None
        why = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else "the cause unknown"
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        more = f"{why}" if since is None else f"{why}; {held} more held back in {since:.0f} s"
        record.msg = f"{record.getMessage()} ({more})"
        record.args = None
        return True


_ACCEPT_FLOOD = AcceptFlood()


def quiet_accept_flood() -> None:
    """Install :class:`AcceptFlood` on the ``asyncio`` logger (once per process)."""
    logger = logging.getLogger("asyncio")
    if _ACCEPT_FLOOD not in logger.filters:
        logger.addFilter(_ACCEPT_FLOOD)


def serve_until_signalled(server: Any, sock: socket.socket, name: str) -> bool:
    """Run the uvicorn ``server`` on ``sock`` until SIGTERM or SIGINT, then shut it down gracefully
    and return normally; returns whether it had started (False: it ended on its own, e.g. a failed
    start). A second signal stops it without waiting for open connections.

    uvicorn's own ``run()`` on the main thread catches those signals itself and, once shut down,
    raises the signal again so that its default action ends the process: the caller's ``finally``
    (closing the store, the Kafka hand-off's producer) never ran and the exit status was 143. On a
    thread of its own uvicorn installs no handlers; the main thread's ask it to exit
    (``should_exit``, then ``force_exit``), and the command exits 0 after its cleanup."""
    failed: list[BaseException] = []
    quiet_accept_flood()

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as e:  # raised on the caller's thread below, as run() on it would
            failed.append(e)

    thread = threading.Thread(target=run, name=name, daemon=True)

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: %s shutting down", signal.Signals(signum).name, name)
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    with signals_handled(handler):
        thread.start()
        while thread.is_alive():
            thread.join(0.5)  # with a timeout: the main thread's signal handlers run between the waits
    if failed:
        raise failed[0]
    return bool(server.started)


# The ops port (/metrics, /healthz, /readyz) has no authentication and is often reachable from the
# whole cluster. A connection that sent nothing held a thread and a file descriptor for good: a
# thousand of them took the process to its descriptor limit, and the pipeline could open neither its
# database nor a broker socket. So each connection gets a socket timeout and a whole-request
# deadline (the server speaks HTTP/1.0: one request a connection), and at most so many at once, of
# which a quarter from one address; a connection past either limit is closed at once.
OPS_SOCKET_TIMEOUT_S = 5.0
OPS_DEADLINE_S = 15.0
OPS_MAX_CONNECTIONS = 64


class _BoundedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_connections: int,
        deadline_s: float,
    ):
        super().__init__(address, handler)
        self.max_connections = max_connections
        self.per_address = max(1, max_connections // 4)
        self.deadline_s = deadline_s
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self.refused = 0  # connections closed at once, over a limit
        self.gone = 0  # clients that went away before their answer was written (a probe timed out)

    def _take(self, address: str) -> bool:
        with self._lock:
            if sum(self._open.values()) >= self.max_connections or self._open.get(address, 0) >= self.per_address:
                self.refused += 1
                return False
            self._open[address] = self._open.get(address, 0) + 1
            return True

    def _give(self, address: str) -> None:
        with self._lock:
            left = self._open.get(address, 0) - 1
            if left > 0:
                self._open[address] = left
            else:
                self._open.pop(address, None)

    def process_request(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        if not self._take(address):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._give(address)
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A request's handler raised. socketserver's default printed the traceback on stderr: a
        kubelet probe that timed out on a busy node (the connection reset while /readyz ran) put
        one in the service's log each time. A client that went away (a reset, a broken pipe, a
        timeout, the deadline's cut) is counted and logged at debug level; anything else is one
        warning line, without a traceback."""
        error = sys.exc_info()[1]
        peer = client_address[0] if isinstance(client_address, tuple) and client_address else client_address
        if isinstance(error, (ConnectionError, TimeoutError)):  # BrokenPipe, ConnectionReset, socket.timeout
            with self._lock:
                self.gone += 1
            log.debug("ops: client %s went away: %s", peer, error)
            return
        log.warning("ops: request from %s failed: %s: %s", peer, type(error).__name__, error)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        def cut() -> None:  # the deadline: a slow sender's blocked read ends at once
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(self.deadline_s, cut)
        timer.daemon = True
        timer.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            timer.cancel()
            self._give(str(client_address[0]))


class OpsServer:
    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        ready: ReadyCheck,
        *,
        socket_timeout_s: float = OPS_SOCKET_TIMEOUT_S,
        deadline_s: float = OPS_DEADLINE_S,
        max_connections: int = OPS_MAX_CONNECTIONS,
    ):
        self._registry = registry
        self._ready = ready
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "oversight"
            sys_version = ""
            timeout = socket_timeout_s  # set on the socket by StreamRequestHandler.setup

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(outer._registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b'{"status":"ok"}\n', "application/json")
                elif path == "/readyz":
                    try:
                        checks = outer._ready()
                    except Exception:
                        checks = {"check": False}
                    ok = all(checks.values())
                    body = json.dumps({"ready": ok, "checks": checks}).encode() + b"\n"
                    self._send(200 if ok else 503, body, "application/json")
                else:
                    self._send(404, b'{"error":"not found"}\n', "application/json")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self._httpd = _BoundedHTTPServer((host, port), Handler, max_connections, deadline_s)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="ops-http", daemon=True)

    def serve(self, registry: CollectorRegistry, ready: ReadyCheck) -> None:
        """Serve another registry and readiness from now on: the service takes over the server that
        answered while it started (``monitor.startup``), so the port never closes."""
        self._registry, self._ready = registry, ready

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._httpd.server_address[0])
        return f"http://{host}:{self.port}"

    def start(self) -> OpsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
