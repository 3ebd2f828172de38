"""``oversight rm pairs | train | eval`` as users run them: subprocesses, real files."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

OVERSIGHT = [sys.executable, "-m", "monitor.cli"]
TINY = ["--set", "max_length=32", "--set", "max_prompt_tokens=8", "--set", "epochs=1", "--set", "val_fraction=0"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OVERSIGHT, *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow  # about 25 s: the CLI trains and evaluates end to end
def test_rm_pairs_train_eval(tmp_path: Path) -> None:
    pairs = tmp_path / "hh.jsonl"
    out = run("rm", "pairs", "--source", "hh_rlhf", "--split", "test", "--limit", "24", "--out", str(pairs))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["pairs"] == 24
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert len(rows) == 24 and all({"prompt", "chosen", "rejected"} <= set(r) for r in rows)

    v1 = tmp_path / "v1"
    out = run("rm", "train", "--pairs", str(pairs), "--out", str(v1), "--no-progress", *TINY)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["version"].startswith("rm-") and summary["parent"] is None and summary["n_train"] == 24
    assert (v1 / "weights.safetensors").exists() and (v1 / "MODEL_CARD.md").exists()

    out = run("rm", "eval", "--model", str(v1), "--pairs", str(pairs))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["n"] == 24 and 0.0 <= result["pairwise_accuracy"] <= 1.0
    assert result["version"] == summary["version"]

    v2 = tmp_path / "v2"
    out = run("rm", "train", "--pairs", str(pairs), "--out", str(v2), "--base", str(v1), "--no-progress", *TINY)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["parent"] == summary["version"]
    assert json.loads((v2 / "metadata.json").read_text())["parent"] == summary["version"]

    # The registry commands: register (creates the database), list, and an update with nothing to do.
    db = ["--db", f"sqlite:///{tmp_path / 'db.sqlite'}", "--set", f"reward.models_dir={tmp_path / 'models'}"]
    out = run("rm", "register", "--model", str(v1), "--activate", *db)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["active"] is True
    out = run("rm", "versions", *db)
    assert out.returncode == 0, out.stderr
    (row,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert row["version"] == summary["version"] and row["active"] is True
    out = run("rm", "requests", *db)
    assert out.returncode == 0 and out.stdout == ""
    out = run("rm", "update", *db)
    assert out.returncode == 0 and json.loads(out.stdout)["state"] == "nothing to do"


def test_rm_train_rejects_unknown_settings_and_bad_pairs(tmp_path: Path) -> None:
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    out = run("rm", "train", "--pairs", str(pairs), "--out", str(tmp_path / "v"), "--set", "epochz=1")
    assert out.returncode == 2 and "epochz: unknown key" in out.stderr
    assert not (tmp_path / "v").exists()
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    pairs.write_text('{"prompt": "p", "chosen": "a"}\n')
    out = run("rm", "eval", "--model", str(not_a_model), "--pairs", str(pairs))
    assert out.returncode == 2 and "rejected" in out.stderr
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    out = run("rm", "eval", "--model", str(not_a_model), "--pairs", str(pairs))
    assert out.returncode == 2 and "cannot load reward model" in out.stderr
    # A missing folder is found before anything is loaded (exit 1: a missing file, not a bad one).
    out = run("rm", "eval", "--model", str(tmp_path / "missing"), "--pairs", str(pairs))
    assert out.returncode == 1 and "--model" in out.stderr and "no such folder" in out.stderr


def test_rm_pairs_splits_do_not_share_instructions(tmp_path: Path) -> None:
    sides = {}
    for side in ("train", "test"):
        f = tmp_path / f"{side}.jsonl.gz"
        out = run("rm", "pairs", "--source", "alpaca_eval", "--split", side, "--out", str(f))
        assert out.returncode == 0, out.stderr
        sides[side] = json.loads(out.stdout)["pairs"]
        with gzip.open(f, "rt") as fh:
            sides[side + "_prompts"] = {json.loads(line)["prompt"] for line in fh}
    assert sides["train"] > 2000 and sides["test"] > 400
    assert not sides["train_prompts"] & sides["test_prompts"]


def test_an_update_that_stops_on_any_error_leaves_its_request_failed_not_running(tmp_path: Path) -> None:
    """`rm update --request` marked its request failed on an UpdateError only: any other error (here
    reward.models_dir is a file) left it running for good, and the trainer's retry was refused as
    "running: another trainer has it"."""
    from monitor.store import Store
    from monitor.store import requests as rq

    db = f"sqlite:///{tmp_path / 'o.db'}"
    store = Store(db)
    rid, _ = rq.create(store, "rm_update", "chat:1", "chat", {"stream": "chat", "since": 0.0, "incident": 1})
    not_a_folder = tmp_path / "models"
    not_a_folder.write_text("a file")
    out = run("rm", "update", "--request", rid, "--db", db, "--set", f"reward.models_dir={not_a_folder}")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    got = rq.get(store, rid)
    assert got is not None and got["state"] == "failed" and "FileExistsError" in str(got["last_error"]), got


def test_a_request_held_by_a_runner_is_not_taken_over(tmp_path: Path) -> None:
    """`rm update --request` never renewed its lease: after reward.update.lease_s the action worker
    took the request over as abandoned and ran it a second time, both runs promoting."""
    import time

    from monitor.store import Store
    from monitor.store import requests as rq

    store = Store(f"sqlite:///{tmp_path / 'o.db'}")
    rid, _ = rq.create(store, "rm_update", "chat:1", "chat", {"stream": "chat", "since": 0.0})
    assert rq.claim(store, rid)
    lease_s = 0.4
    with rq.held(store, rid, lease_s):
        time.sleep(3 * lease_s)
        row = rq.get(store, rid)
        assert row is not None and not rq.take_over(store, row, time.time() - lease_s)
    time.sleep(2 * lease_s)
    row = rq.get(store, rid)
    assert row is not None and rq.take_over(store, row, time.time() - lease_s)  # not held: it would be
