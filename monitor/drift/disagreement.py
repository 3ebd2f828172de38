"""The human / reward-model disagreement signal: one binary value per reviewed episode.

Labels arrive in the database from the review API, in whatever process serves it; the pipeline
picks them up at each batch checkpoint (an :class:`monitor.pipeline.EpisodeObserver` that sees
no episodes, only the checkpoint). For a newly labelled (not skipped) episode that the reward
model scored (human-sampled episodes are scored for this), the value is 1 when the two put the
episode on opposite sides of their own stream medians: the reward model's score against the
median score of that version's recent scores in the stream, the mean human rating against the
median of the stream's recent ratings (strictly above counts as "good" on both sides, so a
stream where most ratings sit at the floor still splits). It goes to drift detection as
``rm_disagreement`` (one-sided by default: only more disagreement is a problem).

Each stream's cursor (last label id taken) is checkpointed with the batch, in the same
transaction as the detector state that the values updated, so a crash neither skips nor repeats
a label. Only streams this pipeline has seen episodes of since its last rebalance are fed: with
several replicas, a stream's labels go to the replica that owns its detectors.

The reads cost the same with ten streams or a hundred thousand. One scan follows the newest
labels past a mark (every label up to it has been looked at for every caught-up stream). A
stream seen for the first time since the start or a rebalance is caught up from its own cursor
to the mark first, at most ``LAG_CHUNK`` streams per query. One condition per owned stream in a
single query, as before, failed every batch on SQLite beyond about 1,000 streams ("Expression
tree is too large"), and the pipeline retried it forever.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, TypeVar

import sqlalchemy as sa

from monitor.episodes import Episode
from monitor.retry import RetryPolicy
from monitor.store import BatchWrite, Store
from monitor.store import tables as t
from sampling import Decision

log = logging.getLogger(__name__)

SIGNAL = "rm_disagreement"
COMPONENT = SIGNAL
WINDOW = 500  # recent scores / ratings per stream that set the medians
BATCH = 1000  # labels taken per query at most
LAG_CHUNK = 100  # streams caught up per query: its size stays far below SQLite's expression depth of 1,000
CATCH_UP_CHUNKS = 10  # queries of streams to catch up per checkpoint at most

Feed = Callable[[str, str, float, str, float, int], None]
_T = TypeVar("_T")


@dataclass
class _Found:
    """What one checkpoint read: the labels to feed in order, and where the reads got to."""

    rows: list[Any] = field(default_factory=list)
    medians: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    mark: int = 0
    examined: dict[str, int] = field(default_factory=dict)  # lagging stream -> label id examined through
    caught_up: list[str] = field(default_factory=list)


def saved_cursor(stream: str, saved: Any) -> int:
    """The last label id a stream's checkpoint says was taken; 0 (its labels taken again from the
    first) when the checkpoint does not hold one that can be read, said once: raising would fail
    every episode of the stream, on every run, since nothing would rewrite the row.

    >>> saved_cursor("chat", {"last_label_id": 41}), saved_cursor("chat", None)
    (41, 0)
    """
    if saved is None:
        return 0
    value = saved.get("last_label_id") if isinstance(saved, Mapping) else saved
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    log.error("label cursor of %r unreadable (%r): its labels are taken again from the first", stream, value)
    return 0


class DisagreementFeed:
    def __init__(self, store: Store, feed: Feed, retry: RetryPolicy | None = None):
        self.store = store
        self._feed = feed
        # Database reads on the pipeline's path wait out an outage in the pipeline's retry policy.
        self._retry = retry
        self._cursors: dict[str, int] = {}  # owned stream -> last label id taken
        self._lagging: dict[str, None] = {}  # owned streams not yet caught up to the mark, oldest first
        self._mark: int | None = None  # every label up to it was looked at for the caught-up streams
        self._index = -1
        self.fed = 0

    def prepare(self, episodes: Sequence[tuple[Episode, int]]) -> None:
        pass  # its values come from labels, at the checkpoint

    def observe(self, episode: Episode, decision: Decision, index: int) -> None:
        self._index = index  # events name the input index at which their value arrived
        if episode.stream not in self._cursors:
            stream = episode.stream
            saved = self._read(lambda: self.store.load_state(stream, COMPONENT))
            self._cursors[stream] = saved_cursor(stream, saved)
            self._lagging[stream] = None

    def _read(self, fn: Callable[[], _T]) -> _T:
        return fn() if self._retry is None else self._retry.call(fn, "store")

    def checkpoint(self) -> Mapping[tuple[str, str], dict[str, Any]]:
        if not self._cursors:
            return {}
        # Nothing changes before the reads below succeed, so a retry after an outage is exact.
        found = self._read(self._new_labels)
        self._mark = found.mark
        for stream, through in found.examined.items():
            self._cursors[stream] = max(self._cursors[stream], through)
        for stream in found.caught_up:
            del self._lagging[stream]
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for r in found.rows:
            self._cursors[r.stream] = max(self._cursors[r.stream], int(r.id))
            out[(r.stream, COMPONENT)] = {"last_label_id": self._cursors[r.stream]}
            if r.skipped or r.rating is None or r.score is None:
                continue
            m = found.medians.get((r.stream, r.version))
            if m is None:
                continue
            rm_good = float(r.score) > m[0]
            human_good = float(r.rating) > m[1]
            self._feed(r.stream, SIGNAL, 1.0 if rm_good != human_good else 0.0, r.episode_id, r.ts, self._index)
            self.fed += 1
        return out

    def _new_labels(self) -> _Found:
        """Labels past the owned streams' cursors, with the medians they are compared with."""
        with self.store.engine.connect() as conn:
            mark = self._mark
            if mark is None:
                mark = int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(t.labels.c.id), 0))).scalar_one())
            found = _Found(mark=mark)
            lagging = iter(self._lagging)
            for _ in range(CATCH_UP_CHUNKS):
                chunk = list(islice(lagging, LAG_CHUNK))
                if not chunk:
                    break
                self._catch_up(conn, chunk, found)
            caught = set(found.caught_up)
            newest = list(conn.execute(_labels().where(t.labels.c.id > mark)).all())
            if newest:
                found.mark = int(newest[-1].id)
            found.rows += [
                r
                for r in newest
                if r.stream in self._cursors
                and (r.stream not in self._lagging or r.stream in caught)
                and r.id > self._cursors[r.stream]
            ]
            found.medians = self._medians(conn, {(r.stream, r.version) for r in found.rows if r.version is not None})
        return found

    def _catch_up(self, conn: sa.Connection, streams: list[str], found: _Found) -> None:
        """The labels of ``streams`` from their cursors up to the mark: those whose labels were all
        read are caught up, the others have been read through the last row's id."""
        lb = t.labels
        behind = sa.or_(*(sa.and_(lb.c.stream == s, lb.c.id > self._cursors[s]) for s in streams))
        rows = list(conn.execute(_labels().where(behind, lb.c.id <= found.mark)).all())
        if len(rows) < BATCH:
            found.caught_up += streams
        else:  # ordered by id: every label of these streams up to the last row's was in the result
            found.examined.update(dict.fromkeys(streams, int(rows[-1].id)))
        found.rows += rows

    def _medians(self, conn: sa.Connection, keys: set[tuple[str, str]]) -> dict[tuple[str, str], tuple[float, float]]:
        lb, sc = t.labels, t.rm_scores
        out = {}
        for stream, version in keys:
            scores = conn.execute(
                sa.select(sc.c.score)
                .where(sc.c.stream == stream, sc.c.version == version)
                .order_by(sc.c.ts.desc())
                .limit(WINDOW)
            ).scalars()
            ratings = conn.execute(
                sa.select(lb.c.rating)
                .where(lb.c.stream == stream, lb.c.skipped.is_(False), lb.c.rating.is_not(None))
                .order_by(lb.c.id.desc())
                .limit(WINDOW)
            ).scalars()
            s, h = [float(x) for x in scores], [float(x) for x in ratings]
            if s and h:
                out[(stream, version)] = (statistics.median(s), statistics.median(h))
        return out

    def forget(self) -> None:
        """After a rolled-back batch or a rebalance: cursors reload from the database on next use."""
        self._cursors.clear()
        self._lagging.clear()
        self._mark = None

    def add_rows(self, batch: BatchWrite) -> None:
        """Nothing: the values go to the drift monitor, and the cursors into the checkpoint."""

    def between_batches(self) -> bool:
        return False

    def outstanding(self) -> bool:
        return False


def _labels() -> sa.Select[Any]:
    """Labels with their episode's reward-model scores, in id order, ``BATCH`` at most."""
    lb, sc = t.labels, t.rm_scores
    return (
        sa.select(lb.c.id, lb.c.episode_id, lb.c.stream, lb.c.rating, lb.c.skipped)
        .add_columns(sc.c.version, sc.c.score, sc.c.ts)
        .select_from(lb.outerjoin(sc, sc.c.episode_id == lb.c.episode_id))
        .order_by(lb.c.id)
        .limit(BATCH)
    )
