"""Batched reward-model scoring of the ``rm`` sampling channel, inside the pipeline.

Episodes sampled for ``human`` review are scored too: the reward model's verdict on what
people review is what the human/reward-model disagreement signal compares
(``monitor/signals/disagreement.py``). The two channels share their uniform draw, so while the
human rate is at most the rm rate every human-sampled episode is rm-sampled anyway; this
matters when a budget or override puts human review above the rm rate. The score metrics and
the ``rm_score`` drift signal take the ``rm`` channel only, so they describe the rm sample and
its inclusion probabilities.

Episodes sampled for ``rm`` are collected as they pass and scored in one forward pass at the
batch boundary (the observers' checkpoint), by the version active at that moment; the scores
are committed in the same transaction as the batch's offsets, so a crash re-scores nothing
twice (one row per episode and version) and loses nothing. A newly promoted version is picked
up at a batch boundary: every episode is scored by exactly one version, without a restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from monitor.config import RewardConfig
from monitor.episodes import Episode
from monitor.metrics import Metrics
from monitor.reward.registry import Registry
from monitor.store import BatchWrite, RmScoreRow
from sampling import Decision

log = logging.getLogger(__name__)

# (stream, signal, value, episode_id, event_ts, input_index): DriftMonitor.observe_value
Feed = Callable[[str, str, float, str, float, int], None]


class RewardScorer:
    """An :class:`monitor.pipeline.EpisodeObserver` that scores the rm channel.

    The pipeline calls :meth:`observe` per episode and :meth:`checkpoint` at each batch boundary,
    then commits :meth:`take_rows` with the batch. Without an active version (as below, so nothing
    loads the encoder) the sampled episodes are counted as unscored and left to
    ``oversight rm score-backlog``; an episode that no review channel sampled is never held.

    >>> from monitor.config import load_settings
    >>> from monitor.episodes import parse_episode
    >>> from monitor.store import Store
    >>> settings = load_settings(None, ["dev=true", "database.url=sqlite://"])
    >>> registry = Registry.for_settings(Store(settings.database.url), settings)
    >>> scorer = RewardScorer(settings.reward, registry, Metrics())
    >>> episode = parse_episode(b'{"episode_id": "e1", "prompt": "2+2?", "response": "4"}', 1 << 20, now=0.0)
    >>> rates = {"rm": 0.1, "human": 0.01}
    >>> scorer.observe(episode, Decision({"rm": 0.1}, rates, u_review=0.05, u_drift=0.5), index=0)
    >>> scorer.observe(episode, Decision({}, rates, u_review=0.5, u_drift=0.5), index=1)
    >>> scorer.checkpoint()
    {}
    >>> scorer.version, scorer.scored, scorer.unscored, scorer.take_rows()
    (None, 0, 1, [])
    """

    def __init__(self, cfg: RewardConfig, registry: Registry, metrics: Metrics, feed: Feed | None = None):
        self.cfg = cfg
        self.registry = registry
        self._metrics = metrics
        self._feed = feed
        self._pending: list[tuple[Episode, int, bool]] = []  # (episode, input index, rm-sampled?)
        self._rows: list[RmScoreRow] = []
        self._model: Any = None
        self._generation = -2  # unknown: check at the first batch
        self._last_check = -1e18
        self._warned = False
        self.scored = 0
        self.unscored = 0

    @property
    def version(self) -> str | None:
        return None if self._model is None else self._model.version

    def observe(self, episode: Episode, decision: Decision, index: int) -> None:
        rm = "rm" in decision.sampled
        if rm or "human" in decision.sampled:
            self._pending.append((episode, index, rm))

    def checkpoint(self) -> Mapping[tuple[str, str], dict[str, Any]]:
        self._maybe_swap()
        if not self._pending:
            return {}
        pending, self._pending = self._pending, []
        if self._model is None:
            # Kept in the samples table (channel rm): `oversight rm score-backlog` scores them later.
            self.unscored += len(pending)
            if not self._warned:
                log.warning("no active reward-model version: rm-sampled episodes stay unscored")
                self._warned = True
            return {}
        scores = self._model.score(
            [ep.prompt for ep, _, _ in pending], [ep.response for ep, _, _ in pending], batch_size=self.cfg.batch_size
        )
        now = time.time()
        version = str(self._model.version)
        for (ep, index, rm), s in zip(pending, scores, strict=True):
            self._rows.append(
                {
                    "episode_id": ep.episode_id,
                    "version": version,
                    "stream": ep.stream,
                    "score": float(s),
                    "ts": ep.timestamp,
                    "created_at": now,
                }
            )
            if not rm:
                continue
            label = self._metrics.stream_label(ep.stream)
            self._metrics.rm_score.labels(label).observe(float(s))
            self._metrics.rm_score_cumulative.labels(label).inc(float(s))
            if self._feed is not None:
                self._feed(ep.stream, "rm_score", float(s), ep.episode_id, ep.timestamp, index)
        self.scored += len(pending)
        return {}

    def take_rows(self) -> list[RmScoreRow]:
        rows, self._rows = self._rows, []
        return rows

    def add_rows(self, batch: BatchWrite) -> None:
        """The scores of this batch (one row per episode and version) commit with it."""
        batch.rm_scores.extend(self.take_rows())

    def between_batches(self) -> bool:
        return False

    def forget(self) -> None:
        self._pending.clear()
        self._rows.clear()

    def _maybe_swap(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_check < self.cfg.swap_poll_s:
            return
        self._last_check = now
        active = self.registry.active()
        gen = -1 if active is None else active[2]
        if gen == self._generation:
            return
        if active is None:
            self._model, self._generation = None, gen
            return
        from monitor.reward.model import RewardModel

        version, path, _ = active
        try:
            model = RewardModel.load(path, device=self.cfg.device)
        except Exception as e:  # keep scoring with the old version rather than stop ingest
            log.error("cannot load reward-model version %s (keeping %s): %s", version, self.version, e)
            return
        old = self.version
        self._model, self._generation = model, gen
        if old is not None:
            self._metrics.rm_active_version.remove(old)
        self._metrics.rm_active_version.labels(version).set(1)
        log.info("reward model: scoring with %s (generation %d, was %s)", version, gen, old)
