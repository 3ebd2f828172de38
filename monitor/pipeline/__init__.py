"""Stage 3, sample and commit: the hot loop that validates, samples and hands each valid episode to
the stages that watch it (drift, scoring), and the one transaction per batch that commits their
effects. The stages are built by the composition root (``monitor.service``) and meet the pipeline
through :class:`EpisodeObserver`."""

from monitor.pipeline.core import (
    SAMPLING_COMPONENT,
    AfterCommit,
    LoopHooks,
    Pipeline,
    make_sampler,
)
from monitor.pipeline.stages import EpisodeObserver
from monitor.pipeline.stats import RunStats, StreamStats
from monitor.retry import Aborted, NoProgress

__all__ = [
    "SAMPLING_COMPONENT",
    "Aborted",
    "AfterCommit",
    "EpisodeObserver",
    "LoopHooks",
    "NoProgress",
    "Pipeline",
    "RunStats",
    "StreamStats",
    "make_sampler",
]
