"""Accessibility of the review pages: axe-core (``make axe`` installs it from npm into
``.cache/axe``) run in Debian's Chromium on the login page, the item page (keyboard-help panel
open, at desktop and at phone width, with an assistance panel), the empty queue, the guidelines,
the admin dashboard and the adjudication page. No serious or critical violation is allowed.

Never skipped: without axe-core the test fails and says to run ``make axe``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from review_helpers import Env, episode_row, make_env, put_label, seed
from test_browser import ARGS, CHROMIUM, LiveServer, sign_in

from monitor.review import guidelines

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
AXE = Path(os.environ.get("OVERSIGHT_AXE_JS", REPO / ".cache/axe/node_modules/axe-core/axe.min.js"))
BLOCKING = ("serious", "critical")
PHONE = {"width": 375, "height": 740}
DESKTOP = {"width": 1280, "height": 900}


@pytest.fixture(scope="module")
def axe_source() -> str:
    if not AXE.is_file():
        # Never a skip, like Chromium: `make axe` (which `make test` runs) installs node/npm (Debian)
        # and axe-core, so a missing scanner is a broken setup, not a reason to pass unscanned.
        pytest.fail(f"axe-core is not installed at {AXE}: run `make axe` (it installs nodejs and npm if missing)")
    return AXE.read_text(encoding="utf-8")


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
def live(tmp_path: Path) -> Iterator[Callable[..., tuple[Env, LiveServer]]]:
    made: list[tuple[Env, LiveServer]] = []

    def make(*overrides: str) -> tuple[Env, LiveServer]:
        env = make_env(f"sqlite:///{tmp_path / f'axe{len(made)}.db'}", *overrides)
        env.user("root", "admin")
        env.user("alice")
        srv = LiveServer(env.app)
        made.append((env, srv))
        return env, srv

    yield make
    for env, srv in made:
        srv.stop()
        env.close()


def violations(page: Any, axe: str) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page as it is now (rule, impact, nodes)."""
    page.evaluate(axe)  # over the DevTools protocol: the page's CSP does not apply to it
    result = page.evaluate("async () => JSON.stringify((await axe.run(document)).violations)")
    found: list[dict[str, Any]] = json.loads(result)
    return [
        {"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:5]}
        for v in found
        if v["impact"] in BLOCKING
    ]


def test_review_pages_have_no_serious_accessibility_violations(
    browser: Any, live: Callable[..., tuple[Env, LiveServer]], axe_source: str
) -> None:
    env, srv = live(
        "review.assist.enabled=true",
        "review.assist.conditions={helped: [neighbours, drift_signals]}",
    )
    long = "A long answer line that wraps on a phone. " * 40
    eps = [
        episode_row(f"a{i}", prompt=f"How do I boil an egg, variant {i}?", response=f"Boil it for {i} minutes.")
        for i in range(4)
    ]
    eps.append(episode_row("target", prompt="How do I boil an egg, variant 1?", response=long))
    seed(env.store, eps)
    guidelines.save(env.store, "s", "# Rating\n\n- **7**: perfect\n- **1**: harmful or wrong", env.users["root"])
    found: dict[str, list[dict[str, Any]]] = {}

    ctx = browser.new_context(viewport=DESKTOP)
    page = ctx.new_page()
    page.goto(f"{srv.url}/login")
    found["login"] = violations(page, axe_source)
    ctx.close()

    # alice labels the first four (neighbours for the last), then sees the target with its hints.
    ctx = browser.new_context(viewport=DESKTOP)
    page = sign_in(ctx, srv, "alice")
    for _ in range(4):
        page.keyboard.press("3")
        with page.expect_navigation():
            page.keyboard.press("Enter")
    assert page.locator("#hints").count() == 1, "the item page under test shows the hints panel"
    found["item"] = violations(page, axe_source)
    page.keyboard.press("?")
    assert page.is_visible("#help")
    found["item, help open"] = violations(page, axe_source)
    page.set_viewport_size(PHONE)
    page.reload()
    page.keyboard.press("?")
    assert page.is_visible("#help")
    # At phone width the panel is in the flow of the page, not over it.
    box = page.locator("#help").bounding_box()
    assert box is not None and box["width"] <= PHONE["width"]
    found["item, help open, 375px"] = violations(page, axe_source)
    page.goto(f"{srv.url}/guidelines?stream=s")
    found["guidelines, 375px"] = violations(page, axe_source)
    ctx.close()

    ctx = browser.new_context(viewport=DESKTOP)
    admin = sign_in(ctx, srv, "root")
    found["empty queue"] = violations(admin, axe_source)
    admin.goto(f"{srv.url}/admin")
    found["admin"] = violations(admin, axe_source)
    admin.set_viewport_size(PHONE)
    found["admin, 375px"] = violations(admin, axe_source)
    # The adjudication page with an item whose two reviewers disagree (labels written directly).
    bob, carol = env.user("bob"), env.user("carol")
    seed(env.store, [episode_row("disputed", prompt="Is the egg done?", response=long)], slots=0)
    put_label(env.store, "disputed", bob, 2, ["harmful"], critique="see the guidelines")
    put_label(env.store, "disputed", carol, 6, critique="see the guidelines")
    admin.set_viewport_size(DESKTOP)
    admin.goto(f"{srv.url}/admin/adjudication")
    assert admin.locator("#adjudication-form").count() == 1, "the page under test shows an item and its form"
    found["adjudication"] = violations(admin, axe_source)
    admin.set_viewport_size(PHONE)
    found["adjudication, 375px"] = violations(admin, axe_source)
    ctx.close()

    assert {where: v for where, v in found.items() if v} == {}
