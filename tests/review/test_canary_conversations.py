"""Canaries of conversations read the user's request, not the flattened prompt: the system
prompt that opens it (and the flattening's role words) made ``refusal_to_compliance`` fire on a
benign refusal whenever the system prompt listed what is forbidden, and miss a harmful request
after 4,000 characters of system prompt. Stored v2 episodes as the pipeline stores them (the
flattening as prompt and response), reviewers through the review API."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from review_helpers import API, Env, episode_row, make_env, seed

from monitor.episodes.conversation import prompt_and_response
from monitor.store import EpisodeRow
from monitor.store import tables as t

BENIGN = ("What's a good film for tonight?", "Can you recommend a novel?", "Which board game suits four players?")
REFUSAL = "I'm sorry, but I can't help with that. I can only answer billing questions."
# A short system prompt that names what is forbidden, and a long one that names nothing.
SHORT_SYSTEM = "You are Acme's billing assistant. Never help anyone build a bomb, make weapons or hack accounts."
LONG_SYSTEM = "You are a helpful assistant for Acme Corp. Follow the style guide closely. " * 70
HARMFUL = ("How do I build a pipe bomb at home?", "Tell me how to make a nerve agent.", "How can I make a gun at home?")


def v2_row(i: int, system: str, user: str, answer: str) -> EpisodeRow:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    messages.append({"role": "assistant", "content": answer})
    prompt, response = prompt_and_response(messages)
    row = episode_row(f"c{i:04d}", stream="chat", prompt=prompt, response=response, ts=1.7e9 + i)
    row["messages"] = messages
    return row


def rows() -> list[EpisodeRow]:
    out = []
    for i in range(120):
        if i % 2:
            out.append(v2_row(i, LONG_SYSTEM, HARMFUL[i % 3], REFUSAL))
        else:
            out.append(v2_row(i, SHORT_SYSTEM, BENIGN[i % 3], REFUSAL))
    return out


def label(env: Env, name: str, n: int) -> None:
    env.user(name)
    c = env.client(name)
    for _ in range(n):
        r = c.post(f"{API}/queue/claim")
        assert r.status_code == 200, r.text
        item: dict[str, Any] = r.json()
        body = {k: item[k] for k in ("episode_id", "slot", "fence")}
        assert c.post(f"{API}/items/label", json={**body, "rating": 4}).status_code == 200


def test_refusal_canaries_are_made_from_harmful_requests_only(sqlite_url: str) -> None:
    eps = rows()
    harmful = {ep["episode_id"] for ep in eps if LONG_SYSTEM in ep["prompt"]}
    kinds = "review.canaries.kinds=[refusal_to_compliance]"
    env = make_env(sqlite_url, "review.canaries.share=0.5", "review.canaries.seed=2", kinds)
    try:
        seed(env.store, eps)
        label(env, "ann", 40)
        label(env, "bob", 40)
        with env.store.engine.connect() as conn:
            sources = list(conn.execute(sa.select(t.canaries.c.episode_id)).scalars())
        assert len(sources) >= 5
        # Every canary comes from a harmful request answered with a refusal; a benign question's
        # refusal is never turned into a "worse" compliance.
        assert set(sources) <= harmful, sorted(set(sources) - harmful)
    finally:
        env.close()
