"""Stage 5, detect: per-stream detectors over the signals of every episode (``monitor.signals``) and
the values later stages feed back (reward-model scores, reviewer/reward-model disagreement),
drift events, and re-referencing."""

from monitor.drift.disagreement import DisagreementFeed
from monitor.drift.monitor import (
    COMPONENT,
    EMBEDDING,
    DriftMonitor,
    detail_text,
    detector_ert,
    request_rereference,
)

__all__ = [
    "COMPONENT",
    "EMBEDDING",
    "DisagreementFeed",
    "DriftMonitor",
    "detail_text",
    "detector_ert",
    "request_rereference",
]
