"""Human labels in a real store for the update and gate tests of the brought-in kinds: episodes
and reviewer ratings written to the ``episodes`` and ``labels`` tables as the review UI writes them."""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from monitor.review.auth import create_user
from monitor.store import Store
from monitor.store import tables as t


@dataclass(frozen=True)
class Rated:
    episode_id: str
    prompt: str
    response: str
    rating: int
    ts: float = 1000.0
    stream: str = "chat"


def fill(store: Store, rated: Sequence[Rated]) -> None:
    user = create_user(store, f"rev-{time.time_ns()}", "reviewer", "correct horse battery")
    now = time.time()
    eps, labels = [], []
    for r in rated:
        eps.append(
            {
                "episode_id": r.episode_id,
                "stream": r.stream,
                "model": "policy",
                "ts": r.ts,
                "prompt": r.prompt,
                "response": r.response,
                "metadata": {},
                "source": "test",
                "position": r.episode_id,
                "ingested_at": now,
            }
        )
        labels.append(
            {
                "episode_id": r.episode_id,
                "slot": 0,
                "user_id": user.id,
                "stream": r.stream,
                "skipped": False,
                "rating": r.rating,
                "flags": [],
                "critique": "",
                "time_spent_ms": 1000,
                "created_at": now,
            }
        )
    with store.engine.begin() as conn:
        conn.execute(t.episodes.insert(), eps)
        conn.execute(t.labels.insert(), labels)


def alpaca_rated(by_instruction: dict[str, list[dict[str, Any]]], n: int, per_prompt: int = 2) -> list[Rated]:
    """Real AlpacaEval outputs of ``n`` instructions, ``per_prompt`` models each, rated 1-7 by the
    percentile of the judge's preference over the corpus (the reviewers' ratings here)."""
    prefs = sorted(float(r["judge_pref"]) for rows in by_instruction.values() for r in rows)
    out: list[Rated] = []
    for k, (instr, rows) in enumerate(by_instruction.items()):
        if k >= n:
            break
        for j, r in enumerate(rows[:per_prompt]):
            rating = 1 + min(6, int(7 * bisect.bisect_left(prefs, float(r["judge_pref"])) / len(prefs)))
            out.append(Rated(f"a{k}-{j}", instr, r["output"], rating, ts=1000.0 + k))
    return out
