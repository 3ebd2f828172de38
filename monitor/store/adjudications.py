"""Reading adjudications: an item's current final label (the newest adjudication of its episode).

The rule for when labels disagree and the listing of disagreements live in
:mod:`monitor.quality.adjudication`; the review app writes adjudications
(:mod:`monitor.review.adjudication`). This read sits in the store so that every stage that reads
labels (estimates, reward-model training data, exports) can take the final label in their place.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from monitor.store import tables as t
from monitor.store.store import Store


@dataclass(frozen=True)
class Final:
    """An item's adjudicated label: what estimates and training use instead of its labels."""

    adjudication_id: int
    rating: int
    flags: frozenset[str]
    preference: str | None
    user_id: int


def finals(store: Store, stream: str | None = None) -> dict[str, Final]:
    """The current adjudication of every adjudicated episode (the newest row per episode: a later
    adjudication of the same item supersedes an earlier one, which stays as history)."""
    a = t.adjudications
    newest = sa.select(sa.func.max(a.c.id)).group_by(a.c.episode_id)
    q = sa.select(a.c.id, a.c.episode_id, a.c.rating, a.c.flags, a.c.preference, a.c.user_id).where(a.c.id.in_(newest))
    if stream is not None:
        q = q.where(a.c.stream == stream)
    with store.engine.connect() as conn:
        rows = conn.execute(q).all()
    return {
        r.episode_id: Final(int(r.id), int(r.rating), frozenset(r.flags or []), r.preference, int(r.user_id))
        for r in rows
    }
