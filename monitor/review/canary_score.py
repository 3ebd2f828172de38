"""The active reward model's score of a perturbed canary, for the ``rm_score`` assistant.

In an assistance condition that shows ``rm_score``, every real single-response item carries the
active version's stored score: human review samples a subset of what the reward model scores
(``sampling.policy``: one keyed draw, the model's rate never below the human one). A perturbed
canary's text was never stored, so it had no score and the hint stayed silent on it: in one run
28 of 28 perturbed canaries showed no hint against 0 of 126 real items. A reviewer in that
condition could tell the perturbed canaries with certainty, and the experiment measured their
detection under the assistant as if they had found the flaw. So a perturbed canary is scored when
it is made, by the version the real items' hints read, and the score kept with the canary
(``canaries.detail["shown_score"]``); :class:`monitor.assist.builtin.RmScore` shows it like a
stored one. An original presentation shows its source's own text, whose stored score it reads;
a pair shows no score at all.

When the score cannot be had (the version will not load, a remote judge is down, the score is not
a finite number) no canary is made on that claim and the reviewer gets the real item: a canary
without its hint would be the tell again. The failure is logged and counted as an error of the
``rm_score`` assistant. Scoring takes one forward pass of the built-in model per such canary
(a few tens of milliseconds on a CPU), once: what is stored is shown on every view, and the
model is loaded on the first canary that needs it, not at start.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor.config import RewardConfig

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from monitor.reward.kinds import ScoringBackend

log = logging.getLogger(__name__)

#: The canary detail key of the shown text's score: ``{"version": str, "score": float}``.
SHOWN_SCORE = "shown_score"


class ScoreUnavailable(RuntimeError):
    """The canary's text needs a score and none could be had: make no canary on this claim."""


def with_final_turn(messages: Sequence[Any] | None, text: str) -> list[Any] | None:
    """Stored schema-v2 ``messages`` with the final assistant turn's content replaced by ``text``
    (the turn a canary perturbs: the review page's final turn is the last assistant message).

    >>> with_final_turn([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "no")
    [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'no'}]
    >>> with_final_turn(None, "no") is None
    True
    """
    if not messages:
        return None
    out = list(messages)
    last = max((i for i, m in enumerate(out) if isinstance(m, dict) and m.get("role") == "assistant"), default=None)
    if last is not None:
        out[last] = {**out[last], "content": text}
    return out


def shown_score_of(detail: Any) -> dict[str, float]:
    """``{version: score}`` of what a canary shows, from its stored detail (empty when none).

    >>> shown_score_of({"shown_score": {"version": "rm-1", "score": 0.25}})
    {'rm-1': 0.25}
    >>> shown_score_of({"offset": 3}), shown_score_of(None)
    ({}, {})
    """
    got = detail.get(SHOWN_SCORE) if isinstance(detail, Mapping) else None
    if not isinstance(got, Mapping):
        return {}
    version, score = got.get("version"), got.get("score")
    if not isinstance(version, str) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return {}
    return {version: float(score)}


Loader = Callable[[Path], "ScoringBackend"]


class CanaryScorer:
    """Scores a canary's shown text with the active version of ``reward.stream_set``.

    ``active()`` is the registry's ``(version, path, generation)`` or None; ``load(path)`` the
    version's scoring backend. The backend is loaded on first use and again when the active
    generation moves; one score at a time (a page view never waits on it: only the claim that
    makes the canary does)."""

    def __init__(self, active: Callable[[], tuple[str, Path, int] | None], load: Loader):
        self._active = active
        self._load = load
        self._lock = threading.Lock()
        self._generation: int | None = None
        self._backend: ScoringBackend | None = None

    @classmethod
    def of(cls, store: Any, cfg: RewardConfig, registry: CollectorRegistry | None) -> CanaryScorer:
        """The scorer of the review service: the store's registry, ``reward``'s backend settings,
        one thread (the review process serves pages; the pipeline's workers own the cores)."""
        from monitor.reward.registry import Registry
        from monitor.reward.scorer import load_version

        reg = Registry(store, cfg.models_dir, cfg.stream_set)
        return cls(reg.active, lambda path: load_version(cfg, path, registry, threads=1))

    def active_version(self) -> str | None:
        """The version a real item's hint reads now (None: no hint is shown at all)."""
        a = self._active()
        return None if a is None else a[0]

    def score(self, prompt: str, response: str, messages: Sequence[Any] | None) -> dict[str, Any]:
        """``{"version", "score"}`` of the text; raises :class:`ScoreUnavailable`."""
        from monitor.reward.kinds import Item

        with self._lock:
            backend, version = self._current()
            try:
                got = backend.score([Item(prompt, response, messages)])
            except Exception as e:
                raise ScoreUnavailable(f"version {version} failed to score: {type(e).__name__}: {e}") from e
        s = got[0] if got else None
        if s is None or not s.ok or s.value is None:
            raise ScoreUnavailable(f"version {version} gave no score ({None if s is None else s.error})")
        return {"version": version, "score": float(s.value)}

    def _current(self) -> tuple[ScoringBackend, str]:
        a = self._active()
        if a is None:
            raise ScoreUnavailable("no version is active")
        version, path, generation = a
        if self._backend is None or generation != self._generation:
            self.close()
            try:
                self._backend = self._load(path)
            except Exception as e:
                raise ScoreUnavailable(f"version {version} cannot be loaded: {type(e).__name__}: {e}") from e
            self._generation = generation
        return self._backend, version

    def close(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            try:
                backend.close()
            except Exception:  # closing a remote client: nothing left to do about it
                log.debug("closing the canary scorer's backend failed", exc_info=True)
