"""The pipeline end to end over an in-memory source and a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from monitor.config import Settings, load_settings
from monitor.episodes.deadletter import JsonlDeadLetterSink
from monitor.metrics import Metrics
from monitor.pipeline import Pipeline, make_sampler
from monitor.sources.memory import MemorySource
from monitor.store import Store
from sampling import Sampler


def episodes(n: int, stream: str = "s", start: int = 0) -> list[bytes]:
    return [
        json.dumps(
            {
                "episode_id": f"{stream}-{i}",
                "stream": stream,
                "prompt": f"q{i}",
                "response": "a" * (i % 50),
                "timestamp": 1_767_225_600 + i,
                "metadata": {"v": i % 7},
            }
        ).encode()
        for i in range(start, start + n)
    ]


BAD = [
    b'{"episode_id": "t", "prompt": "trunc',
    b"[1]",
    b'{"episode_id": 1, "prompt": "p", "response": "r"}',
    b'{"episode_id": "m", "prompt": "p"}',
    b'{"episode_id": "u", "prompt": "\xff", "response": "r"}',
    b'{"episode_id": "n", "prompt": "\x00", "response": "r"}',
    b'{"episode_id": "big", "prompt": "p", "response": "' + b"x" * 300_000 + b'"}',
]


def settings(db_url: str, tmp_path: Path, *extra: str) -> Settings:
    return load_settings(
        None,
        [
            "dev=true",
            f"database.url={db_url}",
            f"dead_letter.path={tmp_path / 'dlq.jsonl'}",
            "pipeline.batch_size=50",
            # These tests compare the store with an offline sampler: no drift boosts here
            # (tests/test_drift_monitor.py covers drift).
            "drift.enabled=false",
            "sampling.human.rate=0.05",
            "sampling.rm.rate=0.2",
            "sampling.drift.rate=0.1",
            *extra,
        ],
    )


def make(s: Settings, values: list[bytes], store: Store | None = None, name: str = "mem") -> Pipeline:
    store = store or Store(s.database.url)
    sink = JsonlDeadLetterSink(s.dead_letter.path, s.dead_letter.max_raw_bytes)
    return Pipeline(s, store, MemorySource(values, name), sink, Metrics(CollectorRegistry(), s.metrics.max_streams))


def expected_samples(s: Settings, values: list[bytes]) -> set[tuple[str, str, float]]:
    sampler = Sampler(s.sampling_policy(), s.sampling_key())
    out = set()
    for v in values:
        try:
            obj = json.loads(v)
        except ValueError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("episode_id"), str) or "response" not in obj:
            continue
        d = sampler.decide(obj["episode_id"], obj.get("stream", "default"), float(obj["timestamp"]))
        out |= {(obj["episode_id"], ch, p) for ch, p in d.sampled.items()}
    return out


def stored_samples(store: Store) -> set[tuple[str, str, float]]:
    import sqlalchemy as sa

    with store.engine.connect() as c:
        rows = c.execute(sa.text("SELECT episode_id, channel, inclusion_probability FROM samples")).all()
    return {(r[0], r[1], r[2]) for r in rows}


def test_valid_and_invalid_records(db_url: str, tmp_path: Path) -> None:
    s = settings(db_url, tmp_path)
    good = episodes(400, "a") + episodes(200, "b")
    values = good[:100] + BAD + good[100:]
    p = make(s, values)
    stats = p.run()
    assert stats.records == len(values) and stats.invalid == len(BAD)
    assert dict(stats.dead_letters) == {
        "invalid_json": 1,
        "not_object": 1,
        "wrong_type": 1,
        "missing_field": 1,
        "invalid_utf8": 1,
        "nul_character": 1,
        "oversize": 1,
    }
    assert stored_samples(p.store) == expected_samples(s, good)
    assert p.store.traffic_count("a") == 400 and p.store.traffic_count("b") == 200
    assert p.store.load_offsets("mem") == {0: len(values)}
    letters = [json.loads(line) for line in Path(s.dead_letter.path).read_text().splitlines()]
    assert len(letters) == len(BAD)
    by_reason = {d["reason"]: d for d in letters}
    assert base64.b64decode(by_reason["invalid_utf8"]["raw_b64"]) == BAD[4]
    assert by_reason["wrong_type"]["offset"] == 102 and by_reason["wrong_type"]["detail"]
    assert by_reason["oversize"]["size"] == len(BAD[6])
    metrics = p.metrics.registry
    assert metrics.get_sample_value("oversight_dead_letters_total", {"reason": "oversize"}) == 1
    total = sum(
        metrics.get_sample_value("oversight_episodes_total", {"stream": st, "outcome": o}) or 0
        for st in ("a", "b", "default", "_unknown")
        for o in ("sampled", "not_sampled", "invalid")
    )
    assert total == len(values)
    human_a = metrics.get_sample_value("oversight_sampled_total", {"stream": "a", "channel": "human"})
    assert human_a == sum(1 for e, ch, _ in stored_samples(p.store) if ch == "human" and e.startswith("a-"))
    assert metrics.get_sample_value("oversight_inclusion_probability_min", {"stream": "a", "channel": "human"}) == 0.05


def test_restart_resumes_and_duplicates_nothing(db_url: str, tmp_path: Path) -> None:
    s = settings(db_url, tmp_path)
    values = episodes(1000)
    store = Store(s.database.url)
    p1 = make(s, values, store)
    p1.open()
    for _ in range(7):  # process 350 then "crash" (no close)
        p1.process_batch(p1.source.poll(50, 0.0))
    # A redelivery after a crash: a new pipeline resumes from the stored offset.
    p2 = make(s, values, store)
    p2.run()
    assert p2.stats.records == 650
    assert store.traffic_count("s") == 1000
    assert stored_samples(store) == expected_samples(s, values)


def test_stale_batch_is_rolled_back_and_redone(db_url: str, tmp_path: Path) -> None:
    s = settings(db_url, tmp_path)
    values = episodes(300)
    store = Store(s.database.url)
    zombie = make(s, values, store)
    zombie.open()
    fresh = make(s, values, store)
    fresh.run()  # took over the partition and processed everything
    assert not zombie.process_batch(zombie.source.poll(50, 0.0))  # CAS refuses the zombie
    assert zombie.stats.stale_batches == 1
    assert store.traffic_count("s") == 300
    assert stored_samples(store) == expected_samples(s, values)


def test_a_commit_whose_reply_was_lost_counts_once(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database commits a batch and the connection dies before the reply (a crash between
    COMMIT and its answer): the retry's compare-and-set finds the offsets moved. The batch is
    the pipeline's own, stored whole; it must count once, in the stats and the metrics, and
    not as a batch another consumer took (no rollback, no stale batch)."""
    import sqlalchemy as sa

    s = settings(db_url, tmp_path)
    values = episodes(300)
    store = Store(s.database.url)
    real_commit = store.commit_batch
    lost: list[str] = []

    def commit_then_lose_the_reply(batch: Any, **kw: Any) -> None:
        real_commit(batch, **kw)
        if len(lost) < 2 and batch.offsets:  # two batches lose their reply
            lost.append(batch.commit_id)
            raise sa.exc.OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(store, "commit_batch", commit_then_lose_the_reply)
    p = make(s, values, store)
    stats = p.run()
    assert len(lost) == 2
    assert stats.records == 300 and stats.stale_batches == 0
    r = p.metrics.registry
    assert r.get_sample_value("oversight_stale_batches_total") == 0
    assert r.get_sample_value("oversight_commit_errors_total", {"target": "store"}) == 2
    counted = sum(
        r.get_sample_value("oversight_episodes_total", {"stream": "s", "outcome": o}) or 0
        for o in ("sampled", "not_sampled")
    )
    assert counted == 300
    stored = stored_samples(store)
    assert stored == expected_samples(s, values)
    assert r.get_sample_value("oversight_sampled_total", {"stream": "s", "channel": "human"}) == sum(
        1 for _, ch, _ in stored if ch == "human"
    )
    assert store.traffic_count("s") == 300 and store.load_offsets("mem") == {0: 300}


def test_offsets_the_database_lost_are_read_again(db_url: str, tmp_path: Path) -> None:
    """The database loses the last batches it had acknowledged (a failover to a standby that
    was behind, a restore from a backup): every table goes back to what it held two batches
    earlier. The next batch's compare-and-set finds its offset *behind* what it expects: not
    another consumer (no stale batch, no backoff) but a loss, counted and logged, and the
    source is read again from the stored offset, so the database ends with every record once."""
    import sqlalchemy as sa

    from monitor.store import tables

    s = settings(db_url, tmp_path, "drift.enabled=true", "drift.embedding.enabled=false")
    values = episodes(300)
    store = Store(s.database.url)
    p = make(s, values, store)
    p.open()
    for _ in range(2):
        assert p.process_batch(p.source.poll(50, 0.0))
    order = tables.metadata.sorted_tables
    with store.engine.connect() as c:  # the backup
        backup = {tb.name: [dict(r._mapping) for r in c.execute(sa.select(tb))] for tb in order}
    for _ in range(2):
        assert p.process_batch(p.source.poll(50, 0.0))
    assert store.load_offsets("mem") == {0: 200}
    with store.engine.begin() as c:  # the restore: the last two batches are gone
        for tb in reversed(order):
            c.execute(tb.delete())
        for tb in order:
            if backup[tb.name]:
                c.execute(tb.insert(), backup[tb.name])
    assert store.load_offsets("mem") == {0: 100}
    assert not p.process_batch(p.source.poll(50, 0.0))  # refused: read again from 100
    assert p.index == 100, "the input index goes back with the offsets"
    while records := p.source.poll(50, 0.0):
        assert p.process_batch(records)
    assert p.stats.offset_regressions == 1 and p.stats.stale_batches == 0
    r = p.metrics.registry
    assert r.get_sample_value("oversight_offset_regressions_total") == 1
    assert r.get_sample_value("oversight_stale_batches_total") == 0
    assert store.load_offsets("mem") == {0: 300} and store.traffic_count("s") == 300
    assert stored_samples(store) == expected_samples(s, values)
    assert p.stats.records == 400, "the run counts what it read: the lost batches twice"


def test_boost_changes_rates_and_is_checkpointed(db_url: str, tmp_path: Path) -> None:
    s = settings(db_url, tmp_path)
    values = episodes(200)
    p = make(s, values)
    p.open()
    p.process_batch(p.source.poll(50, 0.0))
    p.boost("s", 4.0, duration=1000.0)
    p.process_batch(p.source.poll(50, 0.0))
    snap = p.store.load_state("s", "sampling")
    assert snap is not None and snap["boosts"][0]["factor"] == 4.0
    rows = p.store.sampled("s", "human")
    probs = {r["episode_id"]: r["inclusion_probability"] for r in rows}
    assert all(probs[e] == 0.05 for e in probs if int(e.split("-")[1]) < 50)
    assert all(probs[e] == pytest.approx(0.2) for e in probs if 50 <= int(e.split("-")[1]) < 100)
    # A new pipeline restores the boost from the checkpoint.
    p2 = make(s, values, p.store)
    p2.open()
    assert p2.sampler.rates("s")["human"] == pytest.approx(0.2)
    r = p2.metrics.registry
    p2.process_batch(p2.source.poll(50, 0.0))
    assert r.get_sample_value("oversight_sampling_boost_factor", {"stream": "s", "channel": "human"}) == 4.0


FUTURE = json.dumps(
    {"episode_id": "s-future", "stream": "s", "prompt": "p", "response": "r", "timestamp": "9999-12-31T23:59:59Z"}
).encode()


def test_a_record_from_the_far_future_is_refused_and_leaves_the_streams_clock(db_url: str, tmp_path: Path) -> None:
    """Event time only moves forward: accepted, this one record would end the boost at once
    (and a boost made after it would never end)."""
    s = settings(db_url, tmp_path)
    values = episodes(100)
    p = make(s, [*values[:50], FUTURE, *values[50:]])
    p.open()
    p.process_batch(p.source.poll(50, 0.0))
    p.boost("s", 4.0, duration=1000.0)
    p.process_batch(p.source.poll(51, 0.0))
    assert dict(p.stats.dead_letters) == {"timestamp_in_future": 1}
    assert p.sampler.state("s").clock == 1_767_225_600 + 99
    probs = {r["episode_id"]: r["inclusion_probability"] for r in p.store.sampled("s", "human")}
    later = [probs[e] for e in probs if int(e.split("-")[1]) >= 50]
    assert later and all(x == pytest.approx(0.2) for x in later)
    letter = json.loads(Path(s.dead_letter.path).read_text().splitlines()[0])
    assert letter["episode_id"] == "s-future" and "source.max_future_s = 300 s" in letter["detail"]


def test_max_future_s_null_takes_every_timestamp(db_url: str, tmp_path: Path) -> None:
    p = make(settings(db_url, tmp_path, "source.max_future_s=null"), [*episodes(10), FUTURE])
    p.run()
    assert p.stats.invalid == 0 and p.store.traffic_count("s") == 11


def test_an_episode_id_another_stream_holds_is_a_dead_letter_not_a_window_on_its_text(
    db_url: str, tmp_path: Path
) -> None:
    """Ids are the store's key across streams. Stored anyway, stream b's human sample and review
    task of "shared-1" pointed at stream a's episode: b's reviewers would read a's text."""
    s = settings(
        db_url,
        tmp_path,
        "sampling.rm.rate=1.0",  # a's episodes are stored (rm), never human-sampled; b's always are
        "sampling.human.rate=0.001",
        "sampling.streams.b.human.rate=1.0",
    )

    def record(eid: str, stream: str) -> bytes:
        body = {"episode_id": eid, "stream": stream, "prompt": f"{stream}'s prompt", "response": "r", "timestamp": 1}
        return json.dumps(body).encode()

    # shared-1: a in one batch, b in the next; shared-2: both in one batch.
    values = [record("shared-1", "a"), *episodes(3, "a")]
    values += [record("shared-1", "b"), record("shared-2", "a"), record("shared-2", "b"), record("own-1", "b")]
    p = make(s, values)
    p.open()
    p.process_batch(p.source.poll(4, 0.0))
    p.process_batch(p.source.poll(10, 0.0))
    assert dict(p.stats.dead_letters) == {"episode_id_conflict": 2}
    letters = [json.loads(line) for line in Path(s.dead_letter.path).read_text().splitlines()]
    assert sorted((x["episode_id"], x["stream"]) for x in letters) == [("shared-1", "b"), ("shared-2", "b")]
    assert all(x["detail"].startswith("episode_id already belongs to an episode of another stream") for x in letters)
    import sqlalchemy as sa

    from monitor.store import tables as t

    with p.store.engine.connect() as conn:
        b_tasks = conn.execute(sa.select(t.review_tasks.c.episode_id).where(t.review_tasks.c.stream == "b")).all()
        owners = dict(conn.execute(sa.select(t.episodes.c.episode_id, t.episodes.c.stream)).all())
    assert {r[0] for r in b_tasks} == {"own-1"}
    assert owners["shared-1"] == owners["shared-2"] == "a"
    assert p.store.traffic_count("b") == 1 and p.store.traffic_count("a") == 5
    assert p.stats.stream("b").episodes == 1 and p.stats.stream("b").invalid == 2


def test_a_record_delivered_again_counts_once(db_url: str, tmp_path: Path) -> None:
    """At-least-once delivery (a producer's retry, a collector's re-export) repeats records: in the
    same batch, in a later one, and copies of sampled and of unsampled episodes. Counted again,
    each inflated its stream's traffic (every Horvitz-Thompson population) and sampling counts."""
    s = settings(db_url, tmp_path)
    distinct = episodes(300)
    values = list(distinct)
    values.insert(10, distinct[7])  # the same batch
    values += [distinct[i] for i in range(0, 300, 10)]  # later batches, sampled or not
    values.append(episodes(1, "t", start=3)[0])  # another stream's id is no copy of s-3
    p = make(s, values)
    stats = p.run()
    assert stats.records == 332 and stats.duplicates == 31 and stats.stream("s").duplicates == 31
    assert p.store.traffic_count("s") == 300 and p.store.traffic_count("t") == 1
    assert stats.stream("s").episodes == 300
    assert stored_samples(p.store) == expected_samples(s, distinct + values[-1:])
    counted = {
        o: p.metrics.registry.get_sample_value("oversight_episodes_total", {"stream": "s", "outcome": o})
        for o in ("sampled", "not_sampled", "duplicate")
    }
    assert counted["sampled"] + counted["not_sampled"] == 300 and counted["duplicate"] == 31  # type: ignore[operator]
    assert sum(stats.stream("s").sampled.values()) == sum(1 for _ in p.store.sampled("s", "human")) + sum(
        1 for _ in p.store.sampled("s", "rm")
    ) + sum(1 for _ in p.store.sampled("s", "drift"))
    assert p.report()["streams"]["s"]["duplicates"] == 31


def test_streams_beyond_the_limit_are_dead_letters_and_the_held_ones_go_on(db_url: str, tmp_path: Path) -> None:
    """A producer that makes a stream per record (a request id in ``stream``) made the service
    hold state for each one for its life. Past ``pipeline.max_streams`` a new stream's records
    are dead letters (raw bytes kept, counted), the streams held are sampled and counted as if
    alone, invalid records naming new streams add no per-stream counts, and a rebalance (the
    state forgotten) holds streams anew."""
    s = settings(db_url, tmp_path, "pipeline.max_streams=3")
    held = [episodes(100, name) for name in ("a", "b", "c")]
    per_record = [x for i in range(100) for x in episodes(1, f"user-{i}", start=i)]
    named_invalid = [json.dumps({"episode_id": f"bad{i}", "stream": f"junk-{i}"}).encode() for i in range(50)]
    values = [v for group in zip(*held, per_record, strict=True) for v in group] + named_invalid
    p = make(s, values)
    stats = p.run()
    assert dict(stats.dead_letters) == {"too_many_streams": 100, "missing_field": 50}
    assert sorted(stats.streams) == ["a", "b", "c"], "an invalid or refused record's stream is not counted apart"
    kept = {name: p.store.traffic_count(name) for name in ("a", "b", "c", "user-0", "user-99")}
    assert kept == {"a": 100, "b": 100, "c": 100, "user-0": 0, "user-99": 0}
    assert stored_samples(p.store) == expected_samples(s, [v for group in held for v in group])
    registry = p.metrics.registry
    assert registry.get_sample_value("oversight_dead_letters_total", {"reason": "too_many_streams"}) == 100
    assert registry.get_sample_value("oversight_streams_held") == 3
    letters = [json.loads(line) for line in Path(s.dead_letter.path).read_text().splitlines()]
    refused = [x for x in letters if x["reason"] == "too_many_streams"]
    assert [x["stream"] for x in refused] == [f"user-{i}" for i in range(100)]
    assert base64.b64decode(refused[0]["raw_b64"]) == per_record[0]
    p._forget_state()  # what a rebalance does
    assert p.held.admit("user-0")


def test_after_a_restart_the_known_streams_are_held_before_a_flood_of_new_ones(db_url: str, tmp_path: Path) -> None:
    """The set of streams held starts empty after a restart. A producer of a stream per record
    would take every place before the deployment's own streams came back, and those would be
    refused until the next restart: a stream whose checkpoint the store holds is held beyond
    the limit, a new one is not."""
    s = settings(db_url, tmp_path, "pipeline.max_streams=3")
    own = [episodes(40, name) for name in ("a", "b", "c")]
    first = make(s, [v for group in zip(*own, strict=True) for v in group])
    first.run()
    flood = [x for i in range(20) for x in episodes(1, f"user-{i}", start=i)]
    later = [episodes(40, name, start=40) for name in ("a", "b", "c")]
    again = make(s, flood + [v for group in zip(*later, strict=True) for v in group], first.store, name="again")
    stats = again.run()
    assert dict(stats.dead_letters) == {"too_many_streams": 17}
    assert {name: again.store.traffic_count(name) for name in ("a", "b", "c")} == {"a": 80, "b": 80, "c": 80}
    assert [again.store.traffic_count(f"user-{i}") for i in (0, 2, 3, 19)] == [1, 1, 0, 0]
    assert again.metrics.registry.get_sample_value("oversight_streams_held") == 6


def test_streams_past_the_limit_cost_one_read_a_batch_and_keep_their_order(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether the store knew a stream was one read per new name: a producer of a name per record
    made one read per record at the limit (12 times a record's cost). The batch's names are read at
    once, and the episodes admitted after the read are sampled in input order among the others."""
    s = settings(sqlite_url, tmp_path, "pipeline.max_streams=3", "pipeline.batch_size=100")
    before = episodes(2, "k1")
    first = make(s, before)
    first.run()  # k1 held, so known from now on
    reads: list[int] = []
    store = first.store
    real = store.with_state

    def counted(streams: Any, component: str) -> set[str]:
        reads.append(len(streams))
        return real(streams, component)

    monkeypatch.setattr(store, "with_state", counted)
    own = [v for group in zip(*[episodes(10, name, start=10) for name in ("a", "b", "c")], strict=True) for v in group]
    flood = [x for i in range(60) for x in episodes(1, f"user-{i}", start=i)]
    known = episodes(10, "k1", start=10)
    values = own + [v for pair in zip(flood, known + [b""] * 50, strict=True) for v in pair if v]
    again = make(s, values, store, name="again")
    stats = again.run()
    assert reads == [61], reads  # one read for the batch's undecided names, not one per name
    assert stats.dead_letters["too_many_streams"] == 60
    assert {n: store.traffic_count(n) for n in ("a", "b", "c", "k1")} == {"a": 10, "b": 10, "c": 10, "k1": 12}
    # Every stream sampled as a sampler given its episodes in input order would.
    assert stored_samples(store) == expected_samples(s, before + own + known)


def test_known_streams_do_not_add_up_over_restarts(sqlite_url: str, tmp_path: Path) -> None:
    """Each restart let the limit's worth of new names be held, and every name held once was known
    from then on: a producer that sent new names, then every name it had used, was held 3, 6, 9, 12
    streams after each restart at a limit of 3. Known streams are held up to twice the limit."""
    s = settings(sqlite_url, tmp_path, "pipeline.max_streams=3")
    store = None
    used: list[str] = []
    held = []
    for restart in range(4):
        new = [f"user-{restart}-{i}" for i in range(3)]
        values = [x for i, name in enumerate(new + used) for x in episodes(1, name, start=100 * restart + i)]
        p = make(s, values, store, name=f"run{restart}")
        p.run()
        store = p.store
        used += new
        held.append(p.metrics.registry.get_sample_value("oversight_streams_held"))
    assert held == [3, 6, 6, 6]


def test_the_window_of_recent_episodes_is_bounded_and_can_be_off(db_url: str, tmp_path: Path) -> None:
    def delivery(stream: str) -> list[bytes]:
        distinct = episodes(200, stream)
        return distinct + distinct[:50] + distinct[150:]  # 50 copies of old episodes, 50 of recent ones

    p = make(settings(db_url, tmp_path, "pipeline.duplicate_window=100"), delivery("s"))
    assert p.run().duplicates == 50 and p.store.traffic_count("s") == 250
    off = make(settings(db_url, tmp_path, "pipeline.duplicate_window=0"), delivery("u"), p.store, name="off")
    assert off.run().duplicates == 0 and off.store.traffic_count("u") == 300


def test_a_batch_redone_after_an_outage_is_no_copy_of_itself(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch interrupted after its draft (here: its checkpoint could not be read) is redone
    with the same records: they must be new again, not copies of the attempt that failed."""
    s = settings(db_url, tmp_path)
    values = episodes(200)
    p = make(s, values)
    take_dirty = p.sampler.take_dirty
    failures = [OSError("disk gone")] * 2

    def flaky() -> Any:
        if failures:
            raise failures.pop()
        return take_dirty()

    monkeypatch.setattr(p.sampler, "take_dirty", flaky)
    monkeypatch.setattr(p.retry, "first_delay_s", 0.01)
    stats = p.run()
    assert not failures and stats.duplicates == 0
    assert p.store.traffic_count("s") == 200 and stored_samples(p.store) == expected_samples(s, values)


def test_a_copy_of_a_record_the_store_refused_is_refused_again(db_url: str, tmp_path: Path) -> None:
    """The window holds what the store took: a copy of a dead-lettered record is not a copy of
    anything stored, and gets its own dead letter instead of vanishing as a duplicate."""
    s = settings(db_url, tmp_path, "sampling.rm.rate=1.0")

    def record(stream: str) -> bytes:
        body = {"episode_id": "x", "stream": stream, "prompt": "p", "response": "r", "timestamp": 1}
        return json.dumps(body).encode()

    p = make(s, [record("a"), record("b"), record("b"), record("b")])
    p.open()
    p.process_batch(p.source.poll(3, 0.0))
    p.process_batch(p.source.poll(3, 0.0))
    assert dict(p.stats.dead_letters) == {"episode_id_conflict": 2} and p.stats.duplicates == 1


def test_episode_the_database_refuses_is_dead_lettered(pg_url: str, tmp_path: Path) -> None:
    """Passes validation, refused by PostgreSQL (a model name over the column width is caught
    by validation, so use a JSON metadata key PostgreSQL JSONB refuses: none exist after
    validation; simulate with a too-long stream via a direct batch)."""
    s = settings(pg_url, tmp_path)
    values = episodes(20)
    p = make(s, values)
    p.open()
    recs = p.source.poll(20, 0.0)
    from monitor.store import tables as t

    # Narrow a column so a valid episode no longer fits: the pipeline must not stall on it.
    with p.store.engine.begin() as c:
        c.exec_driver_sql(f"ALTER TABLE {t.episodes.name} ALTER COLUMN prompt TYPE varchar(2)")
    p.process_batch(recs)
    letters = [json.loads(line) for line in Path(s.dead_letter.path).read_text().splitlines()]
    rejected = {d["episode_id"] for d in letters if d["reason"] == "store_rejected"}
    sampled_ids = {e for e, _, _ in expected_samples(s, values)}
    long_prompt = {e for e in sampled_ids if len(f"q{e.split('-')[1]}") > 2}
    assert rejected == long_prompt and rejected
    assert {e for e, _, _ in stored_samples(p.store)} == sampled_ids - rejected
    # A refused episode is a dead letter, not traffic: each record is counted once.
    assert p.store.traffic_count("s") == 20 - len(rejected)
    assert p.stats.invalid == len(rejected) and p.stats.streams["s"].episodes == 20 - len(rejected)


def test_metrics_label_cardinality_is_bounded(tmp_path: Path) -> None:
    s = settings(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, "metrics.max_streams=3")
    values = [v for i in range(10) for v in episodes(3, f"st{i}")]
    p = make(s, values)
    p.run()
    streams = {
        smp.labels["stream"]
        for metric in p.metrics.registry.collect()
        if metric.name == "oversight_episodes"
        for smp in metric.samples
    }
    assert streams == {"st0", "st1", "st2", "_other"}


def test_configured_streams_keep_their_own_metric_label_whatever_came_first(tmp_path: Path) -> None:
    """The label places went first come, first served: junk names right after a start took them
    all, and the deployment's own streams were counted as ``_other`` for the process's life."""
    from monitor.service import build_service

    s = settings(
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        tmp_path,
        "metrics.max_streams=3",
        "sampling.streams.prod.human_budget_per_hour=10",
    )
    values = [v for i in range(10) for v in episodes(3, f"junk{i}")] + episodes(5, "prod")
    with build_service(s, source=MemorySource(values), serve=False, registry=CollectorRegistry()) as svc:
        svc.run()
        per_stream: dict[str, float] = {}
        for metric in svc.metrics.registry.collect():
            if metric.name == "oversight_episodes":
                for smp in metric.samples:
                    if smp.name.endswith("_total"):
                        per_stream[smp.labels["stream"]] = per_stream.get(smp.labels["stream"], 0.0) + smp.value
    assert per_stream == {"junk0": 3, "junk1": 3, "junk2": 3, "_other": 21, "prod": 5}, per_stream
    assert Metrics(max_streams=1, named=["prod"]).stream_label("prod") == "prod"


def _unused(_: Any) -> None:  # keep make_sampler imported for type checkers
    make_sampler  # noqa: B018


class FlakySource(MemorySource):
    """The in-memory source after ``outage`` polls that failed (as a broker that refused the
    connection: an empty poll, counted), with ``commits_failed`` informational commits refused."""

    def __init__(self, values: list[bytes], outage: int, commits_failed: int = 0):
        super().__init__(values)
        self.outage = outage
        self.read_failures = 0
        self.commits_failed = commits_failed

    def poll(self, max_records: int, timeout_s: float) -> list[Any]:
        if self.read_failures < self.outage:
            self.read_failures += 1
            return []
        return super().poll(max_records, timeout_s)

    def failures(self) -> dict[str, int]:
        return {"read": self.read_failures, "commit": self.commits_failed}


def test_source_failures_are_counted_once_each(tmp_path: Path) -> None:
    s = settings(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path)
    registry = CollectorRegistry()
    src = FlakySource(episodes(120), outage=7, commits_failed=2)
    metrics = Metrics(registry, s.metrics.max_streams)

    def errors(operation: str) -> float | None:
        return registry.get_sample_value("oversight_source_errors_total", {"operation": operation})

    # Pre-zeroed: the first failure must show up in rate().
    assert errors("read") == 0.0 and errors("commit") == 0.0
    p = Pipeline(s, Store(s.database.url), src, JsonlDeadLetterSink(s.dead_letter.path, 1024), metrics)
    stats = p.run()
    assert stats.records == 120
    # Published at most once a second while running, the rest at close: each failure once.
    assert errors("read") == 7.0 and errors("commit") == 2.0
    # A second pipeline on the same registry adds only what its own source counts.
    src2 = FlakySource(episodes(10, start=500), outage=1)
    Pipeline(s, Store(s.database.url), src2, JsonlDeadLetterSink(s.dead_letter.path, 1024), metrics).run()
    assert errors("read") == 8.0 and errors("commit") == 2.0


def test_a_service_that_runs_for_months_keeps_only_its_last_drift_events(tmp_path: Path) -> None:
    """The run's stats list its drift events for a replay's report; `oversight run` would keep
    every one for as long as it runs (about 500 bytes each; at the default budget of 1 per 20,000
    episodes a stream at 1,000 episodes/s raises about 4,300 a day), so it keeps the last ones."""
    from monitor.service import build_service
    from monitor.service.build import KEPT_DRIFT_EVENTS

    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(v + b"\n" for v in episodes(5)))
    s = settings(f"sqlite:///{tmp_path / 'o.db'}", tmp_path, "source.kind=file", f"source.path={path}")
    s = s.model_copy(update={"server": s.server.model_copy(update={"port": 0})})
    with build_service(s, registry=CollectorRegistry(), background_calibration=False) as svc:
        assert svc.pipeline.stats.max_drift_events == KEPT_DRIFT_EVENTS
    with build_service(s, source=MemorySource(episodes(5), "replay"), serve=False) as replay:
        assert replay.pipeline.stats.max_drift_events is None, "a replay's report lists every event"


def test_a_checkpoint_whose_clock_a_future_record_poisoned_is_repaired(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Checkpointed by a version without source.max_future_s: the stream's clock at the year 9999,
    the review budget's window frozen there, a drift boost that ends after it. Loaded as it was,
    the boost would hold the rates up for good and a new boost would never end."""
    from monitor.store import BatchWrite

    s = settings(db_url, tmp_path)
    store = Store(s.database.url)
    poisoned = {
        "version": 1,
        "clock": 253402300799.0,
        "window_start": 253402300000.0,
        "window_count": 7,
        "traffic_per_hour": None,
        "budget_rate": None,
        "boosts": [{"factor": 4.0, "until": 253402304399.0, "channels": ["human", "rm"], "reason": "drift"}],
    }
    store.commit_batch(BatchWrite(states={("s", "sampling"): poisoned}))
    p = make(s, episodes(200), store)
    p.open()
    with caplog.at_level("WARNING"):
        p.process_batch(p.source.poll(50, 0.0))
    assert "beyond source.max_future_s" in caplog.text
    state = p.sampler.state("s")
    assert state.clock == 1_767_225_600 + 49 and state.boosts == []
    assert p.sampler.rates("s")["human"] == pytest.approx(0.05), "the poisoned boost is gone"
    p.boost("s", 4.0, duration=100.0)
    p.process_batch(p.source.poll(150, 0.0))
    probs = {r["episode_id"]: r["inclusion_probability"] for r in store.sampled("s", "human")}
    assert all(probs[e] == pytest.approx(0.05) for e in probs if int(e.split("-")[1]) >= 150), "the new boost ended"
