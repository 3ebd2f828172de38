"""Fuzz of Kafka ingest (issue 13): 10,000 seeded mutated records (and tombstones) on a real
Kafka-protocol broker (Tansu) through the service. No record stops the partition: the offsets
reach the end, and every record is counted exactly once, as a valid episode (traffic), as one
dead letter on ``<topic>.dlq`` or as a duplicate (the corpus repeats some ids in a stream)."""

from __future__ import annotations

import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared corpus

from fuzz_corpus import mutated_records

from monitor.episodes import REASONS

pytestmark = pytest.mark.kafka

N_RECORDS = 10_000
TOMBSTONE_EVERY = 997  # a null value, as a compacted topic's delete marker


def test_fuzz_kafka_ingest_counts_every_record_once(kenv: Any, db_url: str) -> None:
    records, valid = mutated_records(N_RECORDS, single_line=False)
    values: list[bytes | None] = [None if i % TOMBSTONE_EVERY == 1 else r for i, r in enumerate(records)]
    valid -= {i for i, v in enumerate(values) if v is None}
    topic, group = kenv.topic(partitions=1), f"g-{uuid.uuid4().hex[:8]}"
    ends = kenv.produce(topic, ((b"k%d" % (i % 7), v) for i, v in enumerate(values)))
    assert ends == {0: N_RECORDS}

    settings = kenv.settings(topic, group, db_url, "pipeline.batch_size=500", "sampling.rm.rate=0.5")
    source = kenv.source_name(group, topic)
    stats = kenv.run_until(settings, lambda store: kenv.offsets_reached(db_url, source, ends), timeout_s=300)

    assert stats.records == N_RECORDS
    assert stats.invalid == sum(stats.dead_letters.values())
    reasons = Counter(stats.dead_letters)
    # No internal_error, nothing refused by the store; the mutations reuse ids ("fz-dup", "x" * 128,
    # ...) across streams: the sampled ones after the first are episode_id_conflict.
    assert set(reasons) <= {*REASONS, "episode_id_conflict"}, reasons
    assert reasons["too_deep"] and reasons["number_out_of_range"] and reasons["invalid_json"]
    traffic = kenv.db_rows(db_url, "SELECT COALESCE(SUM(episodes), 0) FROM traffic")[0][0]
    assert stats.duplicates > 0, "the corpus repeats ids in a stream: copies are counted as such"
    assert int(traffic) == N_RECORDS - stats.invalid - stats.duplicates, "valid + dead letters + duplicates != records"

    letters = kenv.consume_all(f"{topic}.dlq", expect=stats.invalid, timeout_s=120)
    offsets = [int(dict(m.headers)["oversight.source.offset"]) for m in letters]
    assert len(offsets) == stats.invalid, "dead letters on the topic != invalid records"
    assert len(set(offsets)) == len(offsets), "a record was dead-lettered twice"
    assert not set(offsets) & valid, "an untouched valid episode was dead-lettered"
    assert {o for o in offsets if values[o] is None} == {i for i, v in enumerate(values) if v is None}
