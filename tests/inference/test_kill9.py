"""Exactly-once effects of the inference workers across kill -9.

``oversight run`` as users run it, on a file of real texts, with the embedding worker and a real
local reward model (a ``BertForSequenceClassification`` on the bundled MiniLM weights, kind
``hf``) scoring on its worker. It is killed with SIGKILL while both backlogs are half done, then
run again: every drift sample is fed to its stream's detectors exactly once (the committed
checkpoint's count equals the number of drift samples), every rm- and human-sampled episode has
exactly one score, and nothing waits.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa
from outage_helpers import OVERSIGHT, free_port, tail, wait_for
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


def hf_checkpoint(dest: Path) -> Path:
    """An untrained scoring head on the bundled encoder: its scores need not mean anything here."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from monitor.reward.model import packaged_encoder_dir

    torch.manual_seed(0)
    src = packaged_encoder_dir()
    model = BertForSequenceClassification.from_pretrained(src, num_labels=1, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)  # type: ignore[no-untyped-call, unused-ignore]
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


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


def test_kill9_mid_backlog_then_restart_is_exactly_once(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    models = tmp_path / "models"
    overrides = [
        "dev=true",
        f"database.url=sqlite:///{db}",
        f"reward.models_dir={models}",
        f"dead_letter.path={tmp_path / 'dead.jsonl'}",
        f"server.port={free_port()}",
        "sampling.drift.rate=0.4",
        "sampling.rm.rate=0.08",
        "sampling.human.rate=0.02",
        "drift.embedding.reference_size=20",
        "pipeline.batch_size=100",
        "inference.poll_s=0.1",
        "reward.swap_poll_s=0.2",
    ]
    settings = load_settings(None, overrides)
    store = Store(settings.database.url)
    registry = Registry.for_settings(store, settings)
    ckpt = hf_checkpoint(tmp_path / "hf")
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

    log = tmp_path / "run1.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:

            def half_done() -> bool:
                c = counts(db)
                return proc.poll() is not None or (
                    c.get(("drift", "embedded"), 0) >= 40
                    and c.get(("drift", "pending"), 0) >= 60
                    and c.get(("rm", "scored"), 0) >= 5
                    and c.get(("rm", "pending"), 0) >= 10
                )

            wait_for(half_done, 300, "both backlogs half done")
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

    after = counts(db)
    assert ("drift", "pending") not in after and ("rm", "pending") not in after, after
    store = Store(settings.database.url)
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
    assert set(drift_per_stream) == set(STREAMS)
    for stream in STREAMS:
        state = store.load_state(stream, COMPONENT) or {}
        # Fed exactly once: neither an embedding fed before the kill and fed again after the
        # restart, nor one computed before the kill and lost.
        assert state["fed"]["embedding"] == drift_per_stream[stream], (stream, state["fed"])
    assert len(scores) == len(set(scores)) == review_sampled
    store.close()
