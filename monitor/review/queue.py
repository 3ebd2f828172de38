"""The review queue: claim with a lease and a fencing token, label, skip, release.

Claiming is safe under concurrency: on PostgreSQL the candidate row is taken
with ``FOR UPDATE SKIP LOCKED`` (concurrent reviewers get different rows, no
waiting); SQLite serialises writers (every transaction is ``BEGIN IMMEDIATE``).
The update is also a compare-and-set on ``fence``, so a row can never be
handed out twice. A reviewer holds at most one lease at a time; an expired
lease returns the item to the queue; a submit under a lease that is no longer
the current one (expired, released or re-claimed) is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from monitor.review.auth import User
from monitor.store import Store
from monitor.store import tables as t
from sampling import keyed_uniform

MAX_CRITIQUE = 10_000
MAX_SKIP_REASON = 500
PREFERENCES = ("response", "alternative", "tie")


class QueueError(Exception):
    """A refused queue operation; ``status`` is the HTTP status (404, 409, 422)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Claim:
    episode_id: str
    slot: int
    fence: int
    lease_expires_at: float


@dataclass(frozen=True)
class Item:
    """What a reviewer sees: the episode, never another reviewer's label or a model score."""

    claim: Claim
    stream: str
    model: str | None
    timestamp: float
    prompt: str
    response: str
    alternative: str | None
    metadata: dict[str, Any] | None
    alternative_first: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "episode_id": self.claim.episode_id,
            "slot": self.claim.slot,
            "fence": self.claim.fence,
            "lease_expires_at": self.claim.lease_expires_at,
            "stream": self.stream,
            "model": self.model,
            "timestamp": self.timestamp,
            "prompt": self.prompt,
            "response": self.response,
            "alternative": self.alternative,
            "alternative_first": self.alternative_first,
            "metadata": self.metadata,
        }


@dataclass(frozen=True)
class LabelIn:
    rating: int | None = None
    flags: tuple[str, ...] = ()
    critique: str = ""
    preference: str | None = None
    time_spent_ms: int = 0
    skipped: bool = False
    skip_reason: str | None = None


def alternative_of(metadata: Any) -> str | None:
    """A pairwise item carries a second response for the same prompt in ``metadata.alternative_response``."""
    if isinstance(metadata, dict):
        alt = metadata.get("alternative_response")
        if isinstance(alt, str):
            return alt
    return None


def claim(store: Store, user: User, lease_s: float, key: bytes, now: float | None = None) -> Item | None:
    """The reviewer's current lease, or a new one on the oldest available item; None if the queue is empty."""
    now = time.time() if now is None else now
    rt = t.review_tasks
    for _ in range(5):  # a lost compare-and-set race (SQLite readers) just tries the next row
        with store.engine.begin() as conn:
            if store.dialect == "postgresql":
                # One claim at a time per reviewer (two tabs, a double click): otherwise
                # both see "no lease held" and SKIP LOCKED hands each a different row.
                conn.execute(sa.select(t.users.c.id).where(t.users.c.id == user.id).with_for_update())
            held = conn.execute(
                sa.select(rt.c.episode_id, rt.c.slot, rt.c.fence, rt.c.lease_expires_at).where(
                    rt.c.lease_user_id == user.id, rt.c.status == "claimed", rt.c.lease_expires_at > now
                )
            ).first()
            if held is not None:
                c = Claim(held.episode_id, int(held.slot), int(held.fence), float(held.lease_expires_at))
                return _item(conn, c, key)
            mine = sa.select(t.labels.c.episode_id).where(t.labels.c.user_id == user.id)
            leased = sa.select(rt.c.episode_id).where(rt.c.lease_user_id == user.id, rt.c.status == "claimed")
            q = (
                sa.select(rt.c.episode_id, rt.c.slot, rt.c.fence)
                .where(
                    sa.or_(rt.c.status == "pending", sa.and_(rt.c.status == "claimed", rt.c.lease_expires_at <= now)),
                    rt.c.episode_id.not_in(mine),
                    rt.c.episode_id.not_in(leased),
                )
                .order_by(rt.c.created_at, rt.c.episode_id, rt.c.slot)
                .limit(1)
            )
            if store.dialect == "postgresql":
                q = q.with_for_update(skip_locked=True, of=rt)
            row = conn.execute(q).first()
            if row is None:
                return None
            expires = now + lease_s
            res = conn.execute(
                rt.update()
                .where(rt.c.episode_id == row.episode_id, rt.c.slot == row.slot, rt.c.fence == row.fence)
                .values(status="claimed", lease_user_id=user.id, lease_expires_at=expires, fence=row.fence + 1)
            )
            if res.rowcount != 1:
                continue
            return _item(conn, Claim(row.episode_id, int(row.slot), int(row.fence) + 1, expires), key)
    return None


def _item(conn: sa.Connection, c: Claim, key: bytes) -> Item:
    e = t.episodes
    row = conn.execute(
        sa.select(e.c.stream, e.c.model, e.c.ts, e.c.prompt, e.c.response, e.c.metadata).where(
            e.c.episode_id == c.episode_id
        )
    ).one()
    meta = row.metadata if isinstance(row.metadata, dict) else None
    alt = alternative_of(meta)
    return Item(
        claim=c,
        stream=row.stream,
        model=row.model,
        timestamp=float(row.ts),
        prompt=row.prompt,
        response=row.response,
        alternative=alt,
        metadata={k: v for k, v in meta.items() if k != "alternative_response"} if meta else None,
        # Order of the two responses is keyed-random: no position bias across items.
        alternative_first=alt is not None and keyed_uniform(key, c.episode_id, "pair-order") < 0.5,
    )


def _check_lease(
    conn: sa.Connection, store: Store, user: User, episode_id: str, slot: int, fence: int, now: float
) -> Any:
    rt = t.review_tasks
    q = sa.select(rt).where(rt.c.episode_id == episode_id, rt.c.slot == slot)
    if store.dialect == "postgresql":
        q = q.with_for_update()
    row = conn.execute(q).first()
    if row is None:
        raise QueueError("no such review item", 404)
    if (
        row.status != "claimed"
        or row.lease_user_id != user.id
        or int(row.fence) != fence
        or row.lease_expires_at is None
        or row.lease_expires_at <= now
    ):
        raise QueueError("this lease is no longer valid (expired, released or claimed by someone else)", 409)
    return row


def validate_label(label: LabelIn, flags_allowed: list[str], pairwise: bool) -> None:
    if label.skipped:
        if not label.skip_reason or not label.skip_reason.strip():
            raise QueueError("a skip needs a reason", 422)
        if len(label.skip_reason) > MAX_SKIP_REASON:
            raise QueueError(f"skip reason is longer than {MAX_SKIP_REASON} characters", 422)
    else:
        if label.rating is None or isinstance(label.rating, bool) or not 1 <= label.rating <= 7:
            raise QueueError("rating must be an integer from 1 to 7", 422)
        unknown = set(label.flags) - set(flags_allowed)
        if unknown:
            raise QueueError(f"unknown flags: {', '.join(sorted(unknown))}", 422)
        if len(set(label.flags)) != len(label.flags):
            raise QueueError("flags repeat", 422)
        if len(label.critique) > MAX_CRITIQUE:
            raise QueueError(f"critique is longer than {MAX_CRITIQUE} characters", 422)
        if label.preference is not None and label.preference not in PREFERENCES:
            raise QueueError(f"preference must be one of {', '.join(PREFERENCES)}", 422)
        if label.preference is not None and not pairwise:
            raise QueueError("this item has a single response: no preference", 422)
    if not 0 <= label.time_spent_ms <= 86_400_000:
        raise QueueError("time_spent_ms must be between 0 and 86400000", 422)
    if "\x00" in label.critique or (label.skip_reason and "\x00" in label.skip_reason):
        raise QueueError("NUL characters are not allowed", 422)


def submit(
    store: Store,
    user: User,
    episode_id: str,
    slot: int,
    fence: int,
    label: LabelIn,
    flags_allowed: list[str],
    now: float | None = None,
) -> None:
    """Record a label (or a skip) under the reviewer's current lease; 409 if the lease is stale."""
    now = time.time() if now is None else now
    with store.engine.begin() as conn:
        _check_lease(conn, store, user, episode_id, slot, fence, now)
        ep = conn.execute(
            sa.select(t.episodes.c.stream, t.episodes.c.metadata).where(t.episodes.c.episode_id == episode_id)
        ).one()
        validate_label(label, flags_allowed, alternative_of(ep.metadata) is not None)
        exists = conn.execute(
            sa.select(t.labels.c.id).where(t.labels.c.episode_id == episode_id, t.labels.c.user_id == user.id)
        ).first()
        if exists is not None:
            raise QueueError("you have already labelled this episode", 409)
        conn.execute(
            t.labels.insert().values(
                episode_id=episode_id,
                slot=slot,
                user_id=user.id,
                stream=ep.stream,
                skipped=label.skipped,
                skip_reason=label.skip_reason if label.skipped else None,
                rating=None if label.skipped else label.rating,
                flags=[] if label.skipped else sorted(label.flags),
                critique="" if label.skipped else label.critique,
                preference=None if label.skipped else label.preference,
                time_spent_ms=label.time_spent_ms,
                created_at=now,
            )
        )
        # A skipped slot goes back to the queue for someone else; a labelled one is done.
        values: dict[str, Any] = (
            {"status": "pending", "lease_user_id": None, "lease_expires_at": None}
            if label.skipped
            else {"status": "done", "done_at": now, "lease_expires_at": None}
        )
        t_ = t.review_tasks
        conn.execute(t_.update().where(t_.c.episode_id == episode_id, t_.c.slot == slot).values(**values))


def release(store: Store, user: User, episode_id: str, slot: int, fence: int, now: float | None = None) -> None:
    """Give a leased item back to the queue."""
    now = time.time() if now is None else now
    with store.engine.begin() as conn:
        _check_lease(conn, store, user, episode_id, slot, fence, now)
        rt = t.review_tasks
        conn.execute(
            rt.update()
            .where(rt.c.episode_id == episode_id, rt.c.slot == slot)
            .values(status="pending", lease_user_id=None, lease_expires_at=None)
        )


def queue_depth(store: Store, now: float | None = None) -> list[dict[str, Any]]:
    """Per stream: items waiting (pending or with an expired lease), leased, done, and the oldest wait in seconds."""
    now = time.time() if now is None else now
    rt = t.review_tasks
    waiting = sa.or_(rt.c.status == "pending", sa.and_(rt.c.status == "claimed", rt.c.lease_expires_at <= now))
    leased = sa.and_(rt.c.status == "claimed", rt.c.lease_expires_at > now)
    q = (
        sa.select(
            rt.c.stream,
            sa.func.sum(sa.case((waiting, 1), else_=0)),
            sa.func.sum(sa.case((leased, 1), else_=0)),
            sa.func.sum(sa.case((rt.c.status == "done", 1), else_=0)),
            sa.func.min(sa.case((waiting, rt.c.created_at), else_=None)),
        )
        .group_by(rt.c.stream)
        .order_by(rt.c.stream)
    )
    with store.engine.connect() as conn:
        rows = conn.execute(q).all()
    return [
        {
            "stream": r[0],
            "waiting": int(r[1] or 0),
            "leased": int(r[2] or 0),
            "done": int(r[3] or 0),
            "oldest_wait_s": None if r[4] is None else max(0.0, now - float(r[4])),
        }
        for r in rows
    ]
