"""Action requests (``action_requests`` table): reward-model updates and policy retraining.

One request per drift incident and kind: the incident's key (stream + its first event) is
unique per kind, so a redelivered event, a restarted worker or a second replica cannot make
a second request. States: ``pending`` -> ``running`` -> ``done`` | ``failed`` for work the
monitor runs itself (rm_update in embedded mode); ``pending`` -> ``sent`` | ``failed`` for
requests handed to sinks (retraining, rm_update in Kafka mode): pending -> running -> sent | failed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa

from monitor.store import Store
from monitor.store import tables as t

log = logging.getLogger(__name__)

OPEN_STATES = ("pending", "running")


def create(store: Store, kind: str, key: str, stream: str | None, payload: dict[str, Any]) -> tuple[str, bool]:
    """(request id, created?): an existing request with the same kind and key is returned as is."""
    r = t.action_requests
    now = time.time()
    rid = f"{kind}-{uuid.uuid4().hex[:16]}"
    with store.engine.begin() as conn:
        row = conn.execute(sa.select(r.c.id).where(r.c.kind == kind, r.c.key == key)).first()
        if row is not None:
            return str(row.id), False
        # A concurrent creator of the same (kind, key) wins the unique constraint: ours is skipped
        # and the row read back below is theirs.
        store.insert_ignore(
            r,
            [
                {
                    "id": rid,
                    "kind": kind,
                    "key": key,
                    "stream": stream,
                    "state": "pending",
                    "payload": payload,
                    "created_at": now,
                    "updated_at": now,
                }
            ],
            conn,
        )
        row = conn.execute(sa.select(r.c.id).where(r.c.kind == kind, r.c.key == key)).first()
    assert row is not None
    return str(row.id), str(row.id) == rid


def open_request(store: Store, kind: str, stream: str) -> dict[str, Any] | None:
    r = t.action_requests
    with store.engine.connect() as conn:
        q = sa.select(r).where(r.c.kind == kind, r.c.stream == stream, r.c.state.in_(OPEN_STATES))
        row = conn.execute(q.order_by(r.c.created_at)).first()
    return None if row is None else dict(row._mapping)


def claim(store: Store, rid: str, from_state: str = "pending", to_state: str = "running") -> bool:
    """Move a request between states only if nobody else did (compare-and-set)."""
    r = t.action_requests
    with store.engine.begin() as conn:
        res = conn.execute(
            r.update()
            .where(r.c.id == rid, r.c.state == from_state)
            .values(state=to_state, attempts=r.c.attempts + 1, updated_at=time.time())
        )
    return res.rowcount == 1


def take_over(store: Store, row: dict[str, Any], cutoff: float) -> bool:
    """Claim a ``running`` request whose worker stopped renewing it (``updated_at`` before ``cutoff``)."""
    r = t.action_requests
    unchanged = (r.c.id == row["id"], r.c.state == "running", r.c.attempts == row["attempts"], r.c.updated_at < cutoff)
    with store.engine.begin() as conn:
        res = conn.execute(r.update().where(*unchanged).values(attempts=r.c.attempts + 1, updated_at=time.time()))
    return res.rowcount == 1


def touch(store: Store, rid: str) -> None:
    """Renew a running request's lease (the worker is alive and still on it)."""
    r = t.action_requests
    with store.engine.begin() as conn:
        conn.execute(r.update().where(r.c.id == rid, r.c.state == "running").values(updated_at=time.time()))


@contextlib.contextmanager
def held(store: Store, rid: str, lease_s: float) -> Iterator[None]:
    """Renew a running request's lease every quarter of ``lease_s`` while the block runs: whoever
    runs it (the action worker, or ``oversight rm update --request`` by hand or in a Job) keeps it,
    and no other runner takes it over as abandoned and runs it a second time."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(lease_s / 4):
            try:
                touch(store, rid)
            except Exception as e:  # an outage: the next beat tries again, the work goes on
                log.warning("renewing the lease of request %s failed: %s", rid, e)

    ticker = threading.Thread(target=beat, name="request-heartbeat", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()


def finish(store: Store, rid: str, state: str, result: dict[str, Any] | None = None, error: str | None = None) -> None:
    r = t.action_requests
    values: dict[str, Any] = {"state": state, "updated_at": time.time()}
    if result is not None:
        values["result"] = result
    if error is not None:
        values["last_error"] = error[:1000]
    with store.engine.begin() as conn:
        conn.execute(r.update().where(r.c.id == rid).values(**values))


def requeue(store: Store, rid: str, payload: dict[str, Any], result: dict[str, Any]) -> bool:
    """A ``running`` request back to ``pending`` with a new payload and its round's result, in one
    transaction, only if it is still running (compare-and-set: a worker that lost its lease to
    another does not put it back)."""
    r = t.action_requests
    with store.engine.begin() as conn:
        res = conn.execute(
            r.update()
            .where(r.c.id == rid, r.c.state == "running")
            .values(state="pending", payload=payload, result=result, updated_at=time.time())
        )
    return res.rowcount == 1


def modify_payload(store: Store, rid: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> bool:
    """Apply ``change`` to a request's payload under the row's lock (``None``: leave it), and say
    whether it was written. Not a write of a payload read earlier: of two workers attaching
    events to one incident at once, the later write dropped the earlier one's event, and a
    closing could be undone by an attach."""
    r = t.action_requests
    with store.engine.begin() as conn:
        # Locked until the commit (PostgreSQL; SQLite's BEGIN IMMEDIATE holds the whole database).
        row = conn.execute(sa.select(r.c.payload).where(r.c.id == rid).with_for_update()).first()
        new = None if row is None else change(dict(row.payload))
        if new is None:
            return False
        conn.execute(r.update().where(r.c.id == rid).values(payload=new, updated_at=time.time()))
    return True


def get(store: Store, rid: str) -> dict[str, Any] | None:
    r = t.action_requests
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(r).where(r.c.id == rid)).first()
    return None if row is None else dict(row._mapping)


def listing(store: Store, kind: str | None = None, state: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    r = t.action_requests
    q = sa.select(r).order_by(r.c.created_at.desc()).limit(limit)
    if kind is not None:
        q = q.where(r.c.kind == kind)
    if state is not None:
        q = q.where(r.c.state == state)
    with store.engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(q).all()]
