"""``oversight serve`` at its file-descriptor limit: asyncio's accept loop logs "socket.accept() out of
system resource", with a traceback, for every connection it tries (up to uvicorn's 2,048 backlog
each time it wakes): 47,000 tracebacks, 22 MB of log, in 25 s under ``ulimit -n 64`` and 300
clients. One warning a minute now says it, with the count held back (``monitor.ops.AcceptFlood``).
A real server process, real sockets."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

OVERSIGHT = [sys.executable, "-m", "monitor.cli"]
FD_LIMIT = 64


def test_a_server_out_of_descriptors_says_so_once_and_serves_again(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'w.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERSIGHT_")}
    args = [*OVERSIGHT, "serve", "--dev", "--db", db, "--port", "0", "--set", "review.metrics_port=0"]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        shell = f"ulimit -n {FD_LIMIT} && exec {shlex.join(args)}"  # the limit in the server's process only
        proc = subprocess.Popen(["sh", "-c", shell], stderr=out, stdout=out, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while "review UI at " not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        line = next(x for x in log.read_text().splitlines() if "review UI at " in x)
        url = line.split(" at ", 1)[1].strip().rstrip("/")
        host, port = url.split("//", 1)[1].split(":")
        held = []
        for _ in range(3 * FD_LIMIT):  # more connections than the server has descriptors
            s = socket.create_connection((host, int(port)), timeout=5)
            held.append(s)
        time.sleep(3)  # the accept loop meets the limit again and again meanwhile
        for s in held:
            s.close()
        time.sleep(1)
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as r:  # free descriptors: it serves again
            assert r.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    said = text.count("out of system resource")
    assert 1 <= said <= 2, (said, len(text))
    assert "Traceback" not in text, text[:2000]
