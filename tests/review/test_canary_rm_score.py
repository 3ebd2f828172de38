"""A perturbed canary shows a reward-model score hint like every real item: its text is scored by
the active version when it is made (monitor/review/canary_score.py). Real episodes, a real
built-in reward model registered and promoted in the store's registry, reviewers through the
review API."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from realdata import alpaca_rows
from review_helpers import API, Env, episode_row, make_env, seed

from monitor.reward.kinds import Item
from monitor.reward.model import ModelConfig, RewardModel
from monitor.reward.registry import Registry
from monitor.reward.scorer import load_version
from monitor.store import EpisodeRow, Store
from monitor.store import tables as t

EPISODES = 150  # ids r0000-r0149: the canaries take free ids of their shape (r01xx)
CANARIES = ("review.canaries.share=0.3", "review.canaries.seed=1")


def experiment(conditions: str) -> tuple[str, ...]:
    return ("review.assist.enabled=true", "review.assist.seed=3", f"review.assist.conditions={conditions}")


@pytest.fixture(scope="module")
def rows() -> list[EpisodeRow]:
    return [
        episode_row(f"r{i:04d}", stream="chat", prompt=r["instruction"], response=r["output"], ts=1.7e9 + i)
        for i, r in enumerate(alpaca_rows("claude-2")[:EPISODES])
    ]


def promote_version(store: Store, models: Path) -> tuple[str, Path]:
    """A real built-in model registered and made active; every episode scored by it, as the
    pipeline's scorer stores scores (human review samples a subset of what the model scores)."""
    model = RewardModel.create(ModelConfig(finetune_layers=0, max_length=64), seed=1)
    registry = Registry(store, models)
    version = registry.register(model, data_window={}, metrics={})
    registry.promote(version)
    return version, registry.path_of(version)


def store_scores(store: Store, version: str, path: Path, eps: list[EpisodeRow], settings: Any) -> None:
    backend = load_version(settings.reward, path, None, threads=1)
    scores = backend.score([Item(ep["prompt"], ep["response"]) for ep in eps])
    with store.engine.begin() as conn:
        for ep, s in zip(eps, scores, strict=True):
            assert s.ok
            conn.execute(
                t.rm_scores.insert().values(
                    episode_id=ep["episode_id"],
                    version=version,
                    stream="chat",
                    score=s.value,
                    ts=ep["ts"],
                    created_at=1.0,
                )
            )


def review_all(env: Env, users: tuple[str, ...], per_user: int) -> list[tuple[dict[str, Any], Any]]:
    """Each user claims and labels up to ``per_user`` items; each item with its canary row (None: real)."""
    seen = []
    for name in users:
        env.user(name)
        c = env.client(name)
        for _ in range(per_user):
            r = c.post(f"{API}/queue/claim")
            if r.status_code == 204:
                break
            assert r.status_code == 200, r.text
            item = r.json()
            with env.store.engine.connect() as conn:
                row = conn.execute(sa.select(t.canaries).where(t.canaries.c.id == item["episode_id"])).first()
            seen.append((item, row))
            body = {k: item[k] for k in ("episode_id", "slot", "fence")}
            assert c.post(f"{API}/items/label", json={**body, "rating": 4}).status_code == 200
    return seen


def scored(item: dict[str, Any]) -> list[float]:
    return [h["score"] for h in item["hints"] if h["assistant"] == "rm_score"]


@dataclass
class Scored:
    """A review app whose experiment shows rm_score, over episodes all scored by an active version."""

    env: Env
    store: Store
    version: str
    path: Path


@pytest.fixture
def scored_env(sqlite_url: str, rows: list[EpisodeRow], tmp_path: Path) -> Iterator[Scored]:
    store = Store(sqlite_url)
    seed(store, rows)
    version, path = promote_version(store, tmp_path / "models")
    overrides = (*CANARIES, *experiment("{rm: [rm_score]}"), f"reward.models_dir={tmp_path / 'models'}")
    env = make_env(sqlite_url, *overrides)
    try:
        store_scores(store, version, path, rows, env.settings)
        yield Scored(env, store, version, path)
    finally:
        env.close()
        store.close()


@pytest.mark.slow  # a real reward model scores every episode and canary: about 25 s each here
def test_a_perturbed_canary_shows_the_active_versions_score_of_its_own_text(
    scored_env: Scored, rows: list[EpisodeRow]
) -> None:
    env, store, version, path = scored_env.env, scored_env.store, scored_env.version, scored_env.path
    seen = review_all(env, ("ann", "bob", "cy"), 30)
    tally = Counter(("real" if row is None else row.presentation, bool(scored(item))) for item, row in seen)
    # Every item a reviewer sees carries the hint, the perturbed canaries as the real items.
    assert tally[("perturbed", True)] >= 3, tally
    assert tally[("real", True)] >= 40, tally
    assert not [k for k in tally if not k[1]], tally
    backend = load_version(env.settings.reward, path, None, threads=1)
    for item, row in seen:
        if row is None or row.presentation != "perturbed":
            continue
        (shown,) = scored(item)
        source = next(r for r in rows if r["episode_id"] == row.episode_id)
        (own,) = backend.score([Item(source["prompt"], row.perturbed)])
        original = next(s for s in scored_of(store, row.episode_id, version))
        # The score of the text shown, not of the source's stored text.
        assert shown == pytest.approx(own.value, abs=1e-6)
        assert shown != pytest.approx(original, abs=1e-9)


def scored_of(store: Store, episode_id: str, version: str) -> list[float]:
    s = t.rm_scores
    with store.engine.connect() as conn:
        q = sa.select(s.c.score).where(s.c.episode_id == episode_id, s.c.version == version)
        return [float(v) for v in conn.execute(q).scalars()]


@pytest.mark.slow  # a real reward model scores every episode and canary: about 25 s each here
def test_a_canary_whose_score_cannot_be_had_is_set_aside_and_the_real_item_served(scored_env: Scored) -> None:
    env, store, path = scored_env.env, scored_env.store, scored_env.path
    shutil.rmtree(path)  # the version's files are gone: it can no longer be loaded
    seen = review_all(env, ("ann", "bob"), 30)
    shown = Counter("real" if row is None else row.presentation for _, row in seen)
    assert shown["perturbed"] == 0, shown
    assert shown["real"] >= 40, shown
    with store.engine.connect() as conn:
        c = t.canaries
        aside = conn.execute(
            sa.select(sa.func.count()).where(c.c.presentation == "perturbed", c.c.status == "error")
        ).scalar()
    assert aside and aside >= 2
    errors = env.app.state.review.metrics.registry.get_sample_value(
        "oversight_assist_errors_total", {"assistant": "rm_score"}
    )
    assert errors == aside


def test_without_rm_score_in_any_condition_no_model_is_loaded(sqlite_url: str, rows: list[EpisodeRow]) -> None:
    store = Store(sqlite_url)
    seed(store, rows[:30])
    env = make_env(sqlite_url, *CANARIES, *experiment("{plain: [], neighbours: [neighbours]}"))
    try:
        assert env.app.state.review.canary_scorer is None
    finally:
        env.close()
        store.close()
