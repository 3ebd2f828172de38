"""The drift observer takes a batch at once (``prepare``) and must change nothing but the cost.

Three interleaved streams of real answers, two of them with a real policy swap, run through the
pipeline twice: once as it runs, once with ``prepare`` switched off (one episode at a time, the
path every earlier release took). The drift events (episode, signal, detector, statistic), the
samples with their inclusion probabilities (a boost applies from the episode after the one that
raised it) and the detector state must be the same, for batch sizes that cut the streams
anywhere; and a failure in the batch path loses no record and no value.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from realdata import alpaca_rows

from monitor.config import Settings, load_settings
from monitor.drift import COMPONENT
from monitor.drift.monitor import DriftMonitor
from monitor.episodes.deadletter import JsonlDeadLetterSink
from monitor.service import build_service
from monitor.sources.memory import MemorySource

T0 = 1_767_225_600
STREAMS = ("chat", "code", "stable")


def episodes(n: int = 2400) -> list[bytes]:
    """``chat`` swaps gpt-3.5 for alpaca-7b at 40% of its traffic, ``code`` swaps it for gpt-4 at
    60%, ``stable`` stays on gpt-3.5; the streams interleave at random."""
    gpt, alpaca, gpt4 = alpaca_rows("gpt-3.5-turbo-1106"), alpaca_rows("alpaca-7b"), alpaca_rows("gpt4_1106_preview")
    rnd = random.Random(3)
    seen = dict.fromkeys(STREAMS, 0)
    out = []
    for i in range(n):
        stream = rnd.choice(STREAMS)
        k = seen[stream]
        seen[stream] += 1
        j = rnd.randrange(805)
        src = gpt[j]
        if stream == "chat" and k > 0.4 * n / 3:
            src = alpaca[j]
        elif stream == "code" and k > 0.6 * n / 3:
            src = gpt4[j]
        ep = {"episode_id": f"{stream}-{k}", "stream": stream, "timestamp": T0 + i, "prompt": src["instruction"]}
        out.append(json.dumps({**ep, "response": src["output"]}).encode())
    return out


def settings(tmp: Path, name: str, batch_size: int) -> Settings:
    return load_settings(
        None,
        [
            "dev=true",
            f"database.url=sqlite:///{tmp / name}.db",
            f"dead_letter.path={tmp / name}.dlq.jsonl",
            f"pipeline.batch_size={batch_size}",
            "drift.reference_size=120",
            "drift.ert=400",  # alarms on the swaps, and a few false ones on the stable stream
            "drift.cooldown=15",  # the quiet updates after a warm-up go one at a time
            # Two detectors on one signal stop at the same alarm: one value at a time there.
            "drift.signals={response_log_chars: [cusum, page_hinkley], distinct_token_ratio: [cusum],"
            " refusal: [cusum], response_log_lines: [cusum], non_text_ratio: [cusum]}",
            "drift.embedding.enabled=false",
            "reward.enabled=false",
            "drift.boost_factor=4",
            "drift.boost_duration_s=60",
            "sampling.human.rate=0.1",
        ],
    )


def run(tmp: Path, name: str, values: list[bytes], batch_size: int) -> dict[str, Any]:
    s = settings(tmp, name, batch_size)
    sink = JsonlDeadLetterSink(s.dead_letter.path, 1000)
    svc = build_service(s, source=MemorySource(values), serve=False, dead_letters=sink, registry=CollectorRegistry())
    stats = svc.run()
    with svc.store.engine.connect() as c:
        events = c.execute(
            sa.text("SELECT stream, episode_id, input_index, signal, detector, statistic FROM drift_events ORDER BY id")
        ).all()
        samples = c.execute(sa.text("SELECT episode_id, channel, inclusion_probability FROM samples")).all()
    state = {stream: svc.store.load_state(stream, COMPONENT) for stream in STREAMS}
    letters = Path(s.dead_letter.path).read_text().splitlines() if Path(s.dead_letter.path).exists() else []
    svc.close()
    return {"stats": stats, "events": events, "samples": set(samples), "state": state, "letters": letters}


def same_events(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(
        x[:5] == y[:5] and x[5] == pytest.approx(y[5], rel=1e-9, abs=1e-9) for x, y in zip(a, b, strict=True)
    )


@pytest.fixture(scope="module")
def values() -> list[bytes]:
    return episodes()


@pytest.fixture(scope="module")
def one_at_a_time(values: list[bytes], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DriftMonitor, "prepare", lambda self, episodes: None)
        return run(tmp_path_factory.mktemp("one"), "one", values, 100)


@pytest.mark.parametrize("batch_size", [100, 37, 500])
def test_a_batch_at_once_finds_what_one_episode_at_a_time_finds(
    values: list[bytes], one_at_a_time: dict[str, Any], tmp_path: Path, batch_size: int
) -> None:
    want = one_at_a_time
    assert {e[0] for e in want["events"]} >= {"chat", "code"}, "the swaps raised no alarm: the test proves nothing"
    assert any(p == pytest.approx(0.4) for _, ch, p in want["samples"] if ch == "human"), "no boost to compare"
    got = run(tmp_path, "batch", values, batch_size)
    assert same_events(got["events"], want["events"]), (got["events"], want["events"])
    # Every boost from the same episode on: the same episodes sampled at the same probabilities.
    assert got["samples"] == want["samples"]
    for stream in STREAMS:
        g, w = got["state"][stream], want["state"][stream]
        assert g["fed"] == w["fed"]
        assert {k: (v["n"], v["cooldown"], v["ref"] is None) for k, v in g["signals"].items()} == {
            k: (v["n"], v["cooldown"], v["ref"] is None) for k, v in w["signals"].items()
        }
    assert got["letters"] == [] and got["stats"].records == len(values)


def test_an_episode_whose_statistics_fail_is_dead_lettered_alone(
    values: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A text the statistics cannot take (a bug nobody foresaw) fails its record only: the batch
    path finds which one, the record becomes an internal_error dead letter, every other episode
    is stored and fed."""
    from monitor.signals import text_stats, text_stats_many

    def buggy(prompt: str, response: str) -> dict[str, float]:
        if "BOOM" in response:
            raise IndexError("injected")
        return text_stats(prompt, response)

    def buggy_many(prompts: list[str], responses: list[str]) -> dict[str, list[float]]:
        if any("BOOM" in r for r in responses):
            raise IndexError("injected")
        return text_stats_many(prompts, responses)

    monkeypatch.setattr("monitor.drift.monitor.text_stats", buggy)
    monkeypatch.setattr("monitor.drift.monitor.text_stats_many", buggy_many)
    bad = json.loads(values[150])
    bad["response"] += " BOOM"
    got = run(tmp_path, "boom", [*values[:150], json.dumps(bad).encode(), *values[151:]], 100)
    letters = [json.loads(line) for line in got["letters"]]
    assert [(d["episode_id"], d["reason"]) for d in letters] == [(bad["episode_id"], "internal_error")]
    assert got["stats"].records == len(values) and got["stats"].invalid == 1
    fed = sum(got["state"][s]["fed"]["distinct_token_ratio"] for s in STREAMS)
    assert fed == len(values) - 1


def test_a_batch_path_that_fails_falls_back_to_one_episode_at_a_time(
    values: list[bytes],
    one_at_a_time: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in the batch path itself (here: the third batch's feed raises half-way): the observer
    drops what it did to that batch (its state reloads from the last checkpoint), takes the batch
    one episode at a time, and the run ends exactly as the reference run does. The error is logged
    with the frames that raised it, its message escaped."""
    real = DriftMonitor._feed_many
    calls = {"n": 0}

    def flaky(self: DriftMonitor, *args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2 * 3 * 6 + 4:  # the third batch (3 streams x 6 signals each), its fourth feed
            raise RuntimeError("injected\nFAKE LOG LINE")
        real(self, *args)

    monkeypatch.setattr(DriftMonitor, "_feed_many", flaky)
    got = run(tmp_path, "flaky", values, 100)
    assert calls["n"] > 2 * 3 * 6 + 4
    assert same_events(got["events"], one_at_a_time["events"])
    assert got["samples"] == one_at_a_time["samples"]
    assert got["letters"] == []
    for stream in STREAMS:
        assert got["state"][stream]["fed"] == one_at_a_time["state"][stream]["fed"]
    errors = [r.getMessage() for r in caplog.records if "could not take the batch at once" in r.getMessage()]
    assert len(errors) == 1 and "DriftMonitor" in errors[0] and "flaky" in errors[0]
    assert "\nFAKE LOG LINE" not in caplog.text
