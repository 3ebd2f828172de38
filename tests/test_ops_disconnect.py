"""The ops port when a client gives up before its answer (a kubelet probe's 1 s timeout while
/readyz runs on a busy node): socketserver's default error handler printed a traceback on the
service's stderr for each one (ConnectionResetError, BrokenPipeError in ``_send``). Now a client
that went away is counted quietly, any other failure is one warning line, and the server goes on
answering."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from monitor.ops import OpsServer


def _healthz(url: str) -> int:
    with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
        return int(r.status)


def _wait_for(predicate: Any, timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def _slow_ready(started: threading.Event, delay_s: float = 0.4) -> Any:
    def ready() -> dict[str, bool]:
        started.set()
        time.sleep(delay_s)  # the client gives up meanwhile
        return {"database": True}

    return ready


@pytest.mark.parametrize("reset", [True, False], ids=["reset", "closed"])
def test_a_probe_that_gives_up_leaves_no_traceback(
    reset: bool, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    started = threading.Event()
    server = OpsServer("127.0.0.1", 0, CollectorRegistry(), _slow_ready(started)).start()
    caplog.set_level(logging.DEBUG, logger="monitor.ops")
    try:
        for _ in range(2):
            started.clear()
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert started.wait(5)
            if reset:  # SO_LINGER 0: close sends a reset, the server's write fails at once
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        # Both handlers' writes have failed (a reset), or may have (a plain close: the first
        # write can land in the buffers); the server goes on answering.
        _wait_for(lambda: server._httpd.gone >= 2, timeout_s=3.0 if reset else 1.0)
        assert _healthz(server.url) == 200
    finally:
        server.stop()
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    assert "Error" not in err, err
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    if reset:  # counted, and logged at debug level
        assert server._httpd.gone == 2
        assert len([r for r in caplog.records if "went away" in r.getMessage()]) == 2


class _Broken:
    """A collector whose scrape raises: not a client that went away, a real failure."""

    def collect(self) -> Iterator[Any]:
        raise RuntimeError("collector broke")
        yield  # pragma: no cover

    def describe(self) -> list[Any]:
        return []


def test_another_failure_is_one_warning_line_without_a_traceback(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    registry.register(_Broken())
    server = OpsServer("127.0.0.1", 0, registry, lambda: {"ok": True}).start()
    caplog.set_level(logging.DEBUG, logger="monitor.ops")
    try:
        with pytest.raises(OSError):  # the handler failed: the connection closes without an answer
            urllib.request.urlopen(f"{server.url}/metrics", timeout=5).close()
        assert _wait_for(lambda: any(r.levelno == logging.WARNING for r in caplog.records))
        assert _healthz(server.url) == 200
    finally:
        server.stop()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].exc_info is None
    assert "RuntimeError: collector broke" in warnings[0].getMessage()
    assert server._httpd.gone == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
