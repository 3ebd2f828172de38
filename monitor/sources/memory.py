"""An in-memory source: a test double for sources (never for the systems we integrate with)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext

from monitor.sources.base import Rebalance, Record


class MemorySource:
    def __init__(self, values: Iterable[bytes], name: str = "memory"):
        self.name = name
        self._values = list(values)
        self._pos = 0
        self._committed = 0
        self._rebalance: Rebalance | None = None

    def open(self, rebalance: Rebalance) -> None:
        self._rebalance = rebalance
        stored = rebalance.assigned([0])
        self._pos = self._committed = int(stored.get(0, 0))

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        now = time.time()
        end = min(len(self._values), self._pos + max_records)
        out = [Record(self._values[i], 0, i, i + 1, now) for i in range(self._pos, end)]
        self._pos = end
        return out

    @property
    def exhausted(self) -> bool:
        return self._pos >= len(self._values)

    def commit(self, offsets: Mapping[int, int]) -> None:
        self._committed = offsets.get(0, self._committed)

    def guard(self, records: list[Record]) -> AbstractContextManager[bool]:
        return nullcontext(True)

    def rewind(self) -> None:
        assert self._rebalance is not None
        self._pos = int(self._rebalance.assigned([0]).get(0, 0))

    def lag(self) -> dict[int, int]:
        return {0: len(self._values) - self._pos}

    def failures(self) -> Mapping[str, int]:
        return {}  # a list in memory cannot fail

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        pass
