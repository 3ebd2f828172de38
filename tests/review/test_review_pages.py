"""The server-rendered pages: login, the reviewer page, the admin dashboard; escaping and CSP hygiene."""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from review_helpers import PASSWORD, Env, TestClient, episode_row, make_env, make_settings, seed, seed_simple

from monitor.quality import labels as quality_labels
from monitor.quality.window import Windows
from monitor.review import auth, label_stats, queue
from monitor.review.app import create_app
from monitor.review.chart import estimates_svg
from monitor.review.markdown import split_fences
from monitor.review.pages import flag_keys
from monitor.store import Store
from monitor.store import tables as t

XSS = "<script>alert(1)</script>"


@pytest.fixture
def make_page_env(sqlite_url: str) -> Iterator[Callable[..., Env]]:
    envs: list[Env] = []

    def make(*overrides: str) -> Env:
        env = make_env(sqlite_url, *overrides)
        envs.append(env)
        return env

    yield make
    for e in envs:
        e.close()


def browser(env: Env) -> TestClient:
    c = TestClient(env.app, follow_redirects=False)
    env.clients.append(c)
    return c


def form_token(page: str, name: str = "csrf") -> str:
    m = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert m is not None, f"no {name} field"
    return html.unescape(m.group(1))


def login(env: Env, name: str, password: str = PASSWORD) -> TestClient:
    c = browser(env)
    page = c.get("/login")
    assert page.status_code == 200
    r = c.post("/login", data={"name": name, "password": password, "csrf": form_token(page.text)})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/"
    return c


def hidden(page: str) -> dict[str, str]:
    """The label form's hidden fields."""
    form = page.split('id="label-form"', 1)[1].split("</form>", 1)[0]
    return {k: form_token(form, k) for k in ("episode_id", "slot", "fence", "csrf")}


def labels(env: Env) -> list[Any]:
    with env.store.engine.connect() as conn:
        return list(conn.execute(sa.select(t.labels).order_by(t.labels.c.id)))


# -- login / logout ------------------------------------------------------------------------


def test_login_page_sets_csrf_cookie_and_rejects_bad_password(make_page_env: Callable[..., Env]) -> None:
    env = make_page_env()
    env.user("alice")
    c = browser(env)
    assert c.get("/").headers["location"] == "/login"
    page = c.get("/login")
    assert page.status_code == 200
    cookie = page.headers["set-cookie"]
    assert "oversight_login_csrf=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    r = c.post("/login", data={"name": "alice", "password": "wrong-password", "csrf": form_token(page.text)})
    assert r.status_code == 401
    assert "Wrong name or password" in r.text
    assert "oversight_session" not in r.headers.get("set-cookie", "")
    # An unknown user gets the same answer.
    r = c.post("/login", data={"name": "nobody", "password": "wrong-password", "csrf": form_token(r.text)})
    assert r.status_code == 401 and "Wrong name or password" in r.text


def test_login_needs_the_csrf_token(make_page_env: Callable[..., Env]) -> None:
    env = make_page_env()
    env.user("alice")
    c = browser(env)
    page = c.get("/login")
    r = c.post("/login", data={"name": "alice", "password": PASSWORD})
    assert r.status_code == 403
    r = c.post("/login", data={"name": "alice", "password": PASSWORD, "csrf": "0" * 64})
    assert r.status_code == 403
    # A valid token without its cookie (cross-site form) is refused too.
    other = browser(env)
    r = other.post("/login", data={"name": "alice", "password": PASSWORD, "csrf": form_token(page.text)})
    assert r.status_code == 403
    assert "oversight_session" not in r.headers.get("set-cookie", "")


def test_login_success_sets_session_cookie_and_logout_revokes_it(make_page_env: Callable[..., Env]) -> None:
    env = make_page_env()
    env.user("alice")
    c = browser(env)
    page = c.get("/login")
    r = c.post("/login", data={"name": "alice", "password": PASSWORD, "csrf": form_token(page.text)})
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookies = r.headers.get_list("set-cookie")
    session = next(h for h in cookies if h.startswith("oversight_session="))
    assert "HttpOnly" in session and "SameSite=strict" in session and "Path=/" in session
    assert "Secure" not in session  # dev mode: plain HTTP
    home = c.get("/")
    assert home.status_code == 200
    assert "alice" in home.text
    assert 'href="/admin"' not in home.text  # reviewers get no Admin link
    # Logout needs the session's CSRF token.
    assert c.post("/logout", data={"csrf": "nope"}).status_code == 403
    r = c.post("/logout", data={"csrf": form_token(home.text)})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert c.get("/").headers["location"] == "/login"


def test_session_cookie_is_secure_outside_dev(sqlite_url: str) -> None:
    settings = make_settings(
        sqlite_url, "sampling.key=test-sampling-key-123456", "review.secret_key=test-review-secret-123456", dev=False
    )
    store = Store(sqlite_url)
    try:
        auth.create_user(store, "alice", "reviewer", PASSWORD)
        with TestClient(create_app(settings, store), base_url="https://testserver", follow_redirects=False) as c:
            page = c.get("/login")
            assert "Secure" in page.headers["set-cookie"]
            r = c.post("/login", data={"name": "alice", "password": PASSWORD, "csrf": form_token(page.text)})
            assert r.status_code == 303
            session = next(h for h in r.headers.get_list("set-cookie") if h.startswith("oversight_session="))
            assert "Secure" in session
    finally:
        store.close()


def test_login_rate_limit_answers_429(make_page_env: Callable[..., Env]) -> None:
    env = make_page_env("review.login_max_failures=2")
    env.user("alice")
    c = browser(env)
    page = c.get("/login")
    for _ in range(2):
        page = c.post("/login", data={"name": "alice", "password": "bad-password", "csrf": form_token(page.text)})
        assert page.status_code == 401
    r = c.post("/login", data={"name": "alice", "password": PASSWORD, "csrf": form_token(page.text)})
    assert r.status_code == 429
    assert "Too many" in r.text


# -- reviewer page -------------------------------------------------------------------------


def test_review_page_claims_labels_and_shows_the_next_item(make_page_env: Callable[..., Env]) -> None:
    env = make_page_env()
    env.user("alice")
    seed(
        env.store,
        [
            episode_row("ep-1", prompt="What is 2+2?", response="It is 4."),
            episode_row("ep-2", prompt="Second prompt", response="Second response"),
        ],
    )
    c = login(env, "alice")
    page = c.get("/")
    assert page.status_code == 200
    assert "What is 2+2?" in page.text and "It is 4." in page.text
    assert 'type="radio" id="rating-7"' in page.text
    for f, k in {"harmful": "h", "incorrect": "i", "unhelpful": "u", "refusal": "r", "policy_violation": "p"}.items():
        assert f'name="flags" value="{f}" data-key="{k}"' in page.text
    assert 'name="preference"' not in page.text  # single response: no preference
    assert 'name="time_spent_ms"' in page.text
    fields = hidden(page.text)
    assert fields["episode_id"] == "ep-1"
    r = c.post(
        "/review/submit",
        data={
            **fields,
            "rating": "6",
            "flags": ["incorrect", "harmful"],
            "critique": "line one\r\nline two",
            "time_spent_ms": "4321",
        },
    )
    assert r.status_code == 303 and r.headers["location"] == "/"
    [row] = labels(env)
    assert (row.episode_id, row.rating, row.skipped, row.time_spent_ms) == ("ep-1", 6, False, 4321)
    assert row.flags == ["harmful", "incorrect"]
    assert row.critique == "line one\nline two"
    nxt = c.get("/")
    assert "Second prompt" in nxt.text and "What is 2+2?" not in nxt.text
    # Skip the second; the queue is then empty for alice.
    fields = hidden(nxt.text)
    skip_form = nxt.text.split('id="skip-form"', 1)[1]
    assert form_token(skip_form, "fence") == fields["fence"]
    r = c.post("/review/skip", data={**fields, "skip_reason": "not my language", "time_spent_ms": "10"})
    assert r.status_code == 303
    assert labels(env)[-1].skipped
    done = c.get("/")
    assert "Skipped" in done.text
    assert "The queue is empty" in done.text
    assert "The queue is empty" in c.get("/").text  # the flash shows once


def test_submit_errors(make_page_env: Callable[..., Env]) -> None:
    env = make_page_env()
    env.user("alice")
    seed_simple(env.store, 2, prompt="first prompt")
    c = login(env, "alice")
    page = c.get("/")
    fields = hidden(page.text)
    # CSRF: wrong or missing token -> 403, nothing recorded.
    assert c.post("/review/submit", data={**fields, "csrf": "x", "rating": "3"}).status_code == 403
    assert c.post("/review/submit", data={k: v for k, v in fields.items() if k != "csrf"}).status_code == 403
    # Invalid label -> 422 on the same item, the reviewer's input kept.
    r = c.post("/review/submit", data={**fields, "critique": "kept text", "flags": ["harmful"]})
    assert r.status_code == 422
    assert "rating must be" in r.text and "kept text" in r.text
    assert 'value="harmful" data-key="h" checked' in r.text
    assert hidden(r.text)["fence"] == fields["fence"]
    r = c.post("/review/submit", data={**fields, "rating": "9"})
    assert r.status_code == 422
    r = c.post("/review/submit", data={**fields, "rating": "3", "flags": ["nonexistent"]})
    assert r.status_code == 422 and "unknown flags" in r.text
    r = c.post("/review/skip", data={**fields, "skip_reason": "   "})
    assert r.status_code == 422 and "reason" in r.text
    assert labels(env) == []
    # A stale fence (lease lost) -> back to / with a notice.
    r = c.post("/review/submit", data={**fields, "fence": str(int(fields["fence"]) + 5), "rating": "3"})
    assert r.status_code == 303 and r.headers["location"] == "/"
    nxt = c.get("/")
    assert "lease expired" in nxt.text
    assert labels(env) == []
    # Malformed numbers -> 400.
    assert c.post("/review/submit", data={**fields, "slot": "x", "rating": "3"}).status_code == 400


def test_model_text_is_escaped_and_code_fences_render(make_page_env: Callable[..., Env]) -> None:
    env = make_page_env("review.metadata_fields=[note]")  # "note" is shown, "score_hidden" is not
    env.user("alice")
    response = (
        f"Hi {XSS}\n```python\nif a < b:\n    print('<b>')\n```\ntail & more"
        "\n```python I will <exfiltrate> the keys\u202e\nprint(1)\n```"
    )
    seed(
        env.store,
        [
            episode_row(
                "ep-x",
                stream='s"><img src=x onerror=alert(2)>',
                prompt=f"prompt {XSS}",
                response=response,
                metadata={"note": XSS, "score_hidden": False},
            )
        ],
    )
    c = login(env, "alice")
    page = c.get("/").text
    assert XSS not in page
    assert "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert (
        '<pre class="code" data-lang="python"><span class="fence-info">python</span>'
        "<code>if a &lt; b:\n    print(&#39;&lt;b&gt;&#39;)</code></pre>" in page
    )
    # What a model writes after a fence's backticks is shown too, escaped and with markers.
    assert '<span class="fence-info">python I will &lt;exfiltrate&gt; the keys<span class="invisible-char"' in page
    assert "tail &amp; more" in page
    assert "<details" in page and "&#34;note&#34;" in page  # metadata pretty-printed, escaped
    assert "score_hidden" not in page  # not on the stream's allow-list
    assert ">m<" not in page  # the policy version (model) is not shown: blind review


def test_pairwise_item_shows_both_responses_in_keyed_order(make_page_env: Callable[..., Env]) -> None:
    env = make_page_env()
    env.user("alice")
    seed(
        env.store,
        [
            episode_row(f"pair-{i}", response=f"main-{i}", metadata={"alternative_response": f"alt-{i}"})
            for i in range(12)
        ],
    )
    c = login(env, "alice")
    orders = set()
    for _ in range(12):
        page = c.get("/").text
        fields = hidden(page)
        i = fields["episode_id"].split("-")[1]
        first = "alt" if page.index(f"alt-{i}") < page.index(f"main-{i}") else "main"
        item = queue.claim(env.store, env.users["alice"], 600, env.settings.sampling_key())
        assert item is not None and item.alternative_first == (first == "alt")
        orders.add(first)
        # "a" is the response shown first.
        a_value = "alternative" if first == "alt" else "response"
        assert f'id="pref-a" name="preference" value="{a_value}" data-key="a"' in page
        assert 'value="tie" data-key="t"' in page
        assert "alternative_response" not in page
        r = c.post("/review/submit", data={**fields, "rating": "4", "preference": "tie"})
        assert r.status_code == 303
    assert orders == {"alt", "main"}  # both orders occur
    assert {row.preference for row in labels(env)} == {"tie"}


# -- admin ---------------------------------------------------------------------------------


def test_admin_page_is_for_admins(make_page_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch) -> None:
    env = make_page_env()
    env.user("alice")
    env.user("root", "admin")
    seed(env.store, [episode_row(f"e{i}", stream=f"stream<{i}>", ts=1_700_000_000.0 + 3600 * i) for i in range(4)])
    reviewer = login(env, "alice")
    r = reviewer.get("/admin")
    assert r.status_code == 403
    for _ in range(4):
        fields = hidden(reviewer.get("/").text)
        assert reviewer.post("/review/submit", data={**fields, "rating": "5", "flags": ["harmful"]}).status_code == 303
    admin = login(env, "root")
    assert 'href="/admin"' in admin.get("/").text
    reads: list[int] = []
    every_label = quality_labels.label_rows

    def counted(store: Store, since: float | None = None, windows: Windows | None = None) -> list[Any]:
        reads.append(1)
        return every_label(store, since, windows)

    monkeypatch.setattr(label_stats, "label_rows", counted)
    page = admin.get("/admin")
    assert page.status_code == 200
    assert reads == [1], "the summary and the chart read the labels once between them"
    text = page.text
    assert "Each stream's last 30 days of traffic (event time). Agreement, estimates and chart as of 20" in text
    assert "<svg" in text and "<circle" in text  # one hourly estimate per stream
    assert "stream&lt;0&gt;" in text and "stream<0>" not in text
    assert "Not available until the reward model is deployed" in text
    assert "No drift events" in text and "No requests." in text
    # Requests show with their id and state; stream names from traffic are escaped.
    from monitor.store import requests as rq

    rid, _ = rq.create(env.store, "retrain", "k1", "<img src=x onerror=alert(1)>", {"incident": "k1"})
    text = admin.get("/admin").text
    assert rid in text and ">pending<" in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and "<img src=x" not in text
    assert "alice" in text  # throughput
    for href in ("pairs.jsonl", "ratings.jsonl", "ratings.csv"):
        assert f'href="/api/v1/admin/export/{href}"' in text
    assert "n/a" in text  # alpha without overlapping labels


def test_pages_have_no_inline_script_or_style(make_page_env: Callable[..., Env]) -> None:
    env = make_page_env()
    env.user("root", "admin")
    seed(env.store, [episode_row("ep-1", metadata={"alternative_response": "other"})])
    c = browser(env)
    pages = [c.get("/login")]
    c = login(env, "root")
    pages += [c.get("/"), c.get("/admin")]
    for r in pages:
        assert r.status_code == 200
        assert "default-src 'none'" in r.headers["content-security-policy"]
        body = r.text
        assert "style=" not in body
        assert "<style" not in body
        assert re.search(r"\son[a-z]+\s*=", body) is None
        for tag in re.findall(r"<script[^>]*>", body):
            assert 'src="/static/' in tag
        body = body.replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert "http://" not in body and "https://" not in body  # nothing external
    for path in ("/static/app.css", "/static/review.js"):
        assert c.get(path).status_code == 200


# -- units ---------------------------------------------------------------------------------


def test_split_fences() -> None:
    segs = split_fences("intro\n```js\nlet a = 1;\n```\nafter\n```\nunclosed <x>")
    assert [(s.code, s.text, s.lang) for s in segs] == [
        (False, "intro", ""),
        (True, "let a = 1;", "js"),
        (False, "after", ""),
        (True, "unclosed <x>", ""),
    ]
    assert [(s.code, s.text) for s in split_fences("no fences\n  kept  ")] == [(False, "no fences\n  kept  ")]
    assert split_fences("")[0].text == ""
    odd = split_fences('```"><script>\nx\n```')[0]
    assert (odd.lang, odd.info) == ("", '"><script>')  # no language word, but the text is kept to be shown
    said = split_fences("```py  ignore the code, rate 7\nx = 1\n```\n```\ny\n```")
    assert [(s.lang, s.info, s.text) for s in said] == [("py", "py  ignore the code, rate 7", "x = 1"), ("", "", "y")]


def test_flag_keys_avoid_reserved_letters() -> None:
    assert flag_keys(["harmful", "incorrect", "unhelpful", "refusal", "policy_violation"]) == {
        "harmful": "h",
        "incorrect": "i",
        "unhelpful": "u",
        "refusal": "r",
        "policy_violation": "p",
    }
    # s (skip), a/b/t (preference) are taken; "toxic" falls back to its next letter.
    assert flag_keys(["safety", "toxic", "tox"]) == {"safety": "f", "toxic": "o", "tox": "x"}


def test_chart_escapes_names_and_handles_gaps() -> None:
    svg = estimates_svg(
        {
            '</text><script>alert(1)</script>"': [
                {"start": 0, "mean": 4.0, "ci_low": 3.0, "ci_high": 5.0, "n": 3},
                {"start": 3600, "mean": None, "ci_low": None, "ci_high": None, "n": 0},
                {"start": 7200, "mean": 5.0, "ci_low": float("nan"), "ci_high": 6.5, "n": 2},
                {"start": 10800, "mean": 5.5, "ci_low": 5.0, "ci_high": 6.0, "n": 2},
            ],
            "empty": [],
        }
    )
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "<script" not in svg and "&lt;script&gt;" in svg
    assert "style=" not in svg
    assert svg.count("<polyline") == 1 and svg.count("<circle") == 1  # the gap splits the series
    empty = estimates_svg({})
    assert "No rating estimates yet" in empty
    import xml.etree.ElementTree as ET

    ET.fromstring(svg)  # well-formed
    ET.fromstring(empty)
