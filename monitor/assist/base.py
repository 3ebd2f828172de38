"""The assistance contract: an assistant looks at one episode a reviewer is about to label and
returns hints (a score, flags, text spans with a note, or a note).

Assistance experiments hold the reviewers and the model constant and vary the help: which
assistants' hints a reviewer sees is the experiment's condition (``monitor.assist.experiment``).
An assistant is read-only: it never writes to the store and never changes what is sampled.

Why the episode is an :class:`EpisodeView` and not a store row: a reviewer sees only what the
stream's blinding allows, and a hint must not leak more (no policy version, no hidden metadata,
nothing from another stream). Hint texts are untrusted like the episode they come from (a span
quotes model output): the page escapes them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from monitor.config import Settings
    from monitor.store import Store

HintKind = Literal["score", "flag", "span", "note"]
HintField = Literal["prompt", "response", "alternative"]
MAX_HINTS = 20  # per assistant and episode: hints are read by a person in a few seconds
MAX_HINT_CHARS = 500


class Hint(BaseModel):
    """One piece of help shown next to the item.

    ``score``: a number with its meaning in ``text`` (e.g. "reward model 0.71, 83rd percentile");
    ``flag``: a short warning; ``span``: characters ``start:end`` of ``field`` with a note in
    ``text``; ``note``: free text (e.g. a similar labelled episode).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    assistant: str = Field(max_length=64)
    kind: HintKind
    text: str = Field(max_length=MAX_HINT_CHARS)
    score: float | None = None
    percentile: float | None = Field(None, ge=0, le=100)
    field: HintField | None = None
    start: int | None = Field(None, ge=0)
    end: int | None = Field(None, ge=0)


@dataclass(frozen=True)
class EpisodeView:
    """The episode as the reviewer sees it (already blinded for the stream)."""

    episode_id: str
    stream: str
    prompt: str
    response: str
    alternative: str | None = None
    timestamp: float | None = None
    #: Reward-model scores of the shown response by version, where it is not the stored one (a
    #: perturbed canary, scored when it was made: ``monitor.review.canary_score``).
    shown_scores: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AssistContext:
    """What an assistant may read: the store (read-only), the settings, and the clock."""

    store: Store
    settings: Settings
    now: float


class Assistant(Protocol):
    """``hints(episode, ctx)`` returns at most :data:`MAX_HINTS` hints; it never raises for an
    ordinary episode (no score yet, no labelled neighbour: no hint), and it is cheap enough to
    run when a reviewer opens an item (a few database reads, no model forward pass)."""

    name: ClassVar[str]

    def hints(self, episode: EpisodeView, ctx: AssistContext) -> list[Hint]: ...


AssistantFactory = Callable[[dict[str, Any]], Assistant]
_REGISTRY: dict[str, AssistantFactory] = {}


def register(name: str, factory: AssistantFactory) -> None:
    """Make an assistant available to experiment conditions under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"assistant {name!r} is already registered")
    _REGISTRY[name] = factory


def registered() -> list[str]:
    return sorted(_REGISTRY)


def make(name: str, params: dict[str, Any] | None = None) -> Assistant:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown assistant {name!r}; known: {', '.join(registered()) or 'none'}") from None
    return factory(dict(params or {}))
