"""oversight_client against a broken or hostile server (a STAND-IN HTTP server that answers what
each test scripts, byte for byte). The SDK runs inside the application's serving process: an
answer must never take its memory, hold its sender for good, or count episodes as stored that
nothing stored."""

from __future__ import annotations

import gzip
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from oversight_client import Backoff, Client, Result
from sdk_helpers import ep

# (status, headers, body chunks, seconds between chunks)
Reply = tuple[int, dict[str, str], Iterator[bytes], float]


class _Handler(BaseHTTPRequestHandler):
    server: Any
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        return None

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        status, headers, chunks, pause = self.server.reply()
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Connection", "close")
            self.end_headers()
            for c in chunks:
                self.wfile.write(c)
                self.wfile.flush()
                time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def hostile() -> Iterator[Callable[[Callable[[], Reply]], str]]:
    servers: list[ThreadingHTTPServer] = []

    def start(reply: Callable[[], Reply]) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.reply = reply  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _send(url: str, n: int = 3, **kw: Any) -> tuple[list[Result], Any, float]:
    results: list[Result] = []
    t0 = time.monotonic()
    settings: dict[str, Any] = {"backoff": Backoff(initial_s=0.01, max_s=0.05), "max_retries": 0, **kw}
    with Client(url, "tok", on_result=results.append, flush_interval_s=0.05, **settings) as c:
        for i in range(n):
            c.log(ep(i))
        c.flush(20)
        stats = c.stats
    return results, stats, time.monotonic() - t0


def _endless() -> Iterator[bytes]:
    while True:
        yield b"x" * 65536


def test_an_answer_that_never_ends_is_read_no_further_than_a_bound(hostile: Any) -> None:
    """Read whole, it grew the serving process by 250 MB a second until it was killed."""
    url = hostile(lambda: (200, {"Content-Type": "application/json"}, _endless(), 0.0))
    tracemalloc.start()
    try:
        results, stats, _ = _send(url)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak
    assert [r.status for r in results] == ["failed"] * 3 and {r.reason for r in results} == {"unexpected_answer"}
    assert stats.accepted == 0


def test_a_gzip_bomb_answer_is_not_inflated_whole(hostile: Any) -> None:
    """A megabyte of gzip that inflates to a gigabyte took the process to 3 GB."""
    bomb = gzip.compress(b"\0" * (256 * 2**20))
    url = hostile(lambda: (200, {"Content-Encoding": "gzip", "Content-Length": str(len(bomb))}, iter([bomb]), 0.0))
    tracemalloc.start()
    try:
        results, _, _ = _send(url)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 160 * 2**20, peak
    assert {r.reason for r in results} == {"unexpected_answer"}


def test_an_answer_sent_a_byte_at_a_time_is_a_timeout(hostile: Any) -> None:
    """httpx's timeout bounds each read: a byte every 0.2 s held the sender, and every batch behind
    it, for good (close() then took twice its timeout and left the episodes pending)."""
    url = hostile(lambda: (200, {"Content-Type": "application/json"}, iter([b" "] * 1000), 0.2))
    results, stats, took = _send(url, timeout_s=1.0)
    assert took < 6 and stats.pending == 0
    assert {r.reason for r in results} == {"connection_error: TimeoutError"}


@pytest.fixture
def header_drip() -> Iterator[str]:
    """A STAND-IN server that reads a request, then sends its status line and a header a byte every
    0.2 s for 12 s: each of the client's reads gets a byte within its timeout."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    def drip(conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                piece = conn.recv(65536)
                if not piece:
                    return
                head += piece
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Drip: ")
                for _ in range(60):
                    if stop.is_set():
                        return
                    conn.sendall(b"x")
                    time.sleep(0.2)
            except OSError:
                return  # the client hung up: what the test wants

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()


def test_headers_sent_a_byte_at_a_time_are_a_timeout(header_drip: str) -> None:
    """The status line and headers are read inside httpx, whose timeout bounds each read: headers
    sent a byte every 0.2 s held the sender (and every batch behind it) for as long as they came."""
    results, stats, took = _send(header_drip, timeout_s=1.0)
    assert took < 6 and stats.pending == 0 and stats.failed == 3
    assert {r.reason for r in results} == {"connection_error: TimeoutError"}
    # Retried on a new connection, and cut again at each deadline.
    results, stats, took = _send(header_drip, timeout_s=1.0, max_retries=2)
    assert took < 10 and stats.failed == 3 and stats.requests == 3


def test_close_accounts_for_a_batch_stuck_in_an_exchange(hostile: Any) -> None:
    """A server that takes the request and never answers (within the client's timeout): close()
    returned with the batch in flight still pending, neither sent nor failed, for good."""

    def silent() -> Reply:
        time.sleep(5)  # longer than close() waits, shorter than the client's timeout
        return 200, {"Content-Type": "application/json"}, iter([b"{}"]), 0.0

    results: list[Result] = []
    c = Client(hostile(silent), "tok", on_result=results.append, flush_interval_s=0.01, timeout_s=60, max_retries=0)
    for i in range(3):
        c.log(ep(i))
    time.sleep(0.3)  # the batch is in its exchange
    t0 = time.monotonic()
    stats = c.close(timeout_s=0.2)
    assert time.monotonic() - t0 < 2
    assert stats.pending == 0 and stats.failed == 3 and stats.enqueued == 3
    assert [(r.status, r.reason) for r in results] == [("failed", "closed")] * 3


def test_a_2xx_that_is_not_the_ingest_apis_answer_stores_nothing(hostile: Any) -> None:
    """A proxy's page, a wrong path: the episodes counted as accepted and were lost without a word."""
    page = b"<html><body>Welcome to nginx!</body></html>"
    url = hostile(lambda: (200, {"Content-Type": "text/html", "Content-Length": str(len(page))}, iter([page]), 0.0))
    results, stats, _ = _send(url)
    assert stats.accepted == 0 and {(r.status, r.reason) for r in results} == {("failed", "unexpected_answer")}
    deep = b"[" * 100_000 + b"]" * 100_000  # nesting past the recursion limit: a traceback in the log before
    url = hostile(lambda: (200, {"Content-Length": str(len(deep))}, iter([deep]), 0.0))
    results, stats, _ = _send(url)
    assert stats.accepted == 0 and {r.reason for r in results} == {"unexpected_answer"}


def test_a_token_no_header_can_carry_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="token holds a space, a control"):
        Client("http://127.0.0.1:9", "tok-from-a-file\n")
