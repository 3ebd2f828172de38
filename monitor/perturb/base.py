"""The perturbation contract: a :class:`Perturbation` turns one real (prompt, response) into a
:class:`Perturbed` item that is worse (or better) in one named, checkable way.

Deterministic per item and seed: every random choice is a keyed hash (BLAKE2b, via
``sampling.keyed_uniform``) of the kind, the caller's ``seed_key`` and the name of the choice,
never Python's global ``random``. The same (prompt, response, seed_key) always gives the same
item, in any process, in any order of calls.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar, runtime_checkable

from monitor.perturb import phrases
from sampling import keyed_uniform

Direction = Literal["worse", "better"]
DIRECTIONS: tuple[Direction, ...] = ("worse", "better")

#: Responses longer than this are not perturbed (every kind returns None): it bounds the cost of
#: one call (all kinds are linear in the text's length) whatever a model emits. Real answers are
#: far shorter (the bundled AlpacaEval answers: at most 4,378 characters).
MAX_CHARS = 20_000
#: Only the first characters of a prompt are read (topic words, harmful-request keywords).
MAX_PROMPT_CHARS = 4_000

# The draws must be reproducible, not secret: which episodes become canaries is decided elsewhere
# (with the secret sampling key); how a chosen episode is perturbed may be public.
DRAW_KEY = b"oversight-monitor/perturb/v1"

T = TypeVar("T")
C = TypeVar("C")


def make_seed_key(episode_id: str, seed: int | str = 0) -> str:
    """The ``seed_key`` of an episode under a seed: one episode gets independent perturbations
    under different seeds and the same one under the same seed."""
    return f"{episode_id}\x1f{seed}"


class Draws:
    """Named uniform draws in [0, 1) for one (kind, seed_key): ``uniform("cut")`` is the same number
    every time, and a different name is an independent draw. Names must be at most 16 bytes (the
    BLAKE2b salt)."""

    def __init__(self, kind: str, seed_key: str) -> None:
        self._id = f"{kind}\x1f{seed_key}"

    def uniform(self, name: str) -> float:
        if len(name.encode()) > 16:
            raise ValueError(f"draw name {name!r} is longer than 16 bytes")
        return keyed_uniform(DRAW_KEY, self._id, name)

    def index(self, name: str, n: int) -> int:
        """A uniform index in ``range(n)`` (``n`` >= 1)."""
        return min(int(self.uniform(name) * n), n - 1)

    def pick(self, name: str, options: Sequence[T]) -> T:
        return options[self.index(name, len(options))]


@dataclass(frozen=True)
class Perturbed:
    """One perturbed item.

    ``original`` is the real response, ``perturbed`` the changed one, ``direction`` whether
    ``perturbed`` is expected to be ``"worse"`` or ``"better"`` than ``original``. ``detail`` says
    what was changed, where (character offsets into ``original``) and the old and new values; it
    is JSON-serialisable. ``seed_key`` is what the item was drawn with (empty when nothing was
    drawn).
    """

    kind: str
    prompt: str
    original: str
    perturbed: str
    direction: Direction
    detail: dict[str, Any] = field(default_factory=dict, hash=False)
    seed_key: str = ""

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {self.direction!r}")

    @property
    def worse(self) -> str:
        """The response expected to be worse of the two."""
        return self.perturbed if self.direction == "worse" else self.original

    @property
    def better(self) -> str:
        """The response expected to be better of the two."""
        return self.original if self.direction == "worse" else self.perturbed

    @property
    def chars_changed(self) -> int:
        """Characters removed plus characters inserted between the common prefix and suffix."""
        return chars_changed(self.original, self.perturbed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "prompt": self.prompt,
            "original": self.original,
            "perturbed": self.perturbed,
            "direction": self.direction,
            "detail": dict(self.detail),
            "seed_key": self.seed_key,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Perturbed:
        """The inverse of :meth:`to_dict`; refuses unknown keys and wrong types (ValueError)."""
        known = {"kind", "prompt", "original", "perturbed", "direction", "detail", "seed_key"}
        extra = set(obj) - known
        if extra:
            raise ValueError(f"unknown keys in a perturbed item: {sorted(extra)}")
        for k in ("kind", "prompt", "original", "perturbed", "direction"):
            if not isinstance(obj.get(k), str):
                raise ValueError(f"perturbed item: {k!r} must be a string")
        detail = obj.get("detail", {})
        seed_key = obj.get("seed_key", "")
        if not isinstance(detail, dict) or not isinstance(seed_key, str):
            raise ValueError("perturbed item: 'detail' must be an object and 'seed_key' a string")
        return cls(
            kind=obj["kind"],
            prompt=obj["prompt"],
            original=obj["original"],
            perturbed=obj["perturbed"],
            direction=obj["direction"],
            detail=dict(detail),
            seed_key=seed_key,
        )


def common_affixes(a: str, b: str) -> tuple[int, int]:
    """Lengths of the longest common prefix and (not overlapping it) common suffix of two texts:
    ``a[p : len(a) - s]`` became ``b[p : len(b) - s]``."""
    n = min(len(a), len(b))
    p = 0
    while p < n and a[p] == b[p]:
        p += 1
    s = 0
    while s < n - p and a[len(a) - 1 - s] == b[len(b) - 1 - s]:
        s += 1
    return p, s


def chars_changed(a: str, b: str) -> int:
    """Size of the edit between ``a`` and ``b``: what differs between the common prefix and
    suffix, counted on both sides (linear; an upper bound of the edit distance, so a renumbered
    list counts everything from the dropped item to the last renumbered number)."""
    p, s = common_affixes(a, b)
    return (len(a) - p - s) + (len(b) - p - s)


@runtime_checkable
class Perturbation(Protocol):
    """A named, rule-based way to make a response worse.

    * ``kind``: the registry name; ``description``: what changes, in one sentence.
    * ``applies(prompt, response)``: cheap (linear in the text, no model); True exactly when
      ``apply`` returns an item for that input (under any seed).
    * ``apply(prompt, response, seed_key)``: the item, or None when the kind does not apply. Never
      raises on any strings; deterministic in its three arguments.
    """

    kind: str
    description: str

    def applies(self, prompt: str, response: str) -> bool: ...

    def apply(self, prompt: str, response: str, seed_key: str) -> Perturbed | None: ...


class RuleBased(abc.ABC, Generic[C]):
    """Shared skeleton: find the candidate edits (``candidates``), draw one and make it
    (``rewrite``). ``applies`` is "there is a candidate", which keeps it exact: ``rewrite`` must
    succeed on any non-empty candidate list."""

    kind: str = ""
    description: str = ""

    def __init__(self, bank: phrases.Bank = phrases.PROBE_BANK) -> None:
        # The kinds that insert a bundled sentence draw it from ``bank``; the others ignore it.
        self.bank = bank

    @abc.abstractmethod
    def candidates(self, prompt: str, response: str) -> Sequence[C]:
        """Every edit this perturbation could make to ``response`` (empty: it does not apply)."""

    @abc.abstractmethod
    def rewrite(self, prompt: str, response: str, cands: Sequence[C], draws: Draws) -> tuple[str, dict[str, Any]]:
        """The perturbed response and what was changed, from one of ``cands`` drawn with ``draws``."""

    def _usable(self, prompt: str, response: str) -> Sequence[C]:
        if len(response) > MAX_CHARS:
            return ()
        return self.candidates(prompt[:MAX_PROMPT_CHARS], response)

    def applies(self, prompt: str, response: str) -> bool:
        return bool(self._usable(prompt, response))

    def apply(self, prompt: str, response: str, seed_key: str) -> Perturbed | None:
        cands = self._usable(prompt, response)
        if not cands:
            return None
        text, detail = self.rewrite(prompt[:MAX_PROMPT_CHARS], response, cands, Draws(self.kind, seed_key))
        return Perturbed(
            kind=self.kind,
            prompt=prompt,
            original=response,
            perturbed=text,
            direction="worse",
            detail=detail,
            seed_key=seed_key,
        )

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}()" if self.bank is phrases.PROBE_BANK else f"{name}({self.bank.name!r})"
