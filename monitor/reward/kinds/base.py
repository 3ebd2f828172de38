"""The one scorer contract every reward-model kind implements.

A backend scores items (prompt, response and, for schema-v2 episodes, the conversation) and
returns one :class:`Score` per item, in order. A score that could not be computed carries an
``error`` and no value: the caller leaves that episode unscored (it stays in the backlog) rather
than storing a made-up number. ``truncated`` says the backend saw less than the whole text;
``tokens`` is what the item cost (input plus output tokens for a remote judge). ``embedding``:
the item's drift embedding, when the backend's encoder pass computed it as well
(``monitor.inference.shared``; the built-in kind, once :func:`share_drift_pass` says so).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from monitor.inference.shared import DriftPass

KINDS = ("builtin", "hf", "judge", "http")
REMOTE_KINDS = frozenset({"judge", "http"})


class BackendError(RuntimeError):
    """A backend cannot score at all (bad configuration, unreachable checkpoint)."""


@dataclass(frozen=True)
class Item:
    prompt: str
    response: str
    messages: Sequence[Mapping[str, Any]] | None = None


@dataclass(frozen=True)
class Score:
    value: float | None
    truncated: bool = False
    tokens: int = 0
    error: str | None = None
    embedding: Any = None
    # A failure's: whether it may be the item's own (a refusal of it, an answer that cannot be
    # parsed), or only the scorer's (a timeout, a 429 or 5xx, an open circuit), which says nothing
    # about the item and never counts toward giving up on it (``reward.async.give_up_after``).
    own_fault: bool = True

    @property
    def ok(self) -> bool:
        return self.error is None and self.value is not None and math.isfinite(self.value)

    @classmethod
    def failed(cls, error: str, *, own_fault: bool = True) -> Score:
        return cls(None, error=error, own_fault=own_fault)


class ScoringBackend(Protocol):
    """What the scorer, the gate and the benchmarks call; ``remote`` backends are scored off the
    pipeline's thread (they may be slow or down)."""

    kind: str
    remote: bool

    @property
    def version(self) -> str | None: ...

    def score(self, items: Sequence[Item]) -> list[Score]: ...

    def close(self) -> None: ...


class BuiltinBackend:
    """The in-process reward model (``monitor.reward.model.RewardModel``) under the contract.
    It sees the whole text through its length/structure features, so nothing is recorded as
    truncated; its cut is the documented prompt-end/response-start one."""

    kind = "builtin"
    remote = False

    def __init__(self, model: Any, batch_size: int = 32):
        self.model = model
        self.batch_size = batch_size
        self.drift_slot: int | None = None  # set by share_drift_pass

    @property
    def version(self) -> str | None:
        v = self.model.version
        return None if v is None else str(v)

    def score(self, items: Sequence[Item]) -> list[Score]:
        prompts, responses = [i.prompt for i in items], [i.response for i in items]
        values, vectors = self.model.score_and_embed(prompts, responses, self.batch_size, self.drift_slot)
        if vectors is None:
            return [Score(float(v)) for v in values]
        return [Score(float(v), embedding=vec) for v, vec in zip(values, vectors, strict=True)]

    def close(self) -> None:
        return None


def share_drift_pass(backend: ScoringBackend, spec: DriftPass | None) -> bool:
    """Make ``backend`` hand out the drift embedding ``spec`` describes with each score, when its
    encoder pass computes it (only the built-in kind's can); returns whether it does now."""
    if not isinstance(backend, BuiltinBackend):
        return False
    backend.drift_slot = None if spec is None else backend.model.drift_slot(spec)
    return backend.drift_slot is not None


class PairScorer:
    """A backend seen as ``RewardModel.score(prompts, responses, batch_size)``, so that the gate's
    ``train.evaluate`` measures every kind the same way. A single failed item fails the whole
    evaluation: agreement computed on the items a judge happened to answer would be biased."""

    def __init__(self, backend: ScoringBackend):
        self.backend = backend

    @property
    def version(self) -> str | None:
        return self.backend.version

    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32) -> list[float]:
        del batch_size  # each backend batches by its own configuration
        scores = self.backend.score([Item(p, r) for p, r in zip(prompts, responses, strict=True)])
        failed = [s.error for s in scores if not s.ok]
        if failed:
            raise BackendError(f"{len(failed)} of {len(scores)} items could not be scored (first: {failed[0]})")
        return [float(s.value) for s in scores if s.value is not None]
