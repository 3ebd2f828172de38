"""One encoder pass per episode: drift embeddings taken from the reward model's pass.

An episode sampled for both drift and reward-model scoring would otherwise be encoded twice, by
the drift embedder and by the reward model, over the same weights. The built-in reward model
mean-pools the base encoder's last layer over the pair ``[CLS] prompt [SEP] response [SEP]``
(``monitor.inference.pairs``), and that, L2-normalised, *is* the drift embedding when

* the drift embedding encodes the pair too (``drift.embedding.encoding: pair``, the default), with
  the same ``max_length`` and ``max_prompt_tokens``;
* the reward model's encoder has the drift encoder's weights (the SHA-256 of the weights file)
  and trained none of its layers (``finetune_layers: 0``, the default), so its last layer is
  the base encoder's;
* the reward model pools the last layer (``pool_layers`` holds -1, the default).

:class:`DriftPass` is what a drift embedding is; ``RewardModel.drift_slot`` says whether a
version's pass computes it. The scoring worker then hands each vector it computed to a
:class:`SharedVectors`, and the embedding worker takes it from there instead of encoding the
episode again. A drift sample whose episode still waits for its score waits for that pass, at
most ``inference.share_wait_s`` (``monitor.store.inference``); after that, or when the vector is
not held (evicted, or computed by a process that restarted since), the embedding worker encodes
it itself: the same function, so the detectors see one distribution either way (up to the
backends' numerics: the reward model scores in fp32 by default and the drift encoder runs int8,
within the int8 gate's cosine 0.99 of each other).

>>> import numpy as np
>>> held = SharedVectors(DriftPass("0" * 64, 128, 32), capacity=2)
>>> held.active = True
>>> held.put([("e1", np.ones(2)), ("e2", np.zeros(2)), ("e3", np.ones(2))])  # e1 is evicted
>>> sorted(held.take(["e1", "e2", "e3"])), held.take(["e2"])
(['e2', 'e3'], {})
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class DriftPass:
    """What a drift embedding is: the encoder's weights and the pair encoding's token limits."""

    weights_sha256: str
    max_length: int
    max_prompt_tokens: int


class SharedVectors:
    """Drift embeddings computed by the reward model's encoder pass, held for the embedding worker
    (thread-safe; at most ``capacity``, the oldest dropped first: a dropped one is encoded again).

    ``active`` is set by whoever loads the reward-model version (its pass computes ``spec``); the
    embedding worker waits for the scoring pass only while it is."""

    def __init__(self, spec: DriftPass, capacity: int = 8192):
        self.spec = spec
        self.capacity = capacity
        self.active = False
        self._lock = threading.Lock()
        self._held: OrderedDict[str, Any] = OrderedDict()

    def put(self, vectors: Iterable[tuple[str, Any]]) -> None:
        with self._lock:
            for episode_id, vector in vectors:
                self._held[episode_id] = vector
                self._held.move_to_end(episode_id)
            while len(self._held) > self.capacity:
                self._held.popitem(last=False)

    def take(self, episode_ids: Sequence[str]) -> dict[str, Any]:
        """The held vectors of ``episode_ids`` (each handed out once)."""
        with self._lock:
            return {i: v for i in episode_ids if (v := self._held.pop(i, None)) is not None}

    def __len__(self) -> int:
        return len(self._held)


class DriftSample(Protocol):
    """What :func:`embed_sharing` reads of a drift sample (``monitor.store.inference.ToEmbed``)."""

    @property
    def episode_id(self) -> str: ...

    @property
    def prompt(self) -> str: ...

    @property
    def response(self) -> str: ...


def embed_sharing(
    held: SharedVectors | None, items: Sequence[DriftSample], embed: Callable[[list[str], list[str]], Any]
) -> tuple[list[Any], int]:
    """The drift embeddings of a batch: those ``held`` has, and ``embed(prompts, responses)`` of
    the others (one pass for them all). Returns the vectors in order, and how many were held.

    >>> import numpy as np
    >>> from types import SimpleNamespace as Sample
    >>> held = SharedVectors(DriftPass("0" * 64, 128, 32))
    >>> held.put([("e2", np.full(2, 7.0))])
    >>> def embed(prompts, responses):
    ...     return np.zeros((len(prompts), 2))
    >>> items = [Sample(episode_id=f"e{i}", prompt="p", response="r") for i in (1, 2)]
    >>> vectors, shared = embed_sharing(held, items, embed)
    >>> [v.tolist() for v in vectors], shared
    ([[0.0, 0.0], [7.0, 7.0]], 1)
    """
    got = held.take([w.episode_id for w in items]) if held is not None else {}
    todo = [w for w in items if w.episode_id not in got]
    out = [got.get(w.episode_id) for w in items]
    if todo:
        own = iter(embed([w.prompt for w in todo], [w.response for w in todo]))
        out = [next(own) if v is None else v for v in out]
    return out, len(got)
