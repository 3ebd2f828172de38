"""The ops port (/metrics, /healthz, /readyz) against clients that connect and send nothing, or a
byte at a time. It has no authentication and is reachable from the cluster; each such connection
held a thread and a file descriptor for good, and a thousand took the process to its descriptor
limit (the pipeline then could open neither its database nor a broker socket)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import urllib.request

from prometheus_client import CollectorRegistry

from monitor.ops import OpsServer


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _healthz(url: str) -> int:
    with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
        return int(r.status)


def test_idle_connections_are_bounded_and_time_out() -> None:
    server = OpsServer(
        "127.0.0.1", 0, CollectorRegistry(), lambda: {"ok": True}, socket_timeout_s=1.0, max_connections=8
    ).start()
    idle: list[socket.socket] = []
    try:
        threads, fds = threading.active_count(), _open_fds()
        for _ in range(100):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        time.sleep(0.5)
        # At most 2 (a quarter of 8, one address) held by the server; the rest closed at once.
        assert threading.active_count() - threads <= 2 * 2  # a handler and its deadline timer each
        assert _open_fds() - fds <= 100 + 2 + 2  # the test's own 100 client sockets, 2 accepted, slack
        closed = 0
        for s in idle:
            s.settimeout(0.05)
            with contextlib.suppress(TimeoutError):
                closed += s.recv(1) == b""
        assert closed >= 95
        time.sleep(1.5)  # past the socket timeout: the two held are let go
        assert threading.active_count() - threads <= 1
        assert _healthz(server.url) == 200
    finally:
        for s in idle:
            s.close()
        server.stop()


def test_a_request_sent_a_byte_at_a_time_is_cut_at_the_deadline() -> None:
    server = OpsServer("127.0.0.1", 0, CollectorRegistry(), lambda: {"ok": True}, deadline_s=1.0).start()
    try:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        t0 = time.monotonic()
        got = b""
        for c in b"GET /healthz HTTP/1.0\r\nX-Slow: " + b"a" * 40:
            try:
                s.sendall(bytes([c]))
            except OSError:
                break
            time.sleep(0.1)  # each byte well within the socket timeout
        s.settimeout(2)
        with contextlib.suppress(OSError):
            got = s.recv(100)
        assert time.monotonic() - t0 < 5.0 and b"200" not in got
        s.close()
        assert _healthz(server.url) == 200
    finally:
        server.stop()
