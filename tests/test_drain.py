"""SIGTERM drains: fast while detectors calibrate, clean while reading stdin.

``oversight run`` as users run it, in a subprocess. The drain target is 2 s (the watchdog exits
after ``pipeline.drain_timeout_s``, 8 s by default): a batch must never wait for a detector's
calibration by simulation (seconds at the default ERT), and a reader thread blocked on stdin must
not abort the interpreter's exit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from outage_helpers import OVERSIGHT, SETTINGS, episode, free_port, tail, wait_for

DRAIN_S = 2.0


def stored(db: Path) -> int:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return int(c.execute("SELECT COALESCE(SUM(episodes), 0) FROM traffic").fetchone()[0])
    except sqlite3.Error:
        return 0


def command(db: Path, tmp_path: Path, *extra: str) -> list[str]:
    args = [OVERSIGHT, "run", "--db", f"sqlite:///{db}", "--set", f"server.port={free_port()}"]
    args += ["--set", f"dead_letter.path={tmp_path / 'dead-letters.jsonl'}"]
    for s in (*SETTINGS, *extra):
        args += ["--set", s]
    return args


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("OVERSIGHT_")}
    out["HF_HUB_OFFLINE"] = "1"
    return out


def test_sigterm_drains_in_2s_while_detectors_calibrate(tmp_path: Path) -> None:
    """The stream's references fill in the batch in flight when SIGTERM comes: its detectors
    are calibrated to the default ERT by simulation (seconds). The drain must not wait for it."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    db = tmp_path / "db.sqlite"
    overrides = ["drift.reference_size=60", "drift.ert=20000", "pipeline.batch_size=50"]
    log = open(tmp_path / "service.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [*command(db, tmp_path, *overrides), "--input", str(fifo)], stdout=log, stderr=subprocess.STDOUT, env=env()
    )
    # One stream, 120 episodes at once: the second batch (episodes 50-99) is waiting when the
    # first commits, and its 10th episode fills the references.
    fh = open(fifo, "w", encoding="utf-8")  # noqa: SIM115 (held open: the pipe stays quiet, not closed)
    fh.write("".join(json.dumps(episode(i, ("chat",))) + "\n" for i in range(120)))
    fh.flush()
    try:
        wait_for(lambda: proc.poll() is not None or stored(db) >= 50, 120, "the first batch")
        assert proc.poll() is None, tail(tmp_path / "service.log")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=15)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        fh.close()
        log.close()
    assert rc == 0, tail(tmp_path / "service.log")
    assert took <= DRAIN_S, f"the drain took {took:.1f}s"
    assert stored(db) == 120, "what was read was not all committed"


def test_sigterm_while_reading_stdin_exits_cleanly(tmp_path: Path) -> None:
    """``oversight run --input -`` with a writer that stays quiet: the reader thread is blocked
    in a read of stdin when SIGTERM comes. What was read is stored, and the exit is clean (it was
    "Fatal Python error: _enter_buffered_busy", exit 134)."""
    db = tmp_path / "db.sqlite"
    proc = subprocess.Popen(
        [*command(db, tmp_path), "--input", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(),
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"".join(json.dumps(episode(i)).encode() + b"\n" for i in range(30)))
        proc.stdin.flush()
        wait_for(lambda: proc.poll() is not None or stored(db) >= 30, 120, "the episodes written")
        assert proc.poll() is None
        time.sleep(0.5)  # the reader is blocked in a read of the (open, quiet) pipe
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = err.decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    assert "Fatal Python error" not in text and "Traceback" not in text, text[-2000:]
    assert took <= DRAIN_S, f"the drain took {took:.1f}s"
    assert stored(db) == 30
