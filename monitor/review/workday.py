"""What a reviewer who labels all day needs besides the item: progress, and undo.

Progress: the reviewer's labels and skips since the start of the UTC day, and the items waiting
in the queue that they could claim (not ones they labelled, not leased by someone else).

Undo: the reviewer's newest label (or skip) can be withdrawn within ``review.undo_window_s``.
The label row is deleted, not marked: every reader of labels (estimates, agreement, exports,
reward-model training data) then sees the queue as if it had never been submitted, with no
filter to forget. The item goes back to the same reviewer under a fresh lease (a new fence, as a
claim gives), and the lease they held on the next item is released: one lease at a time.

Canaries (:mod:`monitor.review.canary`) count and undo like real items: their labels are in
``canary_labels``, so "today's count" and "the newest label" read both tables (a count that did
not move after a canary would tell the reviewer what it was).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from monitor.review.auth import User
from monitor.review.queue import Claim, QueueError, current_guidelines_version
from monitor.store import Store
from monitor.store import tables as t

DAY_S = 86_400


#: The items waiting that a reviewer's progress counts at most (then "10,000+").
WAITING_COUNTED = 10_000


def day_start(now: float) -> float:
    """The start of the UTC day of ``now``."""
    return now - now % DAY_S


def progress(store: Store, user: User, now: float | None = None) -> dict[str, Any]:
    """Labels and skips of ``user`` today (UTC), and the items waiting that they could claim."""
    now = time.time() if now is None else now
    lb, rt = t.labels, t.review_tasks
    start = day_start(now)
    done = sa.select(
        sa.func.sum(sa.case((lb.c.skipped == sa.false(), 1), else_=0)),
        sa.func.sum(sa.case((lb.c.skipped == sa.true(), 1), else_=0)),
    ).where(lb.c.user_id == user.id, lb.c.created_at >= start)
    # Counted up to WAITING_COUNTED: the page shows this on every item, and counting every waiting
    # task (millions at production volume: retention keeps them for its horizon) took 0.15 s on
    # PostgreSQL and 0.46 s on SQLite per view at 2,000,000, and reading all the reviewer's labels
    # (NOT IN) grew with her work. The reviewer's own are passed over by key lookups.
    ahead = (
        sa.select(rt.c.episode_id)
        .where(
            sa.or_(rt.c.status == "pending", sa.and_(rt.c.status == "claimed", rt.c.lease_expires_at <= now)),
            ~sa.exists().where(lb.c.episode_id == rt.c.episode_id, lb.c.user_id == user.id),
        )
        .limit(WAITING_COUNTED + 1)
        .subquery()
    )
    waiting = sa.select(sa.func.count()).select_from(ahead)
    cl = t.canary_labels
    canaries_done = sa.select(
        sa.func.sum(sa.case((cl.c.skipped == sa.false(), 1), else_=0)),
        sa.func.sum(sa.case((cl.c.skipped == sa.true(), 1), else_=0)),
    ).where(cl.c.user_id == user.id, cl.c.created_at >= start)
    with store.engine.connect() as conn:
        labelled, skipped = conn.execute(done).one()
        c_labelled, c_skipped = conn.execute(canaries_done).one()
        labelled, skipped = (labelled or 0) + (c_labelled or 0), (skipped or 0) + (c_skipped or 0)
        counted = int(conn.execute(waiting).scalar() or 0)
    return {
        "labelled_today": int(labelled or 0),
        "skipped_today": int(skipped or 0),
        "waiting": min(counted, WAITING_COUNTED),
        "waiting_more": counted > WAITING_COUNTED,
        "day_start": start,
    }


def _newest(conn: sa.Connection, user: User) -> Any:
    """The reviewer's newest label, real or canary: (id, episode_id, slot, created_at, skipped,
    canary), ``canary`` true for a ``canary_labels`` row (``episode_id`` is then the canary's id)."""
    lb, cl = t.labels, t.canary_labels
    real = conn.execute(
        sa.select(lb.c.id, lb.c.episode_id, lb.c.slot, lb.c.created_at, lb.c.skipped)
        .where(lb.c.user_id == user.id)
        .order_by(lb.c.created_at.desc(), lb.c.id.desc())
        .limit(1)
    ).first()
    fake = conn.execute(
        sa.select(cl.c.id, cl.c.canary_id, cl.c.created_at, cl.c.skipped)
        .where(cl.c.user_id == user.id)
        .order_by(cl.c.created_at.desc(), cl.c.id.desc())
        .limit(1)
    ).first()
    if fake is not None and (real is None or float(fake.created_at) >= float(real.created_at)):
        return Newest(int(fake.id), fake.canary_id, 0, float(fake.created_at), bool(fake.skipped), True)
    if real is None:
        return None
    return Newest(int(real.id), real.episode_id, int(real.slot), float(real.created_at), bool(real.skipped), False)


@dataclass(frozen=True)
class Newest:
    id: int
    episode_id: str
    slot: int
    created_at: float
    skipped: bool
    canary: bool


def last_label(store: Store, user: User) -> Newest | None:
    """The reviewer's newest label (real or canary), or None."""
    with store.engine.connect() as conn:
        out: Newest | None = _newest(conn, user)
        return out


def undo_left(store: Store, user: User, window_s: float, now: float | None = None) -> float:
    """Seconds left to undo the reviewer's newest label (0: nothing to undo)."""
    now = time.time() if now is None else now
    row = last_label(store, user)
    if row is None:
        return 0.0
    return max(0.0, float(row.created_at) + window_s - now)


def undo(store: Store, user: User, lease_s: float, window_s: float, now: float | None = None) -> Claim:
    """Withdraw the reviewer's newest label and lease its item back to them.

    404 when they have no label; 409 when the window has passed or the item has meanwhile been
    leased to someone else, or someone else has labelled it since (a withdrawn skip goes back to
    the queue at once)."""
    now = time.time() if now is None else now
    lb, rt = t.labels, t.review_tasks
    with store.engine.begin() as conn:
        if store.dialect == "postgresql":
            # One undo or claim at a time per reviewer (see queue.claim).
            conn.execute(sa.select(t.users.c.id).where(t.users.c.id == user.id).with_for_update())
        row = _newest(conn, user)
        if row is None:
            raise QueueError("there is no label to undo", 404)
        if now - float(row.created_at) > window_s:
            raise QueueError(f"a label can be undone for {window_s:g} seconds only", 409)
        if row.canary:
            return _undo_canary(conn, user, row, lease_s, now)
        q = sa.select(rt).where(rt.c.episode_id == row.episode_id, rt.c.slot == row.slot)
        task = conn.execute(q.with_for_update() if store.dialect == "postgresql" else q).first()
        if task is None:
            raise QueueError("no such review item", 404)
        if task.status == "claimed" and task.lease_user_id != user.id and (task.lease_expires_at or 0) > now:
            raise QueueError("the item is now leased to another reviewer", 409)
        if task.status == "error":
            raise QueueError("the item was set aside", 409)
        if _labelled_since(conn, row, user):
            # A withdrawn skip that someone else then took and labelled: re-opening the finished
            # slot would give it two labels (or send it back to the queue for a third reviewer).
            raise QueueError("another reviewer has labelled the item since", 409)
        # The lease on the next item goes back to the queue: one lease at a time.
        _release_all(conn, user)
        conn.execute(lb.delete().where(lb.c.id == row.id))
        fence, expires = int(task.fence) + 1, now + lease_s
        guidelines = task.guidelines_version if task.guidelines_version is not None else current_guidelines_version()
        res = conn.execute(
            rt.update()
            .where(rt.c.episode_id == row.episode_id, rt.c.slot == row.slot, rt.c.fence == task.fence)
            .values(
                status="claimed",
                lease_user_id=user.id,
                lease_expires_at=expires,
                fence=fence,
                done_at=None,
                guidelines_version=guidelines,
            )
        )
        if res.rowcount != 1:
            raise QueueError("the item changed meanwhile; try again", 409)
        return Claim(row.episode_id, int(row.slot), fence, expires)


def _labelled_since(conn: sa.Connection, row: Newest, user: User) -> bool:
    """Whether another reviewer left a label (or a skip) on ``row``'s item and slot after it."""
    lb = t.labels
    q = sa.select(lb.c.id).where(
        lb.c.episode_id == row.episode_id, lb.c.slot == row.slot, lb.c.user_id != user.id, lb.c.id > row.id
    )
    return conn.execute(q.limit(1)).first() is not None


def _release_all(conn: sa.Connection, user: User) -> None:
    """Release whatever the reviewer holds, a real item or a canary."""
    rt, ct = t.review_tasks, t.canaries
    conn.execute(
        rt.update()
        .where(rt.c.lease_user_id == user.id, rt.c.status == "claimed")
        .values(status="pending", lease_user_id=None, lease_expires_at=None)
    )
    conn.execute(
        ct.update()
        .where(ct.c.user_id == user.id, ct.c.status == "claimed")
        .values(status="pending", lease_expires_at=None)
    )


def _undo_canary(conn: sa.Connection, user: User, row: Newest, lease_s: float, now: float) -> Claim:
    """Withdraw a canary label: as a real one, the canary is leased back to its reviewer."""
    ct, cl = t.canaries, t.canary_labels
    task = conn.execute(sa.select(ct).where(ct.c.id == row.episode_id, ct.c.user_id == user.id)).first()
    if task is None:
        raise QueueError("no such review item", 404)
    if task.status == "error":
        raise QueueError("the item was set aside", 409)
    _release_all(conn, user)
    conn.execute(cl.delete().where(cl.c.id == row.id))
    fence, expires = int(task.fence) + 1, now + lease_s
    res = conn.execute(
        ct.update()
        .where(ct.c.id == task.id, ct.c.fence == task.fence)
        .values(status="claimed", lease_expires_at=expires, fence=fence, done_at=None)
    )
    if res.rowcount != 1:
        raise QueueError("the item changed meanwhile; try again", 409)
    return Claim(task.id, 0, fence, expires)
