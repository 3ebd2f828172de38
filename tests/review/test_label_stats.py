"""The admin views of every label (``monitor/review/label_stats.py``): computed once for all who ask
together, reused for ``took / duty`` after a costly computation, afresh after a cheap one; a failure
leaves the last result; the summary says when it was computed."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from review_helpers import API, Env, episode_row, label_body, seed

from monitor.review.label_stats import LabelStats, LabelStatsCache

MakeEnv = Callable[..., Env]


def _result(at: float) -> LabelStats:
    return LabelStats({}, [], {}, at)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_computation_serves_everyone_who_asks_together() -> None:
    """Five admins at once while a costly computation (2 s) runs: one computation, one result."""
    release, started = threading.Event(), threading.Event()
    calls: list[int] = []
    clock = _Clock()

    def slow() -> LabelStats:
        calls.append(1)
        started.set()
        release.wait(10)
        clock.now += 2.0
        return _result(len(calls))

    cache = LabelStatsCache(slow, clock=clock)
    got: list[LabelStats] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get())) for _ in range(5)]
    threads[0].start()
    assert started.wait(10)
    for th in threads[1:]:
        th.start()
    release.set()
    for th in threads:
        th.join(10)
    assert len(got) == 5 and len({id(g) for g in got}) == 1, "each asker computed its own"
    assert calls == [1]


def test_a_costly_result_serves_its_pace_and_a_cheap_one_is_never_reused() -> None:
    clock, took = _Clock(), [3.0]
    calls: list[float] = []

    def compute() -> LabelStats:
        calls.append(clock.now)
        clock.now += took[0]
        return _result(clock.now)

    cache = LabelStatsCache(compute, duty=0.1, clock=clock)
    first = cache.get()  # 0 -> 3 s: served until 30 s after its start
    clock.now = 29.9
    assert cache.get() is first and len(calls) == 1
    clock.now = 30.0
    took[0] = 0.2  # cheaper than MIN_PACED_S from now on
    second = cache.get()
    assert second is not first and len(calls) == 2
    assert cache.get() is not second and len(calls) == 3  # at once: a cheap result is not reused


def test_a_failure_is_raised_and_the_last_result_still_served() -> None:
    clock = _Clock()
    outcomes: list[Any] = ["ok", RuntimeError("database gone")]

    def compute() -> LabelStats:
        clock.now += 2.0
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return _result(clock.now)

    cache = LabelStatsCache(compute, duty=0.5, clock=clock)
    first = cache.get()
    clock.now = 10.0  # due
    with pytest.raises(RuntimeError):
        cache.get()
    clock.now = 12.0  # the failed computation (2 s) paces too: not due before 14 s
    assert cache.get() is first


def test_the_summary_says_when_and_a_small_store_shows_every_new_label(make_review_env: MakeEnv) -> None:
    """(The admin page's single read of the labels: ``test_review_pages.test_admin_page_is_for_admins``.)"""
    env = make_review_env()
    env.user("root", "admin")
    seed(env.store, [episode_row(f"o{i}") for i in range(4)])
    env.user("alice")
    c = env.client("alice")
    admin = env.client("root")
    for n in (1, 2, 3):
        item = c.post(f"{API}/queue/claim").json()
        assert c.post(f"{API}/items/label", json=label_body(item, rating=5)).status_code == 200
        summary = admin.get(f"{API}/admin/summary").json()
        (est,) = summary["estimates"]
        # A small store's computation is cheap: each view computes afresh and sees the new label.
        assert est["n_labelled"] == n and summary["labels_computed_at"] > 0
