"""The gate for a version registered by hand (any kind): the same held-out human-label pairs, the
same rule and the same verdict record as an in-process update (``monitor.reward.update.decide``).

A remote judge cannot be trained here; when its owner registers a new endpoint, model or rubric
(a new version), this decides whether it replaces the active one. A backend that fails on any
held-out item makes the gate fail (``BackendError``): agreement over the items a judge happened
to answer would be biased, so the version stays a candidate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monitor.config import Settings
from monitor.metrics import Metrics
from monitor.reward.kinds.base import PairScorer
from monitor.reward.kinds.version import load_backend
from monitor.reward.registry import Registry
from monitor.store import Store


class _Candidate(PairScorer):
    """A registered version as ``decide`` sees a candidate: it scores, and saving it again is a no-op
    (``Registry.register`` is idempotent by version id and keeps the existing folder)."""

    def __init__(self, backend: Any, path: Path):
        super().__init__(backend)
        self._path = path
        self.parent: str | None = None

    def save(self, path: str | Path) -> Path:
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        for f in self._path.iterdir():
            if f.is_file():
                (root / f.name).write_bytes(f.read_bytes())
        return root


def gate_version(
    settings: Settings,
    store: Store,
    version: str,
    *,
    stream: str,
    since: float,
    metrics: Metrics | None = None,
) -> dict[str, Any]:
    """Gate the registered ``version`` against the active one on fresh labels of ``stream`` since
    ``since`` (event time); promote or reject it. Raises UpdateError without enough labels."""
    from monitor.reward.update import UpdateError, build_pairs, decide, rated_records

    ucfg = settings.reward.update
    registry = Registry.for_settings(store, settings)
    split = build_pairs(
        rated_records(store),
        stream,
        since,
        ucfg.rating_gap,
        ucfg.holdout_fraction,
        across_prompts=ucfg.pairing == "absolute",
        partners=ucfg.partners,
    )
    if not split["holdout_new"]:
        raise UpdateError(
            f"no held-out rated pairs from {stream} since {since}: { ({k: len(v) for k, v in split.items()}) }"
        )
    device = settings.reward.device
    candidate = _Candidate(load_backend(registry.path_of(version), device=device), registry.path_of(version))
    active_row = registry.active()
    active = None
    if active_row is not None and active_row[0] != version:
        active = PairScorer(load_backend(active_row[1], device=device))
    try:
        return decide(
            settings,
            registry,
            candidate,
            active,
            split,
            data_window={"stream": stream, "since": since, "gated_by": "rm register --gate"},
            train_metrics={},
            metrics=metrics,
        )
    finally:
        candidate.backend.close()
        if active is not None:
            active.backend.close()
