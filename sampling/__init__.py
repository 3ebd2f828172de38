"""Random sampling for oversight: keyed, deterministic per episode, with floors.

Pure and light: no torch, no Kafka, no database. Imports nothing from
``monitor`` or ``detectors``.
"""

from sampling.estimator import Estimate, RunningSums, WeightedSums, bounded_hajek, bounded_interval, horvitz_thompson
from sampling.hashing import keyed_uniform, keyed_uniforms
from sampling.policy import (
    CHANNELS,
    ChannelPolicy,
    Decision,
    Sampler,
    SamplingPolicy,
    StreamSamplingState,
    rewind_clock,
)

__all__ = [
    "CHANNELS",
    "ChannelPolicy",
    "Decision",
    "Estimate",
    "RunningSums",
    "Sampler",
    "SamplingPolicy",
    "StreamSamplingState",
    "WeightedSums",
    "bounded_hajek",
    "bounded_interval",
    "horvitz_thompson",
    "keyed_uniform",
    "keyed_uniforms",
    "rewind_clock",
]
