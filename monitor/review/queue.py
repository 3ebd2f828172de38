"""The review queue: claim with a lease and a fencing token, label, skip, release.

Claiming is safe under concurrency: on PostgreSQL the candidate row is taken
with ``FOR UPDATE SKIP LOCKED`` (concurrent reviewers get different rows, no
waiting); SQLite serialises writers (every transaction is ``BEGIN IMMEDIATE``).
The update is also a compare-and-set on ``fence``, so a row can never be
handed out twice. A reviewer holds at most one lease at a time; an expired
lease returns the item to the queue; a submit under a lease that is no longer
the current one (expired, released or re-claimed) is refused.

Canaries (:mod:`monitor.review.canary`): with ``canaries`` configured, a share of a reviewer's
claims hand out a perturbed copy of a stored episode instead, in the same :class:`Item`; its
label goes to ``canary_labels``, never ``labels``. Submit, skip, release, leave, set-aside and
undo (:mod:`monitor.review.workday`) take a canary's id like an episode's.

Blind review: an :class:`Item` holds only what the stream's blinding allows
(``review.metadata_fields``, ``review.show_model``, per stream under
``review.streams``); the rest of the episode never leaves this module.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from monitor.assist import condition_of
from monitor.config import AssistExperimentConfig, CanaryConfig
from monitor.review import canary
from monitor.review.auth import User
from monitor.review.conversation import Rate, Turn, invisible_in, turns_of
from monitor.review.display import bounded, invisible_count
from monitor.store import Store
from monitor.store import tables as t
from sampling import keyed_uniform

MAX_CRITIQUE = 10_000
MAX_SKIP_REASON = 500
PREFERENCES = ("response", "alternative", "tie")
# Statuses of a review task. ``error``: the item could not be shown (see :func:`set_aside`).
STATUSES = ("pending", "claimed", "done", "error")

log = logging.getLogger(__name__)

# (metadata keys reviewers may see, whether they see the policy version) for a stream;
# ``ReviewConfig.blinding`` is the one the app passes.
Blinding = Callable[[str], tuple[frozenset[str], bool]]


def blind_all(_stream: str) -> tuple[frozenset[str], bool]:
    """The default: no metadata, no policy version."""
    return frozenset(), False


# What a stream's reviewers rate in a conversation; ``ReviewContext.rate`` is the one the app passes.
Rating = Callable[[str], Rate]


def final_turn(_stream: str) -> Rate:
    """The default: the final assistant turn."""
    return "final_turn"


class QueueError(Exception):
    """A refused queue operation; ``status`` is the HTTP status (404, 409, 422); ``field``: the
    label field a 422 refuses (None when it is no one field's)."""

    def __init__(self, message: str, status: int, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field


@dataclass(frozen=True)
class Claim:
    episode_id: str
    slot: int
    fence: int
    lease_expires_at: float


@dataclass(frozen=True)
class Item:
    """What a reviewer sees: the episode as its stream's blinding allows (``model`` None and
    ``metadata`` without the hidden keys), never another reviewer's label or a model score.
    ``metadata`` is already bounded (:func:`monitor.review.display.bounded`)."""

    claim: Claim
    stream: str
    model: str | None
    timestamp: float
    prompt: str
    response: str
    alternative: str | None
    metadata: dict[str, Any] | None
    alternative_first: bool
    # Schema v2: the conversation (None for v1), and what its stream rates (set by the caller,
    # which knows the settings: ``ReviewContext.claim``).
    messages: tuple[Turn, ...] | None = None
    rate: Rate = "final_turn"

    def invisible_characters(self) -> dict[str, int]:
        """Invisible or direction-changing characters per shown field (fields with none left out)."""
        counts = self.field_invisibles()
        if self.messages is not None:
            counts["messages"] = invisible_in(self.messages)
        return {k: n for k, n in counts.items() if n}

    def shown_invisibles(self) -> int:
        """Invisible characters on the review page: a conversation is shown instead of its
        flattening into ``prompt`` and ``response``, so those are not counted twice."""
        counts = self.invisible_characters()
        if self.messages is not None:
            counts.pop("prompt", None)
            counts.pop("response", None)
        return sum(counts.values())

    def field_invisibles(self) -> dict[str, int]:
        fields = {
            "stream": self.stream,
            "model": self.model,
            "prompt": self.prompt,
            "response": self.response,
            "alternative": self.alternative,
            "metadata": json.dumps(self.metadata, ensure_ascii=False) if self.metadata else None,
        }
        return {k: invisible_count(v) for k, v in fields.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "episode_id": self.claim.episode_id,
            "slot": self.claim.slot,
            "fence": self.claim.fence,
            "lease_expires_at": self.claim.lease_expires_at,
            "stream": self.stream,
            "model": self.model,
            # A non-finite time (an old row) is no JSON number: shown as unknown, like the page does.
            "timestamp": self.timestamp if math.isfinite(self.timestamp) else None,
            "prompt": self.prompt,
            "response": self.response,
            "alternative": self.alternative,
            "alternative_first": self.alternative_first,
            "metadata": self.metadata,
            "invisible_characters": self.invisible_characters(),
            "messages": None if self.messages is None else [m.to_json(self.rate) for m in self.messages],
            "rate": self.rate,
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


class UnreadableItem(Exception):
    """An item's row cannot be read back (for example text that is not valid UTF-8 in SQLite,
    written by something other than the pipeline); ``fence`` is the task's fence before the claim."""

    def __init__(self, episode_id: str, slot: int, fence: int):
        super().__init__(f"review item {episode_id!r} slot {slot} cannot be read")
        self.episode_id, self.slot, self.fence = episode_id, slot, fence


class _LostRace(Exception):
    """Another reviewer took the row between the select and the compare-and-set."""


class _UnreadableCanary(Exception):
    """A canary's source episode cannot be read back: the canary is set aside (status ``error``)."""

    def __init__(self, canary_id: str):
        super().__init__(canary_id)
        self.canary_id = canary_id


def claim(
    store: Store,
    user: User,
    lease_s: float,
    key: bytes,
    now: float | None = None,
    blinding: Blinding = blind_all,
    renew: bool = False,
    canaries: CanaryConfig | None = None,
) -> Item | None:
    """The reviewer's current lease, or a new one on the oldest available item; None if the queue is empty.

    ``renew``: a held lease is extended to ``now + lease_s`` (the review page, on every view):
    its ``lease_expires_at`` then names this view, so the leave beacon of a page the reviewer
    has since reloaded cannot release it (:func:`leave`). The fence stays.

    An item whose row cannot be read is set aside (status ``error``) and the next one is
    tried: one bad row must not fail every claim of the queue's oldest item. The caller turns
    the item into a response; if that fails it must call :func:`set_aside`, or the lease would
    keep the reviewer on an item they cannot see.

    ``canaries``: hand out canaries at their configured share (None: none; a canary already
    leased or released to the reviewer is handed out again all the same).
    """
    now = time.time() if now is None else now
    for _ in range(5):  # a lost compare-and-set race (SQLite readers) or a bad row: try the next row
        try:
            return _claim_once(store, user, lease_s, key, now, blinding, renew, canaries)
        except _LostRace:
            continue
        except UnreadableItem as e:
            _set_aside_unreadable(store, e, key, blinding)
        except _UnreadableCanary as e:
            log.warning("a canary's source cannot be read (%s); set aside", type(e.__cause__).__name__)
            with store.engine.begin() as conn:
                canary.set_aside(conn, e.canary_id)
    return None


def _claim_once(
    store: Store,
    user: User,
    lease_s: float,
    key: bytes,
    now: float,
    blinding: Blinding,
    renew: bool = False,
    canaries: CanaryConfig | None = None,
) -> Item | None:
    rt = t.review_tasks
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
            if renew:
                c = _renew(conn, c, now + lease_s)
            return _read_item(conn, c, c.fence, key, blinding)
        mine_canary = _held_canary(conn, user, lease_s, now, renew, blinding)
        if mine_canary is not None:
            return mine_canary
        row = _oldest_waiting(conn, store, user, now)
        if row is None:
            return None
        expires = now + lease_s
        if canaries is not None and canaries.share > 0:
            new = _new_canary(conn, user, key, canaries, row.episode_id, now, expires, blinding)
            if new is not None:
                return new
        res = conn.execute(
            rt.update()
            .where(rt.c.episode_id == row.episode_id, rt.c.slot == row.slot, rt.c.fence == row.fence)
            .values(
                status="claimed",
                lease_user_id=user.id,
                lease_expires_at=expires,
                fence=row.fence + 1,
                guidelines_version=current_guidelines_version(),
            )
        )
        if res.rowcount != 1:
            raise _LostRace
        c = Claim(row.episode_id, int(row.slot), int(row.fence) + 1, expires)
        return _read_item(conn, c, int(row.fence), key, blinding)


def _oldest_waiting(conn: sa.Connection, store: Store, user: User, now: float) -> Any:
    """The oldest item the reviewer may take: pending, or claimed under a lease that expired.

    Two reads, each the head of ``ix_review_tasks_status_created`` in order, and the older of
    the two. One read of "pending OR expired" cannot walk that index, so the database read and
    sorted every waiting item on every claim: at 2,000,000 waiting (a few days of 1% of 1,000
    episodes/s, which retention keeps for its whole horizon) 0.65 s a claim on PostgreSQL, with
    an 86 MB sort on disk, against 7 ms at 20,000. The reviewer's own items are passed over by
    primary-key lookups as the walk meets them (``NOT EXISTS``), not by reading all their labels."""
    rt, lb = t.review_tasks, t.labels
    leased = rt.alias("leased")
    skip = (
        ~sa.exists().where(lb.c.episode_id == rt.c.episode_id, lb.c.user_id == user.id),
        ~sa.exists().where(
            leased.c.episode_id == rt.c.episode_id, leased.c.lease_user_id == user.id, leased.c.status == "claimed"
        ),
        # An episode that was this reviewer's canary: seeing it again would tell.
        rt.c.episode_id.not_in(canary.sources_of(user.id)),
    )
    heads = []
    for waiting in (rt.c.status == "pending", sa.and_(rt.c.status == "claimed", rt.c.lease_expires_at <= now)):
        q = (
            sa.select(rt.c.episode_id, rt.c.slot, rt.c.fence, rt.c.created_at)
            .where(waiting, *skip)
            .order_by(rt.c.created_at, rt.c.episode_id, rt.c.slot)
            .limit(1)
        )
        if store.dialect == "postgresql":
            q = q.with_for_update(skip_locked=True, of=rt)
        row = conn.execute(q).first()
        if row is not None:
            heads.append(row)
    return min(heads, key=lambda r: (float(r.created_at), r.episode_id, int(r.slot)), default=None)


def _held_canary(
    conn: sa.Connection, user: User, lease_s: float, now: float, renew: bool, blinding: Blinding
) -> Item | None:
    """The reviewer's canary under a live lease (renewed on ``renew``), else their released or
    expired one leased again; None when they have neither."""
    held = canary.held(conn, user.id, now)
    if held is not None:
        if renew:
            canary.renew(conn, held, now + lease_s)
        return _canary_item(conn, canary.find(conn, user.id, held.id), blinding)
    back = canary.waiting(conn, user.id, now)
    if back is None:
        return None
    if canary.lease(conn, back, now + lease_s) is None:
        raise _LostRace
    return _canary_item(conn, canary.find(conn, user.id, back.id), blinding)


def _new_canary(
    conn: sa.Connection,
    user: User,
    key: bytes,
    cfg: CanaryConfig,
    head_id: str,
    now: float,
    expires: float,
    blinding: Blinding,
) -> Item | None:
    """A new canary in place of the real item ``head_id`` when this claim's draw says so."""
    n = canary.claim_number(conn, user.id)
    if not canary.canary_turn(key, cfg, user.id, n):
        return None
    e = t.episodes
    head = conn.execute(sa.select(e.c.episode_id, e.c.ts).where(e.c.episode_id == head_id)).one()
    cid = canary.create(conn, key, cfg, user.id, n, head, now, expires, _source)
    return None if cid is None else _canary_item(conn, canary.find(conn, user.id, cid), blinding)


def _source(conn: sa.Connection, episode_id: str) -> tuple[Any, dict[str, Any] | None, tuple[Turn, ...] | None]:
    """An episode as a canary is made from it: its row, metadata and conversation."""
    e = t.episodes
    row = conn.execute(
        sa.select(e.c.stream, e.c.model, e.c.ts, e.c.prompt, e.c.response).where(e.c.episode_id == episode_id)
    ).one()
    return row, load_metadata(conn, episode_id), load_messages(conn, episode_id)


def _canary_item(conn: sa.Connection, row: Any, blinding: Blinding) -> Item:
    """A canary as an :class:`Item`: the same fields, blinding and shape as a real item."""
    try:
        source, meta, messages = _source(conn, row.episode_id)
        sh = canary.shown(row, source, meta, messages)
        fields, show_model = blinding(sh.stream)
        shown = {k: bounded(v) for k, v in (sh.metadata or {}).items() if k in fields and k != "alternative_response"}
        return Item(
            claim=Claim(sh.id, 0, sh.fence, sh.lease_expires_at),
            stream=sh.stream,
            model=sh.model if show_model else None,
            timestamp=sh.timestamp,
            prompt=sh.prompt,
            response=sh.response,
            alternative=sh.alternative,
            metadata=shown or None,
            alternative_first=sh.alternative is not None and sh.alternative_first,
            messages=sh.messages,
        )
    except sa.exc.DBAPIError as e:
        if e.connection_invalidated:
            raise
        raise _UnreadableCanary(row.id) from e
    except (ValueError, TypeError, OverflowError) as e:
        raise _UnreadableCanary(row.id) from e


def current_guidelines_version() -> sa.ScalarSelect[Any]:
    """The newest guidelines version of the review task's stream (NULL: none), for an UPDATE of
    ``review_tasks``: what the reviewer is told at claim time."""
    g, rt = t.guidelines, t.review_tasks
    return sa.select(sa.func.max(g.c.version)).where(g.c.stream == rt.c.stream).scalar_subquery()


def _renew(conn: sa.Connection, c: Claim, expires: float) -> Claim:
    rt = t.review_tasks
    conn.execute(
        rt.update()
        .where(rt.c.episode_id == c.episode_id, rt.c.slot == c.slot, rt.c.fence == c.fence)
        .values(lease_expires_at=expires)
    )
    return Claim(c.episode_id, c.slot, c.fence, expires)


def _read_item(conn: sa.Connection, c: Claim, fence_before: int, key: bytes, blinding: Blinding) -> Item:
    try:
        return _item(conn, c, key, blinding)
    except sa.exc.DBAPIError as e:
        if e.connection_invalidated:
            raise  # the database, not the row
        raise UnreadableItem(c.episode_id, c.slot, fence_before) from e
    except (ValueError, TypeError, OverflowError) as e:
        raise UnreadableItem(c.episode_id, c.slot, fence_before) from e


def _set_aside_unreadable(store: Store, e: UnreadableItem, key: bytes, blinding: Blinding) -> None:
    """Set aside a row that failed to read, if it still fails in a fresh transaction (the
    first failure rolled the claim back); a failure that does not repeat was not the row's."""
    rt = t.review_tasks
    with store.engine.connect() as conn:  # read only; rolled back at close
        try:
            _item(conn, Claim(e.episode_id, e.slot, e.fence, 0.0), key, blinding)
            return
        except Exception as again:
            log.warning("review item %r cannot be read (%s); set aside", e.episode_id, type(again).__name__)
    with store.engine.begin() as conn:
        conn.execute(
            rt.update()
            .where(rt.c.episode_id == e.episode_id, rt.c.slot == e.slot, rt.c.fence == e.fence)
            .values(status="error", lease_user_id=None, lease_expires_at=None)
        )


def metadata_text() -> sa.Cast[str]:
    """The episodes' metadata column as JSON text, for :func:`parse_metadata`."""
    return sa.cast(t.episodes.c.metadata, sa.Text)


def parse_metadata(raw: str | None, episode_id: str) -> dict[str, Any] | None:
    """Metadata read as text (:func:`metadata_text`), or None when there is none or it cannot be read.

    Parsed here, not by the column type: a row stored before validation limited nesting (or
    by another writer) can nest deeper than the JSON decoder's recursion limit, and an
    exception while fetching would fail every claim of the queue's oldest item (and exports).
    """
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        log.warning("episode %r: metadata cannot be read back (%d characters); used without it", episode_id, len(raw))
        return None
    return meta if isinstance(meta, dict) else None


def load_metadata(conn: sa.Connection, episode_id: str) -> dict[str, Any] | None:
    """An episode's metadata (see :func:`parse_metadata`)."""
    raw = conn.execute(sa.select(metadata_text()).where(t.episodes.c.episode_id == episode_id)).scalar()
    return parse_metadata(raw, episode_id)


def stored_messages(conn: sa.Connection, episode_id: str) -> Any:
    """An episode's stored conversation as JSON (None for v1). Read as text and parsed here, like
    metadata (:func:`parse_metadata`); raises ``ValueError`` or ``RecursionError`` for a row that
    cannot be decoded."""
    raw = conn.execute(
        sa.select(sa.cast(t.episodes.c.messages, sa.Text)).where(t.episodes.c.episode_id == episode_id)
    ).scalar()
    return None if raw is None else json.loads(raw)


def load_messages(conn: sa.Connection, episode_id: str) -> tuple[Turn, ...] | None:
    """An episode's conversation (schema v2), None for v1: a row that cannot be decoded is shown as
    its flattening."""
    try:
        return turns_of(stored_messages(conn, episode_id))
    except (ValueError, RecursionError):
        log.warning("episode %r: messages cannot be read back; shown flattened", episode_id)
        return None


def source_for_scoring(conn: sa.Connection, episode_id: str) -> tuple[str, list[Any] | None] | None:
    """A canary source's prompt and stored conversation, as the pipeline's scorer reads an episode;
    None when the source is gone. A conversation that cannot be decoded is scored flattened."""
    prompt = conn.execute(sa.select(t.episodes.c.prompt).where(t.episodes.c.episode_id == episode_id)).scalar()
    if prompt is None:
        return None
    try:
        messages = stored_messages(conn, episode_id)
    except (ValueError, RecursionError):
        messages = None
    return str(prompt), messages if isinstance(messages, list) else None


def _item(conn: sa.Connection, c: Claim, key: bytes, blinding: Blinding) -> Item:
    e = t.episodes
    row = conn.execute(
        sa.select(e.c.stream, e.c.model, e.c.ts, e.c.prompt, e.c.response).where(e.c.episode_id == c.episode_id)
    ).one()
    meta = load_metadata(conn, c.episode_id)
    alt = alternative_of(meta)
    fields, show_model = blinding(row.stream)
    shown = {k: bounded(v) for k, v in (meta or {}).items() if k in fields and k != "alternative_response"}
    return Item(
        claim=c,
        stream=row.stream,
        model=row.model if show_model else None,
        timestamp=float(row.ts),
        prompt=row.prompt,
        response=row.response,
        alternative=alt,
        metadata=shown or None,
        # Order of the two responses is keyed-random: no position bias across items.
        alternative_first=alt is not None and keyed_uniform(key, c.episode_id, "pair-order") < 0.5,
        messages=load_messages(conn, c.episode_id),
    )


def episode_item(store: Store, episode_id: str, key: bytes, blinding: Blinding = blind_all) -> Item | None:
    """An episode as its stream's reviewers would see it, with no lease (``claim`` names the
    episode only): for the adjudication page. None when there is no such episode or its row
    cannot be read."""
    with store.engine.connect() as conn:
        try:
            return _item(conn, Claim(episode_id, 0, 0, 0.0), key, blinding)
        except sa.exc.NoResultFound:
            return None
        except (sa.exc.DBAPIError, ValueError, TypeError, OverflowError) as e:
            if isinstance(e, sa.exc.DBAPIError) and e.connection_invalidated:
                raise  # the database, not the row
            log.warning("episode %r cannot be read for adjudication (%s)", episode_id, type(e).__name__)
            return None


def set_aside(store: Store, user: User, c: Claim, now: float | None = None) -> bool:
    """Take an item that could not be shown out of the queue (status ``error``), in place of
    the reviewer's lease; whether it was still theirs to set aside.

    Releasing it instead would hand the same item to the next claim, which would fail the
    same way: one bad item would stop the queue for everyone. Set-aside items are counted
    (``oversight_review_queue_error``) and go back with ``UPDATE review_tasks SET
    status = 'pending' WHERE status = 'error'`` once the cause is fixed.
    """
    now = time.time() if now is None else now
    rt, ct = t.review_tasks, t.canaries
    with store.engine.begin() as conn:
        if canary.find(conn, user.id, c.episode_id) is not None:
            res = conn.execute(
                ct.update()
                .where(
                    ct.c.id == c.episode_id, ct.c.user_id == user.id, ct.c.fence == c.fence, ct.c.status == "claimed"
                )
                .values(status="error", lease_expires_at=None)
            )
            return bool(res.rowcount)
        res = conn.execute(
            rt.update()
            .where(
                rt.c.episode_id == c.episode_id,
                rt.c.slot == c.slot,
                rt.c.fence == c.fence,
                rt.c.lease_user_id == user.id,
                rt.c.status == "claimed",
            )
            .values(status="error", lease_user_id=None, lease_expires_at=None)
        )
    return bool(res.rowcount)


def _check_lease(
    conn: sa.Connection, store: Store, user: User, episode_id: str, slot: int, fence: int, now: float
) -> Any:
    rt = t.review_tasks
    q = sa.select(rt).where(rt.c.episode_id == episode_id, rt.c.slot == slot)
    if store.dialect == "postgresql":
        q = q.with_for_update()
    row = conn.execute(q).first()
    # No item at all is refused as a lease not held is: a 404 here, against the canaries' 409 for
    # any slot but 0, told a reviewer which of their items were canaries (and whether any episode
    # id of any stream had a review task).
    if row is None or (
        row.status != "claimed"
        or row.lease_user_id != user.id
        or int(row.fence) != fence
        or row.lease_expires_at is None
        or row.lease_expires_at <= now
    ):
        raise QueueError("this lease is no longer valid (expired, released or claimed by someone else)", 409)
    return row


def _check_canary_lease(row: Any, slot: int, fence: int, now: float) -> None:
    if (
        slot != 0
        or row.status != "claimed"
        or int(row.fence) != fence
        or row.lease_expires_at is None
        or row.lease_expires_at <= now
    ):
        raise QueueError("this lease is no longer valid (expired, released or claimed by someone else)", 409)


def validate_label(label: LabelIn, flags_allowed: list[str], pairwise: bool) -> None:
    if label.skipped:
        if not label.skip_reason or not label.skip_reason.strip():
            raise QueueError("a skip needs a reason", 422, "skip_reason")
        if len(label.skip_reason) > MAX_SKIP_REASON:
            raise QueueError(f"skip reason is longer than {MAX_SKIP_REASON} characters", 422, "skip_reason")
    else:
        if label.rating is None or isinstance(label.rating, bool) or not 1 <= label.rating <= 7:
            raise QueueError("rating must be an integer from 1 to 7", 422, "rating")
        unknown = set(label.flags) - set(flags_allowed)
        if unknown:
            raise QueueError(f"unknown flags: {', '.join(sorted(unknown))}", 422, "flags")
        if len(set(label.flags)) != len(label.flags):
            raise QueueError("flags repeat", 422, "flags")
        if len(label.critique) > MAX_CRITIQUE:
            raise QueueError(f"critique is longer than {MAX_CRITIQUE} characters", 422, "critique")
        if label.preference is not None and label.preference not in PREFERENCES:
            raise QueueError(f"preference must be one of {', '.join(PREFERENCES)}", 422, "preference")
        if label.preference is not None and not pairwise:
            raise QueueError("this item has a single response: no preference", 422, "preference")
    if not 0 <= label.time_spent_ms <= 86_400_000:
        raise QueueError("time_spent_ms must be between 0 and 86400000", 422, "time_spent_ms")
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
    rate: Rating = final_turn,
    assist: AssistExperimentConfig | None = None,
) -> None:
    """Record a label (or a skip) under the reviewer's current lease; 409 if the lease is stale.
    A label of a conversation records what was rated (``labels.rated``): the stream's ``rate``, or
    ``final_turn`` for a pair; NULL for a v1 episode and a skip. ``assist``: the experiment whose
    condition for this reviewer and item is recorded with the label (NULL when none runs)."""
    now = time.time() if now is None else now
    condition = condition_of(assist, user.id, episode_id, slot) if assist is not None else None
    experiment = assist.name if assist is not None and condition is not None else None
    with store.engine.begin() as conn:
        row = canary.find(conn, user.id, episode_id, lock=store.dialect == "postgresql")
        if row is not None:
            _submit_canary(conn, user, row, slot, fence, label, flags_allowed, now, rate, experiment, condition)
            return
        task = _check_lease(conn, store, user, episode_id, slot, fence, now)
        ep = conn.execute(sa.select(t.episodes.c.stream).where(t.episodes.c.episode_id == episode_id)).one()
        pairwise = alternative_of(load_metadata(conn, episode_id)) is not None
        validate_label(label, flags_allowed, pairwise)
        exists = conn.execute(
            sa.select(t.labels.c.id).where(t.labels.c.episode_id == episode_id, t.labels.c.user_id == user.id)
        ).first()
        if exists is not None:
            raise QueueError("you have already labelled this episode", 409)
        rated: Rate | None = None
        if not label.skipped and load_messages(conn, episode_id) is not None:
            # A pair compares two final turns, whatever the stream's setting.
            rated = "final_turn" if pairwise else rate(ep.stream)
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
                rated=rated,
                guidelines_version=task.guidelines_version,
                assist_experiment=experiment,
                assist_condition=condition,
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


def _submit_canary(
    conn: sa.Connection,
    user: User,
    row: Any,
    slot: int,
    fence: int,
    label: LabelIn,
    flags_allowed: list[str],
    now: float,
    rate: Rating,
    experiment: str | None,
    condition: str | None,
) -> None:
    """A label on a canary goes to ``canary_labels`` (never ``labels``): validated, refused and
    recorded as on a real item. A skipped canary is done, not re-queued: it belongs to this
    reviewer alone."""
    _check_canary_lease(row, slot, fence, now)
    pairwise = row.presentation == "pair"
    validate_label(label, flags_allowed, pairwise)
    cl = t.canary_labels
    if conn.execute(sa.select(cl.c.id).where(cl.c.canary_id == row.id, cl.c.user_id == user.id)).first() is not None:
        raise QueueError("you have already labelled this episode", 409)
    rated: Rate | None = None
    if not label.skipped and load_messages(conn, row.episode_id) is not None:
        rated = "final_turn" if pairwise else rate(row.stream)
    conn.execute(
        cl.insert().values(
            canary_id=row.id,
            user_id=user.id,
            episode_id=row.episode_id,
            stream=row.stream,
            kind=row.kind,
            presentation=row.presentation,
            skipped=label.skipped,
            skip_reason=label.skip_reason if label.skipped else None,
            rating=None if label.skipped else label.rating,
            flags=[] if label.skipped else sorted(label.flags),
            critique="" if label.skipped else label.critique,
            preference=None if label.skipped else label.preference,
            time_spent_ms=label.time_spent_ms,
            created_at=now,
            rated=rated,
            guidelines_version=row.guidelines_version,
            assist_experiment=experiment,
            assist_condition=condition,
        )
    )
    ct = t.canaries
    conn.execute(ct.update().where(ct.c.id == row.id).values(status="done", done_at=now, lease_expires_at=None))


def release(store: Store, user: User, episode_id: str, slot: int, fence: int, now: float | None = None) -> None:
    """Give a leased item back to the queue."""
    now = time.time() if now is None else now
    with store.engine.begin() as conn:
        row = canary.find(conn, user.id, episode_id, lock=store.dialect == "postgresql")
        if row is not None:
            _check_canary_lease(row, slot, fence, now)
            ct = t.canaries
            conn.execute(ct.update().where(ct.c.id == row.id).values(status="pending", lease_expires_at=None))
            return
        _check_lease(conn, store, user, episode_id, slot, fence, now)
        rt = t.review_tasks
        conn.execute(
            rt.update()
            .where(rt.c.episode_id == episode_id, rt.c.slot == slot)
            .values(status="pending", lease_user_id=None, lease_expires_at=None)
        )


def leave(
    store: Store, user: User, episode_id: str, slot: int, fence: int, until: float, now: float | None = None
) -> bool:
    """The reviewer left the page that showed this lease (its ``pagehide`` beacon): release it,
    unless the lease has been shown again since (a reload or a second tab renews it, so its
    ``lease_expires_at`` is no longer ``until``). Whether it was released; never refuses."""
    now = time.time() if now is None else now
    rt, ct = t.review_tasks, t.canaries
    with store.engine.begin() as conn:
        if canary.find(conn, user.id, episode_id) is not None:
            res = conn.execute(
                ct.update()
                .where(
                    ct.c.id == episode_id,
                    ct.c.user_id == user.id,
                    ct.c.fence == fence,
                    ct.c.status == "claimed",
                    ct.c.lease_expires_at > now,
                    sa.func.abs(ct.c.lease_expires_at - until) < 1e-4,
                    sa.literal(slot) == 0,
                )
                .values(status="pending", lease_expires_at=None)
            )
            return bool(res.rowcount)
        res = conn.execute(
            rt.update()
            .where(
                rt.c.episode_id == episode_id,
                rt.c.slot == slot,
                rt.c.fence == fence,
                rt.c.lease_user_id == user.id,
                rt.c.status == "claimed",
                rt.c.lease_expires_at > now,
                # The page had the value as text: equal to well under a millisecond.
                sa.func.abs(rt.c.lease_expires_at - until) < 1e-4,
            )
            .values(status="pending", lease_user_id=None, lease_expires_at=None)
        )
    return bool(res.rowcount)


def queue_depth(store: Store, now: float | None = None) -> list[dict[str, Any]]:
    """Per stream: items waiting (pending or with an expired lease), leased, done, set aside
    (``error``: could not be shown), and the oldest wait in seconds."""
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
            sa.func.sum(sa.case((rt.c.status == "error", 1), else_=0)),
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
            "error": int(r[5] or 0),
        }
        for r in rows
    ]
