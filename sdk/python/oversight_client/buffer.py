"""The bounded buffer between ``log()`` (the application's threads) and the sender thread."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

OnFull = Literal["drop_oldest", "block", "raise"]
ON_FULL: tuple[OnFull, ...] = ("drop_oldest", "block", "raise")


class BufferFull(Exception):
    """``log()`` found the buffer full (``on_full="raise"``, or ``"block"`` past its timeout)."""


class ClientClosed(RuntimeError):
    """``log()`` after ``close()``."""


@dataclass(frozen=True, slots=True)
class Item:
    """One serialized episode: its id (for results), its stream (the Kafka key) and its JSON line."""

    episode_id: str
    stream: str
    payload: bytes


class Buffer:
    """At most ``max_items`` episodes waiting, plus those the sender has taken (one batch)."""

    def __init__(self, max_items: int, on_full: OnFull):
        if max_items < 1:
            raise ValueError("max_buffer must be at least 1")
        if on_full not in ON_FULL:
            raise ValueError(f"on_full must be one of {', '.join(ON_FULL)}, not {on_full!r}")
        self._max = max_items
        self._on_full = on_full
        self._items: deque[Item] = deque()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._flush_waiters = 0
        self._closed = False

    def put(self, item: Item, block_timeout_s: float | None) -> Item | None:
        """Enqueue ``item``; returns the episode dropped to make room, if any."""
        with self._cond:
            if self._closed:
                raise ClientClosed("the client is closed")
            dropped = None
            if len(self._items) >= self._max:
                if self._on_full == "raise":
                    raise BufferFull(f"{len(self._items)} episodes are waiting (max_buffer={self._max})")
                if self._on_full == "drop_oldest":
                    dropped = self._items.popleft()
                else:
                    self._wait_for_room(block_timeout_s)
            self._items.append(item)
            self._cond.notify_all()
            return dropped

    def _wait_for_room(self, timeout_s: float | None) -> None:
        ok = self._cond.wait_for(lambda: self._closed or len(self._items) < self._max, timeout_s)
        if self._closed:
            raise ClientClosed("the client is closed")
        if not ok:
            raise BufferFull(f"no room in the buffer within {timeout_s} s (max_buffer={self._max})")

    def take(self, max_n: int, wait_s: float) -> list[Item]:
        """Up to ``max_n`` episodes: at once when that many wait, when a flush or close asks,
        otherwise after ``wait_s`` (the flush interval) with whatever is there."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while len(self._items) < max_n and not self._flush_waiters and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(max_n, len(self._items))
            batch = [self._items.popleft() for _ in range(n)]
            self._in_flight += n
            self._cond.notify_all()  # room for blocked producers
            return batch

    def done(self, n: int) -> None:
        """The sender finished ``n`` taken episodes (whatever their outcome)."""
        with self._cond:
            self._in_flight -= n
            self._cond.notify_all()

    def wait_empty(self, timeout_s: float | None) -> bool:
        """Wait until nothing waits or is in flight; True if so within the timeout."""
        with self._cond:
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: not self._items and not self._in_flight, timeout_s)
            finally:
                self._flush_waiters -= 1

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def drain(self) -> list[Item]:
        """Remove and return everything still waiting (the sender gave up on them)."""
        with self._cond:
            out = list(self._items)
            self._items.clear()
            self._in_flight += len(out)
            self._cond.notify_all()
            return out

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
