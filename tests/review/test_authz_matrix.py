"""Who may call what: every API endpoint (enumerated from the OpenAPI document, so a new
endpoint cannot be forgotten) x {anonymous, bad token, reviewer, admin, another reviewer's
item}, the CSRF rule for cookie sessions, and the HTML pages (enumerated from the routes)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
from fastapi.routing import APIRoute
from review_helpers import API, PASSWORD, Env, make_env, seed_simple

from monitor.review import auth, queue

ANON, BAD, REV, ADM, OTHER = "anonymous", "bad_token", "reviewer", "admin", "other_reviewers_item"
ANY_USER = {ANON: 401, BAD: 401, REV: 200, ADM: 200}
ADMIN_ONLY = {ANON: 401, BAD: 401, REV: 403, ADM: 200}
ITEM = {ANON: 401, BAD: 401, REV: 200, ADM: 200, OTHER: 409}

# (method, path as in the OpenAPI document) -> role -> exact status.
EXPECT: dict[tuple[str, str], dict[str, int]] = {
    ("POST", f"{API}/auth/login"): {ANON: 200, BAD: 200, REV: 200, ADM: 200},
    ("POST", f"{API}/auth/logout"): ANY_USER,
    ("GET", f"{API}/me"): ANY_USER,
    ("POST", f"{API}/queue/claim"): ANY_USER,
    ("GET", f"{API}/queue"): ANY_USER,
    ("POST", f"{API}/items/label"): ITEM,
    ("POST", f"{API}/items/skip"): ITEM,
    ("POST", f"{API}/items/release"): ITEM,
    ("GET", f"{API}/admin/summary"): ADMIN_ONLY,
    ("GET", f"{API}/admin/reviewers/quality"): ADMIN_ONLY,
    ("GET", f"{API}/admin/assist/report"): ADMIN_ONLY,
    ("GET", f"{API}/admin/estimates/series"): ADMIN_ONLY,
    ("GET", f"{API}/admin/estimates/chart.svg"): ADMIN_ONLY,
    ("GET", f"{API}/admin/rm/sensitivity"): ADMIN_ONLY,
    ("GET", f"{API}/admin/export/pairs.jsonl"): ADMIN_ONLY,
    ("GET", f"{API}/admin/export/ratings.jsonl"): ADMIN_ONLY,
    ("GET", f"{API}/admin/export/ratings.csv"): ADMIN_ONLY,
    ("GET", f"{API}/admin/users"): ADMIN_ONLY,
    ("POST", f"{API}/admin/users"): {**ADMIN_ONLY, ADM: 201},
    ("POST", f"{API}/admin/users/{{name}}/tokens"): {**ADMIN_ONLY, ADM: 201},
    ("GET", f"{API}/progress"): ANY_USER,
    ("POST", f"{API}/items/undo"): ANY_USER,  # the caller labels an item first (see _request)
    ("GET", f"{API}/guidelines"): {ANON: 401, BAD: 401, REV: 404, ADM: 404},  # stream "s" has none
    ("POST", f"{API}/admin/guidelines"): {**ADMIN_ONLY, ADM: 201},
    ("GET", f"{API}/admin/adjudications/pending"): ADMIN_ONLY,
    ("GET", f"{API}/admin/adjudications"): ADMIN_ONLY,
    # An admin gets past authorisation to the episode lookup: the episode named does not exist.
    ("POST", f"{API}/admin/adjudications"): {**ADMIN_ONLY, ADM: 404},
}
CELLS = [(m, p, role, status) for (m, p), roles in EXPECT.items() for role, status in roles.items()]
_names = itertools.count()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    url = f"sqlite:///{tmp_path_factory.mktemp('authz') / 'authz.db'}"
    e = make_env(url)
    e.user("root", "admin")
    e.user("rev")
    e.user("owner")  # holds a lease that "rev" then tries to use
    e.user("login-target")
    seed_simple(e.store, 300)
    yield e
    e.close()


def _own_lease(env: Env, name: str) -> dict[str, Any]:
    item = queue.claim(env.store, env.users[name], 600, env.settings.sampling_key())
    assert item is not None
    c = item.claim
    return {"episode_id": c.episode_id, "slot": c.slot, "fence": c.fence}


def _request(env: Env, method: str, path: str, role: str) -> httpx.Response:
    client = env.client({REV: "rev", ADM: "root", OTHER: "rev"}.get(role))
    if role == BAD:
        client.headers["Authorization"] = "Bearer ovt_not-a-real-token"
    elif path.endswith("/auth/logout") and role in (REV, ADM):
        # Logout revokes the bearer token it is called with: use a throwaway one.
        name = {REV: "rev", ADM: "root"}[role]
        client.headers["Authorization"] = f"Bearer {auth.create_api_token(env.store, env.users[name], 'logout')}"
    actor = {REV: "rev", ADM: "root"}.get(role, "owner")
    body: dict[str, Any] | None = None
    params: dict[str, Any] = {}
    url = path
    if path.endswith("/auth/login"):
        body = {"name": "login-target", "password": PASSWORD}
    elif path.endswith(("/items/label", "/items/skip", "/items/release")):
        body = _own_lease(env, actor)  # an anonymous or "other" caller names the owner's lease
        if path.endswith("/label"):
            body["rating"] = 5
        elif path.endswith("/skip"):
            body["reason"] = "authz test"
    elif path.endswith("/admin/users") and method == "POST":
        body = {"name": f"made-{next(_names)}", "role": "reviewer"}
    elif path.endswith("/tokens"):
        url = path.replace("{name}", "rev")
        body = {"name": "authz"}
    elif path.endswith("/estimates/series") or (path.endswith("/guidelines") and method == "GET"):
        params = {"stream": "s"}
    elif path.endswith("/admin/guidelines"):
        body = {"stream": "authz", "markdown": "authz"}
    elif path.endswith("/admin/adjudications") and method == "POST":
        body = {"episode_id": "authz-missing", "rating": 4, "note": "authz"}
    elif path.endswith("/items/undo") and role in (REV, ADM):
        lease = _own_lease(env, actor)
        flags = env.settings.review.flags
        queue.submit(env.store, env.users[actor], **lease, label=queue.LabelIn(rating=4), flags_allowed=flags)
    # starlette types its TestClient against httpx2: an httpx2.Response where it is installed (huggingface_hub 2
    # brings it), Any to mypy where not; both have httpx.Response's interface.
    return cast(httpx.Response, client.request(method, url, json=body, params=params))


def test_the_table_covers_every_endpoint(env: Env) -> None:
    spec = env.client().get(f"{API}/openapi.json").json()
    found = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert found == set(EXPECT), f"endpoints without expectations: {found - set(EXPECT)}; stale: {set(EXPECT) - found}"


@pytest.mark.parametrize(("method", "path", "role", "status"), CELLS, ids=[f"{m} {p} {r}" for m, p, r, _ in CELLS])
def test_authz_cell(env: Env, method: str, path: str, role: str, status: int) -> None:
    r = _request(env, method, path, role)
    assert r.status_code == status, r.text
    if status == 401:
        assert r.headers.get("www-authenticate") == "Bearer"
    if role == OTHER:
        # The owner's lease is untouched by the other reviewer's attempt.
        held = queue.claim(env.store, env.users["owner"], 600, env.settings.sampling_key())
        assert held is not None and held.claim.fence >= 1


UNSAFE = [(m, p) for (m, p) in EXPECT if m == "POST" and not p.endswith("/auth/login")]


@pytest.mark.parametrize(("method", "path"), UNSAFE, ids=[p for _, p in UNSAFE])
def test_cookie_sessions_need_the_csrf_header(env: Env, method: str, path: str) -> None:
    c = env.session_client("root")
    csrf = c.headers.pop("X-CSRF-Token")
    url = path.replace("{name}", "rev")
    for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": ""}):
        r = c.request(method, url, json={}, headers=headers)
        assert r.status_code == 403, (headers, r.text)
    # GET needs no CSRF header.
    assert c.get(f"{API}/me").status_code == 200
    # The same session with its token passes authorization (an empty body may then be a 422).
    r = c.request(method, url, json={}, headers={"X-CSRF-Token": csrf})
    # (An undo with no recent label of the caller is a 404 or 409: authorized, nothing to undo.)
    assert r.status_code in (200, 201, 204, 422) or (path.endswith("/undo") and r.status_code in (404, 409)), r.text


# -- HTML pages and other routes outside the OpenAPI document ---------------------------------

# (method, path) -> role -> (status, Location or None); roles use session cookies, forms carry no CSRF.
PAGE_EXPECT: dict[tuple[str, str], dict[str, tuple[int, str | None]]] = {
    ("GET", "/login"): {ANON: (200, None), REV: (303, "/"), ADM: (303, "/")},
    ("POST", "/login"): {ANON: (403, None), REV: (403, None), ADM: (403, None)},  # no login CSRF token
    ("POST", "/logout"): {ANON: (303, "/login"), REV: (403, None), ADM: (403, None)},
    ("GET", "/"): {ANON: (303, "/login"), REV: (200, None), ADM: (200, None)},
    ("POST", "/review/submit"): {ANON: (303, "/login"), REV: (403, None), ADM: (403, None)},
    ("POST", "/review/skip"): {ANON: (303, "/login"), REV: (403, None), ADM: (403, None)},
    ("GET", "/admin"): {ANON: (303, "/login"), REV: (403, None), ADM: (200, None)},
    ("GET", "/healthz"): {ANON: (200, None), REV: (200, None), ADM: (200, None)},
    ("GET", "/readyz"): {ANON: (200, None), REV: (200, None), ADM: (200, None)},
    ("GET", "/guidelines"): {ANON: (303, "/login"), REV: (404, None), ADM: (404, None)},  # no stream named
    ("POST", "/review/undo"): {ANON: (303, "/login"), REV: (403, None), ADM: (403, None)},
    ("POST", "/review/release"): {ANON: (303, "/login"), REV: (403, None), ADM: (403, None)},
    ("POST", "/review/leave"): {ANON: (303, "/login"), REV: (403, None), ADM: (403, None)},
    ("POST", "/admin/guidelines"): {ANON: (303, "/login"), REV: (403, None), ADM: (403, None)},
    ("GET", "/admin/adjudication"): {ANON: (303, "/login"), REV: (403, None), ADM: (200, None)},
    ("POST", "/admin/adjudication"): {ANON: (303, "/login"), REV: (403, None), ADM: (403, None)},
}
PAGE_CELLS = [(m, p, role, exp) for (m, p), roles in PAGE_EXPECT.items() for role, exp in roles.items()]


def test_the_pages_are_served(env: Env) -> None:
    """The login form, the reviewer's item and the dashboard, rendered from their templates."""
    login = env.client().get("/login")
    assert login.status_code == 200 and login.headers["content-type"] == "text/html; charset=utf-8"
    assert '<form method="post" action="/login"' in login.text
    assert all(f'name="{field}"' in login.text for field in ("name", "password", "csrf"))
    assert "oversight_login_csrf=" in login.headers["set-cookie"]
    page = _page_client(env, REV).get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert 'id="label-form"' in page.text and 'action="/logout"' in page.text  # an item, and signing out
    assert 'href="/admin"' not in page.text
    dashboard = _page_client(env, ADM).get("/admin")
    assert dashboard.status_code == 200 and "<svg" in dashboard.text
    assert 'href="/api/v1/admin/export/ratings.csv"' in dashboard.text


def _routes(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every route, also inside included routers (FastAPI >= 0.16x keeps
    ``include_router`` lazy: the app's route list then holds the router, not its routes)."""
    for route in routes:
        if isinstance(route, APIRoute):
            assert route.methods is not None  # typed optional, but APIRoute fills in {"GET"}
            yield from ((m, prefix + route.path) for m in route.methods if m != "HEAD")
        elif hasattr(route, "original_router"):  # fastapi.routing._IncludedRouter
            yield from _routes(route.original_router.routes, prefix + route.include_context.prefix)


def test_the_page_table_covers_every_route(env: Env) -> None:
    found = {(m, p) for m, p in _routes(env.app.routes) if not p.startswith(API)}
    assert found == set(PAGE_EXPECT), (
        f"without expectations: {found - set(PAGE_EXPECT)}; stale: {set(PAGE_EXPECT) - found}"
    )
    # The API routes seen this way are exactly the OpenAPI ones: nothing hidden from the schema.
    assert {(m, p) for m, p in _routes(env.app.routes) if p.startswith(API) and "openapi" not in p} == set(EXPECT)


def _page_client(env: Env, role: str) -> Any:
    if role == ANON:
        return env.client()
    return env.session_client({REV: "rev", ADM: "root"}[role])


@pytest.mark.parametrize(
    ("method", "path", "role", "expected"), PAGE_CELLS, ids=[f"{m} {p} {r}" for m, p, r, _ in PAGE_CELLS]
)
def test_page_authz_cell(env: Env, method: str, path: str, role: str, expected: tuple[int, str | None]) -> None:
    c = _page_client(env, role)
    c.headers.pop("X-CSRF-Token", None)
    data = {"episode_id": "e00000", "slot": "0", "fence": "1", "rating": "4", "name": "rev", "password": PASSWORD}
    r = c.request(method, path, data=data if method == "POST" else None, follow_redirects=False)
    status, location = expected
    assert r.status_code == status, r.text[:500]
    if location is not None:
        assert r.headers["location"] == location
    if r.headers.get("content-type", "").startswith("text/html"):
        assert "script-src 'self'" in r.headers["content-security-policy"]


def test_static_files_are_public(env: Env) -> None:
    r = env.client().get("/static/review.js")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]


def test_metrics_are_not_on_the_public_port(env: Env) -> None:
    """Queue depths and login counters are for Prometheus, on the metrics listener only."""
    for role in (ANON, REV, ADM):
        assert _page_client(env, role).get("/metrics").status_code == 404
