"""The model channels' rates follow what the inference workers can serve.

Embeddings (``drift`` channel) and reward-model scores (``rm``) are computed off the ingest path,
from a backlog in the store. When a worker falls behind (its oldest waiting sample has waited more
than ``inference.max_lag_s``) the channel's rate is halved, every ``inference.adapt_every_s``,
until the lag comes down; when the lag is below a quarter of the limit the factor doubles back
towards 1. The sampler applies the factor under its floors (a channel never goes below its floor)
and records the probability in effect on every sample, so the Horvitz-Thompson estimates stay
unbiased while the sample shrinks. A backlog that the floors alone exceed keeps growing: the lag
metric and its alert say so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from monitor.config import InferenceConfig
from monitor.episodes import Episode
from monitor.metrics import Metrics
from monitor.retry import first_line
from monitor.store import BatchWrite
from monitor.store.inference import Backlog
from sampling import Decision, Sampler

log = logging.getLogger(__name__)

MIN_FACTOR = 1.0 / 1024  # far below any floor's share: the floors bind long before this


class ModelChannelThrottle:
    """An :class:`monitor.pipeline.EpisodeObserver` that sees no episode: between batches it
    reads the workers' backlogs and sets the sampler's throttle of each model channel.

    ``backlogs`` maps a channel to (stage name, a reader of its backlog); ``capacities`` a stage to
    its worker's items per second of computing time (``None`` before its first result).

    >>> from monitor.config import InferenceConfig
    >>> from sampling import ChannelPolicy, Sampler, SamplingPolicy
    >>> rates = {"human": ChannelPolicy(0.01), "rm": ChannelPolicy(0.2), "drift": ChannelPolicy(0.1)}
    >>> sampler = Sampler(SamplingPolicy(rates), key=b"an example key, never this one")
    >>> lag = [500.0]
    >>> throttle = ModelChannelThrottle(sampler, Metrics(), InferenceConfig(max_lag_s=60),
    ...                                 {"drift": ("embedding", lambda: Backlog(900, lag[0]))})
    >>> throttle.step(now=0.0), sampler.rates("chat")["drift"]
    (True, 0.05)
    >>> lag[0] = 5.0
    >>> throttle.step(now=10.0), sampler.rates("chat")["drift"]
    (True, 0.1)
    """

    def __init__(
        self,
        sampler: Sampler,
        metrics: Metrics,
        cfg: InferenceConfig,
        backlogs: Mapping[str, tuple[str, Callable[[], Backlog]]],
        clock: Callable[[], float] = time.monotonic,
        capacities: Mapping[str, Callable[[], float | None]] | None = None,
    ):
        self.sampler = sampler
        self.metrics = metrics
        self.cfg = cfg
        self.backlogs = dict(backlogs)
        self.clock = clock
        self.capacities = dict(capacities or {})
        self._last = -float("inf")

    def step(self, now: float | None = None) -> bool:
        """Read the backlogs and adapt (at most every ``adapt_every_s``); True when it read them."""
        now = self.clock() if now is None else now
        if now - self._last < self.cfg.adapt_every_s:
            return False
        self._last = now
        for channel, (stage, read) in self.backlogs.items():
            try:
                backlog = read()
            except Exception as e:  # the database: readiness reports it; try again next time
                log.debug("reading the %s backlog failed: %s", stage, first_line(e))
                continue
            self.metrics.inference_backlog.labels(stage).set(backlog.waiting)
            self.metrics.inference_lag.labels(stage).set(backlog.oldest_s)
            self._adapt(channel, stage, backlog)
        for stage, capacity in self.capacities.items():
            value = capacity()
            if value is not None:
                self.metrics.inference_capacity.labels(stage).set(value)
        return True

    def _adapt(self, channel: str, stage: str, backlog: Backlog) -> None:
        old = self.sampler.throttle_factor(channel)
        new = old
        if backlog.oldest_s > self.cfg.max_lag_s:
            new = max(MIN_FACTOR, old / 2)
        elif backlog.oldest_s < self.cfg.max_lag_s / 4:
            new = min(1.0, old * 2)
        if new != old:
            self.sampler.throttle(channel, new)
            log.log(
                logging.WARNING if new < old else logging.INFO,
                "%s workers: oldest sample waiting %.0f s (%d waiting): %s rate x%.4g",
                stage,
                backlog.oldest_s,
                backlog.waiting,
                channel,
                new,
            )
        self.metrics.sampling_throttle.labels(channel).set(new)

    # -- observer protocol: no episode, no state -------------------------------------
    def prepare(self, episodes: Sequence[tuple[Episode, int]]) -> None:
        pass

    def observe(self, episode: Episode, decision: Decision, index: int) -> None:
        pass

    def checkpoint(self) -> Mapping[tuple[str, str], dict[str, Any]]:
        return {}

    def add_rows(self, batch: BatchWrite) -> None:
        pass

    def forget(self) -> None:
        pass

    def between_batches(self) -> bool:
        self.step()
        return False

    def outstanding(self) -> bool:
        return False
