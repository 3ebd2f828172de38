"""The human / reward-model disagreement signal: labels from the database reach drift detection,
once each, with the right value, and the cursor survives a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from monitor.drift.disagreement import COMPONENT, SIGNAL, DisagreementFeed
from monitor.store import Store
from monitor.store import tables as t


class _Ep:
    def __init__(self, episode_id: str, stream: str):
        self.episode_id = episode_id
        self.stream = stream


NOW = 1_700_000_000.0


def _reviewer(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(t.users.insert().values(id=1, name="r", role="reviewer", password_hash="x", created_at=NOW))


def _labelled(store: Store, rows: list[tuple[str, str, float, float, int]]) -> None:
    """(episode id, stream, time, rm score, human rating): each episode, its score and its label."""
    eps, scores, labels = [], [], []
    for eid, stream, ts, score, rating in rows:
        eps.append(
            {
                "episode_id": eid,
                "stream": stream,
                "model": None,
                "ts": ts,
                "prompt": "p",
                "response": "r",
                "metadata": None,
                "source": "test",
                "position": eid,
                "ingested_at": NOW,
            }
        )
        scores.append(
            {"episode_id": eid, "version": "v1", "stream": stream, "score": score, "ts": ts, "created_at": NOW}
        )
        labels.append(
            {
                "episode_id": eid,
                "slot": 0,
                "user_id": 1,
                "stream": stream,
                "skipped": False,
                "rating": rating,
                "flags": [],
                "critique": "",
                "time_spent_ms": 0,
                "created_at": ts,
            }
        )
    with store.engine.begin() as conn:
        conn.execute(t.episodes.insert(), eps)
        conn.execute(t.rm_scores.insert(), scores)
        conn.execute(t.labels.insert(), labels)


def _seed(store: Store, rows: list[tuple[str, float, int]]) -> None:
    """(episode id, rm score, human rating) in stream chat."""
    _reviewer(store)
    _labelled(store, [(eid, "chat", NOW + i, score, rating) for i, (eid, score, rating) in enumerate(rows)])


def test_each_label_is_fed_once_with_its_verdict(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'o.db'}")
    # Scores 1..6 (median 3.5), ratings: the rm's top three are rated low, its bottom three high.
    _seed(store, [(f"e{i}", float(i), r) for i, r in zip(range(1, 7), [5, 4, 5, 1, 2, 1], strict=True)])
    fed: list[tuple[Any, ...]] = []
    feed = DisagreementFeed(store, lambda *a: fed.append(a))
    assert feed.checkpoint() == {}  # owns no stream yet: feeds nothing
    feed.observe(_Ep("x", "chat"), None, 41)  # type: ignore[arg-type]
    state = feed.checkpoint()
    assert [(a[0], a[1], a[3]) for a in fed] == [("chat", SIGNAL, f"e{i}") for i in range(1, 7)]
    # Median rating 3: e1,e2,e3 "bad" by the rm (score <= 3.5) but rated > 3 -> disagree; e4..e6 too.
    assert [a[2] for a in fed] == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert all(a[5] == 41 for a in fed)
    assert state == {("chat", COMPONENT): {"last_label_id": 6}}
    assert feed.checkpoint() == {} and len(fed) == 6  # nothing twice
    # A restarted pipeline continues from the committed cursor.
    with store.engine.begin() as conn:
        conn.execute(
            t.stream_state.insert().values(
                stream="chat", component=COMPONENT, state=state[("chat", COMPONENT)], updated_at=0.0
            )
        )
    again: list[tuple[Any, ...]] = []
    feed2 = DisagreementFeed(store, lambda *a: again.append(a))
    feed2.observe(_Ep("y", "chat"), None, 42)  # type: ignore[arg-type]
    assert feed2.checkpoint() == {} and not again
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.labels)).scalar_one() == 6
    store.close()


def test_agreeing_labels_feed_zeros(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'o.db'}")
    _seed(store, [(f"e{i}", float(i), r) for i, r in zip(range(1, 7), [1, 1, 2, 4, 5, 5], strict=True)])
    fed: list[tuple[Any, ...]] = []
    feed = DisagreementFeed(store, lambda *a: fed.append(a))
    feed.observe(_Ep("x", "chat"), None, 0)  # type: ignore[arg-type]
    feed.checkpoint()
    # Median rating 3: e4..e6 good on both sides, e1..e3 bad on both sides.
    assert [a[2] for a in fed] == [0.0] * 6
    store.close()


def _label_streams(store: Store, streams: list[str], first: int, per_stream: int = 2) -> None:
    """``per_stream`` scored and labelled episodes in each stream, the episode ids numbered from ``first``."""
    _labelled(
        store,
        [
            (f"{stream}-e{first + j}", stream, NOW + k, float(j), 5 - j)
            for k, stream in enumerate(streams)
            for j in range(per_stream)
        ],
    )


def test_thousands_of_streams_are_fed_once_each_without_one_query_per_stream(db_url: str) -> None:
    """One condition per owned stream in one query failed every checkpoint on SQLite beyond about
    1,000 streams ("Expression tree is too large"), and the pipeline retried it forever."""
    store = Store(db_url)
    _reviewer(store)
    streams = [f"s{i}" for i in range(2500)]
    _label_streams(store, streams, 0)
    fed: list[tuple[Any, ...]] = []
    feed = DisagreementFeed(store, lambda *a: fed.append(a))
    for i, s in enumerate(streams[:2400]):  # s2400.. are another replica's
        feed.observe(_Ep(f"x{i}", s), None, i)  # type: ignore[arg-type]
    state: dict[Any, Any] = {}
    state.update(feed.checkpoint())
    # Labels keep coming while the streams are caught up (1,000 streams per checkpoint).
    _label_streams(store, streams[:3] + streams[-3:], 10)
    state.update(feed.checkpoint())
    state.update(feed.checkpoint())
    assert feed.checkpoint() == {}
    ids = [a[3] for a in fed]
    assert len(ids) == len(set(ids)) == 2 * 2400 + 2 * 3
    assert {e.split("-")[0] for e in ids} == set(streams[:2400])
    assert [a[3] for a in fed if a[0] == "s1"] == ["s1-e0", "s1-e1", "s1-e10", "s1-e11"]  # in label order
    # A restart from the committed cursors feeds nothing twice; a new label is fed once.
    with store.engine.begin() as conn:
        conn.execute(
            t.stream_state.insert(),
            [{"stream": s, "component": c, "state": v, "updated_at": 0.0} for (s, c), v in state.items()],
        )
    _label_streams(store, ["s7"], 20, per_stream=1)
    again: list[tuple[Any, ...]] = []
    feed2 = DisagreementFeed(store, lambda *a: again.append(a))
    for i, s in enumerate(streams[:2400]):
        feed2.observe(_Ep(f"y{i}", s), None, i)  # type: ignore[arg-type]
    for _ in range(4):
        feed2.checkpoint()
    assert [a[3] for a in again] == ["s7-e20"]
    store.close()
