"""Hostile requests to the review service that once got a 500, crossed a limit or were taken
for what they were not (found by a hostile-input hunt, 2026-12): values Python's JSON parser
accepts and no answer can carry, non-ASCII CSRF tokens, numbers past SQL's integers, values
converted to a field's type, bodies without a size limit, an undo of a finished item (in
test_workday), and X-Forwarded-For trusted on the embedded server."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from review_helpers import API, PASSWORD, Env, episode_row, label_body, lease, make_env, seed
from test_review_pages import browser, form_token, hidden, login

from monitor.review import text_guard
from monitor.review.server import BackgroundServer
from monitor.store import tables as t

MakeEnv = Callable[..., Env]


@pytest.fixture
def page_env(sqlite_url: str) -> Iterator[Env]:
    env = make_env(sqlite_url)
    yield env
    env.close()


def _labels(env: Env) -> list[Any]:
    with env.store.engine.connect() as conn:
        return list(conn.execute(sa.select(t.labels.c.rating)))


@pytest.mark.parametrize(
    "body",
    [b'{"name": NaN, "password": "x"}', b'{"name": "a", "password": 1e400}', b'{"name": "\\ud800", "password": 5}'],
    ids=["nan", "inf", "lone-surrogate"],
)
def test_a_refused_value_no_answer_can_carry_is_a_422_not_a_500(make_review_env: MakeEnv, body: bytes) -> None:
    """FastAPI's handler echoed the refused value into the 422, which then failed to encode."""
    env = make_review_env()
    r = env.client().post(f"{API}/auth/login", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert all("input" not in e for e in r.json()["detail"]) and r.json()["detail"][0]["loc"]


def test_a_label_takes_its_fields_types_as_they_are(make_review_env: MakeEnv) -> None:
    """Lenient parsing took ``true`` and ``"5"`` for ratings; NaN or a lone surrogate was a 500."""
    env = make_review_env()
    env.user("alice")
    seed(env.store, [episode_row("e1")])
    c = env.client("alice")
    item = c.post(f"{API}/queue/claim").json()
    for wrong in ({"rating": True}, {"rating": "5"}, {"rating": 5.0}, {"time_spent_ms": 1.0}, {"critique": 7}):
        r = c.post(f"{API}/items/label", json=label_body(item, **wrong))
        assert r.status_code == 422, (wrong, r.text)
    for raw in (b"Infinity", b'"\\udc00"'):
        body = (
            f'{{"episode_id": "e1", "slot": {item["slot"]}, "fence": {item["fence"]}, "rating": '.encode() + raw + b"}"
        )
        r = c.post(f"{API}/items/label", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
    assert _labels(env) == []
    assert c.post(f"{API}/items/label", json=label_body(item, rating=5)).status_code == 200
    assert [x.rating for x in _labels(env)] == [5]


def test_a_non_ascii_csrf_token_is_refused_not_a_500(make_review_env: MakeEnv, page_env: Env) -> None:
    env = make_review_env()
    env.user("alice")
    c = env.session_client("alice")
    r = c.post(f"{API}/queue/claim", headers={b"X-CSRF-Token": "\u00e9t\u00e9".encode()})  # bytes: sent as they are
    assert r.status_code == 403, r.text
    page_env.user("bob")
    b = browser(page_env)
    b.get("/login")
    r = b.post("/login", data={"name": "bob", "password": PASSWORD, "csrf": "\u00e9" * 64})
    assert r.status_code == 403


def test_form_numbers_past_sql_integers_or_not_ascii_are_a_400(page_env: Env) -> None:
    env = page_env
    env.user("alice")
    seed(env.store, [episode_row("e1")])
    c = login(env, "alice")
    form = hidden(c.get("/").text)
    for path in ("/review/submit", "/review/skip", "/review/release", "/review/leave"):
        for field, value in (("slot", "9" * 30), ("fence", "9" * 30), ("slot", "\u0660")):
            r = c.post(path, data={**form, field: value, "rating": "4", "reason": "x"})
            assert r.status_code in (400, 204), (path, field, r.status_code)  # the beacon answers 204 always
    r = c.post("/review/submit", data={**form, "rating": "\u0665"})  # an Arabic-Indic 5
    assert r.status_code == 422 and _labels(env) == []
    r = c.post("/review/submit", data={**form, "rating": "5"})
    assert r.status_code == 303 and [x.rating for x in _labels(env)] == [5]
    assert form_token(c.get("/").text)  # the page still renders


def test_a_body_over_the_limit_is_refused_before_it_is_read(make_review_env: MakeEnv) -> None:
    env = make_review_env("review.max_request_bytes=10000")
    c = env.client()
    big = {"name": "alice", "password": "x" * 20_000}
    r = c.post(f"{API}/auth/login", json=big)
    assert r.status_code == 413 and "review.max_request_bytes" in r.json()["detail"]
    assert r.headers["x-content-type-options"] == "nosniff"  # through the security headers

    def chunks() -> Any:  # no Content-Length: counted as it arrives
        yield b'{"name": "alice", "password": "'
        for _ in range(5):
            yield b"x" * 5000
        yield b'"}'

    r = c.post(f"{API}/auth/login", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert c.post(f"{API}/auth/login", json={"name": "alice", "password": "x" * 100}).status_code == 401


def test_the_embedded_server_does_not_take_x_forwarded_for_from_loopback(make_review_env: MakeEnv) -> None:
    """`oversight run --review`, the demo and simulate serve with BackgroundServer: uvicorn's
    default trusted X-Forwarded-For from 127.0.0.1, so each guess could name a new address and
    never meet the login throttle."""
    env = make_review_env("review.login_max_failures=3", "review.login_backoff_s=60")
    env.user("alice")
    srv = BackgroundServer(env.app, "127.0.0.1", 0).start()
    try:
        statuses = [
            httpx.post(
                f"{srv.url}api/v1/auth/login",
                json={"name": "alice", "password": f"guess-{i}"},
                headers={"X-Forwarded-For": f"203.0.113.{i}"},
            ).status_code
            for i in range(6)
        ]
    finally:
        srv.stop()
    assert statuses[:3] == [401, 401, 401] and set(statuses[3:]) == {429}, statuses


def test_text_no_store_can_hold_is_a_422_on_every_route_before_it_reaches_the_store(make_review_env: MakeEnv) -> None:
    """A NUL anywhere (path, query, JSON, form) was a 500 with a traceback on PostgreSQL, whose text
    refuses it, on a sign-in too, before anyone was known; an unpaired surrogate inside a list (a
    label's flags) was a 500 on both stores when the refusal quoted it back."""
    env = make_review_env()
    env.user("alice")
    env.user("root", role="admin")
    seed(env.store, [episode_row("e1")])
    anon, alice, root = env.client(), env.client("alice"), env.client("root")
    item = alice.post(f"{API}/queue/claim").json()
    page = browser(env)
    csrf = form_token(page.get("/login").text)
    refused = {
        "login json": anon.post(f"{API}/auth/login", json={"name": "a\x00b", "password": "x"}),
        "login form": page.post("/login", data={"name": "a\x00b", "password": "x", "csrf": csrf}),
        "query": alice.get(f"{API}/guidelines", params={"stream": "\x00"}),
        "page query": page.get("/guidelines?stream=%00"),
        "release": alice.post(f"{API}/items/release", json={**lease(item), "episode_id": "\x00"}),
        "nul flag": alice.post(f"{API}/items/label", json=label_body(item, flags=["a\x00"])),
        "path": root.post(f"{API}/admin/users/x%00/tokens", json={"name": "t"}),
        "body name": root.post(f"{API}/admin/users/alice/tokens", json={"name": "t\x00"}),
    }
    lone = b'"flags": ["\\ud800"], '
    body = json.dumps(label_body(item)).encode().replace(b'"rating"', lone + b'"rating"')
    refused["surrogate flag"] = alice.post(
        f"{API}/items/label", content=body, headers={"content-type": "application/json"}
    )
    for what, r in refused.items():
        assert r.status_code == 422, (what, r.status_code, r.text)
        assert r.json()["detail"][0]["msg"] in (text_guard.NUL, text_guard.SURROGATE)
    # Nothing was stored or broken: the item is still leased to alice and takes a label whose
    # critique *mentions* an escaped NUL (a backslash, then u0000: text, not a NUL).
    r = alice.post(f"{API}/items/label", json=label_body(item, critique="C's \\u0000 terminator"))
    assert r.status_code == 200, r.text
    assert [row[0] for row in _labels(env)] == [label_body(item)["rating"]]
    with env.store.engine.connect() as conn:
        assert conn.execute(sa.select(t.labels.c.critique)).scalar_one() == "C's \\u0000 terminator"


def test_a_refusal_that_quotes_the_client_is_answered_encodable() -> None:
    """A queue refusal quotes what the client sent (an unknown flag); unencodable text in it must
    not turn the 422 into a 500."""
    import asyncio

    from monitor.review.app import queue_error
    from monitor.review.queue import QueueError

    r = asyncio.run(queue_error(None, QueueError("unknown flags: \ud800x", 422)))  # type: ignore[arg-type]
    assert r.status_code == 422
    assert json.loads(bytes(r.body))["detail"][0]["msg"] == "unknown flags: ?x"
