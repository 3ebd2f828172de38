"""Exactly-once effects of the inference workers across kill -9.

``oversight run`` as users run it, on a file of real texts, with the embedding worker and a real
local reward model (a ``BertForSequenceClassification`` on the bundled MiniLM weights, kind
``hf``) scoring on its worker. It is killed with SIGKILL while both backlogs are half done, then
run again: every drift sample is fed to its stream's detectors exactly once (the committed
checkpoint's count equals the number of drift samples), every rm- and human-sampled episode has
exactly one score, and nothing waits.

The same with the inference workers as a process of their own (``oversight infer``,
``inference.external``): that process is killed with SIGKILL mid-backlog while ``oversight run``
(which loads no model) keeps running, and a new one takes over the expired claims.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from model_helpers import untrained_hf_checkpoint
from outage_helpers import OVERSIGHT, free_port, metric, readyz, tail, wait_for
from realdata import alpaca_rows

from monitor.config import load_settings
from monitor.drift import COMPONENT
from monitor.reward.kinds import KindVersion
from monitor.reward.registry import Registry
from monitor.store import Store
from monitor.store import tables as t

pytestmark = pytest.mark.slow

T0 = 1_767_225_600
STREAMS = ("chat", "assistant")


def counts(db: Path) -> dict[tuple[str, str], int]:
    """(channel, status) -> samples; empty while the database cannot be read."""
    try:
        store = Store(f"sqlite:///{db}", migrate=False)
        s = t.samples
        with store.engine.connect() as conn:
            rows = conn.execute(sa.select(s.c.channel, s.c.status, sa.func.count()).group_by(s.c.channel, s.c.status))
            out = {(r[0], r[1]): int(r[2]) for r in rows}
        store.close()
        return out
    except sa.exc.SQLAlchemyError:
        return {}


def prepare(tmp_path: Path, *extra: str) -> tuple[list[str], list[str], dict[str, str]]:
    """The settings' overrides, an hf version promoted, and 1,500 real episodes in a file: the
    ``oversight run`` command line, the overrides, and the environment."""
    db = tmp_path / "db.sqlite"
    overrides = [
        "dev=true",
        f"database.url=sqlite:///{db}",
        f"reward.models_dir={tmp_path / 'models'}",
        f"dead_letter.path={tmp_path / 'dead.jsonl'}",
        f"server.port={free_port()}",
        "sampling.drift.rate=0.4",
        "sampling.rm.rate=0.08",
        "sampling.human.rate=0.02",
        "drift.embedding.reference_size=20",
        "pipeline.batch_size=100",
        "inference.poll_s=0.1",
        "reward.swap_poll_s=0.2",
        # The workers at ingest's priority, so both backlogs move while the input is read and the
        # kill finds both half done. At the default (inference.nice) ingest goes first on 2 busy
        # cores: the scoring backlog can be done before the encoder has embedded a sample.
        "inference.nice=0",
        *extra,
    ]
    settings = load_settings(None, overrides)
    store = Store(settings.database.url)
    registry = Registry.for_settings(store, settings)
    ckpt = untrained_hf_checkpoint(tmp_path / "hf")
    registry.promote(
        registry.register(KindVersion.create("hf", {"path": str(ckpt), "max_length": 64}), data_window={}, metrics={})
    )
    store.close()

    rows = alpaca_rows("gpt-3.5-turbo-1106")
    data = tmp_path / "in.jsonl"
    with data.open("w") as fh:
        for i in range(1500):
            r = rows[i % len(rows)]
            ep = {
                "episode_id": f"e{i}",
                "stream": STREAMS[i % 2],
                "timestamp": T0 + i,
                "prompt": r["instruction"],
                "response": r["output"],
            }
            fh.write(json.dumps(ep) + "\n")
    cmd = [OVERSIGHT, "run", "--input", str(data)]
    for o in overrides:
        cmd += ["--set", o]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERSIGHT_")} | {"HF_HUB_OFFLINE": "1"}
    return cmd, overrides, env


def half_done(db: Path, proc: subprocess.Popen[bytes]) -> Callable[[], bool]:
    def check() -> bool:
        c = counts(db)
        return proc.poll() is not None or (
            c.get(("drift", "embedded"), 0) >= 40
            and c.get(("drift", "pending"), 0) >= 60
            and c.get(("rm", "scored"), 0) >= 5
            and c.get(("rm", "pending"), 0) >= 10
        )

    return check


def assert_exactly_once(db: Path) -> None:
    """Every drift sample fed to its stream's detectors once, every review sample scored once."""
    after = counts(db)
    assert ("drift", "pending") not in after and ("rm", "pending") not in after, after
    store = Store(f"sqlite:///{db}")
    s, sc = t.samples, t.rm_scores
    with store.engine.connect() as conn:
        grouped = conn.execute(
            sa.select(s.c.stream, sa.func.count()).where(s.c.channel == "drift").group_by(s.c.stream)
        ).all()
        drift_per_stream: dict[str, int] = {str(r[0]): int(r[1]) for r in grouped}
        review_sampled = conn.execute(
            sa.select(sa.func.count(sa.distinct(s.c.episode_id))).where(s.c.channel.in_(("rm", "human")))
        ).scalar_one()
        scores = conn.execute(sa.select(sc.c.episode_id)).scalars().all()
        in_flight = conn.execute(sa.select(sa.func.count()).select_from(t.inference_results)).scalar_one()
    assert set(drift_per_stream) == set(STREAMS)
    for stream in STREAMS:
        state = store.load_state(stream, COMPONENT) or {}
        # Fed exactly once: neither an embedding fed before the kill and fed again after the
        # restart, nor one computed before the kill and lost.
        assert state["fed"]["embedding"] == drift_per_stream[stream], (stream, state["fed"])
    assert len(scores) == len(set(scores)) == review_sampled
    assert in_flight == 0
    store.close()


def test_kill9_mid_backlog_then_restart_is_exactly_once(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    cmd, _, env = prepare(tmp_path)
    log = tmp_path / "run1.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(half_done(db, proc), 300, "both backlogs half done")
            assert proc.poll() is None, tail(log)
            proc.kill()  # SIGKILL: no drain, no close
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    before = counts(db)
    assert before[("drift", "pending")] > 0 and before[("rm", "pending")] > 0, before

    log2 = tmp_path / "run2.log"
    with log2.open("wb") as out:
        rc = subprocess.run(cmd, check=False, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=600).returncode
    assert rc == 0, tail(log2)
    assert_exactly_once(db)


def test_kill9_of_the_inference_process_then_restart_is_exactly_once(tmp_path: Path) -> None:
    """``oversight infer`` (inference.external) killed with SIGKILL mid-backlog while ``oversight
    run`` keeps running and loads no model; a new one takes over the expired claims."""
    db = tmp_path / "db.sqlite"
    cmd, overrides, env = prepare(tmp_path, "inference.external=true", "inference.retry_after_s=2")
    infer = [OVERSIGHT, "infer"]
    for o in overrides:
        infer += ["--set", o]
    logs = [tmp_path / f"{name}.log" for name in ("run", "infer1", "infer2")]
    with logs[0].open("wb") as out:
        run = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    procs = [run]
    try:
        port = free_port()
        with logs[1].open("wb") as out:
            first = subprocess.Popen([*infer, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
        procs.append(first)
        wait_for(half_done(db, first), 300, "both backlogs half done")
        assert first.poll() is None, tail(logs[1])
        assert readyz(port)[0] == 200
        assert metric(port, "oversight_ready") == 1.0  # as /readyz: what OversightNotReady reads
        assert (metric(port, "oversight_inference_items_total", stage="embedding", outcome="ok") or 0) > 0
        first.kill()  # SIGKILL: its claims stay until they expire
        first.wait(30)
        assert run.poll() is None, tail(logs[0])  # the pipeline waits for the work, it does not fail
        before = counts(db)
        assert before[("drift", "pending")] > 0 and before[("rm", "pending")] > 0, before

        port2 = free_port()
        with logs[2].open("wb") as out:
            second = subprocess.Popen([*infer, "--port", str(port2)], stdout=out, stderr=subprocess.STDOUT, env=env)
        procs.append(second)
        assert run.wait(600) == 0, tail(logs[0])
        second.send_signal(signal.SIGTERM)
        assert second.wait(15) == 0, tail(logs[2])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
    # The pipeline never scored: the reward model was the workers'. (Its action worker loads the
    # active version once to measure its sensitivity, as this version has no gate record.)
    assert "reward model: scoring with" not in logs[0].read_text()
    assert "scoring with" in logs[1].read_text() + logs[2].read_text()
    assert_exactly_once(db)
