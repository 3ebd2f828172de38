"""Adjudication of disagreements (items with overlap): which labels disagree, the API and page that
settle them, and what a final label changes: estimates and training data use it in place of the
reviewers' labels; agreement statistics do not. SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import html
import io
import json
import re
import statistics
from collections.abc import Callable
from typing import Any

import pytest
import review_helpers as helpers
import sqlalchemy as sa
from review_helpers import API, PASSWORD, Env, FakeClock, TestClient, episode_row, seed

from monitor.quality import estimates as quality_estimates
from monitor.quality import labels as quality_labels
from monitor.quality.adjudication import Given, Rule, disagreements, finals
from monitor.reward.update import calibrated_records, rated_records
from monitor.store import tables as t

FLAGS = ["harmful", "incorrect"]
XSS = "<script>alert(1)</script>"


def put_label(
    env: Env, eid: str, user: str, rating: int, flags: tuple[str, ...] = (), preference: str | None = None
) -> None:
    helpers.put_label(
        env.store, eid, env.users[user], rating, flags, preference=preference, critique=f"rated {rating}: {XSS}"
    )


@pytest.fixture
def disputed(make_review_env: Callable[..., Env]) -> Env:
    """e0: ratings 2 vs 6 (rating); e1: 4 vs 4 but one flags harmful (flags); e2: 5 vs 4 (agree);
    e3: one label. Reviewers bob and carol; root and boss are admins, root also labelled e2."""
    env = make_review_env(f"review.flags={FLAGS}", clock=FakeClock())
    for name in ("bob", "carol"):
        env.user(name)
    env.user("root", "admin")
    env.user("boss", "admin")
    seed(env.store, [episode_row(f"e{i}", response=f"answer {i} {XSS}") for i in range(4)], slots=0)
    put_label(env, "e0", "bob", 2)
    put_label(env, "e0", "carol", 6)
    put_label(env, "e1", "bob", 4, ("harmful",))
    put_label(env, "e1", "carol", 4)
    put_label(env, "e2", "bob", 5)
    put_label(env, "e2", "root", 4)
    put_label(env, "e3", "carol", 3)
    return env


# -- the rule ----------------------------------------------------------------------------------


def test_the_rule_names_each_kind_of_disagreement() -> None:
    rule = Rule(rating_gap=3)
    assert rule.reasons([Given(2, frozenset()), Given(4, frozenset())]) == []  # 2 apart: under the gap
    assert rule.reasons([Given(2, frozenset()), Given(5, frozenset())]) == ["rating"]
    assert rule.reasons([Given(4, frozenset({"a", "b"})), Given(4, frozenset({"b"}))]) == ["flags"]
    assert rule.reasons([Given(4, frozenset({"b"})), Given(4, frozenset({"b"}))]) == []
    assert rule.reasons([Given(4, frozenset(), "response"), Given(4, frozenset(), "tie")]) == ["preference"]
    assert rule.reasons([Given(1, frozenset({"a"}))]) == []  # one label cannot disagree
    assert Rule(rating_gap=3, flags_disagree=False).reasons([Given(4, frozenset({"a"})), Given(4, frozenset())]) == []
    three = [Given(1, frozenset({"a"})), Given(4, frozenset({"a"})), Given(4, frozenset())]
    assert rule.reasons(three) == ["rating", "flags"]


# -- the API -------------------------------------------------------------------------------------


def test_pending_lists_the_disagreements_with_their_labels(disputed: Env) -> None:
    admin = disputed.client("boss")
    r = admin.get(f"{API}/admin/adjudications/pending")
    assert r.status_code == 200, r.text
    got = {d["episode_id"]: d for d in r.json()}
    assert set(got) == {"e0", "e1"}
    assert got["e0"]["reasons"] == ["rating"] and got["e0"]["rating_spread"] == 4
    assert got["e1"]["reasons"] == ["flags"] and got["e1"]["split_flags"] == ["harmful"]
    assert sorted(x["reviewer"] for x in got["e0"]["labels"]) == ["bob", "carol"]
    assert {x["rating"] for x in got["e0"]["labels"]} == {2, 6}
    # The gap is configurable: at 5 points e0 agrees.
    assert [d.episode_id for d in disagreements(disputed.store, Rule(rating_gap=5))] == ["e1"]
    # Reviewers may not see other reviewers' labels.
    assert disputed.client("bob").get(f"{API}/admin/adjudications/pending").status_code == 403
    assert disputed.client("bob").post(f"{API}/admin/adjudications", json=verdict("e0")).status_code == 403


def verdict(eid: str, **kw: Any) -> dict[str, Any]:
    return {"episode_id": eid, "rating": 7, "flags": [], "note": "guideline 3: a correct answer", **kw}


def test_an_adjudication_settles_the_item_and_is_audited(disputed: Env) -> None:
    admin = disputed.client("boss")
    r = admin.post(f"{API}/admin/adjudications", json=verdict("e0"))
    assert r.status_code == 201, r.text
    a = r.json()
    assert (a["adjudicator"], a["rating"], a["reasons"], a["current"]) == ("boss", 7, ["rating"], True)
    assert len(a["label_ids"]) == 2
    pending = admin.get(f"{API}/admin/adjudications/pending").json()
    assert [d["episode_id"] for d in pending] == ["e1"]
    every = admin.get(f"{API}/admin/adjudications/pending", params={"include_adjudicated": True}).json()
    assert {d["episode_id"]: d["adjudicated"] for d in every} == {"e0": True, "e1": False}
    # A second verdict supersedes the first; both stay in the history, newest first.
    r = admin.post(f"{API}/admin/adjudications", json=verdict("e0", rating=5, note="on second reading"))
    assert r.status_code == 201
    hist = admin.get(f"{API}/admin/adjudications", params={"episode_id": "e0"}).json()
    assert [(h["rating"], h["current"]) for h in hist] == [(5, True), (7, False)]
    assert finals(disputed.store)["e0"].rating == 5
    # An item without disagreement may be adjudicated by hand (reasons then empty).
    r = disputed.client("boss").post(f"{API}/admin/adjudications", json=verdict("e2"))
    assert r.status_code == 201 and r.json()["reasons"] == []


@pytest.mark.parametrize(
    ("who", "body", "status", "field"),
    [
        ("root", verdict("e2"), 409, None),  # root labelled e2
        ("boss", verdict("e3"), 409, None),  # one label: nothing to adjudicate
        ("boss", verdict("nope"), 404, None),
        ("boss", verdict("e0", flags=["harmful", "bogus"]), 422, "flags"),
        ("boss", verdict("e0", preference="tie"), 422, "preference"),  # not a pair
        ("boss", verdict("e0", note="   "), 422, "note"),
        ("boss", verdict("e0", rating=8), 422, "rating"),
        ("boss", {**verdict("e0"), "extra": 1}, 422, "extra"),
    ],
)
def test_refusals(disputed: Env, who: str, body: dict[str, Any], status: int, field: str | None) -> None:
    r = disputed.client(who).post(f"{API}/admin/adjudications", json=body)
    assert r.status_code == status, r.text
    if field is not None:
        assert field in {str(e["loc"][-1]) for e in r.json()["detail"]}
    with disputed.store.engine.connect() as conn:
        assert conn.execute(t.adjudications.select()).first() is None


def test_a_pair_is_adjudicated_with_a_preference(make_review_env: Callable[..., Env]) -> None:
    env = make_review_env(f"review.flags={FLAGS}")
    env.user("bob")
    env.user("carol")
    env.user("boss", "admin")
    seed(env.store, [episode_row("p0", metadata={"alternative_response": "the other answer"})], slots=0)
    put_label(env, "p0", "bob", 4, preference="response")
    put_label(env, "p0", "carol", 4, preference="alternative")
    admin = env.client("boss")
    assert [d["reasons"] for d in admin.get(f"{API}/admin/adjudications/pending").json()] == [["preference"]]
    r = admin.post(f"{API}/admin/adjudications", json=verdict("p0", preference="alternative"))
    assert r.status_code == 201 and r.json()["preference"] == "alternative"
    assert finals(env.store)["p0"].preference == "alternative"


# -- what a final label changes ----------------------------------------------------------------


def test_estimates_and_training_use_the_final_label_and_agreement_does_not(disputed: Env) -> None:
    store = disputed.store

    def rating_mean() -> tuple[float, float, int]:
        (row,) = quality_estimates.estimates(store, FLAGS)
        return row["rating"]["mean"], row["flags"]["harmful"]["mean"], row["n_adjudicated"]

    agreement_before = quality_labels.agreement(quality_labels.label_rows(store), FLAGS)
    # Equal inclusion probabilities: the Hajek mean is the mean of the items' mean ratings.
    mean, harmful, n = rating_mean()
    assert mean == pytest.approx(statistics.fmean([4.0, 4.0, 4.5, 3.0]))
    assert harmful == pytest.approx(statistics.fmean([0.0, 0.5, 0.0, 0.0]))
    assert n == 0
    admin = disputed.client("boss")
    assert admin.post(f"{API}/admin/adjudications", json=verdict("e0", rating=7)).status_code == 201
    assert admin.post(f"{API}/admin/adjudications", json=verdict("e1", flags=["harmful"])).status_code == 201
    mean, harmful, n = rating_mean()
    assert mean == pytest.approx(statistics.fmean([7.0, 7.0, 4.5, 3.0]))
    assert harmful == pytest.approx(statistics.fmean([0.0, 1.0, 0.0, 0.0]))
    assert n == 2
    # With reliability weighting the adjudicated items keep their final rating too.
    (weighted,) = quality_estimates.estimates(store, FLAGS, reliability_weighting=True)
    assert weighted["n_adjudicated"] == 2
    series = quality_estimates.estimate_series(store, "s")
    assert sum(p["n"] for p in series) == 4 and series[0]["mean"] == pytest.approx(mean)
    # Agreement measures the reviewers: unchanged.
    assert quality_labels.agreement(quality_labels.label_rows(store), FLAGS) == agreement_before

    records = rated_records(store)
    by_episode: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_episode.setdefault(r["episode_id"], []).append(r)
    assert [(r["rating"], r["adjudicated"], r["user_id"]) for r in by_episode["e0"]] == [
        (7, True, disputed.users["boss"].id)
    ]
    assert sorted(r["rating"] for r in by_episode["e2"]) == [4, 5]
    assert not any(r["adjudicated"] for r in by_episode["e2"])
    calibrated = {r["episode_id"]: r["rating"] for r in calibrated_records(records)}
    assert calibrated["e0"] == 7 and calibrated["e1"] == 7


def test_metrics_count_adjudications_and_the_disagreements_waiting(disputed: Env) -> None:
    registry = disputed.app.state.review.metrics.registry

    def value(name: str, **labels: str) -> float | None:
        v: float | None = registry.get_sample_value(name, labels)
        return v

    assert value("oversight_review_adjudications_total", outcome="adjudicated") == 0  # pre-zeroed
    assert value("oversight_review_adjudications_total", outcome="refused") == 0
    assert value("oversight_review_disagreements_waiting", stream="s") == 2
    admin = disputed.client("boss")
    # A stream with a review queue and no disagreement reads 0 at once (within the minute the
    # counts are cached), so its series exists from its first review task.
    seed(disputed.store, [episode_row("q0", stream="quiet")])
    assert value("oversight_review_disagreements_waiting", stream="quiet") == 0
    assert admin.post(f"{API}/admin/adjudications", json=verdict("e0")).status_code == 201
    assert admin.post(f"{API}/admin/adjudications", json=verdict("e3")).status_code == 409
    assert value("oversight_review_adjudications_total", outcome="adjudicated") == 1
    assert value("oversight_review_adjudications_total", outcome="refused") == 1
    # The waiting count is read at most once a minute (every replica's every scrape would re-read it).
    assert value("oversight_review_disagreements_waiting", stream="s") == 2
    disputed.app.state.review.clock.advance(61)
    assert value("oversight_review_disagreements_waiting", stream="s") == 1


# -- the page ----------------------------------------------------------------------------------


def login(env: Env, name: str) -> TestClient:
    c = TestClient(env.app, follow_redirects=False)
    env.clients.append(c)
    page = c.get("/login")
    r = c.post("/login", data={"name": name, "password": PASSWORD, "csrf": token(page.text)})
    assert r.status_code == 303, r.text
    return c


def token(page: str, name: str = "csrf") -> str:
    m = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert m is not None, f"no {name} field"
    return html.unescape(m.group(1))


def without_tokens(page: str) -> str:
    """The page with its CSRF tokens blanked: a token is random URL-safe base64, which spells a
    reviewer's name now and then (one held "...JBbobns4..." and failed the blindness check below)."""
    return re.sub(r'(name="csrf" value=")[^"]*"', r'\1"', page)


def test_the_page_shows_the_item_blind_and_records_the_verdict(disputed: Env) -> None:
    c = login(disputed, "boss")
    page = c.get("/admin/adjudication")
    assert page.status_code == 200
    text = page.text
    # The longest waiting item is shown, with its labels but not who gave them; model text escaped.
    assert 'name="episode_id" value="e0"' in text
    assert "Reviewer A" in text and "Reviewer B" in text
    shown = without_tokens(text)
    assert 'name="csrf" value=""' in shown  # the tokens were there, and only they are blanked
    assert "bob" not in shown and "carol" not in shown
    assert XSS not in text and html.escape(XSS) in text
    assert "<script" not in text.replace('<script src="/static/review.js" defer></script>', "")
    # No CSRF token: refused, nothing written.
    form = {"episode_id": "e0", "rating": "6", "flags": ["incorrect"], "note": "checked the facts"}
    assert c.post("/admin/adjudication", data=form).status_code == 403
    # A missing note: the page again, the input kept.
    r = c.post("/admin/adjudication", data={**form, "note": "", "csrf": token(text)})
    assert r.status_code == 422 and "needs a note" in r.text and 'value="6" required checked' in r.text
    r = c.post("/admin/adjudication", data={**form, "csrf": token(text)})
    assert r.status_code == 303 and r.headers["location"] == "/admin/adjudication?done=1"
    f = finals(disputed.store)["e0"]
    assert (f.rating, f.flags) == (6, frozenset({"incorrect"}))
    after = c.get("/admin/adjudication?done=1").text
    assert "Adjudicated" in after and 'name="episode_id" value="e0"' not in after
    assert 'name="episode_id" value="e1"' in after
    # An adjudicated item is out of the waiting list but can be opened again to revise it.
    again = c.get("/admin/adjudication", params={"episode": "e0"}).text
    assert "adjudicated already" in again and 'name="episode_id" value="e0"' in again
    # The dashboard links the page with the count waiting.
    dash = c.get("/admin").text
    assert 'class="disagreements-waiting">1<' in dash and 'href="/admin/adjudication"' in dash


def test_the_page_is_for_admins_and_not_for_their_own_items(disputed: Env) -> None:
    bob = login(disputed, "bob")
    assert bob.get("/admin/adjudication").status_code == 403
    # A reviewer's own valid CSRF token does not make the form an admin's.
    form = {"episode_id": "e0", "rating": "6", "note": "mine", "csrf": token(bob.get("/").text)}
    assert bob.post("/admin/adjudication", data=form).status_code == 403
    assert not finals(disputed.store)
    root = login(disputed, "root")
    # root labelled e2: shown (by hand) without the form.
    lb = t.labels
    with disputed.store.engine.begin() as conn:  # make e2 disagree: bob's 5 becomes a 1 (root gave 4)
        conn.execute(
            lb.update().where(lb.c.episode_id == "e2", lb.c.user_id == disputed.users["bob"].id).values(rating=1)
        )
    page = root.get("/admin/adjudication", params={"episode": "e2"}).text
    assert "another administrator must adjudicate it" in page and 'id="adjudication-form"' not in page


def test_migration_0012_up_and_down(db_url: str) -> None:
    from alembic import command
    from alembic.config import Config

    from monitor.store import Store
    from monitor.store.store import MIGRATIONS_DIR

    store = Store(db_url)
    assert "adjudications" in sa.inspect(store.engine).get_table_names()
    with store.engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0011")
    assert store.revision() == "0011"
    assert "adjudications" not in sa.inspect(store.engine).get_table_names()
    store.migrate("0012")
    assert store.revision() == "0012"
    indexes = {i["name"] for i in sa.inspect(store.engine).get_indexes("adjudications")}
    assert indexes == {"ix_adjudications_episode", "ix_adjudications_stream_created"}
    store.close()


def test_exports_carry_the_final_label(disputed: Env) -> None:
    admin = disputed.client("boss")

    def pairs() -> set[tuple[str, str]]:
        r = admin.get(f"{API}/admin/export/pairs.jsonl")
        assert r.status_code == 200
        return {(json.loads(x)["chosen"][:8], json.loads(x)["rejected"][:8]) for x in r.text.splitlines()}

    # Same prompt, four responses: e2 (mean 4.5) beats e0 (mean of 2 and 6) before adjudication.
    assert ("answer 2", "answer 0") in pairs()
    assert (
        admin.post(f"{API}/admin/adjudications", json=verdict("e0", rating=7, flags=["incorrect"])).status_code == 201
    )
    assert ("answer 0", "answer 2") in pairs() and ("answer 2", "answer 0") not in pairs()
    rows = [json.loads(x) for x in admin.get(f"{API}/admin/export/ratings.jsonl").text.splitlines()]
    e0 = [r for r in rows if r["episode_id"] == "e0"]
    assert len(e0) == 2 and {r["rating"] for r in e0} == {2, 6}  # the reviewers' own labels stay
    assert all((r["adjudicated"], r["final_rating"], r["final_flags"]) == (True, 7, ["incorrect"]) for r in e0)
    assert all(r["final_rating"] is None for r in rows if r["episode_id"] != "e0")
    csv_text = admin.get(f"{API}/admin/export/ratings.csv").text
    header = next(csv.reader(io.StringIO(csv_text)))
    assert header[-4:] == ["adjudicated", "final_rating", "final_flags", "final_preference"]
