"""Concurrent guideline saves, on SQLite and the real PostgreSQL: each save gets its own version
(1..N, none lost, no error), and a save that cannot take a number is a 503, never a 500."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from review_helpers import API, PASSWORD, Env

from monitor.review import auth, guidelines
from monitor.store import Pool, Store
from monitor.store import tables as t

SAVERS = 6


def _inserts_guidelines(statement: str) -> bool:
    return statement.lstrip().upper().startswith("INSERT INTO GUIDELINES")


def test_concurrent_saves_each_get_their_own_version(db_url: str) -> None:
    """Every saver reads ``max(version)`` and is held before its INSERT until all have read it
    (where the database lets them: on PostgreSQL without the per-stream lock). They all picked
    version 1, a single retry picked 2 for all but one, and the rest failed (IntegrityError, a
    500). Now each saves: versions 1..N, each text once."""
    store = Store(db_url, pool=Pool(size=SAVERS, overflow=SAVERS))
    admin = auth.create_user(store, "root", "admin", PASSWORD)
    # A reusable barrier: the first round holds all N after their read; the round after (N-1
    # retries) times out and breaks it, so those retries also insert together. Serialised saves
    # (the lock, SQLite's BEGIN IMMEDIATE) wait here once, break it, and go on one by one.
    barrier = threading.Barrier(SAVERS)
    racing: set[int] = set()

    def hold(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if threading.get_ident() in racing and _inserts_guidelines(statement):
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=2)

    sa.event.listen(store.engine, "before_cursor_execute", hold)
    saved: list[guidelines.Guidelines] = []
    errors: list[BaseException] = []
    start = threading.Barrier(SAVERS)

    def run(i: int) -> None:
        racing.add(threading.get_ident())
        start.wait(timeout=10)
        try:
            saved.append(guidelines.save(store, "chat", f"rule {i}", admin))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(SAVERS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    sa.event.remove(store.engine, "before_cursor_execute", hold)
    try:
        assert not errors, [repr(e)[:200] for e in errors]
        assert sorted(g.version for g in saved) == list(range(1, SAVERS + 1))
        g = t.guidelines
        with store.engine.connect() as conn:
            rows = conn.execute(sa.select(g.c.version, g.c.markdown).where(g.c.stream == "chat")).all()
        assert sorted(r.markdown for r in rows) == sorted(f"rule {i}" for i in range(SAVERS))
        assert {r.version: r.markdown for r in rows} == {s.version: s.markdown for s in saved}
        # Numbering goes on from there.
        assert guidelines.save(store, "chat", "next", admin).version == SAVERS + 1
    finally:
        store.close()


@contextlib.contextmanager
def _number_always_taken(store: Store, stream: str) -> Iterator[list[int]]:
    """Before each INSERT of ``stream``'s guidelines, another writer (one that does not take the
    lock) inserts the same next number in the same transaction: every try conflicts."""
    tries: list[int] = []

    def interlope(_conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if _inserts_guidelines(statement):
            tries.append(1)
            cursor.execute(
                "INSERT INTO guidelines (stream, version, markdown, created_at, created_by)"
                f" SELECT '{stream}', COALESCE(MAX(version), 0) + 1, 'other', 0, 'other'"
                f" FROM guidelines WHERE stream = '{stream}'"
            )

    sa.event.listen(store.engine, "before_cursor_execute", interlope)
    try:
        yield tries
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", interlope)


def test_a_save_that_cannot_take_a_number_is_busy_after_bounded_tries(db_url: str) -> None:
    store = Store(db_url)
    admin = auth.create_user(store, "root", "admin", PASSWORD)
    try:
        with _number_always_taken(store, "chat") as tries, pytest.raises(guidelines.GuidelinesBusy):
            guidelines.save(store, "chat", "mine", admin)
        assert len(tries) == guidelines.SAVE_ATTEMPTS
        assert guidelines.get(store, "chat") is None  # each try rolled back whole
        assert guidelines.save(store, "chat", "mine", admin).version == 1
    finally:
        store.close()


def test_the_api_answers_503_with_retry_after_not_500(make_review_env: Callable[..., Env]) -> None:
    env = make_review_env()
    env.user("root", "admin")
    admin = env.client("root")
    with _number_always_taken(env.store, "chat"):
        r = admin.post(f"{API}/admin/guidelines", json={"stream": "chat", "markdown": "Rate."})
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"] == "1"
    assert "try again" in r.json()["detail"]
    r = admin.post(f"{API}/admin/guidelines", json={"stream": "chat", "markdown": "Rate."})
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1
