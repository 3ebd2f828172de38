"""The reviewer's workday: guidelines per stream (versioned, recorded with each label), progress,
undo within a window, releasing a lease (button, API, the pagehide beacon), and the keyboard-help
panel's markup. API tests run on SQLite and PostgreSQL; page tests on SQLite."""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from review_helpers import API, PASSWORD, Env, FakeClock, TestClient, episode_row, make_env, seed, seed_simple

from monitor.quality.labels import label_rows
from monitor.review import workday
from monitor.review.workday import DAY_S, day_start
from monitor.store import tables as t

XSS = "<script>alert(1)</script>"


def task(env: Env, episode_id: str, slot: int = 0) -> Any:
    rt = t.review_tasks
    with env.store.engine.connect() as conn:
        return conn.execute(sa.select(rt).where(rt.c.episode_id == episode_id, rt.c.slot == slot)).one()


def label_of(env: Env, episode_id: str) -> Any:
    with env.store.engine.connect() as conn:
        return conn.execute(sa.select(t.labels).where(t.labels.c.episode_id == episode_id)).first()


def claim(c: TestClient) -> dict[str, Any]:
    r = c.post(f"{API}/queue/claim")
    assert r.status_code == 200, r.text
    item: dict[str, Any] = r.json()
    return item


def rate(c: TestClient, item: dict[str, Any], rating: int = 4) -> None:
    body = {"episode_id": item["episode_id"], "slot": item["slot"], "fence": item["fence"], "rating": rating}
    r = c.post(f"{API}/items/label", json=body)
    assert r.status_code == 200, r.text


# -- guidelines ------------------------------------------------------------------------------


def test_guidelines_are_versioned_and_each_label_records_the_version_at_claim(
    make_review_env: Callable[..., Env],
) -> None:
    env = make_review_env()
    env.user("admin", "admin")
    env.user("alice")
    seed(env.store, [episode_row("a1"), episode_row("a2"), episode_row("b1", stream="other")])
    admin, alice = env.client("admin"), env.client("alice")

    assert alice.get(f"{API}/guidelines", params={"stream": "s"}).status_code == 404
    r = admin.post(f"{API}/admin/guidelines", json={"stream": "s", "markdown": "Rate **helpfulness**."})
    assert r.status_code == 201 and r.json()["version"] == 1 and r.json()["created_by"] == "admin"
    # Reviewers read guidelines, they do not write them; empty or unknown fields are refused.
    assert alice.post(f"{API}/admin/guidelines", json={"stream": "s", "markdown": "mine"}).status_code == 403
    assert admin.post(f"{API}/admin/guidelines", json={"stream": "s", "markdown": "  "}).status_code == 422
    assert admin.post(f"{API}/admin/guidelines", json={"stream": "s", "markdown": "x", "v": 1}).status_code == 422
    # A stream no episode can carry: guidelines saved under it would look like a stream's and never apply.
    for stream in ("ch\x1b]52;c;QQ==\x07at", "s\u202e", "x\r\ny"):
        r = admin.post(f"{API}/admin/guidelines", json={"stream": stream, "markdown": "Rate."})
        assert r.status_code == 422 and "stream must not contain" in r.text, (stream, r.text)

    first = claim(alice)  # claimed under version 1
    assert task(env, first["episode_id"]).guidelines_version == 1
    assert (
        admin.post(f"{API}/admin/guidelines", json={"stream": "s", "markdown": "Version two."}).json()["version"] == 2
    )
    rate(alice, first)
    assert label_of(env, first["episode_id"]).guidelines_version == 1  # what alice was told, not what is current
    second = claim(alice)
    rate(alice, second)
    assert label_of(env, second["episode_id"]).guidelines_version == 2
    third = claim(alice)  # a stream without guidelines: NULL
    assert third["stream"] == "other"
    rate(alice, third)
    assert label_of(env, "b1").guidelines_version is None

    now = alice.get(f"{API}/guidelines", params={"stream": "s"}).json()
    assert (now["version"], now["markdown"]) == (2, "Version two.")
    old = alice.get(f"{API}/guidelines", params={"stream": "s", "version": 1}).json()
    assert old["markdown"] == "Rate **helpfulness**."
    assert alice.get(f"{API}/guidelines", params={"stream": "s", "version": 9}).status_code == 404


# -- progress and undo -------------------------------------------------------------------------


def test_progress_counts_todays_labels_and_the_queue_ahead(make_review_env: Callable[..., Env]) -> None:
    clock = FakeClock(start=1_750_000_000.0)
    env = make_review_env(clock=clock)
    env.user("alice")
    env.user("bob")
    seed_simple(env.store, 4)
    alice, bob = env.client("alice"), env.client("bob")

    p = alice.get(f"{API}/progress").json()
    assert (p["labelled_today"], p["skipped_today"], p["waiting"], p["undo_left_s"]) == (0, 0, 4, 0)
    assert p["day_start"] == day_start(clock.now) and p["day_start"] % DAY_S == 0
    rate(alice, claim(alice))
    item = claim(alice)
    r = alice.post(f"{API}/items/skip", json={**{k: item[k] for k in ("episode_id", "slot", "fence")}, "reason": "x"})
    assert r.status_code == 200
    assert alice.get(f"{API}/progress").json()["waiting"] == 2  # her skip is back in the queue, not for her
    claim(bob)  # bob takes the oldest waiting item
    assert bob.get(f"{API}/progress").json()["waiting"] == 2  # his own lease is not waiting
    p = alice.get(f"{API}/progress").json()
    assert (p["labelled_today"], p["skipped_today"], p["waiting"]) == (1, 1, 2)
    assert 0 < p["undo_left_s"] <= 30
    clock.advance(DAY_S)  # the next UTC day; bob's lease has long expired
    p = alice.get(f"{API}/progress").json()
    assert (p["labelled_today"], p["skipped_today"], p["waiting"], p["undo_left_s"]) == (0, 0, 2, 0)


def test_the_queue_ahead_is_counted_up_to_a_limit(
    make_review_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The item page shows the count on every view: counting millions of waiting tasks took
    0.15 s (PostgreSQL) to 0.46 s (SQLite) a view at 2,000,000, so it stops at WAITING_COUNTED
    (10,000; 3 here) and says "3+"."""
    monkeypatch.setattr(workday, "WAITING_COUNTED", 3)
    env = make_review_env()
    env.user("alice")
    seed_simple(env.store, 6)
    alice = env.client("alice")
    p = alice.get(f"{API}/progress").json()
    assert (p["waiting"], p["waiting_more"]) == (3, True)
    for _ in range(3):
        rate(alice, claim(alice))
    p = alice.get(f"{API}/progress").json()
    assert (p["waiting"], p["waiting_more"]) == (3, False)  # exactly 3 left for her: no "+"
    rate(alice, claim(alice))
    assert alice.get(f"{API}/progress").json()["waiting"] == 2
    page = login(env, "alice").get("/").text
    assert re.search(r'<strong class="waiting">1</strong> waiting', page)  # the page's own claim holds one
    monkeypatch.setattr(workday, "WAITING_COUNTED", 0)
    assert re.search(r'<strong class="waiting">0\+</strong> waiting', login(env, "alice").get("/").text)


def test_undo_within_the_window_gives_the_item_back_then_409(make_review_env: Callable[..., Env]) -> None:
    clock = FakeClock()
    env = make_review_env("review.undo_window_s=30", clock=clock)
    env.user("alice")
    seed_simple(env.store, 3)
    alice = env.client("alice")
    assert alice.post(f"{API}/items/undo").status_code == 404  # nothing to undo

    first = claim(alice)
    rate(alice, first, 2)
    assert len(label_rows(env.store)) == 1
    nxt = claim(alice)  # holds the next item when she notices the mistake
    clock.advance(10)
    r = alice.post(f"{API}/items/undo")
    assert r.status_code == 200, r.text
    back = r.json()
    assert back["episode_id"] == first["episode_id"] and back["fence"] > first["fence"]
    # The label is gone from everything that reads labels; the next item went back to the queue.
    assert label_rows(env.store) == [] and label_of(env, first["episode_id"]) is None
    assert task(env, nxt["episode_id"]).status == "pending"
    assert task(env, first["episode_id"]).status == "claimed"
    again = claim(alice)  # the held lease is the undone item
    assert (again["episode_id"], again["fence"]) == (back["episode_id"], back["fence"])
    # The old lease is dead; the new one takes the corrected label.
    stale = {"episode_id": first["episode_id"], "slot": 0, "fence": first["fence"], "rating": 6}
    assert alice.post(f"{API}/items/label", json=stale).status_code == 409
    rate(alice, again, 6)
    assert [r.rating for r in label_rows(env.store)] == [6]
    counted = env.app.state.review.metrics.labels.collect()[0].samples
    assert {x.labels["outcome"]: x.value for x in counted if x.name.endswith("_total")}["undone"] == 1

    clock.advance(31)
    r = alice.post(f"{API}/items/undo")
    assert r.status_code == 409 and "30 seconds" in r.json()["detail"]
    assert [r.rating for r in label_rows(env.store)] == [6]


def test_undo_of_a_skip_taken_by_someone_else_is_refused(make_review_env: Callable[..., Env]) -> None:
    env = make_review_env()
    env.user("alice")
    env.user("bob")
    seed_simple(env.store, 1)
    alice, bob = env.client("alice"), env.client("bob")
    item = claim(alice)
    lease = {k: item[k] for k in ("episode_id", "slot", "fence")}
    assert alice.post(f"{API}/items/skip", json={**lease, "reason": "not my language"}).status_code == 200
    taken = claim(bob)
    assert taken["episode_id"] == item["episode_id"]
    r = alice.post(f"{API}/items/undo")
    assert r.status_code == 409 and "another reviewer" in r.json()["detail"]
    assert label_of(env, item["episode_id"]) is not None  # nothing changed
    # Bob labels it: the slot is done, with his label. Undoing the skip would re-open it for a
    # second label (or, released, for a third reviewer).
    rate(bob, taken, 6)
    assert task(env, item["episode_id"]).status == "done"
    r = alice.post(f"{API}/items/undo")
    assert r.status_code == 409 and "labelled the item since" in r.json()["detail"], r.text
    assert task(env, item["episode_id"]).status == "done"
    assert sorted((x.skipped, x.rating) for x in label_rows(env.store)) == [(False, 6), (True, None)]


def test_release_frees_the_lease_at_once(make_review_env: Callable[..., Env]) -> None:
    env = make_review_env()
    env.user("alice")
    env.user("bob")
    seed_simple(env.store, 1)
    alice, bob = env.client("alice"), env.client("bob")
    item = claim(alice)
    assert bob.post(f"{API}/queue/claim").status_code == 204
    lease = {k: item[k] for k in ("episode_id", "slot", "fence")}
    assert alice.post(f"{API}/items/release", json=lease).status_code == 200
    assert claim(bob)["episode_id"] == item["episode_id"]


# -- pages -----------------------------------------------------------------------------------


@pytest.fixture
def page_env(sqlite_url: str) -> Iterator[tuple[Env, FakeClock]]:
    clock = FakeClock()
    env = make_env(sqlite_url, clock=clock)
    yield env, clock
    env.close()


def field(page: str, name: str, form_id: str | None = None) -> str:
    if form_id is not None:
        page = page.split(f'id="{form_id}"', 1)[1].split("</form>", 1)[0]
    m = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert m is not None, f"no {name} field"
    return html.unescape(m.group(1))


def login(env: Env, name: str) -> TestClient:
    c = TestClient(env.app, follow_redirects=False)
    env.clients.append(c)
    page = c.get("/login")
    r = c.post("/login", data={"name": name, "password": PASSWORD, "csrf": field(page.text, "csrf")})
    assert r.status_code == 303, r.text
    return c


def form(page: str, form_id: str, *names: str) -> dict[str, str]:
    return {n: field(page, n, form_id) for n in names}


LEASE = ("episode_id", "slot", "fence", "csrf")


def test_admin_sets_guidelines_in_a_form_and_the_item_page_links_them_safely(
    page_env: tuple[Env, FakeClock],
) -> None:
    env, _clock = page_env
    env.user("root", "admin")
    env.user("alice")
    seed(env.store, [episode_row("e1", stream="chat/<b>")])
    admin = login(env, "root")
    dash = admin.get("/admin")
    assert "No stream has guidelines yet" in dash.text
    csrf = field(dash.text, "csrf")
    text = f"# Rules\n\nRate **helpfulness**.\n\n{XSS}\n\n[more](javascript:alert(1))"
    body = {"stream": "chat/<b>", "markdown": text}
    assert admin.post("/admin/guidelines", data={**body, "csrf": "nope"}).status_code == 403
    assert admin.post("/admin/guidelines", data={**body, "csrf": csrf}).status_code == 303
    assert admin.post("/admin/guidelines", data={"stream": "x", "markdown": " ", "csrf": csrf}).status_code == 422
    assert "chat/&lt;b&gt;" in admin.get("/admin").text

    alice = login(env, "alice")
    assert alice.post("/admin/guidelines", data={**body, "csrf": field(alice.get("/").text, "csrf")}).status_code == 403
    page = alice.get("/").text
    m = re.search(r'<a class="guidelines-link" href="([^"]+)" target="_blank" rel="noopener">', page)
    assert m is not None and "Guidelines (version 1)" in page
    g = alice.get(html.unescape(m.group(1)))
    assert g.status_code == 200
    assert "<strong>helpfulness</strong>" in g.text and "&lt;script&gt;" in g.text
    assert "<script>alert" not in g.text and 'href="javascript' not in g.text
    assert alice.get("/guidelines", params={"stream": "none"}).status_code == 404


def test_item_page_progress_undo_and_release(page_env: tuple[Env, FakeClock]) -> None:
    env, clock = page_env
    env.user("alice")
    seed_simple(env.store, 3)
    c = login(env, "alice")
    page = c.get("/").text
    assert re.search(r'labelled-today">0</strong>.*<strong class="waiting">2</strong> waiting', page)
    assert 'id="undo-form"' not in page  # nothing to undo yet
    first = form(page, "label-form", *LEASE)
    assert c.post("/review/submit", data={**first, "rating": "3"}).status_code == 303
    page = c.get("/").text
    assert re.search(r'labelled-today">1</strong>', page) and 'id="undo-form"' in page
    # Undo: the first item is back under a new lease, its label gone.
    r = c.post("/review/undo", data={"csrf": first["csrf"]})
    assert r.status_code == 303
    page = c.get("/").text
    assert "Your last label was withdrawn" in page
    assert field(page, "episode_id", "label-form") == first["episode_id"] and label_of(env, "e00000") is None
    # Release and pause: the item goes back to the queue at once.
    lease = form(page, "release-form", *LEASE)
    r = c.post("/review/release", data=lease)
    assert r.status_code == 200 and "Item released" in r.text
    assert task(env, first["episode_id"]).status == "pending"
    clock.advance(5)
    # After the window an undo is refused with a notice.
    assert (
        c.post("/review/submit", data={**form(c.get("/").text, "label-form", *LEASE), "rating": "5"}).status_code == 303
    )
    clock.advance(31)
    c.post("/review/undo", data={"csrf": first["csrf"]})
    assert "can no longer be undone" in c.get("/").text


def test_leave_beacon_releases_the_lease_unless_the_page_was_shown_again(page_env: tuple[Env, FakeClock]) -> None:
    env, clock = page_env
    env.user("alice")
    seed_simple(env.store, 1)
    c = login(env, "alice")
    old = form(c.get("/").text, "leave-form", *LEASE, "until")
    clock.advance(2)
    new = form(c.get("/").text, "leave-form", *LEASE, "until")  # a reload renews the lease
    assert new["fence"] == old["fence"] and float(new["until"]) > float(old["until"])
    # The old view's beacon arrives after the reload: it must not release the lease now shown.
    assert c.post("/review/leave", data=old).status_code == 204
    assert task(env, "e00000").status == "claimed"
    assert c.post("/review/leave", data={**new, "csrf": "forged"}).status_code == 403
    assert task(env, "e00000").status == "claimed"
    assert c.post("/review/leave", data={**new, "until": "garbage"}).status_code == 204
    assert c.post("/review/leave", data=new).status_code == 204
    assert task(env, "e00000").status == "pending"


def test_keyboard_help_is_a_key_then_action_table_in_a_focusable_region(page_env: tuple[Env, FakeClock]) -> None:
    env, _clock = page_env
    env.user("alice")
    seed_simple(env.store, 1)
    page = login(env, "alice").get("/").text
    panel = page.split('id="help"', 1)[1].split("</div>", 1)[0]
    assert 'role="region"' in panel and 'aria-labelledby="h-help"' in panel and 'tabindex="0"' in panel
    assert re.search(r'<th scope="col">Key</th><th scope="col">Action</th>', panel)
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", panel)
    assert len(rows) >= 7 and all(key.startswith("<kbd>") for key, _action in rows)
    assert ("<kbd>?</kbd>", "Show or hide this panel") in rows
    # Behaviour and looks stay in static files (CSP: no inline script or style).
    assert "<script>" not in page and " style=" not in page and "onclick" not in page
    css = TestClient(env.app).get("/static/app.css").text
    assert re.search(r"@media \(max-width: 640px\) \{\s*\.help \{ position: static;", css)
