"""Crash consistency: ``oversight run`` against PostgreSQL, killed with SIGKILL at random
moments while it processes, restarted each time; the store must end with exactly-once effects.

Set KAFKA_CRASH_SEED to replay a run's kill schedule (the seed is printed).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

N_EPISODES = 20_000


def _streams(n_per_partition: int = 3, partitions: int = 3) -> tuple[str, ...]:
    """Stream names that the default partitioner spreads over every partition."""
    from kafka.partitioner.default import murmur2

    picked: dict[int, list[str]] = {p: [] for p in range(partitions)}
    i = 0
    while any(len(v) < n_per_partition for v in picked.values()):
        name = f"stream-{i}"
        p = (murmur2(name.encode()) & 0x7FFFFFFF) % partitions
        if len(picked[p]) < n_per_partition:
            picked[p].append(name)
        i += 1
    return tuple(sorted(n for v in picked.values() for n in v))


STREAMS = _streams()
N_BAD = 30


class Replica:
    """One ``oversight run`` process; restartable, each incarnation logging to its own file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logdir: Path):
        self.name = name
        self.args = args
        self.env = env
        self.logdir = logdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log: Path | None = None

    def start(self) -> None:
        self.starts += 1
        self.log = self.logdir / f"{self.name}-{self.starts}.log"
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "monitor.cli", "run", *self.args],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self.env,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        assert self.alive(), f"{self.name} died on its own:\n{self.tail()}"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def sigterm(self, timeout_s: float = 15.0) -> int:
        assert self.proc is not None
        assert self.alive(), f"{self.name} died on its own:\n{self.tail()}"
        # A replica restarted moments ago may still be importing Python modules,
        # before any handler exists: wait until it serves.
        deadline = time.monotonic() + 30
        while (
            self.log is not None
            and "serving /metrics" not in self.log.read_text(errors="replace")
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def cleanup(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log is not None else ""


class Progress:
    """Sum of the database offsets of one source (records processed and committed)."""

    def __init__(self, url: str, source: str):
        import sqlalchemy as sa

        from monitor.store.store import normalize_url

        self._engine = sa.create_engine(normalize_url(url), pool_size=1)
        self._q = sa.text("SELECT COALESCE(SUM(next_offset), 0) FROM offsets WHERE source = :s")
        self._source = source

    def __call__(self) -> int:
        import sqlalchemy as sa

        try:
            with self._engine.connect() as c:
                return int(c.execute(self._q, {"s": self._source}).scalar_one())
        except sa.exc.ProgrammingError:  # tables not migrated yet
            return 0

    def wait_until(self, value: int, timeout_s: float, replicas: list[Replica]) -> int:
        """Wait until at least ``value`` records are committed; return the count then."""
        return self.wait_beyond(value - 1, timeout_s, replicas)

    def wait_beyond(self, value: int, timeout_s: float, replicas: list[Replica]) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for r in replicas:
                assert r.alive(), f"{r.name} died on its own:\n{r.tail()}"
            now = self()
            if now > value:
                return now
            time.sleep(0.05)
        tails = "\n".join(f"--- {r.name}\n{r.tail()}" for r in replicas)
        raise AssertionError(f"no progress beyond {value} within {timeout_s}s\n{tails}")

    def close(self) -> None:
        self._engine.dispose()


def _setup(kenv: Any, pg_url: str, tmp_path: Path) -> tuple[str, str, Any, list[Any], int, list[str]]:
    topic, group = kenv.topic(partitions=3), f"g-{uuid.uuid4().hex[:8]}"
    eps = [kenv.episode(i, STREAMS[i % len(STREAMS)], prefix="crash") for i in range(N_EPISODES)]
    ends = kenv.produce_episodes(topic, eps)
    assert len(ends) == 3, f"streams should hash to every partition: {ends}"
    bad_ends = kenv.produce(
        topic, [(b"bad", b'{"episode_id": "b%d", "prompt": "no response"}' % i) for i in range(N_BAD)]
    )
    total = sum(max(ends.get(p, 0), bad_ends.get(p, 0)) for p in range(3))
    assert total == N_EPISODES + N_BAD
    args = ["--dev", "--db", pg_url, "--log-level", "INFO", "--set", "server.port=0"]
    # A SIGKILLed member holds up the next join until the broker gives up on it: keep that short.
    fast_rejoin = [
        "kafka.session_timeout_ms=3000",
        "kafka.heartbeat_interval_ms=500",
        "kafka.max_poll_interval_ms=3000",
    ]
    for item in kenv.overrides(topic, group, pg_url, "pipeline.batch_size=100", *fast_rejoin):
        if not item.startswith(("dev=", "database.url=")):
            args += ["--set", item]
    return topic, group, kenv.settings(topic, group, pg_url), eps, total, args


def _check(kenv: Any, pg_url: str, topic: str, group: str, settings: Any, eps: list[Any], total: int) -> None:
    kenv.assert_exactly_once(pg_url, settings, eps)
    traffic = kenv.db_rows(pg_url, "SELECT COALESCE(SUM(episodes), 0) FROM traffic")
    assert int(traffic[0][0]) == N_EPISODES
    source = kenv.source_name(group, topic)
    offsets = kenv.db_rows(pg_url, f"SELECT SUM(next_offset) FROM offsets WHERE source = '{source}'")
    assert int(offsets[0][0]) == total
    # Dead letters are at-least-once: every invalid record is there, repeats are allowed.
    letters = kenv.consume_all(f"{topic}.dlq", expect=N_BAD, timeout_s=10)
    keys = {dict(m.headers)["oversight.idempotency_key"] for m in letters}
    assert len(keys) == N_BAD
    assert {dict(m.headers)["oversight.error.reason"] for m in letters} == {b"missing_field"}


def _kill_points(rng: random.Random, n: int, total: int) -> list[int]:
    """Progress counts at which to kill: spread over the run, so every kill lands mid-stream
    however fast the pipeline is."""
    return sorted(int(total * rng.uniform(0.05, 0.85)) for _ in range(n))


def _seed() -> int:
    seed = int(os.environ.get("KAFKA_CRASH_SEED", random.randrange(1 << 30)))
    print(f"KAFKA_CRASH_SEED={seed}")
    return seed


def test_kill9_single_replica_exactly_once(kenv: Any, pg_url: str, tmp_path: Path) -> None:
    rng = random.Random(_seed())
    topic, group, settings, eps, total, args = _setup(kenv, pg_url, tmp_path)
    progress = Progress(pg_url, kenv.source_name(group, topic))
    replica = Replica("r", args, kenv.env_without_oversight(), tmp_path)
    kills = 0
    try:
        done = 0
        for point in _kill_points(rng, 5, total):
            replica.start()
            # Kill while it processes: after it has committed something in this incarnation,
            # at a random moment (between transactions or in the middle of one).
            done = progress.wait_until(max(point, done + 1), 60, [replica])
            time.sleep(rng.uniform(0.0, 0.03))
            replica.kill9()
            kills += 1
            done = progress()
            assert done < total, "finished before the fifth kill; use more episodes or smaller batches"
        replica.start()
        deadline = time.monotonic() + 90
        while progress() < total and time.monotonic() < deadline:
            assert replica.alive(), replica.tail()
            time.sleep(0.2)
        assert progress() == total, replica.tail()
        assert replica.sigterm() == 0, replica.tail()
    finally:
        replica.cleanup()
        progress.close()
    assert kills == 5
    _check(kenv, pg_url, topic, group, settings, eps, total)


def test_kill9_one_of_two_replicas_exactly_once(kenv: Any, pg_url: str, tmp_path: Path) -> None:
    rng = random.Random(_seed())
    topic, group, settings, eps, total, args = _setup(kenv, pg_url, tmp_path)
    progress = Progress(pg_url, kenv.source_name(group, topic))
    env = kenv.env_without_oversight()
    replicas = [Replica("a", args, env, tmp_path), Replica("b", args, env, tmp_path)]
    kills = 0
    try:
        for r in replicas:
            r.start()
        done = 0
        for point in _kill_points(rng, 3, total):
            done = progress.wait_until(max(point, done + 1), 60, replicas)
            time.sleep(rng.uniform(0.0, 0.03))
            victim = rng.choice(replicas)
            victim.kill9()
            kills += 1
            done = progress()
            assert done < total, "finished before the third kill; use more episodes or smaller batches"
            victim.start()
        deadline = time.monotonic() + 90
        while progress() < total and time.monotonic() < deadline:
            for r in replicas:
                assert r.alive(), r.tail()
            time.sleep(0.2)
        assert progress() == total, "\n".join(r.tail() for r in replicas)
        for r in replicas:
            assert r.sigterm() == 0, r.tail()
    finally:
        for r in replicas:
            r.cleanup()
        progress.close()
    _check(kenv, pg_url, topic, group, settings, eps, total)
