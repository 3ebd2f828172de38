"""The ingesting host's wall clock steps ahead for a moment (a bad NTP answer, an RTC read as local
time at boot) and is set right again. Episodes without a timestamp take that clock, and a stream's
sampling clock and a retention horizon only move forward: the step stayed in them. The sampling
clock is now brought back at the first batch after the step (``Pipeline._rewind_clocks``), its
review budget as it was before, and a purge during the step holds its leap of the horizon until
the next purge (``monitor/store/retention.py``)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from monitor.config import RetentionConfig, Settings, load_settings
from monitor.episodes.deadletter import JsonlDeadLetterSink
from monitor.metrics import Metrics
from monitor.pipeline import Pipeline
from monitor.pipeline.core import LoopHooks
from monitor.sources.memory import MemorySource
from monitor.store import Store
from monitor.store import tables as t
from monitor.store.retention import purge
from monitor.store.store import BUCKET_S, bucket_of, horizon_key
from sampling import ChannelPolicy, Sampler, SamplingPolicy, StreamSamplingState, rewind_clock

BASE = 1_767_225_600.0  # 2026-01-01: the host's true time when the run starts
HOUR, DAY, YEAR = 3600.0, 86400.0, 365 * 86400.0


def settings(db_url: str, tmp_path: Path, *extra: str) -> Settings:
    return load_settings(
        None,
        [
            "dev=true",
            f"database.url={db_url}",
            f"dead_letter.path={tmp_path / 'dlq.jsonl'}",
            "drift.enabled=false",
            "reward.enabled=false",
            "sampling.rm.rate=1.0",  # every episode stored
            *extra,
        ],
    )


def pipeline(s: Settings, store: Store, values: list[bytes], clock: Any, name: str = "mem") -> Pipeline:
    sink = JsonlDeadLetterSink(s.dead_letter.path, s.dead_letter.max_raw_bytes)
    return Pipeline(s, store, MemorySource(values, name), sink, Metrics(CollectorRegistry()), clock=clock)


# -- the sampling clock ---------------------------------------------------------------------------

STEP_AT, STEP_LEN, BATCHES = 900, 30, 1500  # one batch of 10 episodes a second; the step at 15 min


def test_a_clock_stepped_ahead_for_30_s_leaves_no_trace_in_the_sampling(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """10 episodes/s without timestamps, a budget of 360 human reviews an hour (a rate of 0.01).
    The clock reads +8 h for 30 s. Before, the stream's clock stayed 8 h ahead, its budget window
    frozen on the step's (0.0198 for 8 h) and a boost made during the step lasted 8 h."""
    s = settings(
        sqlite_url,
        tmp_path,
        "pipeline.batch_size=10",
        "sampling.human_budget_per_hour=360",
        "sampling.human.floor=1e-4",
    )
    store = Store(s.database.url)
    calls = [0]

    def real(i: int) -> float:
        return BASE + i

    def clock() -> float:
        i = calls[0]
        calls[0] += 1
        return real(i) + 8 * HOUR if STEP_AT <= i < STEP_AT + STEP_LEN else real(i)

    values = [
        json.dumps({"episode_id": f"e{i}", "prompt": "p", "response": f"r{i % 97}"}).encode()
        for i in range(BATCHES * 10)
    ]
    p = pipeline(s, store, values, clock)
    trace: dict[int, tuple[float, float, int]] = {}

    def after(_records: object) -> None:
        i = calls[0] - 1
        st = p.sampler.state("default")
        trace[i] = (st.clock - real(i), p.sampler.rates("default")["human"], len(st.boosts))
        if i == STEP_AT + 5:  # drift raises a boost of 10 min during the step
            p.boost("default", 2.0, duration=600.0)

    with caplog.at_level(logging.WARNING, logger="monitor.pipeline.core"):
        p.run(hooks=LoopHooks(after_batch=after, stage_idle_work=False))
    rate = trace[STEP_AT - 1][1]
    assert rate == pytest.approx(0.01, rel=0.05), "the budget's rate before the step"
    assert trace[STEP_AT + STEP_LEN - 1][0] == pytest.approx(8 * HOUR, abs=1), "stepped"
    lag, human, boosts = trace[STEP_AT + STEP_LEN]
    assert (abs(lag) <= 1, human, boosts) == (True, rate, 0), "the first batch after the step: clock, rate, boost"
    assert all(abs(lag) <= 1 and h == pytest.approx(0.01, rel=0.05) for lag, h, _ in list(trace.values())[-300:])
    warned = [r for r in caplog.records if "ahead of this host's clock" in r.getMessage()]
    assert len(warned) == 1 and "'default'" in warned[0].getMessage() and "28799 s ahead" in warned[0].getMessage()
    # Every sample keeps the probability it was drawn with: the step's (boosted) ones too.
    sampled = store.sampled("default", "human")
    stepped = [r for r in sampled if r["ts"] >= BASE + 8 * HOUR]
    assert stepped and all(r["inclusion_probability"] > rate for r in stepped)
    later = [r for r in sampled if BASE + STEP_AT + STEP_LEN <= r["ts"] < BASE + 8 * HOUR]
    assert all(r["inclusion_probability"] == pytest.approx(0.01, rel=0.05) for r in later)
    expected = (BATCHES - STEP_AT - STEP_LEN) * 10 * 0.01  # 57
    assert len(later) < 1.5 * expected, f"{len(later)} human samples after the step against a budget of {expected}"
    store.close()


def budget_sampler() -> Sampler:
    rates = {"human": ChannelPolicy(0.05, 1e-4), "rm": ChannelPolicy(0.2), "drift": ChannelPolicy(0.1)}
    return Sampler(SamplingPolicy(rates, budgets={"*": 360.0}), key=b"clock step")


def feed(sampler: Sampler, start: float, seconds: int, per_s: int = 10) -> None:
    for i in range(seconds * per_s):
        sampler.decide(f"e{start}-{i}", "s", start + i / per_s)


def test_rewind_puts_the_budget_back_as_it_was_before_the_leap_and_survives_a_restart() -> None:
    sampler = budget_sampler()
    feed(sampler, BASE, 900)
    before = sampler.rates("s")["human"]
    assert before == pytest.approx(0.01, rel=0.01)
    feed(sampler, BASE + 900 + 8 * HOUR, 30)
    assert sampler.rates("s")["human"] > 1.9 * before, "the window across the leap saw hours without traffic"
    snap = json.loads(json.dumps(sampler.state("s").snapshot()))  # as the checkpoint holds it
    restarted = Sampler(sampler.policy, b"clock step", loader=lambda _s: StreamSamplingState.restore(snap))
    for sm in (sampler, restarted):
        sm.take_dirty()
        assert sm.rewind("s", not_after=BASE + 930 + 300) == pytest.approx(BASE + 930 + 8 * HOUR, abs=1)
        assert sm.rates("s")["human"] == before and sm.state("s").leap is None
        assert sm.take_dirty()["s"]["clock"] is None, "checkpointed with the next batch"
        assert sm.rewind("s", not_after=BASE + 931 + 300) is None


def test_a_quiet_stream_keeps_its_budget_through_a_later_rewind() -> None:
    """A window that spanned a quiet hour is a leap too, but one in the past: a rewind later (a
    record stamped in the future, the clock leaping less than two windows) keeps the rate that
    the traffic since the quiet hour measured."""
    st = StreamSamplingState(
        clock=BASE + 2 * HOUR + 500,
        window_start=BASE + 2 * HOUR,
        traffic_per_hour=7200.0,
        budget_rate=0.05,
        leap=(BASE, BASE + HOUR, 36000.0, 0.01),  # quiet for an hour, before the present
    )
    assert rewind_clock(st, not_after=BASE + 2 * HOUR + 300)
    assert (st.traffic_per_hour, st.budget_rate, st.leap) == (7200.0, 0.05, None)


# -- retention --------------------------------------------------------------------------------------

NOW = BASE + 10 * DAY  # the true time of the purges below: ten days of hourly traffic before it


def stamped(stream: str, times: list[float], prefix: str = "") -> list[bytes]:
    return [
        json.dumps(
            {"episode_id": f"{prefix}{stream}-{ts:.0f}", "stream": stream, "prompt": "q", "response": "r"}
            | {"timestamp": ts}
        ).encode()
        for ts in times
    ]


def hourly(start: float, hours: int) -> list[float]:
    return [start + i * HOUR + 17 for i in range(hours)]


def ingest(s: Settings, store: Store, values: list[bytes], now: float, name: str) -> None:
    pipeline(s, store, values, lambda: now, name).run()


def episodes_since(store: Store, since: float) -> int:
    e = t.episodes
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(e).where(e.c.ts >= since)).scalar_one())


def test_a_purge_while_the_clock_is_a_year_ahead_keeps_the_window(db_url: str, tmp_path: Path) -> None:
    """The hourly purge runs while the host's clock reads a year ahead, and episodes stamped with
    it are stored. Before, it saved a horizon 362 days ahead (3 days kept): everything stored
    until then was deleted as it came, and every estimate started there."""
    s = settings(db_url, tmp_path)
    store = Store(db_url)
    cfg = RetentionConfig(days=3)
    ingest(s, store, stamped("a", hourly(BASE, 10 * 24)), NOW, "live")
    h0 = purge(store, cfg, 300.0, now=NOW).horizons["a"]
    assert h0 == bucket_of(NOW - HOUR + 17 + BUCKET_S - 3 * DAY)
    window = episodes_since(store, h0)
    stepped = NOW + YEAR
    ingest(s, store, stamped("a", [stepped + i for i in range(20)], "step-"), stepped, "step")

    during = purge(store, cfg, 300.0, now=stepped + 30)

    leap = bucket_of(stepped + BUCKET_S - 3 * DAY)
    assert store.retention_horizon("a") == h0, "no horizon in the future is saved"
    assert during.deleted["episodes"] == 0 and episodes_since(store, h0) == window + 20
    assert store.traffic_count("a") == 3 * 24 + 20, "the estimates' window starts where it did"
    assert during.held == {"a": leap} and during.horizons["a"] == h0, "held, and counted"
    # The clock is right again: the next purge (an hour later) goes on from the traffic of today.
    ingest(s, store, stamped("a", hourly(NOW, 1)), NOW + HOUR, "later")
    after = purge(store, cfg, 300.0, now=NOW + HOUR)
    assert after.held == {} and after.horizons["a"] == store.retention_horizon("a") == h0 + HOUR
    assert episodes_since(store, h0 + HOUR) == window + 20
    store.close()


def test_normal_purges_move_at_once_and_a_catch_up_one_round_later(sqlite_url: str, tmp_path: Path) -> None:
    """Hourly traffic, hourly purges: the horizon follows at once. A backlog of two days (or a
    replay) arrives at once: the leap is held for one round, then taken; nothing is left behind."""
    s = settings(sqlite_url, tmp_path)
    store = Store(sqlite_url)
    cfg = RetentionConfig(days=3, every_s=3600)
    ingest(s, store, stamped("a", hourly(BASE, 10 * 24)), NOW, "d0")
    h = purge(store, cfg, 300.0, now=NOW).horizons["a"]
    for k in range(1, 4):
        ingest(s, store, stamped("a", hourly(NOW + (k - 1) * HOUR, 1)), NOW + k * HOUR, f"h{k}")
        r = purge(store, cfg, 300.0, now=NOW + k * HOUR)
        assert r.horizons["a"] == h + k * HOUR and r.deleted["episodes"] == 1 and r.held == {}
    ingest(s, store, stamped("a", hourly(NOW + 3 * HOUR, 48)), NOW + 51 * HOUR, "backlog")
    first = purge(store, cfg, 300.0, now=NOW + 51 * HOUR)
    assert first.horizons["a"] == h + 3 * HOUR and first.held == {"a": h + 51 * HOUR}
    second = purge(store, cfg, 300.0, now=NOW + 52 * HOUR)
    assert second.held == {} and second.horizons["a"] == h + 51 * HOUR and second.deleted["episodes"] == 48
    assert episodes_since(store, 0) == 3 * 24
    # Purged once a day (cron) without retention.every_s saying so: every purge leaps, and each
    # goes to the horizon the one before computed.
    for d in range(1, 4):
        ingest(s, store, stamped("a", hourly(NOW + (27 + 24 * d) * HOUR, 24)), NOW + (51 + 24 * d) * HOUR, f"d{d}")
        r = purge(store, cfg, 300.0, now=NOW + (51 + 24 * d) * HOUR)
        assert r.horizons["a"] == h + (27 + 24 * d) * HOUR and r.held == {"a": h + (51 + 24 * d) * HOUR}
        assert r.deleted["episodes"] == (0 if d == 1 else 24) and episodes_since(store, 0) == 4 * 24
    store.close()


def test_reset_horizon_undoes_one_a_stepped_clock_saved(tmp_path: Path) -> None:
    """A horizon saved in the future by a version without the rule: ``oversight db purge
    --reset-horizon STREAM`` forgets it, and the purge computes it from the traffic again."""
    db = tmp_path / "o.db"
    s = settings(f"sqlite:///{db}", tmp_path)
    store = Store(f"sqlite:///{db}")
    ingest(s, store, stamped("a", hourly(BASE, 10 * 24)), NOW, "live")
    far = int(NOW + 275 * DAY)
    store.save_internal(horizon_key("a"), {"horizon": far})
    assert store.traffic_count("a") == 0
    store.close()

    def oversight(*args: str) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "monitor.cli", "db", "purge", *args, "--db", f"sqlite:///{db}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        out: dict[str, Any] = json.loads(done.stdout)
        return out

    assert oversight("--reset-horizon", "a") == {"reset": {"a": far}}
    out = oversight("--days", "3", "--reset-horizon", "a")
    assert out["reset"] == {"a": None} and out["held"] == {} and out["deleted"]["episodes"] > 0
    store = Store(f"sqlite:///{db}")
    assert store.retention_horizon("a") == bucket_of(NOW - HOUR + 17 + BUCKET_S - 3 * DAY)
    assert store.traffic_count("a") == 3 * 24
    store.close()
