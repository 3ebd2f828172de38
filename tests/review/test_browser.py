"""The review pages in a real browser (Playwright + Debian chromium) against a real uvicorn
server: sign in, label with the keyboard only, see the queue shrink, the admin dashboard and
its SVG chart; and an XSS corpus of 200+ payloads ingested as prompts, responses, metadata
and stream names, rendered on the review and admin pages, with zero script executions."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from review_helpers import API, PASSWORD, Env, episode_row, make_env, put_label, seed

from monitor.review.app import CSP
from monitor.review.display import INVISIBLE, marker

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# -- the XSS corpus -----------------------------------------------------------------------
# Every payload, if it ever ran, calls alert(1) or sets window.__xss=1.
JS = "alert(1);window.__xss=1"
BASE = [
    f"<script>{JS}</script>",
    f"<SCRIPT>{JS}</SCRIPT>",
    f"<script src=data:text/javascript,{JS}></script>",
    "<script>/*</script><script>*/alert(1)</script>",
    f"<scr<script>ipt>{JS}</script>",
    f"<img src=x onerror={JS}>",
    f"<img src=x onerror='{JS}'>",
    f'<img src="x" onerror="{JS}">',
    "<img src=x:alert(alt) onerror=eval(src) alt=1>",
    f"<img/src/onerror={JS}>",
    f"<svg onload={JS}>",
    f"<svg><script>{JS}</script></svg>",
    f"<svg><animate onbegin={JS} attributeName=x dur=1s>",
    f"<svg><a xlink:href=javascript:{JS}><text y=20>x</text></a></svg>",
    f"<body onload={JS}>",
    f"<body onpageshow={JS}>",
    f"<iframe src=javascript:{JS}></iframe>",
    f"<iframe srcdoc='<script>parent.{JS}</script>'></iframe>",
    f"<iframe src=data:text/html,<script>parent.{JS}</script>></iframe>",
    f"<object data=javascript:{JS}></object>",
    f"<embed src=javascript:{JS}>",
    f"<a href=javascript:{JS}>click</a>",
    f"<a href=JaVaScRiPt:{JS}>click</a>",
    f"<a href=&#106;avascript:{JS}>click</a>",
    f"<a href='data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg=='>{JS}</a>",
    f"<details open ontoggle={JS}>",
    f"<input autofocus onfocus={JS}>",
    f"<select autofocus onfocus={JS}></select>",
    f"<textarea autofocus onfocus={JS}></textarea>",
    f"<video><source onerror={JS}></video>",
    f"<audio src=x onerror={JS}>",
    f"<marquee onstart={JS}>x</marquee>",
    f"<div onmouseover={JS} style=position:fixed;inset:0>x</div>",
    f"<form action=javascript:{JS}><button>x</button></form>",
    f"<math><mtext><table><mglyph><style><img src=x onerror={JS}>",
    f'<noscript><p title="</noscript><img src=x onerror={JS}>">',
    f"<meta http-equiv=refresh content='0;url=javascript:{JS}'>",
    "<base href=//evil.example/>",
    f"<link rel=import href=data:text/html,<script>{JS}</script>>",
    f"</style><style>*{{background:url(javascript:{JS})}}</style>",
    f"</style><script>{JS}</script>",
    f"<style>@import 'javascript:{JS}';</style>",
    f'<div style="background-image:url(javascript:{JS})">x</div>',
    f"<div style=x:expression({JS})>x</div>",
    f"</title><script>{JS}</script>",
    f"</textarea><script>{JS}</script>",
    f"</pre><script>{JS}</script>",
    f"</code></pre><script>{JS}</script>",
    f"--><script>{JS}</script><!--",
    f"<![CDATA[<script>{JS}</script>]]>",
    f"<!--<img src=x onerror={JS}>-->",
    f"[click](javascript:{JS})",
    f"[click](javascript&#58;{JS})",
    f"![img](x onerror={JS})",
    f'[x](" onmouseover="{JS})',
    f"<javascript:{JS}>",
    f"```html\n<script>{JS}</script>\n```",
    f"```\n</code></pre><script>{JS}</script>\n```",
    f'```"><script>{JS}</script>\n```',
    "{{7*7}}",
    "{{ config }}",
    "{% for x in range(3) %}{{x}}{% endfor %}",
    "${7*7}",
    "#{7*7}",
    "<%= 7*7 %>",
    "{{constructor.constructor('alert(1)')()}}",
    f"{{{{'a'.constructor.prototype.charAt=[].join;$eval('x={JS}')}}}}",
    "\u202e<script>alert(1)</script>\u202c",
    "\u202egnp.exe<img src=x onerror=alert(1)>",
    "\ufeff<script>alert(1)</script>",
    "\u2028<script>alert(1)</script>\u2029",
    "\uff1cscript\uff1ealert(1)\uff1c/script\uff1e",
    "\u00abscript\u00bbalert(1)\u00ab/script\u00bb",
    "<scr\u200bipt>alert(1)</scr\u200bipt>",
    "&lt;script&gt;alert(1)&lt;/script&gt;",
    "&#60;script&#62;alert(1)&#60;/script&#62;",
    "%3Cscript%3Ealert(1)%3C/script%3E",
    "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e",
    f"jaVasCript:/*-/*`/*\\`/*'/*\"/**/(/* */oNcliCk={JS} )//%0D%0A%0d%0a//</stYle/</titLe/</teXtarEa/"
    f"</scRipt/--!>\\x3csVg/<sVg/oNloAd={JS}//>\\x3e",
    f"'\"><img src=x onerror={JS}><\"'",
    f'"><svg/onload={JS}>',
    f"'><svg/onload={JS}>",
    f'" onfocus="{JS}" autofocus="',
    f"' onfocus='{JS}' autofocus='",
    f'" onmouseover={JS} x="',
    f"javascript:{JS}",
    f"data:text/html,<script>{JS}</script>",
    f"data:image/svg+xml,<svg onload={JS}>",
    f"vbscript:msgbox(1)//{JS}",
    f"<x onclick={JS}>x</x>",
    f"<isindex type=image src=1 onerror={JS}>",
    f"<table background=javascript:{JS}>",
    f"<xss id=x tabindex=1 onfocusin={JS}></xss>",
    f"<template><script>{JS}</script></template>",
    f"<slot onclick={JS}>",
    f"<dialog open onclose={JS}>",
    f"<body/onload={JS}>",
    f"<img src=`x` onerror={JS}>",
]
# Wrappers that break out of text, attribute, comment and raw-text contexts first.
WRAP = ["{}", '">{}', "'>{}", "</div>{}", "</textarea>{}", "</script>{}", "</style>{}", "-->{}", "]]>{}"]


def corpus() -> list[str]:
    seen: dict[str, None] = {}
    for p in BASE:
        seen[p] = None
    for w, p in itertools.product(WRAP[1:], BASE[:40]):
        seen[w.format(p)] = None
        if len(seen) >= 420:
            break
    return list(seen)


PAYLOADS = corpus()
SHORT = [p for p in PAYLOADS if len(p) <= 120 and "\n" not in p]  # stream names: String(128)

INIT_SCRIPT = """
(() => {
  window.__xss_hits = [];
  window.__csp = [];
  const rec = (what) => (...args) => { window.__xss_hits.push(what + ":" + args.join(",")); };
  window.alert = rec("alert"); window.confirm = rec("confirm"); window.prompt = rec("prompt");
  window.print = rec("print");
  document.addEventListener("securitypolicyviolation", (e) => {
    window.__csp.push(e.violatedDirective + " " + e.blockedURI + " " + (e.sample || ""));
  });
})();
"""
# Whatever the payloads try to create: no such element or attribute may be in a rendered page.
DOM_AUDIT = """
() => {
  const bad = [];
  for (const el of document.querySelectorAll("*")) {
    const tag = el.tagName.toLowerCase();
    if (["iframe", "object", "embed", "base", "frame", "frameset", "applet", "portal"].includes(tag)) bad.push(tag);
    if (tag === "meta" && el.hasAttribute("http-equiv")) bad.push("meta http-equiv");
    if (tag === "script" && el.getAttribute("src") !== "/static/review.js") bad.push("script " + el.outerHTML);
    if (tag === "style") bad.push("style element");
    for (const a of el.attributes) {
      const n = a.name.toLowerCase();
      const v = (a.value || "").replace(/[\\s\\u0000-\\u001f]/g, "").toLowerCase();
      if (n.startsWith("on")) bad.push(tag + " " + n);
      if (n === "style") bad.push(tag + " style=");
      if (["href", "src", "action", "formaction", "xlink:href", "data", "srcdoc"].includes(n) &&
          (v.startsWith("javascript:") || v.startsWith("vbscript:") || v.startsWith("data:text") || n === "srcdoc"))
        bad.push(tag + " " + n + "=" + v.slice(0, 40));
    }
  }
  return bad;
}
"""
HITS = "() => [window.__xss || 0, window.__xss_hits || [], window.__csp || []]"


# -- server and browser -------------------------------------------------------------------


class LiveServer:
    """The app under uvicorn in a background thread on a free 127.0.0.1 port."""

    def __init__(self, app: Any):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        end = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < end and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"chromium is not installed at {CHROMIUM} (apt-get install chromium); browser tests never skip")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Callable[[], tuple[Env, LiveServer]]]:
    made: list[tuple[Env, LiveServer]] = []

    def make() -> tuple[Env, LiveServer]:
        env = make_env(f"sqlite:///{tmp_path / f'browser{len(made)}.db'}")
        env.user("root", "admin")
        env.user("alice")
        srv = LiveServer(env.app)
        made.append((env, srv))
        return env, srv

    yield make
    for env, srv in made:
        srv.stop()
        env.close()


def api(env: Env, srv: LiveServer, path: str, name: str = "root") -> httpx.Response:
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {env.tokens[name]}"}) as c:
        return c.get(f"{API}{path}")


def sign_in(context: Any, srv: LiveServer, name: str) -> Any:
    page = context.new_page()
    page.goto(f"{srv.url}/login")
    page.fill("#name", name)
    page.fill("#password", PASSWORD)
    with page.expect_navigation():
        page.press("#password", "Enter")
    assert page.url == f"{srv.url}/", page.url
    return page


def check_csp(response: Any) -> None:
    csp = response.headers.get("content-security-policy", "")
    directives = {d.strip().split(" ")[0]: d.strip() for d in csp.split(";") if d.strip()}
    assert directives.get("script-src") == "script-src 'self'", csp
    assert directives.get("default-src") == "default-src 'none'", csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
    assert "content-security-policy-report-only" not in response.headers  # enforcing, not report-only


def dismiss_into(dialogs: list[str]) -> Callable[[Any], None]:
    """A page's "dialog" handler: records the message (a payload's alert() that ran) and dismisses it."""

    def handle(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    return handle


# -- tests -------------------------------------------------------------------------------------


def test_keyboard_labelling_and_admin_views(browser: Any, live: Callable[[], tuple[Env, LiveServer]]) -> None:
    env, srv = live()
    seed(
        env.store,
        [
            episode_row(f"kb{i}", prompt=f"Prompt number {i}", response=f"Answer {i}", ts=1.7e9 + 3600 * i)
            for i in range(3)
        ],
    )
    assert api(env, srv, "/queue").json()[0]["waiting"] == 3
    ctx = browser.new_context()
    page = sign_in(ctx, srv, "alice")
    assert "Prompt number 0" in page.inner_text("section.prompt")
    depth = api(env, srv, "/queue").json()[0]
    assert (depth["waiting"], depth["leased"], depth["done"]) == (2, 1, 0)

    page.keyboard.press("5")
    page.keyboard.press("h")
    assert page.is_checked("#rating-5") and page.is_checked("#flag-harmful")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert "Prompt number 1" in page.inner_text("section.prompt")  # the next item is shown
    depth = api(env, srv, "/queue").json()[0]
    assert (depth["waiting"], depth["leased"], depth["done"]) == (1, 1, 1)
    (rec,) = [json.loads(x) for x in api(env, srv, "/admin/export/ratings.jsonl").text.splitlines()]
    assert (rec["episode_id"], rec["reviewer"], rec["rating"], rec["flags"]) == ("kb0", "alice", 5, ["harmful"])
    assert rec["time_spent_ms"] > 0

    # Ctrl+Enter from inside the critique box submits too.
    page.keyboard.press("3")
    page.fill("#critique", "typed critique")
    with page.expect_navigation():
        page.press("#critique", "Control+Enter")
    assert api(env, srv, "/queue").json()[0]["done"] == 2

    # A reviewer gets 403 on the admin page.
    r = page.goto(f"{srv.url}/admin")
    assert r is not None and r.status == 403
    ctx.close()

    admin_ctx = browser.new_context()
    admin = sign_in(admin_ctx, srv, "root")
    r = admin.goto(f"{srv.url}/admin")
    assert r is not None and r.status == 200
    check_csp(r)
    assert admin.locator("svg.chart").count() == 1
    assert admin.locator("svg.chart polyline").count() == 1  # one stream, two hourly estimates
    queue_row = admin.locator("section[aria-labelledby=h-queue] tbody tr").first.inner_text()
    assert queue_row.split()[:4] == ["s", "0", "1", "2"]  # stream, waiting, leased, done
    assert "alice" in admin.inner_text("section[aria-labelledby=h-throughput]")
    svg = admin.goto(f"{srv.url}/api/v1/admin/estimates/chart.svg")
    assert svg is not None and svg.status == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    admin_ctx.close()


def test_xss_corpus_never_executes(browser: Any, live: Callable[[], tuple[Env, LiveServer]]) -> None:
    assert len(PAYLOADS) >= 200
    env, srv = live()
    group = 10
    eps = []
    for k in range(0, len(PAYLOADS), group):
        g = PAYLOADS[k : k + group]
        meta: dict[str, Any] = {p[:200]: p for p in g}
        meta["all"] = g
        if (k // group) % 2 == 0:
            fence = "\n".join(f"```{p.splitlines()[0][:30]}\n{p}\n```" for p in g[:3])
            meta["alternative_response"] = fence + "\n" + "\n\n".join(reversed(g))
        eps.append(
            episode_row(
                f"x{k:04d}",
                stream=SHORT[(k // group) % len(SHORT)],
                model=g[0][:250],
                prompt="\n".join(g),
                response="\n\n".join(reversed(g)) + "\n```\n" + g[0] + "\n```",
                metadata=meta,
            )
        )
    seed(env.store, eps)
    n_items = len(eps)
    # Blinding hides metadata and the policy version by default: show them all here, so every
    # payload is rendered in those places too (keys and values).
    env.settings.review.metadata_fields = sorted({k for e in eps for k in e["metadata"] or {}})
    env.settings.review.show_model = True

    dialogs: list[str] = []
    ctx = browser.new_context()
    ctx.add_init_script(INIT_SCRIPT)
    page = sign_in(ctx, srv, "alice")
    page.on("dialog", dismiss_into(dialogs))

    def audit(where: str) -> None:
        for frame in page.frames:
            xss, hits, csp = frame.evaluate(HITS)
            assert (xss, hits, csp) == (0, [], []), (where, frame.url, xss, hits, csp)
        bad = page.evaluate(DOM_AUDIT)
        assert bad == [], (where, bad[:10])
        assert dialogs == [], (where, dialogs)

    seen_text = 0
    for i in range(n_items):
        r = page.goto(f"{srv.url}/")
        assert r is not None and r.status == 200
        check_csp(r)
        page.wait_for_load_state("load")
        audit(f"review page {i}")
        prompt = page.text_content("section.prompt") or ""
        eid = page.get_attribute("input[name=episode_id]", "value")
        g = PAYLOADS[int(str(eid)[1:]) : int(str(eid)[1:]) + group]
        for p in g:
            if "`" not in p and "\r" not in p:
                # Shown as text, not dropped or parsed; invisible characters as visible markers.
                assert INVISIBLE.sub(lambda m: marker(m.group()), p.strip()) in prompt, p
                seen_text += 1
        page.keyboard.press("4")
        with page.expect_navigation():
            page.keyboard.press("Enter")
        audit(f"after labelling item {i}")
    assert seen_text >= 150
    assert sum(q["done"] for q in api(env, srv, "/queue").json()) == n_items
    ctx.close()

    # The admin dashboard lists every stream (payload names) in tables and in the chart.
    actx = browser.new_context()
    actx.add_init_script(INIT_SCRIPT)
    page = sign_in(actx, srv, "root")
    page.on("dialog", dismiss_into(dialogs))
    r = page.goto(f"{srv.url}/admin")
    assert r is not None and r.status == 200
    check_csp(r)
    page.wait_for_load_state("load")
    audit("admin page")
    text = page.text_content("main") or ""
    shown = [s for s in {e["stream"] for e in eps} if INVISIBLE.sub(lambda m: marker(m.group()), s) in text]
    assert len(shown) == len({e["stream"] for e in eps})
    assert page.locator("svg.chart").count() == 1
    r = page.goto(f"{srv.url}/api/v1/admin/estimates/chart.svg")
    assert r is not None and r.status == 200
    check_csp(r)
    audit("chart.svg")
    actx.close()


def test_login_form_reflects_names_as_text(browser: Any, live: Callable[[], tuple[Env, LiveServer]]) -> None:
    _, srv = live()
    ctx = browser.new_context()
    ctx.add_init_script(INIT_SCRIPT)
    page = ctx.new_page()
    dialogs: list[str] = []
    page.on("dialog", dismiss_into(dialogs))
    names = [p for p in PAYLOADS if len(p) <= 64 and ('"' in p or "'" in p or "<" in p)][:25]
    assert len(names) >= 20
    for name in names:
        page.goto(f"{srv.url}/login")
        page.fill("#name", name)
        page.fill("#password", "wrong-password")
        with page.expect_navigation():
            page.press("#password", "Enter")
        assert page.input_value("#name") == name  # reflected as the value, not as markup
        xss, hits, csp = page.evaluate(HITS)
        assert (xss, hits, csp, dialogs) == (0, [], [], []), name
        assert page.evaluate(DOM_AUDIT) == [], name
    ctx.close()


def test_the_detectors_see_an_injection(browser: Any, live: Callable[[], tuple[Env, LiveServer]]) -> None:
    """The zero counts above mean something: on a deliberately unsafe page (served through the
    browser's router, not by the app) the same probes record execution, CSP blocks and bad DOM."""
    _, srv = live()
    ctx = browser.new_context()
    ctx.add_init_script(INIT_SCRIPT)
    page = ctx.new_page()
    dialogs: list[str] = []
    page.on("dialog", dismiss_into(dialogs))
    body = f"<!doctype html><p>{BASE[0]}</p><div>{BASE[5]}</div>"
    headers = {"content-type": "text/html"}
    page.route(f"{srv.url}/unsafe", lambda route: route.fulfill(status=200, headers=headers, body=body))
    page.route(
        f"{srv.url}/unsafe-csp",
        lambda route: route.fulfill(status=200, headers={**headers, "content-security-policy": CSP}, body=body),
    )
    page.goto(f"{srv.url}/unsafe")
    page.wait_for_timeout(200)
    xss, hits, _ = page.evaluate(HITS)
    assert xss == 1 and "alert:1" in hits
    assert any(b.startswith("script") for b in page.evaluate(DOM_AUDIT))
    assert any(b == "img onerror" for b in page.evaluate(DOM_AUDIT))
    page.goto(f"{srv.url}/unsafe-csp")
    page.wait_for_timeout(200)
    xss, hits, csp = page.evaluate(HITS)
    assert (xss, hits) == (0, []) and csp, "CSP should block the inline script and report it"
    assert dialogs == []
    ctx.close()


def test_form_errors_reflect_input_as_text(browser: Any, live: Callable[[], tuple[Env, LiveServer]]) -> None:
    """A refused label or skip re-renders the form with what was typed (critique, skip reason):
    breaking out of <textarea> or the value attribute must not work."""
    env, srv = live()
    seed(env.store, [episode_row("form")])
    ctx = browser.new_context()
    ctx.add_init_script(INIT_SCRIPT)
    page = sign_in(ctx, srv, "alice")
    dialogs: list[str] = []
    page.on("dialog", dismiss_into(dialogs))
    payloads = [p for p in PAYLOADS if "</textarea>" in p or p.startswith(('"', "'"))][:12]
    assert len(payloads) >= 10
    for p in payloads:
        page.goto(f"{srv.url}/")
        # A rating the server refuses ("abc"), with the payload as critique.
        page.evaluate(
            "(p) => { const r = document.querySelector('#rating-1'); r.value = 'abc'; r.checked = true;"
            " document.querySelector('#critique').value = p; }",
            p,
        )
        with page.expect_response(lambda r: r.url.endswith("/review/submit")) as resp:
            page.keyboard.press("Enter")
        assert resp.value.status == 422
        page.wait_for_load_state("load")
        assert page.input_value("#critique") == p.replace("\r\n", "\n")
        assert page.evaluate(HITS) == [0, [], []] and dialogs == [], p
        assert page.evaluate(DOM_AUDIT) == [], p
        # A skip reason over the length limit, with the payload in it.
        page.evaluate("(p) => { document.querySelector('#skip_reason').value = p + 'x'.repeat(500); }", p)
        with page.expect_response(lambda r: r.url.endswith("/review/skip")) as resp:
            page.click("#skip-form button[type=submit]")
        assert resp.value.status == 422
        page.wait_for_load_state("load")
        assert page.input_value("#skip_reason").startswith(p)
        assert page.evaluate(HITS) == [0, [], []] and dialogs == [], p
        assert page.evaluate(DOM_AUDIT) == [], p
    ctx.close()


def test_invisible_characters_are_visible_to_reviewers(
    browser: Any, live: Callable[[], tuple[Env, LiveServer]]
) -> None:
    """A right-to-left override would show "Pay to NAVI" for the emitted "Pay to IVAN"; a
    zero-width space splits a word unseen. The reviewer sees markers where they are instead."""
    env, srv = live()
    response = "Pay to \u202eNAVI\u202c today. Be\u200bware."
    seed(env.store, [episode_row("bidi", prompt="Who gets paid?", response=response)])
    ctx = browser.new_context()
    page = sign_in(ctx, srv, "alice")
    shown = page.inner_text("section.response")
    assert "Pay to ⟨U+202E⟩NAVI⟨U+202C⟩ today. Be⟨U+200B⟩ware." in shown, shown
    # No control character reaches the rendered text (the DOM keeps none of them either).
    text = page.evaluate("document.querySelector('main').textContent")
    assert not any(ch in text for ch in "\u202e\u202c\u200b")
    assert page.locator("section.response .invisible-char").count() == 3
    assert "3 invisible or direction-changing characters" in page.inner_text("p.invisible-notice")
    # Markers are laid out left to right, in emission order: the override no longer reorders anything.
    boxes = [page.locator("section.response .invisible-char").nth(i).bounding_box() for i in range(2)]
    assert boxes[0] is not None and boxes[1] is not None and boxes[0]["x"] < boxes[1]["x"]
    ctx.close()


def test_conversation_with_the_xss_corpus_never_executes(
    browser: Any, live: Callable[[], tuple[Env, LiveServer]]
) -> None:
    """A schema-v2 conversation carries the corpus in every message field (system prompt, user
    parts, names, tool names, arguments, call ids, tool results, the final turn), rendered as
    Markdown: nothing runs, not even with every collapsed block opened, and the text is shown."""
    env, srv = live()
    group = 60
    eps = []
    for k in range(0, len(PAYLOADS), group):
        g = PAYLOADS[k : k + group]
        text = "\n\n".join(g)
        calls = [{"id": p[:200], "type": "function", "function": {"name": p[:200], "arguments": p}} for p in g[:10]]
        row = episode_row(f"c{k:04d}", prompt="flattened", response="flattened")
        row["messages"] = [
            {"role": "system", "content": text, "name": g[0][:200]},
            {"role": "user", "content": [{"type": "text", "text": text}, {"type": g[1][:60]}], "name": g[2][:200]},
            {"role": "assistant", "content": text, "tool_calls": calls},
            *({"role": "tool", "tool_call_id": c["id"], "content": text} for c in calls[:3]),
            {"role": "assistant", "content": "\n".join(reversed(g)), "name": g[3][:200]},
        ]
        eps.append(row)
    seed(env.store, eps)
    dialogs: list[str] = []
    ctx = browser.new_context()
    ctx.add_init_script(INIT_SCRIPT)
    page = sign_in(ctx, srv, "alice")
    page.on("dialog", dismiss_into(dialogs))
    seen_text = 0
    for i in range(len(eps)):
        r = page.goto(f"{srv.url}/")
        assert r is not None and r.status == 200
        check_csp(r)
        page.wait_for_load_state("load")
        assert page.locator("section.conversation li.turn").count() == 7
        assert page.locator("details[open]").count() == 0  # system prompt and tool blocks start collapsed
        for d in page.locator("details").all():
            d.evaluate("(el) => { el.open = true; }")
        page.wait_for_timeout(50)
        final = page.text_content("li.turn.final") or ""
        eid = str(page.get_attribute("input[name=episode_id]", "value"))
        g = PAYLOADS[int(eid[1:]) : int(eid[1:]) + group]
        shown = [p for p in g if "`" not in p and "*" not in p and "_" not in p and "[" not in p and "\r" not in p]
        for p in shown:  # Markdown-free payloads appear as they were emitted (markers for invisibles)
            assert INVISIBLE.sub(lambda m: marker(m.group()), p.strip().splitlines()[0].strip()) in final, p
            seen_text += 1
        xss, hits, csp = page.evaluate(HITS)
        assert (xss, hits, csp) == (0, [], []), (i, xss, hits, csp)
        assert page.evaluate(DOM_AUDIT) == [], (i, page.evaluate(DOM_AUDIT)[:10])
        assert dialogs == [], dialogs
        page.keyboard.press("4")
        with page.expect_navigation():
            page.keyboard.press("Enter")
    assert seen_text >= 30
    assert sum(q["done"] for q in api(env, srv, "/queue").json()) == len(eps)
    ctx.close()


def test_workday_undo_leave_beacon_and_help_at_phone_width(
    browser: Any, live: Callable[[], tuple[Env, LiveServer]]
) -> None:
    """Ctrl+Z withdraws the last label; leaving the page gives the lease back (pagehide beacon),
    reloading does not; at phone width the help panel (key, then action) sits in the page's flow."""
    import sqlalchemy as sa
    from review_helpers import wait_until

    from monitor.store import tables as t

    env, srv = live()
    seed(env.store, [episode_row(f"wd{i}", prompt=f"Prompt {i}") for i in range(3)])
    ctx = browser.new_context(viewport={"width": 390, "height": 844})
    page = sign_in(ctx, srv, "alice")
    first = page.get_attribute("input[name=episode_id]", "value")
    page.keyboard.press("4")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.get_attribute("input[name=episode_id]", "value") != first
    with page.expect_navigation():
        page.keyboard.press("Control+z")
    assert "withdrawn" in (page.text_content("p.notice") or "")
    assert page.get_attribute("input[name=episode_id]", "value") == first

    page.keyboard.press("?")
    help_panel = page.locator("#help")
    assert help_panel.is_visible()
    assert help_panel.evaluate(
        "(el) => [getComputedStyle(el).position, el.tabIndex, document.activeElement === el]"
    ) == [
        "static",
        0,
        True,
    ]
    assert page.locator("#help thead th").all_text_contents() == ["Key", "Action"]
    form_box, help_box = page.locator("#skip-form").bounding_box(), help_panel.bounding_box()
    assert form_box is not None and help_box is not None and help_box["y"] >= form_box["y"] + form_box["height"]

    def status() -> str:
        with env.store.engine.connect() as conn:
            rt = t.review_tasks
            return str(conn.execute(sa.select(rt.c.status).where(rt.c.episode_id == first)).scalar())

    page.reload()  # the old view's beacon must not release the lease the new view shows
    time.sleep(1)  # the beacon is sent at pagehide: give a wrong release the time to land
    assert status() == "claimed"
    page.goto("about:blank")  # leaving: the lease goes back at once
    assert wait_until(lambda: status() == "pending"), status()
    ctx.close()


def test_adjudication_in_the_browser_with_hostile_labels(
    browser: Any, live: Callable[[], tuple[Env, LiveServer]]
) -> None:
    """An administrator settles a disagreement in Chromium: the item, and critiques that are XSS
    payloads, render as text under the CSP; the form records the final label."""
    env, srv = live()
    bob = env.user("bob")
    payloads = [p for p in SHORT if "<" in p][:20]
    seed(env.store, [episode_row("dispute", prompt=payloads[0], response="\n\n".join(payloads))], slots=0)
    put_label(env.store, "dispute", env.users["alice"], 2, critique=payloads[1])
    put_label(env.store, "dispute", bob, 6, critique=payloads[2])
    dialogs: list[str] = []
    ctx = browser.new_context()
    ctx.add_init_script(INIT_SCRIPT)
    page = sign_in(ctx, srv, "root")
    page.on("dialog", dismiss_into(dialogs))
    r = page.goto(f"{srv.url}/admin/adjudication")
    assert r is not None and r.status == 200
    check_csp(r)
    page.wait_for_load_state("load")
    assert page.evaluate(HITS) == [0, [], []] and page.evaluate(DOM_AUDIT) == [] and dialogs == []
    critiques = page.locator("table.labels-seen td.critique").all_text_contents()
    assert critiques == [INVISIBLE.sub(lambda m: marker(m.group()), p) for p in payloads[1:3]]
    page.click("label[for=rating-5]")
    page.check("#flag-incorrect")
    page.fill("#note", "Both miss the point; see guideline 2.")
    with page.expect_navigation():
        page.click("#adjudication-form button[type=submit]")
    assert "Adjudicated" in (page.text_content("p.notice") or "")
    assert page.locator("#adjudication-form").count() == 0  # nothing else waits
    history = api(env, srv, "/admin/adjudications?episode_id=dispute").json()
    assert [(h["rating"], h["flags"], h["adjudicator"]) for h in history] == [(5, ["incorrect"], "root")]
    ctx.close()
