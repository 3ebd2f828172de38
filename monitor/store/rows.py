"""The rows a batch writes, typed: what the pipeline and its stages hand to ``Store.commit_batch``.

Each row carries every column the insert names, and the same keys in every row of a list: a batch
is written with one ``executemany`` whose statement is compiled from the first row's keys, so a key
that only some rows have would be refused (or silently dropped) for the others. Columns that the
database fills in (``samples.status``, ``review_tasks.fence``, the ids, ``published_at``) are not
part of them.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict


class EpisodeRow(TypedDict):
    """A sampled episode (``episodes``); idempotent by ``episode_id``."""

    episode_id: str
    stream: str
    model: str | None
    ts: float
    prompt: str
    response: str
    metadata: dict[str, Any] | None
    source: str
    position: str
    ingested_at: float
    # Schema v2's conversation, None for v1. The pipeline always sets it; rows built elsewhere
    # (fixtures, benchmarks) may leave it out, and a batch holds rows of one kind only.
    messages: NotRequired[list[dict[str, Any]] | None]


class SampleRow(TypedDict):
    """One channel that sampled an episode (``samples``), with its inclusion probability."""

    episode_id: str
    channel: str
    stream: str
    ts: float
    inclusion_probability: float
    created_at: float


class ReviewTaskRow(TypedDict):
    """One reviewer slot of a human-sampled episode (``review_tasks``)."""

    episode_id: str
    slot: int
    stream: str
    status: str
    created_at: float


class DriftEventRow(TypedDict):
    """A detector that fired (``drift_events``); unique per stream, signal and episode."""

    stream: str
    signal: str
    detector: str
    statistic: float | None
    threshold: float | None
    p_val: float | None
    episode_id: str
    input_index: int
    event_ts: float
    created_at: float
    #: What the detector measured (``windowed``: shift in reference SDs with its 95% interval,
    #: window, n, bucket; count detectors: statistic, threshold, ERT); NULL before migration 0009.
    detail: NotRequired[dict[str, Any] | None]


class DriftEvent(DriftEventRow):
    """A stored drift event: the row with the columns the database assigns."""

    id: int
    published_at: float | None


class RmScoreRow(TypedDict):
    """A reward-model score of an episode by one version (``rm_scores``)."""

    episode_id: str
    version: str
    stream: str
    score: float
    ts: float
    created_at: float
