"""Fixtures for the review-app tests (helpers live in review_helpers.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from review_helpers import Env, make_env


@pytest.fixture
def make_review_env(db_url: str) -> Iterator[Callable[..., Env]]:
    """``make_review_env(*overrides, clock=...)`` -> Env over the parametrized database (SQLite and
    PostgreSQL); ``clock`` (a :class:`review_helpers.FakeClock`) is the app's time."""
    envs: list[Env] = []

    def make(*overrides: str, clock: Callable[[], float] = time.time) -> Env:
        env = make_env(db_url, *overrides, clock=clock)
        envs.append(env)
        return env

    yield make
    for e in envs:
        e.close()
