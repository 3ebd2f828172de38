"""Per-episode signals that drift detection watches (text statistics now; embeddings,
reward-model scores and human/model disagreement plug in as further signals)."""

from monitor.signals.textstats import FED_SIGNALS, TEXT_SIGNALS, SignalSpec, text_stats

__all__ = ["FED_SIGNALS", "TEXT_SIGNALS", "SignalSpec", "text_stats"]
