"""The registry of perturbation kinds and the deterministic choice of one for an episode."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monitor.perturb.base import Draws, Perturbation, Perturbed, RuleBased
from monitor.perturb.kinds import KINDS
from monitor.perturb.phrases import PROBE_BANK, Bank

_REGISTRY: dict[str, type[RuleBased[Any]]] = {cls.kind: cls for cls in KINDS}

#: Every kind :func:`make` knows, in a fixed order (the order :func:`choose` draws from).
NAMES: tuple[str, ...] = tuple(_REGISTRY)


def make(kind: str, bank: Bank = PROBE_BANK) -> Perturbation:
    """The perturbation registered as ``kind`` (ValueError for an unknown name), inserting
    sentences from ``bank`` (``phrases.TRAINING_BANK`` for training data, never for probes)."""
    try:
        cls = _REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown perturbation {kind!r}; known: {', '.join(NAMES)}") from None
    return cls(bank)


def all_perturbations() -> list[Perturbation]:
    """One instance of every registered kind, in :data:`NAMES` order."""
    return [make(k) for k in NAMES]


def applicable(prompt: str, response: str, kinds: Sequence[str] | None = None) -> list[str]:
    """The kinds (of ``kinds``, default all, in registry order) that apply to this episode."""
    wanted = _validated(kinds)
    return [k for k in NAMES if k in wanted and make(k).applies(prompt, response)]


def choose(prompt: str, response: str, seed_key: str, kinds: Sequence[str] | None = None) -> Perturbed | None:
    """Perturb the episode with one applicable kind drawn by ``seed_key``, or None if none applies.

    The kind is uniform over the applicable ones (so the mix of kinds follows what the traffic
    allows: every answer can be made rude, few contain code); the draw is a keyed hash of
    ``seed_key``, so the same episode and seed always get the same kind and the same edit.
    """
    options = applicable(prompt, response, kinds)
    if not options:
        return None
    kind = Draws("choose", seed_key).pick("kind", options)
    return make(kind).apply(prompt, response, seed_key)


def _validated(kinds: Sequence[str] | None) -> set[str]:
    if kinds is None:
        return set(NAMES)
    if isinstance(kinds, str):
        raise TypeError("kinds must be a sequence of kind names, not one string")
    unknown = [k for k in kinds if k not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown perturbation kinds {unknown}; known: {', '.join(NAMES)}")
    return set(kinds)
