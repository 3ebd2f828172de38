"""Helpers of the outage tests: a running ``oversight run`` fed through a pipe, its ops endpoints,
and the exactly-once check against an offline sampler.

The service runs as users run it: the ``oversight`` entry point in a subprocess, reading a FIFO
that a writer thread keeps feeding at a steady pace (the pipe stays open, so the outages happen
mid-stream), with its ops server on a free port.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

OVERSIGHT = str(Path(sys.executable).parent / "oversight")
BASE_TS = 1_767_225_600  # 2026-01-01T00:00:00Z
KEY = "outage-test-key-0123456789abcdef0123456789abcdef"
# The sampling of these tests, compared with an offline sampler: no budgets, no drift boosts
# (drift runs, reading and checkpointing its state, but its references never fill).
SETTINGS = [
    f"sampling.key={KEY}",
    "sampling.human.rate=0.05",
    "sampling.rm.rate=0.2",
    "sampling.drift.rate=0.1",
    "drift.reference_size=1000000",
    "drift.embedding.enabled=false",
    "drift.ert=2000",
    "drift.rereference_poll_s=1",
    "pipeline.batch_size=50",
    "pipeline.batch_timeout_ms=100",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def episode(i: int, streams: Sequence[str] = ("chat", "assistant", "search")) -> dict[str, Any]:
    stream = streams[i % len(streams)]
    return {
        "episode_id": f"ep-{i}",
        "stream": stream,
        "model": "policy-v1",
        "timestamp": BASE_TS + i,
        "prompt": f"question {i} about {stream}",
        "response": "answer " + "x" * (i % 37),
        "metadata": {"i": i},
    }


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()


def readyz(port: int) -> tuple[int, dict[str, bool]]:
    """(status, checks) of /readyz; (0, {}) while the server does not answer."""
    try:
        code, body = http_get(f"http://127.0.0.1:{port}/readyz")
    except OSError:
        return 0, {}
    return code, dict(json.loads(body)["checks"])


def metric(port: int, name: str, **labels: str) -> float | None:
    """One sample of /metrics (exposition text), or None when absent."""
    _, body = http_get(f"http://127.0.0.1:{port}/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name + (f"{{{want}}}" if want else "")) + r" (\S+)$"
    for line in body.splitlines():
        m = re.match(pattern, line)
        if m:
            return float(m.group(1))
    return None


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> float:
    """Seconds until ``predicate()`` held; fails the test after ``timeout_s``."""
    t0 = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        time.sleep(interval_s)


class PacedWriter:
    """Writes episodes 0, 1, 2... into a FIFO at ``rate`` per second until stopped, then closes
    it (the service then reads to the end and exits). Writes block while the service is behind:
    the pipe's own backpressure, as with a real producer."""

    def __init__(self, fifo: Path, rate: float, streams: Sequence[str] = ("chat", "assistant", "search")):
        self.fifo = fifo
        self.rate = rate
        self.streams = tuple(streams)
        self.written = 0
        self.injected: list[str] = []  # extra raw lines, written between episodes (see inject)
        self._extra: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-writer", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> PacedWriter:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with open(self.fifo, "w", encoding="utf-8") as fh:
                t0 = time.monotonic()
                while not self._stop.is_set():
                    due = int((time.monotonic() - t0) * self.rate) + 1
                    with self._lock:
                        extra, self._extra = self._extra, []
                    for line in extra:
                        fh.write(line + "\n")
                        self.injected.append(line)
                    while self.written < due and not self._stop.is_set():
                        fh.write(json.dumps(episode(self.written, self.streams)) + "\n")
                        self.written += 1
                    fh.flush()
                    time.sleep(0.02)
        except BaseException as e:  # surfaced by finish()
            self.error = e

    def inject(self, line: str) -> None:
        """Write one raw line (say, an invalid record) at the next tick."""
        with self._lock:
            self._extra.append(line)

    def abandon(self) -> None:
        """Stop writing without waiting (cleanup after a failure: the thread is a daemon)."""
        self._stop.set()

    def finish(self, timeout_s: float = 60) -> int:
        """Stop writing, close the pipe; returns how many episodes were written."""
        self._stop.set()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the writer is stuck: the service stopped reading"
        if self.error is not None:
            raise self.error
        return self.written


def start_service(
    fifo: Path, db_url: str, port: int, tmp_path: Path, *extra: str, log_name: str = "service.log"
) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """``oversight run --input FIFO`` with the test settings; returns the process and its log."""
    log = open(tmp_path / log_name, "wb")  # noqa: SIM115 (closed by the caller)
    args = [OVERSIGHT, "run", "--input", str(fifo), "--db", db_url, "--set", f"server.port={port}"]
    args += ["--set", f"dead_letter.path={tmp_path / 'dead-letters.jsonl'}"]
    for s in (*SETTINGS, *extra):
        args += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERSIGHT_")}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, log


def expected_samples(eps: Sequence[dict[str, Any]], *extra: str) -> set[tuple[str, str, float]]:
    """What an offline sampler with the service's key and policy selects among ``eps``."""
    from monitor.config import load_settings
    from sampling import Sampler

    s = load_settings(None, [*SETTINGS, *extra])
    sampler = Sampler(s.sampling_policy(), s.sampling_key())
    out: set[tuple[str, str, float]] = set()
    for e in eps:
        d = sampler.decide(e["episode_id"], e["stream"], float(e["timestamp"]))
        out |= {(e["episode_id"], ch, p) for ch, p in d.sampled.items()}
    return out


def assert_exactly_once(db_url: str, eps: Sequence[dict[str, Any]], *extra: str) -> None:
    """Every sampled (episode, channel) of ``eps`` once and nothing else; every episode counted once."""
    import sqlalchemy as sa

    from monitor.store.store import normalize_url

    engine = sa.create_engine(normalize_url(db_url))
    try:
        with engine.connect() as c:
            rows = [
                (r[0], r[1], float(r[2]))
                for r in c.execute(sa.text("SELECT episode_id, channel, inclusion_probability FROM samples"))
            ]
            ep_ids = [r[0] for r in c.execute(sa.text("SELECT episode_id FROM episodes"))]
            traffic = int(c.execute(sa.text("SELECT COALESCE(SUM(episodes), 0) FROM traffic")).scalar_one())
    finally:
        engine.dispose()
    n = len(eps)
    want = expected_samples(eps, *extra)
    assert len(rows) == len(set(rows)), "duplicate sample rows"
    got = set(rows)
    assert got == want, f"missing {len(want - got)}, unexpected {len(got - want)}"
    assert sorted(ep_ids) == sorted({e for e, _, _ in want})
    assert traffic == n, f"traffic counts {traffic} episodes, {n} were written"


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` if it still runs (a test's ``finally``: whatever failed, nothing is left behind)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class ReadOnlyDir:
    """Makes a directory read-only for files opened from now on, and writable again.

    As root (CI), a read-only bind mount of the directory onto itself: root ignores permission
    bits, and a mount is what a volume remounted read-only looks like. Files opened before stay
    as they were (another process's open database, say). As anyone else, permission bits."""

    def __init__(self, path: Path):
        self.path = path
        self._mounted = False
        self._modes: dict[Path, int] = {}

    def __enter__(self) -> ReadOnlyDir:
        if os.geteuid() == 0:
            subprocess.run(["mount", "--bind", str(self.path), str(self.path)], check=True, capture_output=True)
            self._mounted = True
            subprocess.run(["mount", "-o", "remount,ro,bind", str(self.path)], check=True, capture_output=True)
        else:
            for f in [self.path, *self.path.iterdir()]:
                self._modes[f] = f.stat().st_mode
                f.chmod(0o555 if f.is_dir() else 0o444)
        return self

    def make_writable(self) -> None:
        if self._mounted:
            subprocess.run(["mount", "-o", "remount,rw,bind", str(self.path)], check=True, capture_output=True)
        for f, mode in self._modes.items():
            f.chmod(mode)
        self._modes.clear()

    def __exit__(self, *_: object) -> None:
        self.make_writable()
        if self._mounted:
            for _attempt in range(50):  # busy while a connection through the mount is still closing
                if subprocess.run(["umount", str(self.path)], check=False, capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            else:  # a connection that outlived the test: detach the mount anyway
                subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)
            self._mounted = False


def can_mount() -> bool:
    """Whether this process may mount (root with CAP_SYS_ADMIN, as in CI)."""
    if os.geteuid() != 0:
        return False
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        ok = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], check=False, capture_output=True
            ).returncode
            == 0
        )
        if ok:
            subprocess.run(["umount", d], check=False, capture_output=True)
        return ok


class SmallDisk:
    """A tmpfs of ``size`` mounted on ``path`` (root only), with a filler that takes all its space."""

    def __init__(self, path: Path, size: str = "4m"):
        self.path = path
        self.size = size
        self.filler = path / "filler"

    def __enter__(self) -> SmallDisk:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)],
            check=True,
            capture_output=True,
        )
        return self

    def fill(self) -> None:
        """Take every free byte: the next write that needs space fails with ENOSPC."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for chunk in (1 << 16, 4096, 512, 1):
                while True:
                    try:
                        os.write(fd, b"\0" * chunk)
                    except OSError:
                        break
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def __exit__(self, *_: object) -> None:
        for _attempt in range(50):
            if subprocess.run(["umount", str(self.path)], check=False, capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)


class Partition:
    """A network of its own that a test can cut: a namespace (``name``) joined to this one by a
    veth pair, the far end at ``server_ip``. :meth:`cut` takes the far end's link down: what is
    sent is dropped without a word (no reset, no refusal), as in a network partition or when a
    host vanishes; :meth:`heal` brings it back. Root with CAP_NET_ADMIN, as in CI."""

    def __init__(self) -> None:
        import secrets

        tag = secrets.token_hex(3)
        self.name = f"ovp-{tag}"
        self._near, self._far = f"ovp{tag}a", f"ovp{tag}b"
        net = 16 + secrets.randbelow(200)
        self.client_ip, self.server_ip = f"10.231.{net}.1", f"10.231.{net}.2"

    @staticmethod
    def _ip(*args: str, netns: str | None = None) -> None:
        argv = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
        subprocess.run(argv, check=True, capture_output=True, timeout=10)

    def __enter__(self) -> Partition:
        self._ip("netns", "add", self.name)
        try:
            self._ip("link", "add", self._near, "type", "veth", "peer", "name", self._far)
            self._ip("link", "set", self._far, "netns", self.name)
            self._ip("addr", "add", f"{self.client_ip}/30", "dev", self._near)
            self._ip("link", "set", self._near, "up")
            self._ip("addr", "add", f"{self.server_ip}/30", "dev", self._far, netns=self.name)
            self._ip("link", "set", self._far, "up", netns=self.name)
            self._ip("link", "set", "lo", "up", netns=self.name)
        except BaseException:
            self.close()
            raise
        return self

    def cut(self) -> None:
        self._ip("link", "set", self._far, "down", netns=self.name)

    def heal(self) -> None:
        self._ip("link", "set", self._far, "up", netns=self.name)

    def close(self) -> None:
        for argv in (["ip", "netns", "del", self.name], ["ip", "link", "del", self._near]):
            subprocess.run(argv, check=False, capture_output=True, timeout=10)

    def __exit__(self, *exc: object) -> None:
        self.close()


def can_partition() -> bool:
    """Whether this process may make network namespaces and veth pairs (root with
    CAP_NET_ADMIN and CAP_SYS_ADMIN, as in CI)."""
    if os.geteuid() != 0:
        return False
    try:
        with Partition():
            return True
    except (OSError, subprocess.SubprocessError):
        return False
