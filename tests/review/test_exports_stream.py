"""The label exports stream: what an export holds at once does not grow with the labels kept.

They built every record (each with its episode's prompt and response) in a list before sending the
first byte: several hundred megabytes per export at 200,000 labels, and a few admins exporting at
once could take the review service's memory. Measured with tracemalloc, not timed."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from monitor.review import auth, export
from monitor.store import Store

RESPONSE = "An answer that goes on for a while. " * 100  # 3.6 KB, as a real response


def _fill(url: str, n: int) -> Store:
    """``n`` labelled episodes, ten to a prompt, rated 1..7, by one reviewer."""
    store = Store(url)
    user = auth.create_user(store, "ann", "reviewer", "correct horse battery")
    series = f"WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < {n}) "
    with store.engine.begin() as conn:
        conn.execute(
            sa.text(
                series + "INSERT INTO episodes (episode_id, stream, model, ts, prompt, response, metadata, source,"
                " position, ingested_at) SELECT 'e' || g, 's', 'm', g, 'question ' || (g / 10), :r || g, '{}', 't',"
                " 'e' || g, g FROM s"
            ),
            {"r": RESPONSE},
        )
        conn.execute(
            sa.text(
                series + "INSERT INTO samples (episode_id, channel, stream, ts, inclusion_probability, created_at)"
                " SELECT 'e' || g, 'human', 's', g, 0.1, g FROM s"
            )
        )
        conn.execute(
            sa.text(
                series + "INSERT INTO labels (episode_id, slot, user_id, stream, skipped, rating, flags, critique,"
                f" time_spent_ms, created_at) SELECT 'e' || g, 0, {user.id}, 's', 0, 1 + g % 7, '[]', '', 1, g FROM s"
            )
        )
    return store


def _peak(records: Iterator[Any]) -> tuple[int, int]:
    """(records, peak bytes traced) while consuming ``records`` as the API does."""
    tracemalloc.start()
    try:
        count = sum(1 for _ in export.jsonl(records))
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("stream", [export.iter_ratings, export.iter_pairs], ids=["ratings", "pairs"])
def test_an_export_holds_what_it_sends_not_every_label(
    tmp_path: Path, stream: Callable[[Store], Iterator[Any]]
) -> None:
    small, large = _fill(f"sqlite:///{tmp_path / 's.db'}", 500), _fill(f"sqlite:///{tmp_path / 'l.db'}", 5_000)
    try:
        n_small, peak_small = _peak(stream(small))
        n_large, peak_large = _peak(stream(large))
    finally:
        small.close()
        large.close()
    assert n_large >= 9 * n_small > 0  # ten times the labels, ten times the records
    # In a list: ten times the memory (18 MB for the large one's ratings); streamed: about the same.
    assert peak_large < 2 * peak_small, (peak_small, peak_large)
