"""The Kafka sink on a real Kafka-protocol broker (Tansu): what it publishes is consumed back and checked."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from bench import tansu
from monitor.actions.dispatch import dispatch_pending
from monitor.actions.sinks import KafkaSink, encode
from monitor.config import KafkaConfig, load_settings
from monitor.store import Store, requests

pytestmark = pytest.mark.kafka


def new_topic(bootstrap: str, partitions: int = 1) -> str:
    name = f"retrain-{uuid.uuid4().hex[:10]}"
    tansu.create_topic(bootstrap, name, partitions)
    return name


def test_request_is_published_with_headers_and_acknowledged(action_kafka: str) -> None:
    topic = new_topic(action_kafka)
    sink = KafkaSink(KafkaConfig(bootstrap_servers=[action_kafka], retrain_topic=topic))
    reqs: list[dict[str, Any]] = [
        {
            "id": "retrain-00000000000000a1",
            "kind": "retrain",
            "key": "chat:1",
            "stream": "chat",
            "payload": {"events": [1]},
            "created_at": 1.5,
        },
        {
            "id": "rm_update-00000000000000b2",
            "kind": "rm_update",
            "key": "caf\u00e9:2",
            "stream": "caf\u00e9\n",
            "payload": {},
            "created_at": 2.0,
        },
    ]
    try:
        results = [sink.send(r) for r in reqs]
    finally:
        sink.close()
    assert [r["topic"] for r in results] == [topic, topic]
    got = tansu.consume_all(action_kafka, topic, expect=2)
    assert len(got) == 2
    for req, res, rec in zip(reqs, results, got, strict=True):
        assert (rec.partition, rec.offset) == (res["partition"], res["offset"])
        assert rec.key == req["stream"].encode()
        assert dict(rec.headers) == {
            "oversight.idempotency_key": req["id"].encode(),
            "oversight.kind": req["kind"].encode(),
        }
        body = json.loads(rec.value)
        assert rec.value == encode(body)  # canonical, ASCII
        assert body == {"schema_version": 1, **req}


def test_dispatch_publishes_each_pending_request_once(action_kafka: str, tmp_path: Path) -> None:
    topic = new_topic(action_kafka, partitions=2)
    settings = load_settings(
        None, ["dev=true", f'kafka.bootstrap_servers=["{action_kafka}"]', f"kafka.retrain_topic={topic}"]
    )
    store = Store(f"sqlite:///{tmp_path / 'o.db'}")
    sink = KafkaSink(settings.kafka)
    try:
        ids = [requests.create(store, "retrain", f"s{i}:1", f"s{i}", {"i": i})[0] for i in range(5)]
        assert dispatch_pending(store, settings, "retrain", [sink]) == 5
        assert dispatch_pending(store, settings, "retrain", [sink]) == 0
        rows = {rid: requests.get(store, rid) for rid in ids}
    finally:
        sink.close()
        store.close()
    got = tansu.consume_all(action_kafka, topic, expect=5)
    assert sorted(dict(r.headers)["oversight.idempotency_key"].decode() for r in got) == sorted(ids)
    for rec in got:
        row = rows[json.loads(rec.value)["id"]]
        assert row is not None and row["state"] == "sent"
        assert row["result"] == {"kafka": {"topic": topic, "partition": rec.partition, "offset": rec.offset}}
        assert rec.key == row["stream"].encode()
