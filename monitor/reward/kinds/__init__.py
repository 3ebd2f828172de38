"""Reward-model kinds behind one scorer contract: the built-in model, a local Hugging Face
checkpoint, an OpenAI-compatible LLM judge, a generic JSON endpoint (see ``base.py``)."""

from monitor.reward.kinds.base import (
    KINDS,
    REMOTE_KINDS,
    BackendError,
    BuiltinBackend,
    Item,
    PairScorer,
    Score,
    ScoringBackend,
)
from monitor.reward.kinds.version import KIND_FILE, KindVersion, kind_of, load_backend

__all__ = [
    "KINDS",
    "KIND_FILE",
    "REMOTE_KINDS",
    "BackendError",
    "BuiltinBackend",
    "Item",
    "KindVersion",
    "PairScorer",
    "Score",
    "ScoringBackend",
    "kind_of",
    "load_backend",
]
