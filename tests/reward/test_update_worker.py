"""The action worker end to end on the database: drift events -> one incident -> rm_update
request -> (enough fresh labels) -> train, gate, promote -> re-reference -> one retraining
request. Real AlpacaEval traffic and judge labels as reviewer ratings; a real (small) model."""

from __future__ import annotations

import bisect
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from monitor.actions.worker import ActionWorker
from monitor.config import load_settings
from monitor.metrics import Metrics
from monitor.review.auth import create_user
from monitor.reward.data import load_alpaca_eval
from monitor.reward.registry import Registry
from monitor.store import Store
from monitor.store import requests as rq
from monitor.store import tables as t

CHANGE = 10_000.0


def _rater(by_instr: dict[str, list[dict[str, Any]]]) -> Any:
    """1-7 by the percentile of the judge's preference over the whole corpus (most outputs lose
    to GPT-4 Turbo, so raw probabilities would put nearly everything at 1)."""
    prefs = sorted(float(r["judge_pref"]) for rows in by_instr.values() for r in rows)
    return lambda p: 1 + min(6, int(7 * bisect.bisect_left(prefs, p) / len(prefs)))


def _fill(store: Store, n: int, first: int = 0) -> None:
    """n instructions answered by gpt-3.5 before the change and by alpaca-7b after, all rated
    (from the ``first`` such instruction on, by a reviewer of their own)."""
    by_instr = load_alpaca_eval()
    _rating = _rater(by_instr)
    user = create_user(store, f"rev{first}", "reviewer", "correct horse battery")
    now = time.time()
    eps, labels = [], []
    picked = skipped = 0
    for instr, rows in by_instr.items():
        models = {r["generator"]: r for r in rows}
        if "gpt-3.5-turbo-1106" not in models or "alpaca-7b" not in models:
            continue
        if skipped < first:
            skipped += 1
            continue
        at = first + picked
        for j, (gen, ts) in enumerate((("gpt-3.5-turbo-1106", 100.0 + at), ("alpaca-7b", CHANGE + at))):
            r = models[gen]
            eid = f"{'old' if j == 0 else 'new'}-{at}"
            eps.append(
                {
                    "episode_id": eid,
                    "stream": "chat",
                    "model": "policy",
                    "ts": ts,
                    "prompt": instr,
                    "response": r["output"],
                    "metadata": {},
                    "source": "test",
                    "position": eid,
                    "ingested_at": now,
                }
            )
            labels.append(
                {
                    "episode_id": eid,
                    "slot": 0,
                    "user_id": user.id,
                    "stream": "chat",
                    "skipped": False,
                    "rating": _rating(float(r["judge_pref"])),
                    "flags": [],
                    "critique": "",
                    "time_spent_ms": 1000,
                    "created_at": now,
                }
            )
        picked += 1
        if picked >= n:
            break
    with store.engine.begin() as conn:
        conn.execute(t.episodes.insert(), eps)
        conn.execute(t.labels.insert(), labels)


def _event(store: Store, signal: str, ts: float, eid: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            t.drift_events.insert().values(
                stream="chat",
                signal=signal,
                detector="page_hinkley",
                statistic=12.0,
                threshold=10.0,
                episode_id=eid,
                input_index=int(ts),
                event_ts=ts,
                created_at=time.time(),
            )
        )


def test_incident_update_promotion_and_one_retraining_request(
    tmp_path: Path, db_url: str, small_models: dict[str, Any]
) -> None:
    settings = load_settings(
        None,
        [
            "dev=true",
            f"database.url={db_url}",
            f"reward.models_dir={tmp_path / 'models'}",
            "reward.update.min_labels=100",
            "reward.update.margin=0.0",
            # From an untrained head, the trained candidate rightly loses the head's accidental
            # sensitivity to off-topic text: this test is about the flow, the rule has its own tests.
            "reward.update.sensitivity_pairs=0",
            "reward.update.train={finetune_layers: 0, max_length: 64, epochs: 3, val_fraction: 0.0}",
            "actions.incident_gap_s=600",
            "actions.incident_timeout_s=600",
        ],
    )
    store = Store(db_url)
    registry = Registry.for_settings(store, settings)
    v0 = registry.register(small_models["untrained"], data_window={}, metrics={})
    registry.promote(v0)
    metrics = Metrics()
    worker = ActionWorker(settings, store, metrics)

    # Two events on different signals, close together: one incident, one request.
    _event(store, "response_log_chars", CHANGE + 5, "new-5")
    _event(store, "distinct_token_ratio", CHANGE + 40, "new-40")
    worker.run_once()
    reqs = rq.listing(store, kind="rm_update")
    assert len(reqs) == 1 and reqs[0]["state"] == "pending"
    assert [e["signal"] for e in reqs[0]["payload"]["drift_events"]] == ["response_log_chars", "distinct_token_ratio"]
    assert rq.listing(store, kind="retrain") == []  # waits for the update: it carries its outcome

    # Not enough fresh labels yet: the request waits.
    _fill(store, 200)
    settings_wait = settings.model_copy(deep=True)
    settings_wait.reward.update.min_labels = 10_000
    ActionWorker(settings_wait, store, metrics).run_once()
    waiting = rq.get(store, reqs[0]["id"])
    assert waiting is not None and waiting["state"] == "pending"

    worker.run_once()
    req = rq.get(store, reqs[0]["id"])
    assert req is not None and req["state"] == "done", req
    result = req["result"]
    assert result["parent"] == v0 and result["promoted"] is True
    assert result["gate"]["candidate_new"] > result["gate"]["active_new"]
    active = registry.active()
    assert active is not None and active[0] == result["version"]
    # Re-reference of the stream after the promotion, audited.
    with store.engine.connect() as conn:
        audit = conn.execute(sa.select(t.drift_audit)).all()
    assert [(a.stream, a.action, a.actor) for a in audit] == [("chat", "rereference", "rm-update")]
    # Exactly one retraining request, carrying the incident, the label window and the new version.
    retrain = rq.listing(store, kind="retrain")
    assert len(retrain) == 1
    p = retrain[0]["payload"]
    assert p["rm_version"] == result["version"] and p["label_window"]["since"] == CHANGE + 5
    assert len(p["drift_events"]) == 2 and retrain[0]["state"] == "sent"  # the log sink by default

    # A restarted worker (fresh instance) and a late event of the same incident: no new request.
    _event(store, "prompt_log_chars", CHANGE + 300, "new-300")
    ActionWorker(settings, store, metrics).run_once()
    assert len(rq.listing(store, kind="rm_update")) == 1 and len(rq.listing(store, kind="retrain")) == 1
    # An event long after: a new incident.
    _event(store, "refusal", CHANGE + 5000, "new-5000")
    worker.run_once()
    assert len(rq.listing(store, kind="rm_update")) == 2
    assert metrics.registry.get_sample_value("oversight_rm_updates_total", {"outcome": "promoted"}) == 1
    # The quality gauge is published (no samples table rows here, so no HT estimate: the
    # estimates need inclusion probabilities, which test_oversight covers).
    assert worker.oversight is not None


def test_an_undecided_update_waits_for_the_labels_it_asked_for_and_is_gated_again(
    tmp_path: Path, db_url: str, small_models: dict[str, Any]
) -> None:
    """The gate cannot decide on the first labels: the request goes back to pending with a higher
    label target (the gate's needs_more, at least min_labels more, at most as many again), the
    retraining request goes out with that verdict, nothing runs before the labels come, and then
    a candidate trained on every label is gated again; the last round's verdict stands."""
    base = [
        "dev=true",
        f"database.url={db_url}",
        f"reward.models_dir={tmp_path / 'models'}",
        "reward.update.min_labels=40",
        "reward.update.margin=0.0",
        "reward.update.sensitivity_pairs=0",
        "reward.update.train={finetune_layers: 0, max_length: 64, epochs: 3, val_fraction: 0.0}",
        "actions.incident_gap_s=600",
        "actions.incident_timeout_s=600",
    ]
    # Too few held-out pairs ever to promote: every round is undecided.
    undecided = load_settings(None, [*base, "reward.update.min_gate_pairs=100000"])
    store = Store(db_url)
    registry = Registry.for_settings(store, undecided)
    v0 = registry.register(small_models["untrained"], data_window={}, metrics={})
    registry.promote(v0)
    metrics = Metrics()
    _event(store, "response_log_chars", CHANGE + 5, "new-5")
    _fill(store, 50)
    ActionWorker(undecided, store, metrics).run_once()
    (req,) = rq.listing(store, kind="rm_update")
    assert req["state"] == "pending", req
    first = req["result"]
    assert first["gate"]["verdict"] == "undecided" and first["promoted"] is False
    have = 45  # new episodes from CHANGE + 5 on
    needs = first["gate"]["needs_more"]
    wanted = min(max(needs["labels"] if needs else 0, 40), have)
    assert req["payload"]["round"] == 1 and req["payload"]["min_labels"] == have + wanted
    # The incident's retraining request carries this verdict now, not after the last round.
    (retrain,) = rq.listing(store, kind="retrain")
    assert retrain["payload"]["rm_update"]["version"] == first["version"]
    assert (registry.get(first["version"]) or {}).get("status") == "undecided"

    # Until the labels come, nothing trains again.
    ActionWorker(undecided, store, metrics).run_once()
    assert [v["version"] for v in registry.versions()] == [v0, first["version"]]

    # The labels come; this time the gate may decide on the pairs it has.
    _fill(store, have + wanted, first=50)
    decides = load_settings(None, [*base, "reward.update.min_gate_pairs=1"])
    ActionWorker(decides, store, metrics).run_once()
    done = rq.get(store, req["id"])
    assert done is not None and done["state"] == "done", done
    second = done["result"]
    assert second["version"] not in (v0, first["version"])
    assert second["pairs"]["train_new"] > first["pairs"]["train_new"]  # trained on every label then
    # The first round's gain (about +0.28 over the untrained head) was clear; now it may promote.
    assert second["gate"]["verdict"] == "promote" and second["promoted"] is True, second["gate"]["rule"]
    assert (registry.active() or ("",))[0] == second["version"]
    assert len(rq.listing(store, kind="retrain")) == 1  # one per incident


def test_the_last_undecided_round_stands(tmp_path: Path, db_url: str, small_models: dict[str, Any]) -> None:
    """``regates=0``: the first undecided verdict is final; after a re-gate whose labels never
    came within ``max_wait_s``, the request is done with that round's verdict, not failed."""
    base = [
        "dev=true",
        f"database.url={db_url}",
        f"reward.models_dir={tmp_path / 'models'}",
        "reward.update.min_labels=40",
        "reward.update.min_gate_pairs=100000",
        "reward.update.sensitivity_pairs=0",
        "reward.update.train={finetune_layers: 0, max_length: 64, epochs: 1, val_fraction: 0.0}",
        "actions.incident_gap_s=600",
        "actions.incident_timeout_s=600",
    ]
    store = Store(db_url)
    s0 = load_settings(None, [*base, "reward.update.regates=0"])
    registry = Registry.for_settings(store, s0)
    registry.promote(registry.register(small_models["untrained"], data_window={}, metrics={}))
    _event(store, "response_log_chars", CHANGE + 5, "new-5")
    _fill(store, 50)
    ActionWorker(s0, store, Metrics()).run_once()
    (req,) = rq.listing(store, kind="rm_update")
    assert req["state"] == "done" and req["result"]["gate"]["verdict"] == "undecided"

    # Another incident, gated again once, whose labels never come: done with its verdict.
    _event(store, "refusal", CHANGE + 50_000, "late")
    s1 = load_settings(None, [*base, "reward.update.regates=1"])
    with store.engine.begin() as conn:  # the late incident's fresh labels: the new episodes rated again
        conn.execute(sa.update(t.episodes).where(t.episodes.c.episode_id.like("new-%")).values(ts=CHANGE + 60_000))
    ActionWorker(s1, store, Metrics()).run_once()
    late = next(r for r in rq.listing(store, kind="rm_update") if r["id"] != req["id"])
    assert late["state"] == "pending" and late["payload"]["round"] == 1
    expired = s1.model_copy(deep=True)
    expired.reward.update.max_wait_s = 1e-3
    time.sleep(0.01)
    ActionWorker(expired, store, Metrics()).run_once()
    final = rq.get(store, late["id"])
    assert final is not None and final["state"] == "done" and final["last_error"] is None
    assert final["result"]["gate"]["verdict"] == "undecided"
