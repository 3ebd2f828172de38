"""Quality estimate, reward-model/human agreement and the reward-hacking alarm from the database."""

from __future__ import annotations

import random
import time

import pytest
from prometheus_client import CollectorRegistry

from monitor.metrics import Metrics
from monitor.quality import oversight
from monitor.review.auth import create_user
from monitor.store import Store
from monitor.store import tables as t


def _fill(store: Store, human_rises: bool, seed: int = 0) -> None:
    """400 rm-scored episodes; the second half scores ~1 higher. Every 2nd episode is rated."""
    rng = random.Random(seed)
    user = create_user(store, "rev", "reviewer", "correct horse battery")
    now = time.time()
    eps, samples, scores, labels = [], [], [], []
    for i in range(400):
        eid = f"e{i}"
        late = i >= 200
        score = rng.gauss(1.0 if late else 0.0, 0.5)
        eps.append(
            {
                "episode_id": eid,
                "stream": "chat",
                "model": "m",
                "ts": float(i),
                "prompt": "p",
                "response": "r",
                "metadata": {},
                "source": "t",
                "position": eid,
                "ingested_at": now,
            }
        )
        samples.append(
            {
                "episode_id": eid,
                "channel": "rm",
                "stream": "chat",
                "ts": float(i),
                "inclusion_probability": 0.5,
                "created_at": now,
            }
        )
        scores.append(
            {"episode_id": eid, "version": "rm-a", "stream": "chat", "score": score, "ts": float(i), "created_at": now}
        )
        if i % 2 == 0:
            samples.append(
                {
                    "episode_id": eid,
                    "channel": "human",
                    "stream": "chat",
                    "ts": float(i),
                    "inclusion_probability": 0.25,
                    "created_at": now,
                }
            )
            # Reviewers follow the score within each half; across halves only if human_rises.
            base = 4.0 + (1.5 if (late and human_rises) else 0.0)
            rating = max(1, min(7, round(base + 1.5 * (score - (1.0 if late else 0.0)))))
            labels.append(
                {
                    "episode_id": eid,
                    "slot": 0,
                    "user_id": user.id,
                    "stream": "chat",
                    "skipped": False,
                    "rating": rating,
                    "flags": [],
                    "critique": "",
                    "time_spent_ms": 1,
                    "created_at": now,
                }
            )
    with store.engine.begin() as conn:
        conn.execute(t.episodes.insert(), eps)
        conn.execute(t.samples.insert(), samples)
        conn.execute(t.rm_scores.insert(), scores)
        conn.execute(t.labels.insert(), labels)


@pytest.mark.parametrize("human_rises", [False, True])
def test_reward_hacking_alarm_and_gauges(db_url: str, human_rises: bool) -> None:
    store = Store(db_url)
    _fill(store, human_rises)
    res = oversight.compute(store, "rm-a", window=200)["chat"]
    assert res["reward_hacking"]["suspected"] is (not human_rises), res["reward_hacking"]
    assert res["reward_hacking"]["rm_rise"] > 0.8
    # Agreement: within the last 200 labelled items reviewers follow the score.
    assert res["agreement"]["value"] > 0.75 and res["agreement"]["items"] == 200
    q = res["quality"]
    assert q["ci_low"] < q["mean"] < q["ci_high"]
    m = Metrics(CollectorRegistry())
    oversight.publish(m, {"chat": res})
    get = m.registry.get_sample_value
    assert get("oversight_reward_hacking_suspected", {"stream": "chat"}) == (0.0 if human_rises else 1.0)
    assert get("oversight_quality_estimate", {"stream": "chat", "bound": "estimate"}) == pytest.approx(q["mean"])
    assert get("oversight_rm_human_agreement", {"stream": "chat"}) == pytest.approx(res["agreement"]["value"])


def test_other_version_or_no_scores() -> None:
    store = Store("sqlite://")
    _fill(store, False)
    res = oversight.compute(store, "rm-other", window=200)
    assert "agreement" not in res.get("chat", {}) and "quality" in res["chat"]
    assert oversight.compute(store, None)["chat"].keys() == {"quality"}
