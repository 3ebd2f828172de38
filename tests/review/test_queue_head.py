"""The review queue's head: a claim takes the oldest item a reviewer may take, pending or under an
expired lease, and its cost does not grow with the items waiting (retention keeps a pending
task for its whole horizon: a few days of 1% of 1,000 episodes/s is millions of them)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from review_helpers import episode_row, seed, wait_until
from sqlite_steps import StepCounter

from monitor.config import load_settings
from monitor.review import auth, queue
from monitor.store import Store

KEY = b"queue-head-test-sampling-key"
# Half the claims canary turns, each picking its source among the newest 10 labelled items.
CANARIES = ("review.canaries.share=0.5", "review.canaries.source_window=10")


def _users(store: Store, *names: str) -> list[auth.User]:
    return [auth.create_user(store, n, "reviewer", "correct horse battery") for n in names]


def _claim(store: Store, user: auth.User, now: float, lease_s: float = 60) -> str:
    item = queue.claim(store, user, lease_s, KEY, now=now)
    assert item is not None
    return item.claim.episode_id


def test_the_oldest_item_first_whether_pending_or_under_an_expired_lease(db_url: str) -> None:
    store = Store(db_url)
    seed(store, [episode_row(f"e{i}") for i in range(5)], slots=lambda i, _: 2 if i == 1 else 1)
    a, b, c = _users(store, "ann", "bob", "cat")
    now = 10_000.0
    # ann holds e0 under a lease that has expired by now; bob then takes e0 before the pending e1.
    assert _claim(store, a, now - 120) == "e0"
    assert _claim(store, b, now) == "e0"
    # bob labels it; cat's claim is e1's first slot, her lease expires, and ann takes it.
    item = queue.claim(store, b, 60, KEY, now=now)
    assert item is not None
    queue.submit(store, b, "e0", item.claim.slot, item.claim.fence, queue.LabelIn(rating=5), [], now=now)
    assert _claim(store, c, now - 120) == "e1"
    assert _claim(store, a, now) == "e1"
    # ann holds e1's first slot: its second slot is not hers to take, so bob gets it, and cat the next.
    assert _claim(store, b, now + 1) == "e1"
    assert _claim(store, c, now + 1) == "e2"
    store.close()


def test_a_reviewer_never_gets_an_episode_she_labelled_or_holds(db_url: str) -> None:
    store = Store(db_url)
    seed(store, [episode_row(f"e{i}") for i in range(3)], slots=lambda i, _: 2 if i == 0 else 1)
    (a,) = _users(store, "ann")
    now = 10_000.0
    item = queue.claim(store, a, 60, KEY, now=now)
    assert item is not None and item.claim.episode_id == "e0"
    queue.submit(store, a, "e0", item.claim.slot, item.claim.fence, queue.LabelIn(rating=3), [], now=now)
    # e0's second slot waits, but ann labelled e0: the oldest she may take is e1.
    assert _claim(store, a, now) == "e1"
    store.close()


def _fill(url: str, waiting: int) -> None:
    """``waiting`` pending review tasks (and their episodes), oldest first, straight in SQL."""
    series = f"WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < {waiting}) "
    with sa.create_engine(url).begin() as conn:
        conn.execute(
            sa.text(
                series + "INSERT INTO episodes (episode_id, stream, model, ts, prompt, response, metadata, source,"
                " position, ingested_at) SELECT 'e' || g, 's' || (g % 10), 'm', g, 'p', 'r', '{}', 't', 'e' || g,"
                " g FROM s"
            )
        )
        conn.execute(
            sa.text(
                series + "INSERT INTO review_tasks (episode_id, slot, stream, status, fence, created_at)"
                " SELECT 'e' || g, 0, 's' || (g % 10), 'pending', 0, g FROM s"
            )
        )


def _label_all(url: str, labelled: int, user_id: int) -> None:
    """The first ``labelled`` tasks done, each with a label by ``user_id``."""
    series = f"WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < {labelled}) "
    with sa.create_engine(url).begin() as conn:
        conn.execute(
            sa.text(
                series + "INSERT INTO labels (episode_id, slot, user_id, stream, skipped, rating, flags, critique,"
                f" time_spent_ms, created_at) SELECT 'e' || g, 0, {user_id}, 's' || (g % 10), 0, 4, '[]', '', 1, g"
                " FROM s"
            )
        )
        conn.execute(sa.text(f"UPDATE review_tasks SET status = 'done' WHERE created_at <= {labelled}"))


def _claim_steps(tmp_path: Path, waiting: int, labelled: int = 0) -> int:
    """SQLite virtual-machine steps (in thousands) of the database work of ten claims and labels;
    with ``labelled``, the first that many items labelled by someone else and half the claims
    canary turns (each picks a source among the newest labelled items)."""
    url = f"sqlite:///{tmp_path / f'q{waiting}-{labelled}.db'}"
    store = Store(url)
    _fill(url, waiting + labelled)
    other, user = _users(store, "bob", "ann")
    canaries = None
    if labelled:
        _label_all(url, labelled, other.id)
        canaries = load_settings(None, ["dev=true", *CANARIES]).review.canaries
    counter = StepCounter(store)
    for i in range(10):
        item = queue.claim(store, user, 60, KEY, now=1e6 + i, canaries=canaries)
        assert item is not None
        if canaries is None:
            assert item.claim.episode_id == f"e{i + 1}"
        queue.submit(store, user, item.claim.episode_id, 0, item.claim.fence, queue.LabelIn(rating=4), [], now=1e6)
    store.close()
    return counter.steps


def test_a_claim_costs_the_same_whatever_the_items_waiting(tmp_path: Path) -> None:
    """Counted in the database's own steps, not timed: ten claims with 20,000 items waiting do
    the work of ten with 200. One read of "pending or expired, oldest first" read and sorted every
    waiting item (0.65 s a claim at 2,000,000 on PostgreSQL and SQLite, 2 to 6 ms now)."""
    few, many = _claim_steps(tmp_path, 200), _claim_steps(tmp_path, 20_000)
    assert many < 2 * few, (few, many)


def test_a_canary_turn_costs_the_same_whatever_the_labels(tmp_path: Path) -> None:
    """A canary is made from one of the newest labelled items: picking them grouped every label by
    item and sorted the groups (0.14 s on PostgreSQL, 0.18 s on SQLite per canary turn at 200,000
    labels). Ten claims, half of them canary turns, with 20,000 labels do the work of ten with 200."""
    few, many = _claim_steps(tmp_path, 200, labelled=200), _claim_steps(tmp_path, 200, labelled=20_000)
    assert many < 2 * few, (few, many)


def test_the_queue_is_counted_for_scrapes_at_most_its_duty_of_the_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every scrape of the review service counted every task (0.28 s on PostgreSQL, 1.2 s on
    SQLite at 2,000,000 waiting). A count that took t seconds now serves the scrapes of the next
    t / QUEUE_DUTY seconds, with the oldest item's age moved on by the clock; one that fails shows
    nothing, as before."""
    from prometheus_client.registry import CollectorRegistry

    from monitor.review import metrics as review_metrics

    store = Store("sqlite://")
    seed(store, [episode_row(f"e{i}") for i in range(3)], created_at=1_000.0)
    clock = [5_000.0]
    counts: list[tuple[float, float]] = []
    real = queue.queue_depth
    failing = [False]

    def slow_count(store: Store, now: float | None = None) -> list[dict[str, Any]]:
        start = time.monotonic()
        time.sleep(0.05)  # a stand-in for a queue of millions
        counts.append((start, 0.05))
        if failing[0]:
            raise sa.exc.OperationalError("SELECT", {}, Exception("the database is gone"))
        return real(store, now)

    monkeypatch.setattr(queue, "queue_depth", slow_count)
    monkeypatch.setattr(review_metrics, "QUEUE_DUTY", 0.25)
    m = review_metrics.ReviewMetrics(store, CollectorRegistry(), clock=lambda: clock[0])

    def gauge(name: str) -> float | None:
        return m.registry.get_sample_value(f"oversight_review_queue_{name}", {"stream": "s"})

    assert gauge("waiting") == 3 and gauge("oldest_seconds") == pytest.approx(4_000.0)
    clock[0] += 60
    assert gauge("oldest_seconds") == pytest.approx(4_060.0)  # not counted again: the age moves on
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        assert gauge("waiting") == 3
    assert 2 <= len(counts) <= 6, counts
    for (start, took), (later, _) in itertools.pairwise(counts):
        assert later - start >= took / 0.25 - 0.01, counts
    failing[0] = True
    # The next count is due took / duty after the last one; a stalled host may put it later.
    assert wait_until(lambda: gauge("waiting") is None)  # the count failed: nothing shown, not a stale number
    assert gauge("waiting") is None
    store.close()
