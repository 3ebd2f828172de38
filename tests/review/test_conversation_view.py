"""The review page and the item API render a schema-v2 conversation: roles, the system prompt
collapsed, tool calls and results as collapsible blocks, the rated part marked, Markdown rendered
without letting any markup through; ``review.rate`` per stream changes what is rated and the
label records it."""

from __future__ import annotations

import csv
import html
import io
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from review_helpers import API, PASSWORD, Env, TestClient, episode_row, label_body, make_env, seed

from monitor.review.display import INVISIBLE, marker
from monitor.review.markdown import render_markdown, safe_url
from monitor.store import EpisodeRow
from monitor.store import tables as t

WEATHER_ARGS = '{"city": "Paris", "unit": "celsius"}'
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are WeatherBot. Never reveal the API key."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Weather in Paris?"},
            {"type": "image_url", "image_url": {"url": "https://x.example/p.png"}},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": WEATHER_ARGS}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21, "sky": "clear"}'},
    {"role": "assistant", "content": "It is **21 C** and clear in Paris.\n\n- bring `sunglasses`\n- no umbrella"},
]


def v2_row(eid: str, messages: list[dict[str, Any]], *, stream: str = "s", **kw: Any) -> EpisodeRow:
    """A stored v2 episode: its conversation, and prompt/response as a stand-in flattening."""
    row = episode_row(eid, stream=stream, prompt="(flattened prompt)", response="(flattened response)", **kw)
    row["messages"] = messages
    return row


@pytest.fixture
def make_conv_env(sqlite_url: str) -> Iterator[Callable[..., Env]]:
    envs: list[Env] = []

    def make(*overrides: str) -> Env:
        env = make_env(sqlite_url, *overrides)
        env.user("alice")
        envs.append(env)
        return env

    yield make
    for e in envs:
        e.close()


def found(pattern: str, text: str) -> str:
    """The first group of ``pattern`` in ``text`` (which must match), HTML-unescaped."""
    m = re.search(pattern, text)
    assert m is not None, pattern
    return html.unescape(m.group(1))


def page_client(env: Env, name: str = "alice") -> TestClient:
    """A signed-in browser-like client (session cookie); the page's forms carry the CSRF token."""
    c = TestClient(env.app, follow_redirects=False)
    env.clients.append(c)
    login = c.get("/login").text
    token = found(r'name="csrf" value="([^"]*)"', login)
    r = c.post("/login", data={"name": name, "password": PASSWORD, "csrf": token})
    assert r.status_code == 303, r.text
    return c


def main_of(page: str) -> str:
    return page.split("<main>", 1)[1].split("</main>", 1)[0]


def turns(page: str) -> list[str]:
    """The <li class="turn ..."> blocks of the page, in order."""
    return re.findall(r'<li class="turn [^"]*">.*?</li>\n', page, flags=re.S)


def stored_labels(env: Env) -> list[Any]:
    with env.store.engine.connect() as conn:
        return list(conn.execute(sa.select(t.labels).order_by(t.labels.c.id)))


# -- rendering -------------------------------------------------------------------------------


def test_conversation_page_shows_roles_collapsed_system_tool_blocks_and_the_rated_final_turn(
    make_conv_env: Callable[..., Env],
) -> None:
    env = make_conv_env()
    seed(env.store, [v2_row("chat-1", CONVERSATION)])
    page = main_of(page_client(env).get("/").text)

    assert 'class="conversation"' in page
    assert 'class="prompt"' not in page and "response single" not in page  # the flattening is not shown
    assert "(flattened" not in page
    blocks = turns(page)
    assert [found(r"role-(\w+)", b) for b in blocks] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    system, user, call, result, final = blocks
    # The system prompt is collapsed: a <details> that is not open.
    assert '<details class="system-prompt">' in system and "Never reveal the API key." in system
    assert "[image]" in user and "Weather in Paris?" in user  # a non-text part as a placeholder
    # The tool call: a collapsible block with its name and its arguments pretty-printed.
    assert '<details class="tool-call">' in call and "<code>get_weather</code>" in call
    assert json.dumps(json.loads(WEATHER_ARGS), indent=2) in html.unescape(call)
    # The tool result names the call it answers.
    assert '<details class="tool-result">' in result and "<code>get_weather</code>" in result
    assert "call_1" in result and "temp_c" in result
    # Only the final assistant turn is marked as rated; Markdown rendered.
    assert 'class="turn role-assistant final rated"' in final and "rated-badge" in final
    assert not any("rated" in b.split(">", 1)[0] for b in blocks[:-1])
    assert "<strong>21 C</strong>" in final and "<li>bring <code>sunglasses</code></li>" in final
    assert "Rating of the final assistant turn" in page


def test_item_api_returns_the_conversation(make_review_env: Callable[..., Env]) -> None:
    env = make_review_env()  # SQLite and PostgreSQL (JSONB read back as text)
    env.user("alice")
    seed(env.store, [v2_row("chat-1", CONVERSATION)])
    item = env.client("alice").post(f"{API}/queue/claim").json()
    assert item["rate"] == "final_turn"
    assert item["response"] == "(flattened response)"  # prompt/response keep the flattening
    msgs = item["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant"]
    assert msgs[1]["content"] == "Weather in Paris?\n[image]"
    assert msgs[2]["tool_calls"] == [{"id": "call_1", "name": "get_weather", "arguments": WEATHER_ARGS}]
    assert (msgs[3]["tool_call_id"], msgs[3]["tool_name"]) == ("call_1", "get_weather")
    assert [m["final"] for m in msgs] == [False, False, False, False, True]
    assert [m["rated"] for m in msgs] == [False, False, False, False, True]


def test_v1_items_render_as_before(make_conv_env: Callable[..., Env]) -> None:
    env = make_conv_env()
    seed(env.store, [episode_row("v1", prompt="Plain **prompt**", response="Plain <b>answer</b>")])
    item = env.client("alice").post(f"{API}/queue/claim").json()
    assert item["messages"] is None and item["prompt"] == "Plain **prompt**"
    page = main_of(page_client(env).get("/").text)
    assert 'class="conversation"' not in page and '<details class="system-prompt"' not in page
    assert '<section class="prompt"' in page and '<section class="response single"' in page
    # v1 text is not Markdown-rendered: shown as it was emitted, escaped.
    assert '<div class="prose">Plain **prompt**</div>' in page
    assert '<div class="prose">Plain &lt;b&gt;answer&lt;/b&gt;</div>' in page
    assert "<legend>Rating <span" in page


# -- hostile content -------------------------------------------------------------------------

XSS = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    '"><svg onload=alert(1)>',
    "[click](javascript:alert(1))",
    "[click](JaVaScRiPt:alert(1))",
    "[x](data:text/html,<script>alert(1)</script>)",
    '[x](https://ok.example/" onmouseover="alert(1))',
    "![img](https://evil.example/track.png)",
    "![x](x onerror=alert(1))",
    "**<img src=x onerror=alert(1)>**",
    "`</code><script>alert(1)</script>`",
    "```html\n<script>alert(1)</script>\n```",
    "<a href='javascript:alert(1)'>x</a>",
    "Pay to \u202eNAVI\u202c, be\u200bware",
    "[fine](https://fine.example/path)",
]
HUGE = '{"blob": "' + "A" * 100_000 + '"}'


def hostile_conversation() -> list[dict[str, Any]]:
    text = "\n\n".join(XSS)
    return [
        {"role": "system", "content": text, "name": XSS[2]},
        {"role": "developer", "content": text},
        {"role": "user", "content": [{"type": "text", "text": text}, {"type": "<script>", "x": 1}], "name": XSS[1]},
        {
            "role": "assistant",
            "content": text,
            "tool_calls": [
                {"id": XSS[2], "type": "function", "function": {"name": XSS[0], "arguments": text}},
                {"id": "big", "type": "function", "function": {"name": "upload", "arguments": HUGE}},
            ],
        },
        {"role": "tool", "tool_call_id": XSS[2], "content": text},
        {"role": "tool", "tool_call_id": "big", "content": HUGE},
        {"role": "<script>alert(1)</script>", "content": text},
        {"role": "assistant", "content": text, "name": XSS[0]},
    ]


def assert_inert(page: str) -> None:
    """No markup from the episode survives: no element or attribute it could have injected."""
    assert "<script" not in page.replace('<script src="/static/review.js" defer></script>', "")
    assert re.search(r"<[a-z][^>]*\son[a-z]+\s*=", page, flags=re.I) is None
    assert re.search(r"<(img|svg|iframe|object|embed|style|base|meta)\b", page, flags=re.I) is None
    assert "style=" not in page
    for href in re.findall(r'href="([^"]*)"', page):
        assert href.startswith(("/", "https://", "http://")), href
        assert "javascript" not in href.lower() and '"' not in html.unescape(href), href
    for tag in re.findall(r"<a [^>]*>", page):
        if 'href="http' in tag:
            assert 'rel="noopener noreferrer nofollow"' in tag, tag


def test_hostile_content_in_every_message_field_is_inert(make_conv_env: Callable[..., Env]) -> None:
    env = make_conv_env()
    seed(env.store, [v2_row("evil", hostile_conversation())])
    r = page_client(env).get("/")
    assert r.status_code == 200
    assert "default-src 'none'" in r.headers["content-security-policy"]
    page = main_of(r.text)
    assert_inert(page)
    # Shown as text instead: the escaped payloads are on the page.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "[click](javascript:alert(1))" in page  # a javascript: link stays text
    assert "[image: img] (https://evil.example/track.png)" in page  # an image is never loaded
    # The only links are the http(s) one (its URL shown next to it); the quoted one stays text.
    assert set(re.findall(r'<a href="([^"]*)"', page)) == {"https://fine.example/path"}
    assert '<span class="md-url">(https://fine.example/path)</span>' in page
    assert "[x](https://ok.example/&#34; onmouseover=&#34;alert(1))" in page
    # Invisible characters as markers, counted in the notice.
    assert INVISIBLE.sub(lambda m: marker(m.group()), "Pay to \u202eNAVI\u202c") in html.unescape(
        re.sub(r"<[^>]+>", "", page)
    )
    assert not any(ch in page for ch in "\u202e\u202c\u200b")
    assert "invisible or direction-changing character" in page
    # The huge arguments and result are cut on the page, with a marker.
    assert page.count("more characters)") >= 2 and "A" * 100_000 not in page
    # An unknown role is shown as such, never used as markup or a class name as given.
    assert "role-unknown" in page and "Unknown role" in page
    # The API returns the same fields as JSON text, whole.
    item = env.client("alice").post(f"{API}/queue/claim").json()
    assert item["messages"][3]["tool_calls"][1]["arguments"] == HUGE
    assert item["messages"][6]["role"] == "unknown"
    assert item["invisible_characters"]["messages"] > 0


def test_markdown_subset_is_escaped_first() -> None:
    out = str(render_markdown("Hi <b>x</b> **bold** *em* `a<b` [ok](https://ok.example/a?b=1&c=2)"))
    assert "&lt;b&gt;x&lt;/b&gt;" in out and "<strong>bold</strong>" in out and "<em>em</em>" in out
    assert "<code>a&lt;b</code>" in out
    assert '<a href="https://ok.example/a?b=1&amp;c=2" rel="noopener noreferrer nofollow" target="_blank">ok</a>' in out
    assert '<span class="md-url">(https://ok.example/a?b=1&amp;c=2)</span>' in out  # where it goes, visibly
    assert "snake_case_name" in str(render_markdown("snake_case_name"))  # no emphasis inside words
    fenced = str(render_markdown("```sh <b>rate this 7</b>\nls\n```"))
    assert '<span class="fence-info">sh &lt;b&gt;rate this 7&lt;/b&gt;</span><code>ls</code>' in fenced
    ol = str(render_markdown("3. three\n4. four"))
    assert '<ol start="3"><li>three</li><li>four</li></ol>' in ol
    for url in ("javascript:alert(1)", "data:text/html,x", "//evil.example", "http:/x", "https://a\u202eb.example"):
        assert safe_url(url) is None, url
        assert "<a " not in str(render_markdown(f"[x]({url})")), url
    # Long text is shown as plain escaped text, never parsed.
    long = "**x** <script>" * 10_000
    plain = str(render_markdown(long))
    assert "<strong>" not in plain and "<script>" not in plain


# -- what is rated ---------------------------------------------------------------------------


def test_rate_conversation_per_stream_changes_what_is_marked_and_recorded(
    make_review_env: Callable[..., Env],
) -> None:
    env = make_review_env("review.streams.agents.rate=conversation", "review.flags=[harmful,refusal]")
    env.user("alice")
    seed(env.store, [v2_row("c-final", CONVERSATION, stream="chat"), v2_row("c-whole", CONVERSATION, stream="agents")])
    seed(env.store, [episode_row("v1", stream="agents")], created_at=2_000.0)
    c = page_client(env)

    def label_current(expect_whole: bool | None) -> str:
        page = main_of(c.get("/").text)
        eid = found(r'name="episode_id" value="([^"]*)"', page)
        if expect_whole is None:
            assert 'class="conversation' not in page
        elif expect_whole:
            assert '<section class="conversation rated"' in page and "Rated: the whole conversation" in page
            assert "Rating of the whole conversation" in page
            assert not any(" rated" in b.split(">", 1)[0] for b in turns(page))  # no single turn singled out
        else:
            assert '<section class="conversation"' in page and "Rating of the final assistant turn" in page
            assert sum(" rated" in b.split(">", 1)[0] for b in turns(page)) == 1
        form = page.split('id="label-form"', 1)[1]
        fields = {k: found(rf'name="{k}" value="([^"]*)"', form) for k in ("episode_id", "slot", "fence", "csrf")}
        r = c.post("/review/submit", data={**fields, "rating": "5", "flags": ["harmful"]})
        assert r.status_code == 303, r.text
        return eid

    assert label_current(False) == "c-final"
    assert label_current(True) == "c-whole"
    assert label_current(None) == "v1"
    # What was rated has a column of its own (NULL for a v1 episode); the flags are the reviewer's.
    by_id = {r.episode_id: (r.flags, r.rated) for r in stored_labels(env)}
    assert by_id == {
        "c-final": (["harmful"], "final_turn"),
        "c-whole": (["harmful"], "conversation"),
        "v1": (["harmful"], None),
    }
    # Both exports carry it as a field of its own.
    env.user("root", "admin")
    admin = env.client("root")
    recs = {
        r["episode_id"]: r for r in map(json.loads, admin.get(f"{API}/admin/export/ratings.jsonl").text.splitlines())
    }
    assert {k: (r["flags"], r["rated"]) for k, r in recs.items()} == {
        "c-final": (["harmful"], "final_turn"),
        "c-whole": (["harmful"], "conversation"),
        "v1": (["harmful"], None),
    }
    csv_text = admin.get(f"{API}/admin/export/ratings.csv").text
    assert "rated:" not in csv_text
    rows = {r["episode_id"]: (r["flags"], r["rated"]) for r in csv.DictReader(io.StringIO(csv_text))}
    assert rows == {"c-final": ("harmful", "final_turn"), "c-whole": ("harmful", "conversation"), "v1": ("harmful", "")}


def test_item_api_reports_the_stream_rate(make_conv_env: Callable[..., Env]) -> None:
    env = make_conv_env("review.rate=conversation", "review.streams.chat.rate=final_turn")
    seed(env.store, [v2_row("a", CONVERSATION, stream="agents"), v2_row("b", CONVERSATION, stream="chat")])
    a = env.client("alice")
    first = a.post(f"{API}/queue/claim").json()
    assert (first["episode_id"], first["rate"]) == ("a", "conversation")
    assert all(m["rated"] for m in first["messages"])
    assert a.post(f"{API}/items/label", json=label_body(first)).status_code == 200
    second = a.post(f"{API}/queue/claim").json()
    assert (second["episode_id"], second["rate"]) == ("b", "final_turn")
    assert [m["rated"] for m in second["messages"]] == [False, False, False, False, True]
    assert a.post(f"{API}/items/label", json=label_body(second)).status_code == 200
    assert [(r.episode_id, r.flags, r.rated) for r in stored_labels(env)] == [
        ("a", [], "conversation"),
        ("b", [], "final_turn"),
    ]


def test_a_skip_of_a_conversation_records_nothing_rated(make_conv_env: Callable[..., Env]) -> None:
    env = make_conv_env("review.rate=conversation")
    seed(env.store, [v2_row("skipped", CONVERSATION)])
    a = env.client("alice")
    item = a.post(f"{API}/queue/claim").json()
    skip = {k: item[k] for k in ("episode_id", "slot", "fence")}
    assert a.post(f"{API}/items/skip", json={**skip, "reason": "not my language"}).status_code == 200
    assert [(r.skipped, r.flags, r.rated) for r in stored_labels(env)] == [(True, [], None)]


def test_blinding_still_applies_to_conversations(make_conv_env: Callable[..., Env]) -> None:
    env = make_conv_env()
    row = v2_row("blind", CONVERSATION, model="secret-model-v7", metadata={"judge_pref": "secret-answer"})
    seed(env.store, [row])
    page = main_of(page_client(env).get("/").text)
    item = env.client("alice").post(f"{API}/queue/claim").json()
    assert item["model"] is None and item["metadata"] is None
    for shown in (page, json.dumps(item)):
        assert "secret-model-v7" not in shown and "secret-answer" not in shown


def test_pairwise_conversation_shows_context_then_both_responses(make_conv_env: Callable[..., Env]) -> None:
    env = make_conv_env()
    seed(env.store, [v2_row("pair", CONVERSATION, metadata={"alternative_response": "Alternative answer"})])
    page = main_of(page_client(env).get("/").text)
    blocks = turns(page)
    assert len(blocks) == 4 and not any("final" in b.split(">", 1)[0] for b in blocks)  # context only
    assert 'class="pair"' in page and "Alternative answer" in page and "(flattened response)" in page


def test_a_pair_rates_final_turns_even_where_the_stream_rates_conversations(make_conv_env: Callable[..., Env]) -> None:
    env = make_conv_env("review.rate=conversation")
    seed(env.store, [v2_row("pair", CONVERSATION, metadata={"alternative_response": "Alternative answer"})])
    a = env.client("alice")
    item = a.post(f"{API}/queue/claim").json()
    assert item["rate"] == "final_turn" and [m["rated"] for m in item["messages"]][-1] is True
    assert a.post(f"{API}/items/label", json=label_body(item, preference="tie")).status_code == 200
    assert [(r.flags, r.rated) for r in stored_labels(env)] == [([], "final_turn")]
