"""Retention (``monitor/store/retention.py``) on SQLite and the real PostgreSQL: ten days of two
streams through the real pipeline, then a purge that keeps three. What the model channels stored
before the horizon goes, with its samples, scores and traffic counts; what people made (labels,
open review tasks) stays; and estimates over the retained window are what they were."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from monitor.config import RetentionConfig, Settings, load_settings
from monitor.episodes.deadletter import JsonlDeadLetterSink
from monitor.metrics import Metrics
from monitor.pipeline import Pipeline
from monitor.quality.estimates import estimate_stream
from monitor.sources.memory import MemorySource
from monitor.store import Store
from monitor.store import tables as t
from monitor.store.retention import RetentionJob, purge
from monitor.store.rows import ReviewTaskRow, SampleRow
from monitor.store.store import BUCKET_S, bucket_of

BASE = 1_767_225_600  # 2026-01-01: event time, far from the wall clock
HOUR = 3600
DAYS = 10


def traffic_of(stream: str, hours: int = DAYS * 24, start: float = BASE) -> list[bytes]:
    return [
        json.dumps(
            {
                "episode_id": f"{stream}-{i}",
                "stream": stream,
                "prompt": f"q{i}",
                "response": "a" * (i % 40),
                "timestamp": start + i * HOUR + 17,
            }
        ).encode()
        for i in range(hours)
    ]


def settings(db_url: str, tmp_path: Path) -> Settings:
    return load_settings(
        None,
        [
            "dev=true",
            f"database.url={db_url}",
            f"dead_letter.path={tmp_path / 'dlq.jsonl'}",
            "drift.enabled=false",
            "reward.enabled=false",
            "sampling.human.rate=0.2",
            "sampling.rm.rate=0.5",
            "sampling.drift.rate=0.1",
        ],
    )


def ingest(s: Settings, store: Store, values: list[bytes], name: str = "mem") -> None:
    sink = JsonlDeadLetterSink(s.dead_letter.path, s.dead_letter.max_raw_bytes)
    Pipeline(s, store, MemorySource(values, name), sink, Metrics(CollectorRegistry())).run()


def count(store: Store, table: sa.Table, *where: Any) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one())


def label_half_and_leave_a_third_open(store: Store, horizon: int) -> tuple[set[str], set[str]]:
    """Of the human-sampled episodes before ``horizon``: every other one labelled (its task done),
    one in three of the rest left open, half of those claimed by a reviewer now and half pending,
    the others' tasks failed (``error``). Returns (labelled, claimed)."""
    rt = t.review_tasks
    with store.engine.begin() as conn:
        old = sorted(
            r[0]
            for r in conn.execute(
                sa.select(rt.c.episode_id).where(rt.c.slot == 0).join(t.episodes).where(t.episodes.c.ts < horizon)
            )
        )
        uid = conn.execute(
            t.users.insert()
            .values(name="ann", role="reviewer", password_hash="x", created_at=1.0)
            .returning(t.users.c.id)
        ).scalar_one()
        labelled, open_ = set(old[::2]), set(old[1::2][::3])
        for eid in labelled:
            stream = eid.split("-")[0]
            conn.execute(
                t.labels.insert().values(
                    episode_id=eid,
                    slot=0,
                    user_id=uid,
                    stream=stream,
                    skipped=False,
                    rating=5,
                    flags=[],
                    critique="",
                    time_spent_ms=1000,
                    created_at=2.0,
                )
            )
        conn.execute(rt.update().where(rt.c.episode_id.in_(labelled)).values(status="done", done_at=2.0))
        failed = set(old) - labelled - open_
        conn.execute(rt.update().where(rt.c.episode_id.in_(failed)).values(status="error"))
        claimed = set(sorted(open_)[::2])
        conn.execute(
            rt.update()
            .where(rt.c.episode_id.in_(claimed))
            .values(status="claimed", lease_user_id=uid, lease_expires_at=time.time() + 600, fence=1)
        )
    assert claimed and open_ - claimed, "both kinds of open task"
    return labelled, claimed


def scores_for_every_rm_sample(store: Store) -> None:
    s = t.samples
    with store.engine.begin() as conn:
        rows = conn.execute(sa.select(s.c.episode_id, s.c.stream, s.c.ts).where(s.c.channel == "rm")).all()
        conn.execute(
            t.rm_scores.insert(),
            [
                {"episode_id": e, "version": "v1", "stream": st, "score": 0.5, "ts": ts, "created_at": 3.0}
                for e, st, ts in rows
            ],
        )


@pytest.mark.parametrize("chunk", [1000, 7])
def test_a_purge_keeps_the_window_and_what_people_made(db_url: str, tmp_path: Path, chunk: int) -> None:
    s = settings(db_url, tmp_path)
    store = Store(db_url)
    ingest(s, store, traffic_of("a") + traffic_of("b", hours=5 * 24))  # b went quiet after 5 days
    end_a, end_b = (
        bucket_of(BASE + (DAYS * 24 - 1) * HOUR + 17) + BUCKET_S,
        bucket_of(BASE + (5 * 24 - 1) * HOUR + 17) + BUCKET_S,
    )
    h_a, h_b = bucket_of(end_a - 3 * 86400), bucket_of(end_b - 3 * 86400)
    scores_for_every_rm_sample(store)
    with store.engine.begin() as conn:  # a drift event a day in stream a
        conn.execute(
            t.drift_events.insert(),
            [
                {"stream": "a", "signal": "refusal", "detector": "cusum", "episode_id": f"a-{d * 24}"}
                | {"input_index": d * 24, "event_ts": BASE + d * 86400 + 17, "created_at": 1.0}
                for d in range(DAYS)
            ],
        )
    kept, claimed = label_half_and_leave_a_third_open(store, h_a)
    before = {
        q: estimate_stream(store, "a", "rm", q, since=h_a)["estimate"] for q in ("response_chars", "empty_response")
    }
    population = store.traffic_count("a", since=h_a)
    old = count(store, t.episodes, t.episodes.c.stream == "a", t.episodes.c.ts < h_a)

    purged = purge(store, RetentionConfig(days=3, chunk=chunk))

    assert purged.horizons == {"a": h_a, "b": h_b}, "each stream's own event time"
    assert store.retention_horizon("a") == h_a and store.retention_horizon("b") == h_b
    e = t.episodes
    with store.engine.connect() as conn:
        left = {r[0] for r in conn.execute(sa.select(e.c.episode_id).where(e.c.stream == "a", e.c.ts < h_a))}
    # Before the horizon: the labelled, and those a reviewer holds now. A pending task there would
    # never be reached: at 1% human sampling of 1,000 episodes/s without a budget, 864,000 a day.
    assert left == {x for x in kept | claimed if x.startswith("a-")}, "before the horizon: labelled and held"
    assert old > len(left) > 0 and purged.deleted["episodes"] >= old - len(left)
    for table in (t.samples, t.rm_scores):
        assert count(store, table, table.c.stream == "a", table.c.ts < h_a, table.c.episode_id.not_in(left)) == 0
    assert purged.deleted["samples"] > 0 and purged.deleted["rm_scores"] > 0 and purged.deleted["review_tasks"] > 0
    assert count(store, t.samples, t.samples.c.episode_id.in_(kept)) > 0, "kept episodes keep their samples"
    assert count(store, t.traffic, t.traffic.c.bucket < h_a, t.traffic.c.stream == "a") == 0
    assert count(store, t.traffic, t.traffic.c.bucket >= h_a, t.traffic.c.stream == "a") > 0
    de = t.drift_events
    assert count(store, de, de.c.event_ts < h_a) == 0 and count(store, de, de.c.event_ts >= h_a) == 3
    assert purged.deleted["drift_events"] == DAYS - 3
    # The estimates over everything now are those of the retained window before: same items, same population.
    after = {q: estimate_stream(store, "a", "rm", q)["estimate"] for q in before}
    assert after == before and store.traffic_count("a") == population == 3 * 24
    assert purge(store, RetentionConfig(days=3, chunk=chunk)).deleted["episodes"] == 0, "a second purge finds nothing"
    store.close()


def test_the_horizon_never_moves_back_and_late_records_below_it_are_not_counted(db_url: str, tmp_path: Path) -> None:
    s = settings(db_url, tmp_path)
    store = Store(db_url)
    ingest(s, store, traffic_of("a"))
    h = purge(store, RetentionConfig(days=3)).horizons["a"]
    assert purge(store, RetentionConfig(days=30)).horizons["a"] == h, "a longer window cannot bring rows back"
    late = [
        json.dumps(
            {"episode_id": f"late-{i}", "stream": "a", "prompt": "p", "response": "r", "timestamp": BASE + i}
        ).encode()
        for i in range(50)
    ]
    population = store.traffic_count("a")
    ingest(s, store, late, name="late")
    assert store.traffic_count("a") == population, "before the horizon: stored, not in any estimate"
    assert all(row["ts"] >= h for row in store.sampled("a", "rm"))


def test_the_job_counts_its_rows_and_survives_a_database_that_is_gone(db_url: str, tmp_path: Path) -> None:
    s = settings(db_url, tmp_path)
    store = Store(db_url)
    ingest(s, store, traffic_of("a"))
    metrics = Metrics(CollectorRegistry())
    r = metrics.registry
    assert r.get_sample_value("oversight_retention_runs_total", {"outcome": "failed"}) == 0.0
    assert r.get_sample_value("oversight_retention_deleted_total", {"table": "episodes"}) == 0.0
    job = RetentionJob(store, RetentionConfig(days=3, every_s=3600), metrics)
    purged = job.run_once()
    assert purged is not None and purged.deleted["episodes"] > 0
    assert r.get_sample_value("oversight_retention_deleted_total", {"table": "episodes"}) == purged.deleted["episodes"]
    assert (
        r.get_sample_value("oversight_retention_deleted_total", {"table": "traffic"}) == purged.deleted["traffic"] > 0
    )
    assert abs((r.get_sample_value("oversight_retention_last_success_timestamp_seconds") or 0) - time.time()) < 60
    gone = Store("postgresql://nobody@127.0.0.1:1/none", migrate=False)
    broken = RetentionJob(gone, RetentionConfig(days=3), metrics)
    assert broken.run_once() is None
    assert r.get_sample_value("oversight_retention_runs_total", {"outcome": "failed"}) == 1.0
    assert broken.run_once() is None
    # What the alert reads: failures since the last success, whatever the period between purges.
    assert r.get_sample_value("oversight_retention_failures_in_a_row") == 2.0
    assert job.run_once() is not None
    assert r.get_sample_value("oversight_retention_failures_in_a_row") == 0.0
    job.start()
    job.stop()
    store.close()


def test_db_purge_command(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    s = settings(f"sqlite:///{db}", tmp_path)
    store = Store(f"sqlite:///{db}")
    ingest(s, store, traffic_of("a"))
    store.close()

    def oversight(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "monitor.cli", *args, "--db", f"sqlite:///{db}"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)

    no = oversight("db", "purge")
    assert (
        no.returncode == 2
        and "set database.retention.days or pass --days" in no.stderr
        and "Traceback" not in no.stderr
    )
    done = oversight("db", "purge", "--days", "3")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["streams"] == 1 and out["deleted"]["episodes"] > 0 and out["deleted"]["traffic"] == 7 * 24


def test_the_service_purges_on_its_own_thread(db_url: str, tmp_path: Path) -> None:
    from monitor.service import build_service

    s = settings(db_url, tmp_path).model_copy(deep=True)
    s.database.retention.days = 3
    s.database.retention.every_s = 1
    store = Store(db_url)
    ingest(s, store, traffic_of("a"))
    source = MemorySource([], "none")
    with build_service(s, source=source, serve=False, store=store, registry=CollectorRegistry()) as svc:
        job = svc.retention_job()
        deadline = time.monotonic() + 30
        r = svc.metrics.registry
        while (
            not r.get_sample_value("oversight_retention_runs_total", {"outcome": "ok"}) and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert (r.get_sample_value("oversight_retention_deleted_total", {"table": "episodes"}) or 0) > 0
    assert not job.running, "closing the service stops the job"
    assert store.retention_horizon("a") is not None
    store.close()


def test_a_score_whose_episode_the_purge_took_is_dropped_not_a_failed_batch(db_url: str, tmp_path: Path) -> None:
    """The inference workers score an episode while the purge deletes it: the batch that brings
    the score commits without it (before, the foreign key failed the batch, and the pipeline)."""
    from monitor.store import BatchWrite
    from monitor.store.rows import RmScoreRow

    s = settings(db_url, tmp_path)
    store = Store(db_url)
    ingest(s, store, traffic_of("a"))
    with store.engine.connect() as conn:
        rm = conn.execute(sa.select(t.samples.c.episode_id, t.samples.c.ts).where(t.samples.c.channel == "rm")).all()
    purge(store, RetentionConfig(days=3))
    gone, kept = rm[0], rm[-1]

    def score(eid: str, ts: float) -> RmScoreRow:
        return {"episode_id": eid, "version": "v1", "stream": "a", "score": 0.1, "ts": ts, "created_at": 1.0}

    store.commit_batch(BatchWrite(rm_scores=[score(*gone), score(*kept)]))
    with store.engine.connect() as conn:
        scored = {r[0] for r in conn.execute(sa.select(t.rm_scores.c.episode_id))}
    assert scored == {kept[0]}
    store.close()


def test_a_traffic_minute_from_the_far_future_does_not_move_the_horizon(db_url: str, tmp_path: Path) -> None:
    """A bucket stamped in the year 9999 (stored before source.max_future_s existed) would put the
    horizon 3 days before it: the stream's whole window, deleted. Minutes further ahead of the
    clock than the source accepts do not count."""
    s = settings(db_url, tmp_path)
    store = Store(db_url)
    ingest(s, store, traffic_of("a"))
    with store.engine.begin() as conn:
        conn.execute(t.traffic.insert().values(stream="a", bucket=253402300740, episodes=1))
    kept = count(store, t.episodes, t.episodes.c.ts >= BASE + (DAYS - 3) * 86400)
    purged = purge(store, RetentionConfig(days=3), max_future_s=300.0, now=BASE + DAYS * 86400)
    assert purged.horizons["a"] < BASE + DAYS * 86400
    assert count(store, t.episodes, t.episodes.c.ts >= BASE + (DAYS - 3) * 86400) == kept > 0


def _old_episode(eid: str, ts: float) -> Any:
    return {
        "episode_id": eid,
        "stream": "a",
        "model": "m",
        "ts": ts,
        "prompt": "q",
        "response": "r",
        "metadata": None,
        "source": "t",
        "position": eid,
        "ingested_at": 1.0,
    }


@pytest.mark.postgres
def test_an_old_episode_stored_again_while_the_purge_deletes_it_is_not_a_failed_batch(
    pg_url: str, tmp_path: Path
) -> None:
    """An episode older than the horizon comes again (a producer's retry, a rewind) while the purge
    runs: its insert does nothing (it is there) and takes no lock, the purge deletes it, and the
    batch's sample then referred to nothing. The foreign key failed the batch and stopped
    `oversight run`; now the batch reads its episodes under KEY SHARE and stores one deleted
    in between again."""
    from monitor.store import BatchWrite
    from monitor.store.retention import Purged, purge_stream

    store, purger = Store(pg_url), Store(pg_url)
    eid = "a-old"
    store.commit_batch(BatchWrite(episodes=[_old_episode(eid, BASE)]))
    purged = Purged()
    fired: list[str] = []

    def purge_now(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        # The moment after the batch's episode insert did nothing and before it reads the owners.
        if not fired and statement.lstrip().startswith("SELECT episodes.episode_id, episodes.stream"):
            fired.append(statement)
            purge_stream(purger, "a", BASE + 86400, 100, purged)

    sa.event.listen(store.engine, "before_cursor_execute", purge_now)
    sample: SampleRow = {
        "episode_id": eid,
        "channel": "rm",
        "stream": "a",
        "ts": BASE,
        "inclusion_probability": 0.5,
        "created_at": 1.0,
    }
    store.commit_batch(BatchWrite(episodes=[_old_episode(eid, BASE)], samples=[sample]))
    sa.event.remove(store.engine, "before_cursor_execute", purge_now)
    assert fired and purged.deleted["episodes"] == 1, "the purge did not run in the window"
    assert count(store, t.samples, t.samples.c.episode_id == eid) == 1
    assert count(store, t.episodes, t.episodes.c.episode_id == eid) == 1
    store.close()
    purger.close()


def test_a_task_claimed_after_the_purge_chose_its_episode_is_kept(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The purge reads its candidates, then deletes them in another transaction: a reviewer who
    claimed one of them in between lost the item (their label refused with 409). What keeps an
    episode is checked again where it is deleted."""
    from monitor.store import BatchWrite, retention

    store = Store(db_url)
    eids = [f"a-{i}" for i in range(4)]
    tasks: list[ReviewTaskRow] = [
        {"episode_id": e, "slot": 0, "stream": "a", "status": "pending", "created_at": 1.0} for e in eids
    ]
    store.commit_batch(BatchWrite(episodes=[_old_episode(e, BASE + i) for i, e in enumerate(eids)], tasks=tasks))
    delete = retention._delete_chunk

    def claim_first(*args: Any) -> None:
        with store.engine.begin() as conn:
            conn.execute(t.review_tasks.update().where(t.review_tasks.c.episode_id == eids[0]).values(status="claimed"))
        delete(*args)

    monkeypatch.setattr(retention, "_delete_chunk", claim_first)
    purged = retention.Purged()
    retention.purge_stream(store, "a", BASE + 86400, 100, purged)
    with store.engine.connect() as conn:
        left = {
            str(e): str(st) for e, st in conn.execute(sa.select(t.review_tasks.c.episode_id, t.review_tasks.c.status))
        }
    assert left == {eids[0]: "claimed"}
    assert count(store, t.episodes) == 1 and purged.deleted["episodes"] == 3
    store.close()
