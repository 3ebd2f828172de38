"""Fuzz of file ingest (issue 13): 10,000 seeded mutated records through the real service wiring
(FileSource -> Pipeline.process_batch -> SQLite or PostgreSQL, JSONL dead letters, drift text
statistics on every valid episode). The process survives, and every record is counted exactly
once: as a valid episode (traffic), as one dead letter or as a duplicate (the corpus repeats some
ids in a stream), never two of them, never none."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import sqlalchemy as sa
from fuzz_corpus import mutated_records
from prometheus_client import CollectorRegistry

from monitor.config import load_settings
from monitor.episodes import REASONS
from monitor.service import build_service
from monitor.store import Store
from monitor.store import tables as t

N_RECORDS = 10_000


def test_fuzz_file_ingest_counts_every_record_once(db_url: str, tmp_path: Path) -> None:
    records, valid = mutated_records(N_RECORDS, single_line=True)
    # pytest's tmp_path makes the file source's name (file:<absolute path>) longer than 64
    # characters: the input index is internal state, whose keys have no such limit.
    path = tmp_path / "fuzz.jsonl"
    assert len(f"file:{path}") > 64
    path.write_bytes(b"".join(r + b"\n" for r in records))
    # Whitespace-only lines (of any length) are not records; the byte offset of each line is its position.
    offsets, pos = [], 0
    for r in records:
        offsets.append(pos)
        pos += len(r) + 1
    counted = {offsets[i] for i, r in enumerate(records) if r.strip()}
    dlq = tmp_path / "dlq.jsonl"
    settings = load_settings(
        None,
        [
            "dev=true",
            "source.kind=file",
            f"source.path={path}",
            f"database.url={db_url}",
            f"dead_letter.path={dlq}",
            "dead_letter.fsync=false",
            "pipeline.batch_size=500",
            # More stored rows: the store must accept everything validation accepts.
            "sampling.human.rate=0.2",
            "sampling.rm.rate=0.5",
            # The drift observer computes text statistics on every valid episode; with a reference
            # this long its detectors never arm (calibrating them costs seconds per stream: the
            # drift tests' business, not this one's).
            "drift.reference_size=1000000",
            "drift.embedding.enabled=false",
        ],
    )
    svc = build_service(settings, serve=False, registry=CollectorRegistry())
    try:
        stats = svc.pipeline.run()
        traffic = _traffic_total(svc.store)
    finally:
        svc.store.close()

    letters = [json.loads(line) for line in dlq.read_text().splitlines()]
    assert stats.records == len(counted)
    assert stats.invalid == len(letters) == sum(stats.dead_letters.values())
    letter_offsets = [d["offset"] for d in letters]
    assert len(set(letter_offsets)) == len(letter_offsets), "a record was dead-lettered twice"
    assert set(letter_offsets) <= counted
    assert stats.duplicates > 0, "the corpus repeats ids: copies are counted as such"
    assert traffic == len(counted) - len(letters) - stats.duplicates, "valid + dead letters + duplicates != records"
    # Every dead letter has a reason validation names: nothing needed the internal_error net and
    # the store refused nothing that validation accepted. The mutations reuse ids ("fz-dup", "x" *
    # 128, ...) across streams: the sampled ones after the first are episode_id_conflict.
    reasons = Counter(d["reason"] for d in letters)
    assert set(reasons) <= {*REASONS, "episode_id_conflict"}, reasons
    assert not {offsets[i] for i in valid} & set(letter_offsets), "an untouched valid episode was dead-lettered"
    # The poison pills of issue 13 are in the corpus and got their reasons.
    assert reasons["too_deep"] and reasons["number_out_of_range"] and reasons["invalid_value"]
    m = svc.metrics.registry
    by_outcome = {
        o: sum(
            s.value
            for metric in m.collect()
            if metric.name == "oversight_episodes"
            for s in metric.samples
            if s.name.endswith("_total") and s.labels["outcome"] == o
        )
        for o in ("sampled", "not_sampled", "invalid", "duplicate")
    }
    assert sum(by_outcome.values()) == len(counted)
    assert by_outcome["invalid"] == len(letters) and by_outcome["duplicate"] == stats.duplicates


def _traffic_total(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(t.traffic.c.episodes), 0))).scalar_one())
