"""Through the real Kafka-protocol broker: a policy swap in the traffic produces drift events
that are published to the drift topic, and reward-model scores go to the scores topic, each
exactly as committed in the database, with idempotency keys."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from typing import Any

import pytest
from realdata import alpaca_rows

from monitor.reward.model import ModelConfig, RewardModel
from monitor.reward.registry import Registry
from monitor.store import Store

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_drift_events_and_scores_are_published(kenv: Any, sqlite_url: str, tmp_path: Path) -> None:
    # The files are ordered by prompt source (a real shift of its own): shuffle each side.
    rng = random.Random(0)
    before, after = alpaca_rows("gpt-3.5-turbo-1106"), alpaca_rows("alpaca-7b")
    rng.shuffle(before)
    rng.shuffle(after)
    before, after = before[:700], after[:700]
    eps = [
        {
            "episode_id": f"swap-{i}",
            "stream": "chat",
            "model": "policy",
            "timestamp": kenv.base_ts + i,
            "prompt": r["instruction"],
            "response": r["output"],
        }
        for i, r in enumerate(before + after)
    ]
    topic = kenv.topic()
    drift_topic, scores_topic = f"drift-{uuid.uuid4().hex[:8]}", f"scores-{uuid.uuid4().hex[:8]}"
    group = f"g-{uuid.uuid4().hex[:8]}"
    models = tmp_path / "models"
    store = Store(sqlite_url)
    registry = Registry(store, models)
    registry.promote(
        registry.register(RewardModel.create(ModelConfig(finetune_layers=0, max_length=64)), data_window={}, metrics={})
    )
    store.close()
    settings = kenv.settings(
        topic,
        group,
        sqlite_url,
        "drift.enabled=true",
        "drift.reference_size=300",
        "drift.embedding.enabled=false",
        f"kafka.drift_topic={drift_topic}",
        f"kafka.scores_topic={scores_topic}",
        f"reward.models_dir={models}",
        "sampling.rm.rate=0.05",
    )
    ends = kenv.produce_episodes(topic, eps)
    source = kenv.source_name(group, topic)
    kenv.run_until(settings, lambda st: kenv.offsets_reached(sqlite_url, source, ends), timeout_s=240)

    events = kenv.db_rows(sqlite_url, "SELECT id, signal, episode_id, published_at FROM drift_events ORDER BY id")
    assert events, "the policy swap was not detected"
    assert all(e[3] is not None for e in events), "committed events left unpublished"
    # Detection comes after the change, from the traffic itself.
    assert min(int(e[2].split("-")[1]) for e in events) >= 700
    msgs = kenv.consume_all(drift_topic, expect=len(events))
    got = [json.loads(m.value) for m in msgs]
    assert [(g["id"], g["signal"], g["episode_id"]) for g in sorted(got, key=lambda g: g["id"])] == [
        (e[0], e[1], e[2]) for e in events
    ]
    assert {dict(m.headers)["oversight.idempotency_key"].decode() for m in msgs} == {
        f"drift-event-{e[0]}" for e in events
    }

    scores = kenv.db_rows(sqlite_url, "SELECT episode_id, version, score, published_at FROM rm_scores")
    rm = kenv.db_rows(sqlite_url, "SELECT episode_id FROM samples WHERE channel = 'rm'")
    assert {s[0] for s in scores} == {r[0] for r in rm} and len(scores) == len(rm) > 20
    assert all(s[3] is not None for s in scores)
    smsgs = kenv.consume_all(scores_topic, expect=len(scores))
    published = {(v["episode_id"], v["version"]): v["score"] for v in (json.loads(m.value) for m in smsgs)}
    assert published == {(s[0], s[1]): pytest.approx(s[2]) for s in scores}
    assert all(m.key == b"chat" for m in smsgs)
