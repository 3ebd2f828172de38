"""Quality estimate, reward-model/human agreement and the reward-hacking alarm from the database."""

from __future__ import annotations

import random
import time
from typing import Any

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


def _everything(store: Store, version: str, window: int) -> dict[str, dict[str, Any]]:
    """The agreement, the alarm and the quality estimate computed the obvious way: every score of
    the version and every label read, sorted by (time, id), windows cut in Python, the quality
    estimate the list-based one of ``estimates`` (per item, with adjudicated items' finals)."""
    import math
    import statistics

    import sqlalchemy as sa

    from monitor.quality.estimates import estimates
    from monitor.quality.labels import label_rows

    sc, s = t.rm_scores, t.samples
    q = sa.select(sc.c.episode_id, sc.c.stream, sc.c.score, sc.c.ts, s.c.inclusion_probability).join(
        s, sa.and_(s.c.episode_id == sc.c.episode_id, s.c.channel == "rm")
    )
    with store.engine.connect() as conn:
        rows = conn.execute(q.where(sc.c.version == version)).all()
    ratings: dict[str, list[float]] = {}
    human: dict[str, tuple[str, float, float]] = {}  # episode -> (stream, ts, p)
    labels = label_rows(store)
    for r in labels:
        if not r.skipped and r.rating is not None:
            ratings.setdefault(r.episode_id, []).append(float(r.rating))
            human[r.episode_id] = (r.stream, float(r.ts), float(r.inclusion_probability))

    def hajek(eids: list[str]) -> tuple[float, float] | None:
        if len(eids) < 2:
            return None
        w = [1 / human[e][2] for e in eids]
        y = [statistics.fmean(ratings[e]) for e in eids]
        m = sum(wi * yi for wi, yi in zip(w, y, strict=True)) / sum(w)
        return m, math.sqrt(sum((wi * (yi - m)) ** 2 for wi, yi in zip(w, y, strict=True))) / sum(w)

    out: dict[str, dict[str, Any]] = {est["stream"]: {"quality": est["rating"]} for est in estimates(store, [], labels)}
    for stream in {r.stream for r in rows}:
        items = sorted((r for r in rows if r.stream == stream), key=lambda r: (r.ts, r.episode_id))
        labelled = sorted(
            (
                (human[r.episode_id][1], statistics.fmean(ratings[r.episode_id]), r.score)
                for r in items
                if r.episode_id in ratings
            ),
            key=lambda x: x[0],
        )[-window:]
        pairs = [(a, b) for i, a in enumerate(labelled) for b in labelled[i + 1 :] if a[1] != b[1]]
        good = sum(1.0 if (a[1] - b[1]) * (a[2] - b[2]) > 0 else 0.5 if a[2] == b[2] else 0.0 for a, b in pairs)
        res = out.setdefault(stream, {})
        res["agreement"] = {"value": good / len(pairs) if pairs else None, "pairs": len(pairs), "items": len(labelled)}
        if len(items) >= 2 * window:

            def mean_se(part: list[Any]) -> tuple[float, float]:
                w = [1 / r.inclusion_probability for r in part]
                m = sum(wi * r.score for wi, r in zip(w, part, strict=True)) / sum(w)
                return m, math.sqrt(sum((wi * (r.score - m)) ** 2 for wi, r in zip(w, part, strict=True))) / sum(w)

            def span(part: list[Any], stream: str = stream) -> tuple[float, float] | None:
                lo, hi = part[0].ts, part[-1].ts
                return hajek([e for e, (st, ts, _) in human.items() if st == stream and lo <= ts <= hi])

            (mp, sp), (mr, sr) = mean_se(items[:window]), mean_se(items[-window:])
            res["rm_rise"] = mr - mp
            res["rm_up"] = mr - mp > 2 * math.hypot(sp, sr)
            hp, hr = span(items[:window]), span(items[-window:])
            res["human_rise"] = None if hp is None or hr is None else hr[0] - hp[0]
            human_up = hp is not None and hr is not None and hr[0] - hp[0] > 2 * math.hypot(hp[1], hr[1])
            res["suspected"] = res["rm_up"] and not human_up
    return out


@pytest.mark.parametrize(("seed", "times"), [(1, 300), (2, 20)])
def test_the_windows_read_are_those_of_every_score(
    db_url: str, seed: int, times: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compute reads per stream only the first and last windows, the labelled episodes' scores
    and the database's sums of the ratings (before, every score of the version and every label,
    a second per 100,000 scores and 3.6 s per 200,000 labels every few seconds). On a store with
    another version's scores interleaved, times tied across the windows' edges, scores without an
    rm sample, labels in several streams from several reviewers, skips, inclusion probabilities
    from 1% to 100% and items adjudicated once or twice, it gives what reading everything gives.
    With 20 distinct times every window's edge cuts through episodes of the same time."""
    rng = random.Random(seed)
    store = Store(db_url)
    users = [create_user(store, f"rev{k}", "reviewer", "correct horse battery").id for k in range(3)]
    admin = create_user(store, "adm", "admin", "correct horse battery").id
    eps, samples, scores, labels, finals = [], [], [], [], []
    for i in range(900):
        eid, stream, ts = f"e{rng.randrange(10**6):06d}-{i}", rng.choice(["a", "b", "c"]), float(rng.randrange(times))
        eps.append(
            {"episode_id": eid, "stream": stream, "model": "m", "ts": ts, "prompt": "p", "response": "r"}
            | {"metadata": {}, "source": "t", "position": eid, "ingested_at": 0.0}
        )
        if i % 17:  # a few scores without an rm sample: they never count
            samples.append(
                {"episode_id": eid, "channel": "rm", "stream": stream, "ts": ts, "created_at": 0.0}
                | {"inclusion_probability": rng.choice([0.1, 0.5, 1.0])}
            )
        for version in ("old", "new") if i % 3 else ("old",):
            score = rng.gauss(ts / times if version == "new" else 0.0, 1.0)
            scores.append(
                {"episode_id": eid, "version": version, "stream": stream, "score": score, "ts": ts, "created_at": 0.0}
            )
        if i % 4 == 0 or i % 5 == 0:
            samples.append(
                {"episode_id": eid, "channel": "human", "stream": stream, "ts": ts, "created_at": 0.0}
                | {"inclusion_probability": rng.choice([0.01, 0.1, 0.5, 1.0])}
            )
            for slot, user in enumerate(rng.sample(users, rng.choice([1, 1, 2, 3]))):
                skipped = rng.random() < 0.15
                labels.append(
                    {"episode_id": eid, "slot": slot, "user_id": user, "stream": stream, "skipped": skipped}
                    | {"rating": None if skipped else rng.randint(1, 7), "flags": [], "critique": ""}
                    | {"time_spent_ms": 1, "created_at": 0.0}
                )
            for _ in range(rng.choice([0, 0, 0, 1, 2])):
                finals.append(
                    {"episode_id": eid, "stream": stream, "user_id": admin, "rating": rng.randint(1, 7), "flags": []}
                    | {"note": "n", "label_ids": [], "reasons": ["rating"], "created_at": 0.0}
                )
    with store.engine.begin() as conn:
        conn.execute(t.episodes.insert(), eps)
        conn.execute(t.samples.insert(), samples)
        conn.execute(t.rm_scores.insert(), scores)
        conn.execute(t.labels.insert(), labels)
        conn.execute(t.adjudications.insert(), finals)
    want = _everything(store, "new", 40)

    def every_label(*_: Any) -> None:
        raise AssertionError("the gauges read every label (280 MB per 200,000 every round)")

    monkeypatch.setattr(oversight, "label_rows", every_label)
    assert {s for s, r in want.items() if "quality" in r} == {"a", "b", "c"}
    for stream, w in want.items():
        got = oversight.compute(store, "new", window=40)[stream]
        texts = {k for k, v in w["quality"].items() if isinstance(v, str)}
        assert {k: got["quality"][k] for k in texts} == {k: w["quality"][k] for k in texts}
        numbers = {k: v for k, v in got["quality"].items() if k not in texts}
        assert numbers == pytest.approx({k: v for k, v in w["quality"].items() if k not in texts}, rel=1e-9), stream
        assert got["quality"]["n_sampled"] == w["quality"]["n_sampled"] > 30
        assert got["agreement"]["items"] == w["agreement"]["items"] > 0
    assert oversight.compute(store, None).keys() == {"a", "b", "c"}
    for window in (7, 40, 200):
        got = oversight.compute(store, "new", window=window)
        want = _everything(store, "new", window)  # its own label_rows, not the one patched out
        assert {s for s, r in got.items() if "agreement" in r} == set(want)
        for stream, w in want.items():
            assert got[stream]["agreement"] == pytest.approx(w["agreement"]), (window, stream)
            hacking = got[stream]["reward_hacking"]
            if "rm_rise" in w:
                assert hacking["rm_rise"] == pytest.approx(w["rm_rise"]), (window, stream)
                assert hacking["suspected"] == w["suspected"], (window, stream)
                assert hacking["human_rise"] == pytest.approx(w["human_rise"]), (window, stream)
            else:
                assert hacking["reason"] == "not enough scored episodes"


def test_the_chart_of_a_stream_groups_only_its_own_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The admin chart draws up to 10 streams from one read of every label. Each stream's series
    grouped every stream's labels into items, so the page took 15 s at 200,000 labels; now each
    groups its own, and the series are the same."""
    from monitor.quality import estimates as quality_estimates
    from monitor.quality.labels import label_rows, per_item

    store = Store("sqlite://")
    user = create_user(store, "rev", "reviewer", "correct horse battery").id
    rows_in = []
    for i in range(90):
        stream = "abc"[i % 3]
        rows_in.append((f"e{i}", stream, float(i * 1000), 1 + i % 7))
    with store.engine.begin() as conn:
        conn.execute(
            t.episodes.insert(),
            [
                {"episode_id": e, "stream": s, "model": "m", "ts": ts, "prompt": "p", "response": "r"}
                | {"metadata": {}, "source": "t", "position": e, "ingested_at": 0.0}
                for e, s, ts, _ in rows_in
            ],
        )
        conn.execute(
            t.samples.insert(),
            [
                {"episode_id": e, "channel": "human", "stream": s, "ts": ts, "inclusion_probability": 0.5}
                | {"created_at": 0.0}
                for e, s, ts, _ in rows_in
            ],
        )
        conn.execute(
            t.labels.insert(),
            [
                {"episode_id": e, "slot": 0, "user_id": user, "stream": s, "skipped": False, "rating": r}
                | {"flags": [], "critique": "", "time_spent_ms": 1, "created_at": 0.0}
                for e, s, _, r in rows_in
            ],
        )
    rows = label_rows(store)
    alone = {s: quality_estimates.estimate_series(store, s, 10_000) for s in "abc"}
    grouped: list[int] = []

    def counting(rows: list[Any], final: Any = None) -> dict[str, dict[str, Any]]:
        grouped.append(len(rows))
        return per_item(rows, final)

    monkeypatch.setattr(quality_estimates, "per_item", counting)
    together = {s: quality_estimates.estimate_series(store, s, 10_000, rows) for s in "abc"}
    assert together == alone and sum(b["n"] for b in together["a"]) == 30
    assert grouped == [30, 30, 30]
