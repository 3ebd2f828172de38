"""Per-episode signals that drift detection watches (text statistics now; embeddings,
reward-model scores and human/model disagreement plug in as further signals)."""

from monitor.signals.conversation import CONVERSATION_SIGNALS, conversation_stats
from monitor.signals.textstats import FED_SIGNALS, TEXT_SIGNALS, SignalSpec, text_stats, text_stats_many

__all__ = [
    "CONVERSATION_SIGNALS",
    "FED_SIGNALS",
    "TEXT_SIGNALS",
    "SignalSpec",
    "conversation_stats",
    "text_stats",
    "text_stats_many",
]
