"""Adjudication: an administrator settles an item whose reviewers disagreed with a final label.

The rule for "disagreed" and what reads the final label are in
:mod:`monitor.quality.adjudication`; this module writes adjudications and reads their history.

Refusals (:class:`AdjudicationError`, an HTTP status):

* 404: no such episode;
* 409: the item has fewer than two labels (nothing to adjudicate), or the administrator labelled
  it (one cannot settle one's own disagreement: the final label would only repeat one side);
* 422: an invalid label (the reviewers' rules: rating 1-7, known flags, a preference only on a
  pair) or a missing note. A note says why: the final label is audited, and it is what
  training and estimates will use.

An item may be adjudicated again (a mistake, new guidelines): the new row supersedes the old,
which stays. Items that do not disagree under the current rule may be adjudicated too (an
administrator reviewing overlap by hand): the reasons recorded are then empty.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import sqlalchemy as sa

from monitor.quality.adjudication import Given, Rule
from monitor.review.auth import User
from monitor.review.queue import LabelIn, QueueError, alternative_of, load_metadata, validate_label
from monitor.store import Store
from monitor.store import tables as t

MAX_NOTE = 2000


class AdjudicationError(Exception):
    """A refused adjudication; ``status`` is the HTTP status (404, 409, 422); ``field``: the
    request field a 422 refuses."""

    def __init__(self, message: str, status: int, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field


@dataclass(frozen=True)
class Verdict:
    """What the adjudicator decides: the final label and why."""

    rating: int
    flags: tuple[str, ...] = ()
    preference: str | None = None
    note: str = ""


@dataclass(frozen=True)
class Adjudication:
    id: int
    episode_id: str
    stream: str
    adjudicator: str
    rating: int
    flags: list[str]
    preference: str | None
    note: str
    label_ids: list[int]
    reasons: list[str]
    created_at: float
    current: bool


def _check_note(note: str) -> str:
    note = note.strip()
    if not note:
        raise AdjudicationError("an adjudication needs a note saying why", 422, "note")
    if len(note) > MAX_NOTE:
        raise AdjudicationError(f"the note is longer than {MAX_NOTE} characters", 422, "note")
    if "\x00" in note:
        raise AdjudicationError("NUL characters are not allowed", 422, "note")
    return note


def adjudicate(
    store: Store,
    user: User,
    episode_id: str,
    verdict: Verdict,
    flags_allowed: list[str],
    rule: Rule,
    now: float | None = None,
) -> Adjudication:
    """Record ``user``'s final label of ``episode_id`` (see the module's refusals)."""
    now = time.time() if now is None else now
    note = _check_note(verdict.note)
    lb = t.labels
    with store.engine.begin() as conn:
        ep = conn.execute(sa.select(t.episodes.c.stream).where(t.episodes.c.episode_id == episode_id)).first()
        if ep is None:
            raise AdjudicationError("no such episode", 404)
        pairwise = alternative_of(load_metadata(conn, episode_id)) is not None
        try:
            validate_label(
                LabelIn(verdict.rating, verdict.flags, preference=verdict.preference), flags_allowed, pairwise
            )
        except QueueError as e:
            raise AdjudicationError(str(e), e.status, e.field) from None
        labels = conn.execute(
            sa.select(lb.c.id, lb.c.user_id, lb.c.rating, lb.c.flags, lb.c.preference)
            .where(lb.c.episode_id == episode_id, lb.c.skipped.is_(False), lb.c.rating.is_not(None))
            .order_by(lb.c.id)
        ).all()
        if len(labels) < 2:
            raise AdjudicationError("this item has fewer than two labels: there is nothing to adjudicate", 409)
        if any(int(r.user_id) == user.id for r in labels):
            raise AdjudicationError("you labelled this item: another administrator must adjudicate it", 409)
        reasons = rule.reasons([Given(int(r.rating), frozenset(r.flags or []), r.preference) for r in labels])
        values = {
            "episode_id": episode_id,
            "stream": ep.stream,
            "rating": verdict.rating,
            "flags": sorted(verdict.flags),
            "preference": verdict.preference,
            "note": note,
            "label_ids": [int(r.id) for r in labels],
            "reasons": reasons,
            "created_at": now,
        }
        key = conn.execute(t.adjudications.insert().values(user_id=user.id, **values)).inserted_primary_key
        assert key is not None  # an INSERT of one row always has its key
    return Adjudication(id=int(key[0]), adjudicator=user.name, current=True, **values)


def history(
    store: Store, stream: str | None = None, episode_id: str | None = None, limit: int = 100
) -> list[Adjudication]:
    """Adjudications, newest first; ``current`` false for one a later adjudication superseded."""
    a, u = t.adjudications, t.users
    newest = sa.select(sa.func.max(a.c.id)).group_by(a.c.episode_id)
    q = (
        sa.select(a, u.c.name.label("adjudicator"), a.c.id.in_(newest).label("current"))
        .join(u, u.c.id == a.c.user_id)
        .order_by(a.c.id.desc())
        .limit(limit)
    )
    if stream is not None:
        q = q.where(a.c.stream == stream)
    if episode_id is not None:
        q = q.where(a.c.episode_id == episode_id)
    with store.engine.connect() as conn:
        rows = conn.execute(q).all()
    return [
        Adjudication(
            id=int(r.id),
            episode_id=r.episode_id,
            stream=r.stream,
            adjudicator=r.adjudicator,
            rating=int(r.rating),
            flags=list(r.flags or []),
            preference=r.preference,
            note=r.note,
            label_ids=[int(x) for x in (r.label_ids or [])],
            reasons=list(r.reasons or []),
            created_at=float(r.created_at),
            current=bool(r.current),
        )
        for r in rows
    ]
