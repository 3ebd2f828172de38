"""Every Kafka producer of the service is rebuilt after a send that failed, against a real broker
(Tansu). kafka-python's idempotent producer can enter a fatal state it never leaves (an unknown
producer id after a broker restart, an authorization refusal): kept, every later send of the retrain
sink, an outbox, the dead-letter sink or the ingest hand-off failed the same way until the process
restarted (dead-lettering batches were retried for ever, requests failed for good). Here the first
producer each component builds is made to fail every send, as such a producer does."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.kafka


@pytest.fixture
def first_producer_broken(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every KafkaProducer built in the test, the first of which fails every send."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    built: list[Any] = []
    real_init, real_send = KafkaProducer.__init__, KafkaProducer.send

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        built.append(self)

    def send(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self is built[0]:
            raise KafkaError("a producer in a fatal state (stand-in for an unknown producer id)")
        return real_send(self, *args, **kwargs)

    monkeypatch.setattr(KafkaProducer, "__init__", init)
    monkeypatch.setattr(KafkaProducer, "send", send)
    yield built


def _cfg(kenv: Any, topic: str) -> Any:
    from monitor.config import KafkaConfig

    return KafkaConfig(
        bootstrap_servers=[kenv.bootstrap], topic=topic, retrain_topic=topic, drift_topic=topic, dlq_topic=topic
    )


def test_the_retrain_sink(kenv: Any, first_producer_broken: list[Any]) -> None:
    from monitor.actions.sinks import KafkaSink, SinkError

    topic = kenv.topic()
    sink = KafkaSink(_cfg(kenv, topic), ack_timeout_s=10)
    req = {"id": "retrain-1", "kind": "retrain", "key": "chat:1", "stream": "chat", "payload": {}, "created_at": 1.0}
    try:
        with pytest.raises(SinkError):
            sink.send(req)
        assert sink.send(req)["topic"] == topic
    finally:
        sink.close()
    assert len(first_producer_broken) == 2
    assert len(kenv.consume_all(topic, expect=1)) == 1


def test_an_outbox(kenv: Any, tmp_path: Path, first_producer_broken: list[Any]) -> None:
    from monitor.actions.outbox import drift_publisher
    from monitor.store import BatchWrite, Store

    topic = kenv.topic()
    store = Store(f"sqlite:///{tmp_path / 'o.db'}")
    event: Any = {"stream": "chat", "signal": "s", "detector": "d", "statistic": 1.0, "threshold": 0.5}
    event |= {"p_val": None, "episode_id": "e1", "input_index": 1, "event_ts": 1.0, "created_at": 1.0}
    store.commit_batch(BatchWrite(drift_events=[event]))
    publisher = drift_publisher(_cfg(kenv, topic), store)
    try:
        with pytest.raises(Exception, match="fatal state"):
            publisher.publish_pending()
        assert publisher.publish_pending() == 1
    finally:
        publisher.close()
        store.close()
    assert len(kenv.consume_all(topic, expect=1)) == 1


def test_the_dead_letter_sink(kenv: Any, first_producer_broken: list[Any]) -> None:
    from monitor.episodes.deadletter import DeadLetter, KafkaDeadLetterSink

    topic = kenv.topic()
    sink = KafkaDeadLetterSink(_cfg(kenv, topic), max_raw_bytes=1000)
    letter = DeadLetter("invalid_json", "bad", b"{", "kafka:g:t", 0, 7, time.time(), 1)
    with pytest.raises(Exception, match="fatal state"):
        sink.send(letter)
        sink.flush()
    sink.send(letter)  # the pipeline sends the batch's letters again
    sink.flush()
    sink.close()
    assert len(first_producer_broken) == 2
    [m] = kenv.consume_all(topic, expect=1)
    assert dict(m.headers)["oversight.error.reason"] == b"invalid_json"


def test_the_ingest_hand_off(kenv: Any, first_producer_broken: list[Any]) -> None:
    from monitor.ingest.handoff import HandoffUnavailable, KafkaHandoff
    from monitor.store.ingest import InboxRow

    topic = kenv.topic()
    handoff = KafkaHandoff(_cfg(kenv, topic), timeout_s=10)
    rows = [InboxRow(f"e{uuid.uuid4().hex[:6]}", "chat", b'{"episode_id": "x"}', time.time())]
    with pytest.raises(HandoffUnavailable):
        handoff.submit(rows)
    assert handoff.submit(rows) == {(rows[0].stream, rows[0].episode_id)}
    assert len(first_producer_broken) == 2
    assert len(kenv.consume_all(topic, expect=1)) == 1
