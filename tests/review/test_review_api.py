"""The review JSON API on SQLite and PostgreSQL: leases and fences, blind review, overlap,
exports, sessions, and the refusal to start without a secret. Login throttling, blinding and
the other hardening: test_review_hardening.py."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from review_helpers import (
    API,
    PASSWORD,
    Env,
    FakeClock,
    episode_row,
    label_body,
    lease,
    make_settings,
    seed,
    seed_simple,
)

from monitor.config import ConfigError
from monitor.review import queue
from monitor.review.app import SESSION_COOKIE, create_app
from monitor.store import Store
from monitor.store import tables as t

MakeEnv = Callable[..., Env]
ITEM_KEYS = {
    "episode_id",
    "slot",
    "fence",
    "lease_expires_at",
    "stream",
    "model",
    "timestamp",
    "prompt",
    "response",
    "alternative",
    "alternative_first",
    "metadata",
    "invisible_characters",
    "messages",  # the conversation of a schema-v2 episode (null here); no label, no score
    "rate",
    "hints",  # assistance under an experiment (review.assist); empty without one, as here
}


def _labels(env: Env) -> list[tuple[str, int, int, bool]]:
    lb = t.labels
    with env.store.engine.connect() as conn:
        rows = conn.execute(sa.select(lb.c.episode_id, lb.c.slot, lb.c.user_id, lb.c.skipped).order_by(lb.c.id)).all()
    return [(r[0], int(r[1]), int(r[2]), bool(r[3])) for r in rows]


def _task(env: Env, eid: str, slot: int) -> tuple[str, int | None, int]:
    rt = t.review_tasks
    with env.store.engine.connect() as conn:
        r = conn.execute(
            sa.select(rt.c.status, rt.c.lease_user_id, rt.c.fence).where(rt.c.episode_id == eid, rt.c.slot == slot)
        ).one()
    return r[0], r[1], int(r[2])


# -- leases and fences ---------------------------------------------------------


def test_lease_expiry_returns_the_item_to_the_queue(make_review_env: MakeEnv) -> None:
    clock = FakeClock()
    env = make_review_env("review.lease_seconds=1", clock=clock)
    env.user("alice")
    env.user("bob")
    seed_simple(env.store, 1)
    a, b = env.client("alice"), env.client("bob")

    first = a.post(f"{API}/queue/claim")
    assert first.status_code == 200, first.text
    item = first.json()
    assert item["lease_expires_at"] == pytest.approx(clock.now + 1, abs=1e-6)
    assert b.post(f"{API}/queue/claim").status_code == 204  # leased: not handed out twice
    depth = a.get(f"{API}/queue").json()
    assert depth == [{"stream": "s", "waiting": 0, "leased": 1, "done": 0, "oldest_wait_s": None, "error": 0}]

    clock.advance(0.99)
    assert b.post(f"{API}/queue/claim").status_code == 204  # the lease still holds ...
    assert a.get(f"{API}/queue").json()[0]["leased"] == 1
    clock.advance(0.02)
    assert a.get(f"{API}/queue").json()[0]["waiting"] == 1  # ... then expires: waiting again
    second = b.post(f"{API}/queue/claim")
    assert second.status_code == 200, second.text
    again = second.json()
    assert (again["episode_id"], again["slot"]) == (item["episode_id"], item["slot"])
    assert again["fence"] == item["fence"] + 1
    # Alice's lease is gone: her submit and her release are refused; Bob's label is accepted.
    assert a.post(f"{API}/items/label", json=label_body(item)).status_code == 409
    assert a.post(f"{API}/items/release", json=lease(item)).status_code == 409
    assert b.post(f"{API}/items/label", json=label_body(again)).status_code == 200
    assert [(e, s, skipped) for e, s, _, skipped in _labels(env)] == [(item["episode_id"], 0, False)]


def test_lease_expiry_with_explicit_clock(make_review_env: MakeEnv) -> None:
    env = make_review_env()
    alice, bob = env.user("alice"), env.user("bob")
    seed_simple(env.store, 1)
    t0 = time.time()
    got = queue.claim(env.store, alice, 60, env.settings.sampling_key(), now=t0)
    assert got is not None
    assert queue.claim(env.store, bob, 60, env.settings.sampling_key(), now=t0 + 59) is None
    # Alice asking again within her lease gets the same lease back, not a new one.
    same = queue.claim(env.store, alice, 60, env.settings.sampling_key(), now=t0 + 30)
    assert same is not None and same.claim == got.claim
    taken = queue.claim(env.store, bob, 60, env.settings.sampling_key(), now=t0 + 61)
    assert taken is not None and taken.claim.episode_id == got.claim.episode_id
    assert taken.claim.fence == got.claim.fence + 1
    with pytest.raises(queue.QueueError) as ei:
        queue.submit(
            env.store, alice, got.claim.episode_id, 0, got.claim.fence, queue.LabelIn(rating=3), [], now=t0 + 62
        )
    assert ei.value.status == 409
    queue.submit(env.store, bob, taken.claim.episode_id, 0, taken.claim.fence, queue.LabelIn(rating=3), [], now=t0 + 62)


def test_submit_with_a_stale_fence_is_refused(make_review_env: MakeEnv) -> None:
    env = make_review_env()
    env.user("alice")
    seed_simple(env.store, 2)
    a = env.client("alice")
    item = a.post(f"{API}/queue/claim").json()
    assert item["fence"] >= 1
    for fence in (item["fence"] - 1, item["fence"] + 1):
        r = a.post(f"{API}/items/label", json=label_body(item, fence=fence))
        assert r.status_code == 409, r.text
        assert a.post(f"{API}/items/skip", json={**lease(item), "fence": fence, "reason": "x"}).status_code == 409
        assert a.post(f"{API}/items/release", json={**lease(item), "fence": fence}).status_code == 409
    # Release, claim again (fence moves on): the old fence is stale even though it is the same reviewer.
    assert a.post(f"{API}/items/release", json=lease(item)).status_code == 200
    assert a.post(f"{API}/items/label", json=label_body(item)).status_code == 409
    again = a.post(f"{API}/queue/claim").json()
    assert again["episode_id"] == item["episode_id"] and again["fence"] == item["fence"] + 1
    assert a.post(f"{API}/items/label", json=label_body(item)).status_code == 409
    assert a.post(f"{API}/items/label", json=label_body(again)).status_code == 200
    # A second submit under the used lease is refused too (no double label).
    assert a.post(f"{API}/items/label", json=label_body(again)).status_code == 409
    assert a.post(f"{API}/items/skip", json={**lease(again), "reason": "x"}).status_code == 409
    assert len(_labels(env)) == 1
    # An unknown item is a lease not held, as any other (a 404 would tell canaries apart: test_canaries).
    r = a.post(f"{API}/items/label", json=label_body({**again, "episode_id": "nope"}))
    assert r.status_code == 409


def test_a_second_label_by_the_same_reviewer_is_refused(make_review_env: MakeEnv) -> None:
    env = make_review_env()
    env.user("alice")
    seed(env.store, [episode_row("two")], slots=2)
    a = env.client("alice")
    item = a.post(f"{API}/queue/claim").json()
    assert a.post(f"{API}/items/label", json=label_body(item, rating=6)).status_code == 200
    # The other slot of the same episode is never handed to her ...
    assert a.post(f"{API}/queue/claim").status_code == 204
    # ... and she cannot label it without a lease, whatever fence she guesses.
    other = 1 - item["slot"]
    for fence in range(3):
        r = a.post(f"{API}/items/label", json={"episode_id": "two", "slot": other, "fence": fence, "rating": 6})
        assert r.status_code == 409, r.text
    assert _task(env, "two", other)[0] == "pending"
    assert len(_labels(env)) == 1


def test_a_skip_counts_as_seen_and_returns_the_slot_to_others(make_review_env: MakeEnv) -> None:
    env = make_review_env()
    env.user("alice")
    env.user("bob")
    seed_simple(env.store, 1)
    a, b = env.client("alice"), env.client("bob")
    item = a.post(f"{API}/queue/claim").json()
    assert a.post(f"{API}/items/skip", json={**lease(item), "reason": "  "}).status_code == 422
    assert a.post(f"{API}/items/skip", json={**lease(item), "reason": "not my language"}).status_code == 200
    assert a.post(f"{API}/queue/claim").status_code == 204  # she skipped it: not offered to her again
    got = b.post(f"{API}/queue/claim").json()
    assert got["episode_id"] == item["episode_id"] and got["fence"] == item["fence"] + 1
    assert b.post(f"{API}/items/label", json=label_body(got)).status_code == 200


def test_label_validation(make_review_env: MakeEnv) -> None:
    env = make_review_env()
    env.user("alice")
    seed_simple(env.store, 1)
    a = env.client("alice")
    item = a.post(f"{API}/queue/claim").json()
    bad: list[dict[str, Any]] = [
        {"rating": 0},
        {"rating": 8},
        {"flags": ["not_a_flag"]},
        {"flags": ["harmful", "harmful"]},
        {"preference": "response"},  # a single-response item has no preference
        {"critique": "a\x00b"},
        {"extra": 1},
    ]
    for kw in bad:
        r = a.post(f"{API}/items/label", json=label_body(item, **kw))
        assert r.status_code == 422, (kw, r.text)
    assert _task(env, item["episode_id"], item["slot"])[0] == "claimed"  # a refused label changes nothing
    assert a.post(f"{API}/items/label", json=label_body(item, flags=["harmful", "refusal"])).status_code == 200


# -- blind review and overlap ----------------------------------------------------


def test_blind_review_shows_no_other_label_and_no_score(make_review_env: MakeEnv) -> None:
    env = make_review_env("review.metadata_fields=[topic]")
    env.user("alice")
    env.user("bob")
    seed(env.store, [episode_row("blind", metadata={"alternative_response": "ALT", "topic": "x"})], slots=2)
    a, b = env.client("alice"), env.client("bob")
    first = a.post(f"{API}/queue/claim").json()
    assert set(first) == ITEM_KEYS and first["hints"] == []
    critique = "ALICE-SECRET-CRITIQUE"
    body = label_body(first, rating=7, flags=["harmful"], critique=critique, preference="response")
    assert a.post(f"{API}/items/label", json=body).status_code == 200

    r = b.post(f"{API}/queue/claim")
    assert r.status_code == 200
    second = r.json()
    assert second["episode_id"] == "blind" and second["slot"] != first["slot"]
    assert set(second) == ITEM_KEYS
    assert second["alternative"] == "ALT" and second["metadata"] == {"topic": "x"}
    text = r.text.lower()
    assert critique.lower() not in text and "alice" not in text
    for word in ("rating", "flags", "critique", "preference", "score", "label", "reward", "reviewer"):
        assert word not in text, word
    # The queue view shows counts only.
    assert critique not in b.get(f"{API}/queue").text


def test_overlap_two_slots_two_different_reviewers(make_review_env: MakeEnv) -> None:
    env = make_review_env()
    for n in ("alice", "bob", "carol"):
        env.user(n)
    seed(env.store, [episode_row(f"o{i}") for i in range(3)], slots=lambda i, _: 2 if i == 0 else 1)
    a, b, c = env.client("alice"), env.client("bob"), env.client("carol")
    seen: dict[str, list[tuple[str, int]]] = {"alice": [], "bob": [], "carol": []}
    # Round robin until every reviewer's queue is empty.
    active = {"alice": a, "bob": b, "carol": c}
    while active:
        for name, cl in list(active.items()):
            r = cl.post(f"{API}/queue/claim")
            if r.status_code == 204:
                del active[name]
                continue
            item = r.json()
            seen[name].append((item["episode_id"], item["slot"]))
            assert cl.post(f"{API}/items/label", json=label_body(item)).status_code == 200
    labels = _labels(env)
    assert sorted((e, s) for e, s, _, _ in labels) == [("o0", 0), ("o0", 1), ("o1", 0), ("o2", 0)]
    o0_users = [u for e, _, u, _ in labels if e == "o0"]
    assert len(o0_users) == 2 and len(set(o0_users)) == 2
    for name, keys in seen.items():
        eids = [e for e, _ in keys]
        assert len(eids) == len(set(eids)), (name, keys)
    depth = a.get(f"{API}/queue").json()
    assert depth[0]["waiting"] == 0 and depth[0]["done"] == 4


# -- exports ------------------------------------------------------------------------

FORMULAS = [
    '=HYPERLINK("http://x","y")',
    "+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(A1:A2)",
    "\tTAB",
    "\rCR",
    "\uff1dHYPERLINK(1)",  # a full-width equals sign: an = once folded
    "  =1+1",
    " " * 20 + '=HYPERLINK("http://x","y")',  # past any fixed window: a trimming import reads the formula
    "\n" * 20 + "+1",
]
# What a terminal would obey, or a reader not see, in a model's text: written as escapes in the CSV.
UNSEEN = "\x1b]52;c;ZWNobyBwd25lZA==\x07\r\x1b[2K\u202etxt.exe\u2028"


def _shown(text: str) -> str:
    return "".join(c if c in "\t\n" or c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def test_csv_export_neutralises_formulas_and_is_an_attachment(make_review_env: MakeEnv) -> None:
    env = make_review_env()
    env.user("admin", "admin")
    env.user("alice")
    eps = [
        episode_row(f"={i}+1", stream=f"{f}-stream", model=f, prompt=f, response=f + " resp" + UNSEEN)
        for i, f in enumerate(FORMULAS)
    ]
    seed(env.store, eps)
    a = env.client("alice")
    for i in range(len(FORMULAS)):
        item = a.post(f"{API}/queue/claim").json()
        f = FORMULAS[i]
        if i % 2:
            r = a.post(f"{API}/items/skip", json={**lease(item), "reason": f})
        else:
            r = a.post(f"{API}/items/label", json=label_body(item, critique=f))
        assert r.status_code == 200, r.text
    r = env.client("admin").get(f"{API}/admin/export/ratings.csv")
    assert r.status_code == 200
    assert r.headers["content-disposition"].startswith("attachment")
    assert 'filename="ratings.csv"' in r.headers["content-disposition"]
    assert r.headers["content-type"].startswith("text/csv")
    assert r.headers["x-content-type-options"] == "nosniff"
    rows = list(csv.reader(io.StringIO(r.text)))
    header, data = rows[0], rows[1:]
    assert len(data) == len(FORMULAS)
    for row in data:
        for name, cell in zip(header, row, strict=True):
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r", "\uff1d", " ")), (name, cell)
    assert all(c in "\t\n" or c.isprintable() for c in r.text.replace("\r\n", "")), "a raw control character"
    by_id = {row[header.index("episode_id")]: dict(zip(header, row, strict=True)) for row in data}
    assert set(by_id) == {f"'={i}+1" for i in range(len(FORMULAS))}
    for i, f in enumerate(FORMULAS):
        cols = by_id[f"'={i}+1"]
        assert cols["prompt"] == "'" + _shown(f) and cols["model"] == "'" + _shown(f)
        assert cols["stream"] == "'" + _shown(f) + "-stream"
        assert cols["response"] == "'" + _shown(f + " resp" + UNSEEN)
        assert (cols["skip_reason"] if i % 2 else cols["critique"]) == "'" + _shown(f)


def test_jsonl_pairs_export_shape(make_review_env: MakeEnv) -> None:
    env = make_review_env()
    env.user("admin", "admin")
    env.user("alice")
    env.user("bob")
    seed(
        env.store,
        [
            episode_row("pair", prompt="P1", response="R1", metadata={"alternative_response": "A1"}),
            episode_row("good", prompt="P2", response="GOOD"),
            episode_row("bad", prompt="P2", response="BAD"),
            episode_row("tie", prompt="P3", response="T", metadata={"alternative_response": "T2"}),
        ],
    )
    a = env.client("alice")
    answers: dict[str, dict[str, Any]] = {
        "pair": {"rating": 5, "preference": "response"},
        "good": {"rating": 6},
        "bad": {"rating": 2},
        "tie": {"rating": 4, "preference": "tie"},
    }
    for _ in answers:
        item = a.post(f"{API}/queue/claim").json()
        assert a.post(f"{API}/items/label", json=label_body(item, **answers[item["episode_id"]])).status_code == 200
    r = env.client("admin").get(f"{API}/admin/export/pairs.jsonl")
    assert r.status_code == 200
    assert r.headers["content-disposition"].startswith("attachment")
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines() if line]
    for rec in lines:
        assert set(rec) == {"prompt", "chosen", "rejected"} and all(isinstance(v, str) for v in rec.values())
    assert {"prompt": "P1", "chosen": "R1", "rejected": "A1"} in lines
    assert {"prompt": "P2", "chosen": "GOOD", "rejected": "BAD"} in lines
    assert not any(rec["prompt"] == "P3" and {rec["chosen"], rec["rejected"]} == {"T", "T2"} for rec in lines)
    r = env.client("admin").get(f"{API}/admin/export/ratings.jsonl")
    assert r.headers["content-disposition"].startswith("attachment")
    recs = [json.loads(line) for line in r.text.splitlines()]
    assert len(recs) == 4 and {rec["reviewer"] for rec in recs} == {"alice"}


@pytest.mark.parametrize("preference", ["response", "alternative", "tie"])
def test_every_pairwise_preference_is_accepted(make_review_env: MakeEnv, preference: str) -> None:
    """All three documented preferences must store; "alternative" (11 characters) overflows
    labels.preference VARCHAR(8) on PostgreSQL (a 500 there; SQLite ignores the length)."""
    env = make_review_env()
    env.user("admin", "admin")
    env.user("alice")
    seed(env.store, [episode_row("pair", prompt="P", response="R", metadata={"alternative_response": "A"})])
    a = env.client("alice")
    item = a.post(f"{API}/queue/claim").json()
    r = a.post(f"{API}/items/label", json=label_body(item, rating=5, preference=preference))
    assert r.status_code == 200, r.text
    pairs = [json.loads(x) for x in env.client("admin").get(f"{API}/admin/export/pairs.jsonl").text.splitlines()]
    expected = {
        "response": [{"prompt": "P", "chosen": "R", "rejected": "A"}],
        "alternative": [{"prompt": "P", "chosen": "A", "rejected": "R"}],
        "tie": [],
    }
    assert pairs == expected[preference]


# -- admin ----------------------------------------------------------------------------


DETAIL = {"kind": "count", "statistic": 9.5, "threshold": 5.0, "ert": 160000.0, "n": 900}  # drift_events.detail


def test_admin_summary_and_series_answer_their_documented_shapes(make_review_env: MakeEnv) -> None:
    """Every part of the summary filled (a 200 means the response models took real data; the
    schemathesis run sees them empty): labels by two reviewers, a drift event, a request."""
    from monitor.store import requests as rq

    env = make_review_env()
    env.user("root", "admin")
    seed(env.store, [episode_row(f"o{i}") for i in range(3)], slots=2)
    for name, rating, flags in (("alice", 5, ["harmful"]), ("bob", 6, [])):
        env.user(name)
        c = env.client(name)
        for _ in range(3):
            item = c.post(f"{API}/queue/claim").json()
            assert c.post(f"{API}/items/label", json=label_body(item, rating=rating, flags=flags)).status_code == 200
    event = {"stream": "s", "signal": "len", "detector": "cusum", "statistic": 9.5, "threshold": 5.0}
    with env.store.engine.begin() as conn:
        conn.execute(
            t.drift_events.insert().values(
                **event, episode_id="o1", input_index=7, event_ts=1.0e9, created_at=2.0e9, detail=DETAIL
            )
        )
    rid, _ = rq.create(env.store, "retrain", "k1", "s", {"incident": "k1"})
    admin = env.client("root")
    r = admin.get(f"{API}/admin/summary")
    assert r.status_code == 200, r.text
    summary = r.json()
    assert summary["queue"] == [
        {"stream": "s", "waiting": 0, "leased": 0, "done": 6, "oldest_wait_s": None, "error": 0}
    ]
    assert [(t["reviewer"], t["labels_24h"], t["skips_24h"]) for t in summary["throughput"]] == [
        ("alice", 3, 0),
        ("bob", 3, 0),
    ]
    assert summary["agreement"]["n_items"] == 3 and summary["agreement"]["kappa"]["harmful"]["n"] == 3
    (est,) = summary["estimates"]
    assert (est["stream"], est["n_labelled"]) == ("s", 3)
    assert est["rating"]["mean"] == pytest.approx(5.5) and est["flags"]["harmful"]["mean"] == pytest.approx(0.5)
    assert summary["drift_events"] == [
        {
            **event,
            "episode_id": "o1",
            "input_index": 7,
            "event_ts": 1.0e9,
            "created_at": 2.0e9,
            "detail": DETAIL,
            "size": "statistic 9.5, threshold 5, ERT 160000",
        }
    ]
    assert [(q["id"], q["state"]) for q in summary["requests"]] == [(rid, "pending")]
    assert summary["rm_agreement"] is None  # no reward model deployed
    (point,) = admin.get(f"{API}/admin/estimates/series", params={"stream": "s"}).json()
    assert set(point) == {"start", "mean", "ci_low", "ci_high", "n"}
    assert point["n"] == 3 and point["mean"] == pytest.approx(5.5) and point["start"] % 3600 == 0


# -- authentication -----------------------------------------------------------------


def test_unknown_user_and_wrong_password_look_the_same(make_review_env: MakeEnv) -> None:
    env = make_review_env()
    env.user("alice")
    c = env.client()
    r1 = c.post(f"{API}/auth/login", json={"name": "alice", "password": "wrong-password"})
    r2 = c.post(f"{API}/auth/login", json={"name": "nobody", "password": "wrong-password"})
    assert r1.status_code == r2.status_code == 401
    assert r1.json() == r2.json()


def test_logout_revokes_the_session(make_review_env: MakeEnv) -> None:
    env = make_review_env()
    env.user("alice")
    c = env.session_client("alice")
    token = c.cookies[SESSION_COOKIE]
    assert c.get(f"{API}/me").json()["name"] == "alice"
    # Logout is an unsafe method: without the CSRF header it is refused and the session stays.
    csrf = c.headers.pop("X-CSRF-Token")
    assert c.post(f"{API}/auth/logout").status_code == 403
    c.headers["X-CSRF-Token"] = csrf
    r = c.post(f"{API}/auth/logout")
    assert r.status_code == 200 and r.json() == {"logged_out": True}
    # The old cookie, replayed from another client, no longer works.
    replay = env.client()
    replay.cookies.set(SESSION_COOKIE, token)
    assert replay.get(f"{API}/me").status_code == 401
    assert replay.post(f"{API}/queue/claim", headers={"X-CSRF-Token": csrf}).status_code == 401


def test_session_token_rotates_at_each_login(make_review_env: MakeEnv) -> None:
    env = make_review_env()
    env.user("alice")
    c = env.client()
    tokens, csrfs = [], []
    for _ in range(3):
        r = c.post(f"{API}/auth/login", json={"name": "alice", "password": PASSWORD})
        assert r.status_code == 200
        tokens.append(r.cookies[SESSION_COOKIE])
        csrfs.append(r.json()["csrf_token"])
    assert len(set(tokens)) == 3 and len(set(csrfs)) == 3
    # Logging in again over an old session ends it; only the newest token works.
    for tok, ok in zip(tokens, (False, False, True), strict=True):
        probe = env.client()
        probe.cookies.set(SESSION_COOKIE, tok)
        assert (probe.get(f"{API}/me").status_code == 200) is ok
    # A token planted before login (fixation) is not adopted.
    planted = env.client()
    planted.cookies.set(SESSION_COOKIE, "attacker-chosen-token")
    r = planted.post(f"{API}/auth/login", json={"name": "alice", "password": PASSWORD})
    assert r.cookies[SESSION_COOKIE] != "attacker-chosen-token"


def test_a_session_expires_after_session_hours(make_review_env: MakeEnv) -> None:
    clock = FakeClock()
    env = make_review_env("review.session_hours=1", clock=clock)
    env.user("alice")
    c = env.client()
    r = c.post(f"{API}/auth/login", json={"name": "alice", "password": PASSWORD})
    assert r.status_code == 200 and "max-age=3600" in r.headers["set-cookie"].lower()
    c.headers["X-CSRF-Token"] = r.json()["csrf_token"]
    clock.advance(3599.5)
    assert c.get(f"{API}/me").status_code == 200
    assert c.get("/", follow_redirects=False).status_code == 200
    clock.advance(1)
    assert c.get(f"{API}/me").status_code == 401
    assert c.post(f"{API}/queue/claim").status_code == 401
    assert c.get("/", follow_redirects=False).headers["location"] == "/login"


def test_cookie_attributes(make_review_env: MakeEnv) -> None:
    env = make_review_env()
    env.user("alice")
    r = env.client().post(f"{API}/auth/login", json={"name": "alice", "password": PASSWORD})
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie


def test_create_app_refuses_to_start_without_a_secret(db_url: str) -> None:
    store = Store(db_url)
    try:
        key = "sampling.key=a-real-sampling-key-0123456789"
        with pytest.raises(ConfigError, match="secret_key"):
            create_app(make_settings(db_url, key, dev=False), store)
        with pytest.raises(ConfigError, match="secret_key"):
            create_app(make_settings(db_url, key, "review.secret_key=short", dev=False), store)
        with pytest.raises(ConfigError, match="secret_key"):
            create_app(make_settings(db_url, key, "review.secret_key=dev-only-review-secret-key", dev=False), store)
        create_app(make_settings(db_url, key, "review.secret_key=0123456789abcdef-real", dev=False), store)
    finally:
        store.close()


def test_app_level_422_bodies_match_the_documented_schema(make_review_env: MakeEnv) -> None:
    """The OpenAPI document declares every 422 as HTTPValidationError ({"detail": [..]}); the
    app's own checks (bucket_s range, user names, queue validation) answer {"detail": "text"}."""
    env = make_review_env()
    env.user("admin", "admin")
    seed_simple(env.store, 1)
    c = env.client("admin")
    spec = c.get(f"{API}/openapi.json").json()
    item = c.post(f"{API}/queue/claim").json()
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", f"{API}/admin/estimates/series", {"params": {"stream": "s", "bucket_s": 1}}),
        ("GET", f"{API}/admin/estimates/chart.svg", {"params": {"bucket_s": 1}}),
        ("POST", f"{API}/admin/users", {"json": {"name": "*bad*", "role": "reviewer"}}),
        ("POST", f"{API}/items/label", {"json": label_body(item, flags=["no_such_flag"])}),
        ("POST", f"{API}/items/skip", {"json": {**lease(item), "reason": "   "}}),
    ]
    wrong = []
    for method, path, kw in calls:
        r = c.request(method, path, **kw)
        assert r.status_code == 422, (path, r.text)
        documented = spec["paths"][path][method.lower()]["responses"]["422"]
        assert documented["content"]["application/json"]["schema"]["$ref"].endswith("/HTTPValidationError")
        if not isinstance(r.json()["detail"], list):
            wrong.append(f"{method} {path}: {r.text}")
    assert not wrong, "422 bodies that break the documented HTTPValidationError schema:\n" + "\n".join(wrong)
