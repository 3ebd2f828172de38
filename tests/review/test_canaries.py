"""Canaries in the live queue (monitor/review/canary.py), reviewer quality and the assistance
report (monitor/quality/canaries.py), and the simulation that checks the measurement end to end."""

from __future__ import annotations

import math
import re
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from review_helpers import API, Env, TestClient, episode_row, label_body, lease, make_env, seed

from monitor.assist import condition_of
from monitor.quality import canaries as qc
from monitor.quality import estimates as quality_estimates
from monitor.quality import labels as quality_labels
from monitor.review import canary, export
from monitor.reward.update import rated_records
from monitor.store import Store
from monitor.store import tables as t

RESPONSE = (
    "The primary colours are:\n\n1. Red\n2. Yellow\n3. Blue\n\n"
    "They were named in {n} by Goethe in Germany. They mix into all others."
)


def _id(i: int, random_ids: bool = False) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"e{i}")) if random_ids else f"e{i:05d}"


def _seed(env: Env, n: int, random_ids: bool = False) -> None:
    eps = [
        episode_row(
            _id(i, random_ids), prompt=f"List three primary colours ({i}).", response=RESPONSE.format(n=1700 + i)
        )
        for i in range(n)
    ]
    seed(env.store, eps)


def _work(env: Env, c: TestClient, n: int, rating: int = 4, **kw: Any) -> list[dict[str, Any]]:
    items = []
    for _ in range(n):
        r = c.post(f"{API}/queue/claim")
        if r.status_code == 204:
            break
        item = r.json()
        items.append(item)
        assert c.post(f"{API}/items/label", json=label_body(item, rating=rating, **kw)).status_code == 200
    return items


def _canary_ids(store: Store) -> set[str]:
    with store.engine.connect() as conn:
        return set(conn.execute(sa.select(t.canaries.c.id)).scalars())


def _count(store: Store, table: sa.Table, user_id: int | None = None) -> int:
    q = sa.select(sa.func.count()).select_from(table)
    if user_id is not None:
        q = q.where(table.c.user_id == user_id)
    with store.engine.connect() as conn:
        return int(conn.execute(q).scalar_one())


def test_canaries_are_mixed_in_blind_and_labelled_apart(make_review_env: Any) -> None:
    env = make_review_env("review.canaries.share=0.3", "review.canaries.seed=3")
    _seed(env, 60)
    env.user("ann")
    env.user("bob")
    _work(env, env.client("ann"), 15, rating=4)
    seen = _work(env, env.client("bob"), 30, rating=2)
    ids = _canary_ids(env.store)
    bob_canaries = [i for i in seen if i["episode_id"] in ids]
    real = [i for i in seen if i["episode_id"] not in ids]
    assert bob_canaries and real
    # Same API shape; ids in the stream's shape (e + five digits), never an episode's id.
    assert all(set(i) == set(real[0]) for i in seen)
    assert all(re.fullmatch(r"e\d{5}", i["episode_id"]) for i in seen)
    with env.store.engine.connect() as conn:
        episode_ids = set(conn.execute(sa.select(t.episodes.c.episode_id)).scalars())
        sources = dict(conn.execute(sa.select(t.canaries.c.id, t.canaries.c.episode_id)).all())
        label_ids = set(conn.execute(sa.select(t.labels.c.episode_id)).scalars())
        bob = env.users["bob"].id
        canary_labels = conn.execute(sa.select(t.canary_labels).where(t.canary_labels.c.user_id == bob)).all()
    assert not ids & episode_ids and not ids & label_ids
    assert all(sources[i["episode_id"]] != i["episode_id"] for i in bob_canaries)
    # A canary's prompt is its source's, never with the source's id; no canary source shows up as
    # a real item for the same reviewer.
    assert not {sources[i["episode_id"]] for i in bob_canaries} & {i["episode_id"] for i in real}
    assert len(canary_labels) == len(bob_canaries)
    perturbed = [
        i for i in bob_canaries if i["response"] != RESPONSE.format(n=1700 + int(sources[i["episode_id"]][1:]))
    ]
    with env.store.engine.connect() as conn:
        kinds = {r.presentation for r in conn.execute(sa.select(t.canaries.c.presentation))}
    assert kinds <= {"original", "perturbed"} and len(perturbed) <= len(bob_canaries)
    # Progress counts canaries like real items: no tell in today's count.
    p = env.client("bob").get(f"{API}/progress").json()
    assert p["labelled_today"] == len(seen)


def test_canaries_never_enter_estimates_training_exports_or_agreement(make_review_env: Any) -> None:
    env = make_review_env("review.canaries.share=0.4", "review.canaries.seed=5")
    _seed(env, 50)
    for name in ("ann", "bob", "cy"):
        env.user(name)
    _work(env, env.client("ann"), 15, rating=5)
    _work(env, env.client("bob"), 15, rating=5, flags=["harmful"])
    _work(env, env.client("cy"), 15, rating=5)
    assert _count(env.store, t.canary_labels) > 0
    flags = env.settings.review.flags

    def everything() -> Any:
        rows = quality_labels.label_rows(env.store)
        return (
            quality_estimates.estimates(env.store, flags),
            quality_labels.agreement(rows, flags),
            rated_records(env.store),
            list(export.iter_ratings(env.store)),
            list(export.iter_pairs(env.store)),
        )

    before = everything()
    with env.store.engine.begin() as conn:
        conn.execute(t.canary_labels.delete())
        conn.execute(t.canaries.delete())
    assert everything() == before
    # Disagreement with the reward model (drift signal rm_disagreement) reads labels only: no canary id there.
    with env.store.engine.connect() as conn:
        assert not set(conn.execute(sa.select(t.labels.c.episode_id)).scalars()) - {f"e{i:05d}" for i in range(50)}


def _until_canary(env: Env, c: TestClient) -> dict[str, Any]:
    for _ in range(40):
        item: dict[str, Any] = c.post(f"{API}/queue/claim").json()
        if item["episode_id"] in _canary_ids(env.store):
            return item
        assert c.post(f"{API}/items/label", json=label_body(item)).status_code == 200
    raise AssertionError("no canary in 40 claims")


def _bob_holds_a_canary(env: Env) -> tuple[TestClient, dict[str, Any]]:
    """40 items, ann labels 10 of them, then bob claims until he holds a canary (unlabelled)."""
    _seed(env, 40)
    env.user("ann")
    env.user("bob")
    _work(env, env.client("ann"), 10)
    c = env.client("bob")
    return c, _until_canary(env, c)


def test_release_undo_and_skip_work_on_canaries(make_review_env: Any) -> None:
    env = make_review_env("review.canaries.share=0.5", "review.canaries.seed=1", "review.undo_window_s=60")
    c, item = _bob_holds_a_canary(env)
    # Release: handed out again, under a new fence.
    assert c.post(f"{API}/items/release", json=lease(item)).status_code == 200
    again = c.post(f"{API}/queue/claim").json()
    assert again["episode_id"] == item["episode_id"] and again["fence"] > item["fence"]
    assert c.post(f"{API}/items/label", json=label_body(item)).status_code == 409  # the old lease
    assert c.post(f"{API}/items/label", json=label_body(again, rating=2)).status_code == 200
    bob = env.users["bob"].id
    assert _count(env.store, t.canary_labels, bob) == 1
    # Undo: the canary label is withdrawn and the canary leased back.
    r = c.post(f"{API}/items/undo")
    assert r.status_code == 200 and r.json()["episode_id"] == item["episode_id"]
    assert _count(env.store, t.canary_labels, bob) == 0
    back = c.post(f"{API}/queue/claim").json()
    assert back["episode_id"] == item["episode_id"] and back["fence"] == r.json()["fence"]
    # Skip: recorded as a skipped canary label; the canary is done, the next claim is another item.
    skip = {**lease(back), "reason": "unsure"}
    assert c.post(f"{API}/items/skip", json=skip).status_code == 200
    with env.store.engine.connect() as conn:
        row = conn.execute(sa.select(t.canary_labels).where(t.canary_labels.c.user_id == bob)).one()
    assert row.skipped and row.skip_reason == "unsure"
    assert c.post(f"{API}/queue/claim").json()["episode_id"] != item["episode_id"]


def test_a_real_episode_that_later_takes_a_canarys_id_wins(make_review_env: Any) -> None:
    """Sequential ids: a canary's id was free when it was made, and the stream then ingests a real
    episode of that very id. The id names the real item from then on: the reviewer labels it (it
    was refused with 409 on every try, holding the reviewer on it forever), and the canary, held
    or labelled, is left as it was."""
    env = make_review_env("review.canaries.share=0.5", "review.canaries.seed=1")
    c, held = _bob_holds_a_canary(env)
    cid = held["episode_id"]
    # The real episode of that id arrives with its review task.
    seed(env.store, [episode_row(cid, prompt="A real question.", response="A real answer.")], created_at=0.0)
    for _ in range(80):  # bob works on; the real item comes up in its turn and his label of it counts
        item = c.post(f"{API}/queue/claim").json()
        if item["episode_id"] == cid:
            break
        assert c.post(f"{API}/items/label", json=label_body(item)).status_code == 200
    assert item["episode_id"] == cid and item["response"] == "A real answer."
    assert c.post(f"{API}/items/label", json=label_body(item, rating=5)).status_code == 200
    with env.store.engine.connect() as conn:
        real = conn.execute(sa.select(t.labels).where(t.labels.c.episode_id == cid)).one()
        left = conn.execute(sa.select(t.canaries.c.status).where(t.canaries.c.id == cid)).scalar_one()
    assert real.rating == 5
    assert left == "claimed"  # abandoned unlabelled, never served again
    nxt = c.post(f"{API}/queue/claim")
    assert nxt.status_code == 204 or nxt.json()["episode_id"] != cid


def test_assist_condition_is_recorded_with_every_label(make_review_env: Any) -> None:
    env = make_review_env(
        "review.canaries.share=0.4",
        "review.assist.enabled=true",
        "review.assist.name=trial",
        'review.assist.conditions={"none": [], "hints": ["rm_score"]}',
    )
    _seed(env, 30)
    env.user("ann")
    env.user("bob")
    _work(env, env.client("ann"), 10)
    _work(env, env.client("bob"), 15)
    cfg = env.settings.review.assist
    with env.store.engine.connect() as conn:
        real = conn.execute(sa.select(t.labels)).all()
        fake = conn.execute(sa.select(t.canary_labels)).all()
    assert real and fake
    for r in real:
        assert r.assist_experiment == "trial"
        assert r.assist_condition == condition_of(cfg, r.user_id, r.episode_id, r.slot)
    for r in fake:
        assert r.assist_experiment == "trial"
        assert r.assist_condition == condition_of(cfg, r.user_id, r.canary_id, 0)


def test_no_experiment_records_null(make_review_env: Any) -> None:
    env = make_review_env()
    _seed(env, 3)
    env.user("ann")
    _work(env, env.client("ann"), 3)
    with env.store.engine.connect() as conn:
        rows = conn.execute(sa.select(t.labels.c.assist_experiment, t.labels.c.assist_condition)).all()
    assert rows and all(r == (None, None) for r in rows)
    assert _count(env.store, t.canaries) == 0  # share 0: no canaries at all


def test_shaped_ids() -> None:
    key = b"k" * 32
    u = canary.shaped_id(["0b6a3c1e-9f2d-4c8b-a1e2-3f4a5b6c7d8e"], key, "x")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", u)
    s = canary.shaped_id(["chat-000123", "chat-004567", "chat-120003"], key, "y")
    assert s.startswith("chat-") and re.fullmatch(r"chat-\d{6}", s)
    assert canary.shaped_id(["chat-000123"], key, "y") == canary.shaped_id(["chat-000123"], key, "y")


def test_intervals() -> None:
    lo, hi = qc.wilson(8, 10) or (0.0, 0.0)
    assert (round(lo, 3), round(hi, 3)) == (0.49, 0.943)
    assert qc.wilson(0, 0) is None
    d = qc.newcombe(56, 70, 48, 80)  # Newcombe (1998), example (a): 0.0524 to 0.3339
    assert d is not None and (round(d[0], 4), round(d[1], 4)) == (0.0524, 0.3339)
    m = qc.mean_ci([1.0, 2.0, 3.0])
    assert m["mean"] == 2.0 and m["ci"] is not None and m["ci"][0] < 2.0 < m["ci"][1]
    # t with 2 degrees of freedom (4.303), not z (1.96): 2 +/- 4.303 * 1 / sqrt(3).
    assert m["ci"] == pytest.approx((2 - 2.4841, 2 + 2.4841), abs=1e-4)


def _direct(env: Env, user: str, cid: str, episode: str, kind: str, presentation: str, **label: Any) -> None:
    with env.store.engine.begin() as conn:
        conn.execute(
            t.canaries.insert().values(
                id=cid,
                user_id=env.users[user].id,
                episode_id=episode,
                stream="s",
                kind=kind,
                presentation=presentation,
                perturbed="x",
                detail={},
                alternative_first=False,
                shown_ts=0.0,
                seed=0,
                status="done",
                fence=1,
                created_at=1.0,
            )
        )
        conn.execute(
            t.canary_labels.insert().values(
                canary_id=cid,
                user_id=env.users[user].id,
                episode_id=episode,
                stream="s",
                kind=kind,
                presentation=presentation,
                skipped=False,
                critique="",
                time_spent_ms=label.pop("ms", 1000),
                created_at=label.pop("at", time.time()),
                flags=label.pop("flags", []),
                **label,
            )
        )


def test_detection_estimator(make_review_env: Any) -> None:
    env = make_review_env()
    _seed(env, 3)
    env.user("ann")
    env.user("bob")
    # e00000's original: rated 5 (ann's real label); e00001 has no human rating.
    with env.store.engine.begin() as conn:
        conn.execute(
            t.labels.insert().values(
                episode_id="e00000", slot=0, user_id=env.users["ann"].id, stream="s", skipped=False,
                rating=5, flags=[], critique="", time_spent_ms=1, created_at=1.0,
            )
        )  # fmt: skip
    # bob has 2 originals, fewer than qc.MIN_BASELINE: on single responses only a flag counts.
    _direct(env, "bob", "c1", "e00000", "truncate", "perturbed", rating=4)  # below the reference: the rule fires
    _direct(env, "bob", "c2", "e00000", "drop_item", "perturbed", rating=5)  # not below, no flag: missed
    _direct(env, "bob", "c3", "e00001", "truncate", "perturbed", rating=2)  # no reference, no flag: missed
    _direct(env, "bob", "c4", "e00001", "truncate", "perturbed", rating=6, flags=["harmful"])  # flagged
    _direct(env, "bob", "c5", "e00002", "truncate", "pair", rating=4, preference="response")  # original preferred
    _direct(env, "bob", "c6", "e00002", "drop_item", "pair", rating=4, preference="tie")
    _direct(env, "bob", "c7", "e00002", "truncate", "original", rating=4, flags=["harmful"], ms=3000)
    _direct(env, "bob", "c8", "e00002", "truncate", "original", rating=4, ms=5000)
    (bob,) = qc.reviewer_quality(env.store, level=0.5)
    kinds = {k["kind"]: k for k in bob["kinds"]}
    trunc, drop = kinds["truncate"]["detection"], kinds["drop_item"]["detection"]
    # truncate: flags on 1 of 3 single responses, and a pair with the original preferred (1 - 0):
    # weighted by count, 3/4 * 1/3 + 1/4 * 1 = 0.5.
    assert (trunc["k"], trunc["n"], trunc["rule"], trunc["pairs"]) == (2, 4, "flag", 1)
    assert trunc["rate"] == pytest.approx(0.5) and trunc["raw"] == pytest.approx(0.5)
    assert (drop["k"], drop["n"], drop["rate"]) == (0, 2, 0.0)
    # The baseline: c7 flagged (fires); c8 has no reference but bob's own rating, so it does not.
    assert (trunc["baseline"]["k"], trunc["baseline"]["n"]) == (1, 2)
    assert (bob["false_flag"]["k"], bob["false_flag"]["n"]) == (1, 2)
    assert bob["n"] == 8 and bob["trend"][0]["n"] == 8
    # The metric: pre-zeroed for ann (no canaries), bob's rate per kind, and the low gauge.
    from prometheus_client import generate_latest

    text = generate_latest(env.app.state.review.metrics.registry).decode()
    assert 'oversight_reviewer_canaries{kind="truncate",reviewer="ann"} 0.0' in text
    assert 'oversight_reviewer_detection_rate{kind="truncate",reviewer="bob"} 0.5' in text
    assert 'oversight_reviewer_detection_low{kind="drop_item",reviewer="bob"} 0.0' in text


def test_quality_route_page_and_cli(make_review_env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    env = make_review_env("review.canaries.share=0.5")
    _seed(env, 30)
    env.user("ann")
    env.user("bob")
    env.user("root", role="admin")
    _work(env, env.client("ann"), 10)
    _work(env, env.client("bob"), 10, rating=1, flags=["incorrect"])
    admin = env.client("root")
    r = admin.get(f"{API}/admin/reviewers/quality")
    assert r.status_code == 200
    names = {row["reviewer"] for row in r.json()}
    assert "bob" in names
    assert env.client("bob").get(f"{API}/admin/reviewers/quality").status_code == 403
    rep = admin.get(f"{API}/admin/assist/report")
    assert rep.status_code == 200 and rep.json()["enabled"] is False
    page = env.session_client("root", "correct-horse-battery").get("/admin")
    assert page.status_code == 200 and "Reviewer quality" in page.text and "Assistance experiment" in page.text
    from monitor.cli.app import main

    rc = main(["reviewers", "quality", "--db", env.url])
    out = capsys.readouterr().out
    assert rc == 0 and '"reviewer": "bob"' in out


def test_migration_0011_up_and_down(db_url: str) -> None:
    from alembic import command
    from alembic.config import Config

    from monitor.store.store import MIGRATIONS_DIR

    store = Store(db_url)
    assert store.revision() == "0019"  # the head; 0019 to 0012 downgrade on the way too
    with store.engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0010")
    assert store.revision() == "0010"
    inspector = sa.inspect(store.engine)
    assert "canaries" not in inspector.get_table_names()
    assert "assist_condition" not in {c["name"] for c in inspector.get_columns("labels")}
    store.migrate("0011")
    inspector = sa.inspect(store.engine)
    assert {"canaries", "canary_labels"} <= set(inspector.get_table_names())
    assert {"assist_experiment", "assist_condition"} <= {c["name"] for c in inspector.get_columns("labels")}
    store.close()


@pytest.mark.slow  # about 45 s: a simulated reviewer pool end to end
def test_simulated_reviewers_recover_sensitivity_and_gain(sqlite_url: str) -> None:
    """End to end: simulated reviewers of known skill label a queue with canaries at a high share
    under a two-condition experiment; the report recovers each configured sensitivity (control)
    and sensitivity plus gain (assisted) within its interval, and the gain within the difference's.
    SQLite only: the measurement is the same on PostgreSQL, and this keeps it fast."""
    from monitor.simulate.loop import Truth, make_reviewers

    sens = {"drop_item": 0.3, "off_topic": 0.6}
    gain = 0.3
    env = make_env(
        sqlite_url,
        "review.canaries.share=0.5",
        "review.canaries.seed=11",
        'review.canaries.kinds=["drop_item", "off_topic"]',
        "review.assist.enabled=true",
        "review.assist.seed=2",
        'review.assist.conditions={"none": [], "hints": ["rm_score"]}',
        f"simulate.sensitivity={sens}".replace("'", '"'),
        f"simulate.assist_gain={gain}",
        "simulate.false_flag_rate=0.1",
        "simulate.noise=0",
        "simulate.reviewers=4",
    )
    # Random ids (UUIDs): a canary id in their shape is free at once (sequential ids of a small
    # stream leave few free ids of the same shape; see monitor/review/canary.py).
    n = 600
    _seed(env, n, random_ids=True)
    truth = Truth()
    for i in range(n):
        truth.episodes[_id(i, True)] = {
            "stream": "s",
            "ts": 0.0,
            "prompt": "",
            "response": "",
            "value": 0.01 * (i % 50),
        }
    client = env.client()
    reviewers = make_reviewers(env.settings, env.store, client)
    while any(r.step(math.inf, truth) for r in reviewers):
        pass
    rep = qc.experiment_report(env.store, "assist", ["none", "hints"])
    rows = {(r["condition"], r["kind"]): r for r in rep["rows"]}
    # The report's detection is corrected for each condition's rate on originals (the module's
    # docstring); the simulated reviewers answer a missed perturbation as they answer an original
    # (false flags at simulate.false_flag_rate included), so the corrected measure reads p itself.
    # Six checks at once: Bonferroni-adjusted intervals (z for 1 - 0.05/6 two-sided), so the test
    # as a whole has a 95% level; the report's own intervals are the plain 95% ones.
    z = 2.638
    for kind, s in sens.items():
        cells = {}
        for cond, p in (("none", s), ("hints", s + gain)):
            want = p
            d = rows[(cond, kind)]["detection"]
            assert d["n"] >= 30 and d["rule"] == "baseline", (cond, kind, d)
            found = qc.corrected(d["k"], d["n"], d["baseline"]["k"], d["baseline"]["n"], z)
            assert found is not None
            lo, hi = found[1]
            assert lo <= want <= hi, (cond, kind, d, want)
            assert d["ci"][1] - d["ci"][0] < 0.5  # informative, so the check can fail
            cells[cond] = found
        diff = rows[("hints", kind)]["detection_diff"]
        assert diff["ci"] is not None and diff["diff"] is not None
        lo, hi = qc.mover([(1.0, *cells["hints"]), (-1.0, *cells["none"])])[1]
        assert lo <= gain <= hi, (kind, diff)
    everyone = qc.reviewer_quality(env.store, level=0.5)
    env.close()
    ff = [r["false_flag"] for r in everyone]
    assert all(f["ci"][0] <= 0.1 <= f["ci"][1] for f in ff if f["n"] >= 20)


def test_a_refused_lease_answers_alike_for_canaries_real_items_and_unknown_ids(make_review_env: Any) -> None:
    """A refused release, label or skip (a slot or fence the caller does not hold) is one answer,
    whether the item is a canary, a real item or no item at all. A missing review task used to be a
    404 where a canary's wrong slot was a 409: one refused request told a reviewer which of their
    items were canaries, and whether any episode id of any stream had a review task."""
    env = make_review_env("review.canaries.share=0.5", "review.canaries.seed=1")
    c, canary_item = _bob_holds_a_canary(env)
    assert c.post(f"{API}/items/release", json=lease(canary_item)).status_code == 200
    real_item = c.post(f"{API}/queue/claim").json()
    while real_item["episode_id"] in _canary_ids(env.store):
        assert c.post(f"{API}/items/label", json=label_body(real_item)).status_code == 200
        real_item = c.post(f"{API}/queue/claim").json()
    unknown = {**real_item, "episode_id": "no-such-episode"}
    answers = set()
    for item in (canary_item, real_item, unknown):
        for slot in (1, 16):
            probe = {**lease(item), "slot": slot}
            for route, body in (
                ("release", probe),
                ("skip", {**probe, "reason": "unsure"}),
                ("label", {**label_body(item), "slot": slot}),
            ):
                r = c.post(f"{API}/items/{route}", json=body)
                answers.add((r.status_code, r.text))
    assert len(answers) == 1 and next(iter(answers))[0] == 409, answers
