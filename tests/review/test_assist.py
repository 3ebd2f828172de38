"""Assistance experiments: the built-in assistants on a real store with real episodes and labels
(AlpacaEval rows, labels submitted through the review API), the blinding of their hints, the
hints panel and the item JSON under each condition, escaping, and failing assistants."""

from __future__ import annotations

import html
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from realdata import alpaca_rows
from review_helpers import API, PASSWORD, Env, TestClient, episode_row, make_env, make_settings, seed

from monitor.assist import (
    AssistantFactory,
    AssistContext,
    EpisodeView,
    Hint,
    assistants_of,
    check_experiment,
    condition_of,
    register,
    registered,
)
from monitor.assist.builtin import DriftSignals, Neighbours, RmScore, percentile_of
from monitor.config import ConfigError
from monitor.store import EpisodeRow, Store
from monitor.store import tables as t

HOSTILE = '<script>alert(1)</script><img src=x onerror="alert(2)">'
SECRET = "ANSWER-KEY-7731"


@pytest.fixture(scope="module")
def real() -> list[dict[str, Any]]:
    return alpaca_rows("claude-2")[:120]


def real_row(i: int, row: dict[str, Any], *, stream: str = "chat", prefix: str = "r", **kw: Any) -> EpisodeRow:
    return episode_row(
        f"{prefix}{i:04d}",
        stream=stream,
        prompt=row["instruction"],
        response=row["output"],
        ts=1.7e9 + i,
        metadata={"judge_pref": SECRET},
        model="claude-2",
        **kw,
    )


def context(url: str, store: Store, *overrides: str) -> AssistContext:
    return AssistContext(store=store, settings=make_settings(url, *overrides), now=1.8e9)


def view(ep: EpisodeRow, *, response: str | None = None, alternative: str | None = None) -> EpisodeView:
    return EpisodeView(
        ep["episode_id"], ep["stream"], ep["prompt"], ep["response"] if response is None else response, alternative
    )


def label_all(env: Env, user: str, ratings: dict[str, int]) -> None:
    """Claim and label every waiting item as ``user`` through the API (rating by episode id)."""
    c = env.client(user)
    while True:
        r = c.post(f"{API}/queue/claim")
        if r.status_code == 204:
            return
        item = r.json()
        body = {k: item[k] for k in ("episode_id", "slot", "fence")}
        r = c.post(f"{API}/items/label", json={**body, "rating": ratings.get(item["episode_id"], 4)})
        assert r.status_code == 200, r.text


@pytest.fixture
def envs(sqlite_url: str) -> Iterator[Callable[..., Env]]:
    made: list[Env] = []

    def make(*overrides: str, url: str = sqlite_url) -> Env:
        env = make_env(url, *overrides)
        made.append(env)
        return env

    yield make
    for e in made:
        e.close()


# -- rm_score -------------------------------------------------------------------------------


def activate(store: Store, version: str, scores: dict[str, tuple[str, float]]) -> None:
    """A reward-model version made active for the default stream set, and its stored scores."""
    with store.engine.begin() as conn:
        conn.execute(
            t.rm_versions.insert().values(
                version=version, path=f"/models/{version}", status="active", data_window={}, metrics={}, created_at=1.0
            )
        )
        conn.execute(t.rm_active.insert().values(stream_set="default", version=version, generation=1, updated_at=1.0))
        for i, (eid, (stream, score)) in enumerate(scores.items()):
            conn.execute(
                t.rm_scores.insert().values(
                    episode_id=eid, version=version, stream=stream, score=score, ts=1.7e9 + i, created_at=1.0
                )
            )


def test_rm_score_reads_the_stored_score_and_its_percentile_in_the_stream(
    sqlite_url: str, real: list[dict[str, Any]]
) -> None:
    store = Store(sqlite_url)
    try:
        eps = [real_row(i, r) for i, r in enumerate(real[:40])]
        others = [real_row(i, r, stream="other", prefix="o") for i, r in enumerate(real[40:50])]
        seed(store, eps + others)
        scores = {ep["episode_id"]: ("chat", (i * 7 % 40) / 10.0) for i, ep in enumerate(eps[:30])}
        # Another stream's scores are all above: counted, they would pull the percentile down.
        scores |= {ep["episode_id"]: ("other", 100.0) for ep in others}
        ctx = context(sqlite_url, store)
        assert RmScore({}).hints(view(eps[0]), ctx) == []  # no active version yet

        activate(store, "v1", scores)
        target = eps[3]
        (h,) = RmScore({}).hints(view(target), ctx)
        own = scores[target["episode_id"]][1]
        chat = [s for st, s in scores.values() if st == "chat"]
        assert (h.assistant, h.kind, h.score) == ("rm_score", "score", own)
        assert h.percentile == pytest.approx(percentile_of(own, chat))
        assert h.percentile == pytest.approx(
            100 * (sum(s < own for s in chat) + 0.5 * sum(s == own for s in chat)) / 30
        )
        assert "30 most recent scored episodes" in h.text and f"{own:.3f}" in h.text

        # Fewer scores than min_scores: the score alone.
        (h2,) = RmScore({"min_scores": 31}).hints(view(target), ctx)
        assert h2.percentile is None and h2.text == f"Reward model score {own:.3f}"
        # Silent: an unscored episode, text other than the scored one, a pair.
        assert RmScore({}).hints(view(eps[35]), ctx) == []
        assert RmScore({}).hints(view(target, response=target["response"] + " Also, 2+2=5."), ctx) == []
        assert RmScore({}).hints(view(target, alternative=eps[4]["response"]), ctx) == []
    finally:
        store.close()


# -- drift_signals --------------------------------------------------------------------------


def test_drift_signals_flags_what_is_outside_the_streams_recent_range(
    sqlite_url: str, real: list[dict[str, Any]]
) -> None:
    store = Store(sqlite_url)
    try:
        eps = [real_row(i, r) for i, r in enumerate(real[:100])]
        seed(store, eps)
        ctx = context(sqlite_url, store)
        assistant = DriftSignals({})
        long = "\n".join(r["output"] for r in real[:40])  # far longer than any single answer
        hints = assistant.hints(view(eps[0], response=long), ctx)
        texts = {h.text.split(" ", 2)[0] + " " + h.text.split(" ", 2)[1]: h for h in hints}
        assert all(h.assistant == "drift_signals" and h.kind == "flag" for h in hints)
        length = texts["Response length"]
        assert f"{len(long):,}" in length.text and "above the stream's usual range" in length.text
        assert "central 95% of its 99 most recent episodes" in length.text

        refusal = assistant.hints(view(eps[1], response="I'm sorry, but I cannot help with that."), ctx)
        assert any(h.text.startswith("The response opens like a refusal: yes") for h in refusal)
        # An ordinary answer of the stream is inside every continuous range.
        typical = sorted(eps, key=lambda e: len(e["response"]))[50]
        assert not any("Response length" in h.text for h in assistant.hints(view(typical), ctx))
        # Too few episodes for a reference: nothing.
        assert DriftSignals({"min_reference": 1000, "window": 2000}).hints(view(eps[0], response=long), ctx) == []
        # Another stream's episodes are no reference for this one.
        assert DriftSignals({}).hints(EpisodeView("x", "empty-stream", "p", long), ctx) == []
    finally:
        store.close()


def test_builtin_parameters_are_checked(sqlite_url: str) -> None:
    with pytest.raises(ValueError, match="window"):
        Neighbours({"window": 0})
    with pytest.raises(ValueError, match="unknown text signals"):
        DriftSignals({"signals": ["no_such_signal"]})
    with pytest.raises(ValueError, match="Extra inputs"):
        RmScore({"windw": 10})


# -- neighbours -----------------------------------------------------------------------------


def test_neighbours_are_labelled_episodes_of_the_same_stream_only(
    envs: Callable[..., Env], real: list[dict[str, Any]], db_url: str
) -> None:
    env = envs(url=db_url)
    env.user("alice")
    env.user("bob")
    chat = [real_row(i, r) for i, r in enumerate(real[:20])]
    # The other stream holds the very same texts (marked): only the stream keeps them out.
    other = [real_row(i, r, stream="other", prefix="o") for i, r in enumerate(real[:20])]
    for ep in other:
        ep["prompt"] = "Zyxwv " + ep["prompt"]
    seed(env.store, chat + other)
    label_all(env, "alice", {ep["episode_id"]: 1 + i % 7 for i, ep in enumerate(chat)})

    # A new chat episode: the same question as chat[5], reworded a little.
    target = episode_row(
        "new", stream="chat", prompt=real[5]["instruction"] + " Please be brief.", response=real[5]["output"]
    )
    seed(env.store, [target], slots=2, created_at=5000.0)
    label_all(env, "bob", {"new": 7})  # bob labels slot 0 of the item itself: never its own neighbour
    ctx = AssistContext(store=env.store, settings=env.settings, now=1.8e9)
    hints = Neighbours({}).hints(view(target), ctx)
    assert hints, "the near-duplicate is a neighbour"
    first = hints[0]
    assert first.assistant == "neighbours" and first.kind == "note" and first.score == 6.0
    assert "rated 6/7" in first.text and real[5]["instruction"][:40] in first.text
    assert 1 <= len(hints) <= 3
    for h in hints:
        assert "Zyxwv" not in h.text  # nothing from the other stream
        assert "rated 7/7" not in h.text  # bob's label of this very episode
        assert SECRET not in h.text and "claude-2" not in h.text and "alice" not in h.text
    # The other stream's reviewers get its own episodes, never chat's.
    mirror = Neighbours({}).hints(EpisodeView("new-o", "other", target["prompt"], target["response"]), ctx)
    assert mirror and all("Zyxwv" in h.text for h in mirror)
    assert Neighbours({}).hints(EpisodeView("n2", "nowhere", target["prompt"], target["response"]), ctx) == []


# -- the review page and API ----------------------------------------------------------------


class Highlighter:
    """A real assistant (for the tests) that marks the whole response as a span, with a note that
    is itself hostile text: whatever an assistant says, the page must escape it."""

    name: ClassVar[str] = "test_highlight"

    def hints(self, episode: EpisodeView, ctx: AssistContext) -> list[Hint]:
        end = min(len(episode.response), 40)
        return [
            Hint(assistant=self.name, kind="span", field="response", start=0, end=end, text=f"note {HOSTILE}"),
            Hint(assistant=self.name, kind="flag", text=f"flag {HOSTILE}"),
        ]


class Broken:
    name: ClassVar[str] = "test_broken"

    def hints(self, episode: EpisodeView, ctx: AssistContext) -> list[Hint]:
        raise RuntimeError("the assistant's backend is down")


STUCK = threading.Event()


class Stuck:
    """Waits until the test ends: always later than the experiment's timeout."""

    name: ClassVar[str] = "test_stuck"

    def hints(self, episode: EpisodeView, ctx: AssistContext) -> list[Hint]:
        STUCK.wait(30)
        return []


@pytest.fixture(scope="module", autouse=True)
def test_assistants() -> Iterator[None]:
    factories: dict[str, AssistantFactory] = {
        "test_highlight": lambda params: Highlighter(),
        "test_broken": lambda params: Broken(),
        "test_stuck": lambda params: Stuck(),
    }
    for name, factory in factories.items():
        if name not in registered():
            register(name, factory)
    yield
    STUCK.set()


def experiment(conditions: str, *more: str) -> tuple[str, ...]:
    return ("review.assist.enabled=true", "review.assist.seed=11", f"review.assist.conditions={conditions}", *more)


def login(env: Env, name: str) -> TestClient:
    c = TestClient(env.app, follow_redirects=False)
    env.clients.append(c)
    page = c.get("/login")
    m = re.search(r'name="csrf" value="([^"]*)"', page.text)
    assert m is not None
    r = c.post("/login", data={"name": name, "password": PASSWORD, "csrf": html.unescape(m.group(1))})
    assert r.status_code == 303
    return c


def hints_section(page: str) -> str | None:
    m = re.search(r'<section id="hints".*?</section>', page, re.S)
    return None if m is None else m.group(0)


def test_without_an_experiment_no_panel_and_no_hints(envs: Callable[..., Env]) -> None:
    env = envs()
    env.user("alice")
    seed(env.store, [episode_row("a"), episode_row("b")])
    item = env.client("alice").post(f"{API}/queue/claim").json()
    assert item["hints"] == []
    env.user("bob")
    page = login(env, "bob").get("/")
    assert page.status_code == 200 and hints_section(page.text) is None and "Assistance" not in page.text


def test_hints_are_escaped_and_spans_marked(envs: Callable[..., Env]) -> None:
    env = envs(*experiment("{helped: [test_highlight]}"))
    env.user("alice")
    env.user("bob")
    seed(env.store, [episode_row("x1", response=HOSTILE + " and more"), episode_row("x2", response=HOSTILE)])
    item = env.client("alice").post(f"{API}/queue/claim").json()
    assert [h["kind"] for h in item["hints"]] == ["span", "flag"]
    assert item["hints"][0] == {
        "assistant": "test_highlight",
        "kind": "span",
        "text": f"note {HOSTILE}",
        "score": None,
        "percentile": None,
        "field": "response",
        "start": 0,
        "end": 40,
    }
    page = login(env, "bob").get("/")
    panel = hints_section(page.text)
    assert panel is not None
    assert 'role="region"' in panel and 'aria-labelledby="h-hints"' in panel and 'tabindex="0"' in panel
    assert "<script>" not in panel and "<img" not in panel and "&lt;script&gt;alert(1)" in panel
    quote = re.search(r"<mark>(.*?)</mark>", panel, re.S)
    assert quote is not None and html.unescape(quote.group(1)) == HOSTILE[:40]
    assert "helped" not in page.text  # no condition name shown


def test_the_condition_decides_the_hints_and_nothing_else(envs: Callable[..., Env], real: list[dict[str, Any]]) -> None:
    env = envs(*experiment("{control: [], helped: [test_highlight]}"))
    cfg = env.settings.review.assist
    users = [env.user(f"u{i}") for i in range(6)]
    eps = [real_row(i, r) for i, r in enumerate(real[:6])]
    seed(env.store, eps)
    seen: dict[str, list[dict[str, Any]]] = {"control": [], "helped": []}
    for u in users:
        item = env.client(u.name).post(f"{API}/queue/claim").json()
        cond = condition_of(cfg, u.id, item["episode_id"], item["slot"])
        assert cond is not None
        seen[cond].append(item)
        assert bool(item["hints"]) == bool(assistants_of(cfg, cond))
    assert seen["control"] and seen["helped"], "seed 11 puts these six in both conditions"
    keys = {frozenset(i) for items in seen.values() for i in items}
    assert len(keys) == 1  # the same fields whatever the condition
    for items in seen.values():
        for i in items:
            assert "control" not in str(i) and "helped" not in str(i)


def test_a_failing_or_late_assistant_shows_nothing_and_is_counted(envs: Callable[..., Env]) -> None:
    env = envs(
        *experiment("{c: [test_broken, test_stuck, test_highlight]}", "review.assist.timeout_s=2"),
    )
    env.user("alice")
    seed(env.store, [episode_row("f1", response="a fine answer")])
    r = env.client("alice").post(f"{API}/queue/claim")
    assert r.status_code == 200
    assert {h["assistant"] for h in r.json()["hints"]} == {"test_highlight"}  # the others yield nothing
    reg = env.app.state.review.metrics.registry
    got = {
        a: reg.get_sample_value("oversight_assist_errors_total", {"assistant": a})
        for a in ("test_broken", "test_stuck", "test_highlight", "rm_score", "neighbours", "drift_signals")
    }
    assert got == {
        "test_broken": 1.0,
        "test_stuck": 1.0,
        "test_highlight": 0.0,
        "rm_score": 0.0,  # pre-zeroed
        "neighbours": 0.0,
        "drift_signals": 0.0,
    }


def test_the_builtin_assistants_on_the_page(envs: Callable[..., Env], real: list[dict[str, Any]]) -> None:
    env = envs(*experiment("{all: [rm_score, drift_signals, neighbours]}"))
    env.user("alice")
    env.user("bob")
    eps = [real_row(i, r) for i, r in enumerate(real[:60])]
    eps[7]["prompt"] = HOSTILE + " " + eps[7]["prompt"]
    seed(env.store, eps)
    label_all(env, "alice", {ep["episode_id"]: 2 for ep in eps})
    target = episode_row("t", stream="chat", prompt=eps[7]["prompt"], response=eps[7]["response"] * 12)
    seed(env.store, [target], created_at=9000.0)
    page = login(env, "bob").get("/")
    panel = hints_section(page.text)
    assert panel is not None
    assert "Similar labelled episode" in panel and "rated 2/7" in panel
    assert "above the stream" in panel  # twelve answers in one: longer than the stream's range
    assert "<script>" not in panel and "&lt;script&gt;" in panel
    assert SECRET not in page.text


def test_a_canary_is_not_its_own_sources_neighbour(envs: Callable[..., Env], real: list[dict[str, Any]]) -> None:
    # Canaries are made from labelled episodes: were the assistants to see the canary's own id, the
    # source would be its closest labelled neighbour, its prompt quoted and its rating shown.
    env = envs(*experiment("{all: [neighbours]}"), "review.canaries.share=0.5", "review.canaries.seed=3")
    env.user("alice")
    env.user("bob")
    labelled = [real_row(i, r) for i, r in enumerate(real[:40])]
    seed(env.store, labelled)
    label_all(env, "alice", {ep["episode_id"]: 2 for ep in labelled})
    seed(env.store, [real_row(i, r, prefix="u") for i, r in enumerate(real[40:80], start=40)], created_at=9000.0)
    prompts = {ep["episode_id"]: ep["prompt"] for ep in labelled}
    c = env.client("bob")
    seen = 0
    for _ in range(40):
        r = c.post(f"{API}/queue/claim")
        if r.status_code == 204:
            break
        item = r.json()
        with env.store.engine.connect() as conn:
            source = conn.execute(
                sa.select(t.canaries.c.episode_id).where(t.canaries.c.id == item["episode_id"])
            ).scalar_one_or_none()
        if source is not None:
            seen += 1
            quoted = " ".join(h["text"] for h in item["hints"])
            assert prompts[source][:150] not in quoted
        body = {k: item[k] for k in ("episode_id", "slot", "fence")}
        assert c.post(f"{API}/items/label", json={**body, "rating": 4}).status_code == 200
    assert seen > 0, "no canary was served: the test did not test anything"


# -- configuration ---------------------------------------------------------------------------


def test_an_experiment_naming_an_unknown_assistant_fails_closed(sqlite_url: str) -> None:
    s = make_settings(sqlite_url, *experiment("{a: [rm_score, no_such_helper]}"))
    with pytest.raises(ConfigError, match=r"unknown assistants \['no_such_helper'\]"):
        check_experiment(s.review.assist)
    with pytest.raises(ConfigError, match="unknown assistants"):
        make_env(sqlite_url, *experiment("{a: [no_such_helper]}"))
    bad = make_settings(
        sqlite_url, *experiment("{a: [neighbours]}", "review.assist.assistant_params={neighbours: {k: 0}}")
    )
    with pytest.raises(ConfigError, match=r"assistant_params\.neighbours: .*k"):
        check_experiment(bad.review.assist)
    stray = make_settings(sqlite_url, *experiment("{a: [neighbours]}", "review.assist.assistant_params={rm_score: {}}"))
    with pytest.raises(ConfigError, match="no condition uses"):
        check_experiment(stray.review.assist)
    ok = make_settings(sqlite_url, *experiment("{a: [], b: [rm_score, neighbours]}"))
    assert sorted(check_experiment(ok.review.assist)) == ["neighbours", "rm_score"]
