"""Fair shares of the ingest API between tokens (tenants), so that one cannot stop the others.

Both of the API's guards were global. A tenant that floods ``POST /v1/episodes`` held every
request slot (``ingest.max_inflight``) and filled the inbox past ``ingest.max_backlog``, and from
then on every other tenant's requests were answered 429 too, for as long as the flood lasted.

* :class:`Slots`: a token that already holds a slot cannot take one of the last ``reserve`` free
  slots (a quarter of them, at least one), so a flood holds at most the others, and another
  token always finds a slot for its first request.
* :class:`RecentShares`: the records each token had accepted in the last 10-20 seconds. Past
  ``max_backlog`` only the tokens that sent at least their fair share of them (1 / the tokens
  active) are refused; the others go on until the backlog is twice ``max_backlog``, where every
  token is refused. One token alone is refused at ``max_backlog``, as before.

State is per server process and per token (tokens are an administrator's list), so it is bounded
whatever the traffic. Replicas of the API each keep their own shares.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

__all__ = ["RecentShares", "Slots"]


class Slots:
    """``size`` request slots; a holder that has one cannot take one of the last ``reserve``.

    >>> slots = Slots(4)  # reserve 1
    >>> [slots.take("flood") for _ in range(4)]
    [True, True, True, False]
    >>> slots.take("quiet")  # the reserve: a first slot for another token
    True
    >>> slots.give("flood"); slots.take("quiet")  # a second one only while more than the reserve is free
    False
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError("size must be positive")
        self.size = size
        self.reserve = max(1, size // 4)
        self._lock = threading.Lock()
        self._busy = 0
        self._held: Counter[str | None] = Counter()

    def take(self, holder: str | None) -> bool:
        """A slot for ``holder`` (None: no token, the reserve does not apply), or False."""
        with self._lock:
            free = self.size - self._busy
            if free <= 0 or (holder is not None and self._held[holder] > 0 and free <= self.reserve):
                return False
            self._busy += 1
            self._held[holder] += 1
            return True

    def give(self, holder: str | None) -> None:
        with self._lock:
            self._busy -= 1
            self._held[holder] -= 1
            if self._held[holder] <= 0:
                del self._held[holder]


class RecentShares:
    """Records accepted per token in the current and the previous ``window_s``.

    >>> t = [0.0]
    >>> shares = RecentShares(window_s=10, clock=lambda: t[0])
    >>> shares.add("flood", 900); shares.add("quiet", 20)
    >>> shares.over_share("flood"), shares.over_share("quiet"), shares.over_share("new")
    (True, False, False)
    >>> t[0] = 25.0  # two windows later: forgotten
    >>> shares.over_share("flood")
    False
    """

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        self._current: Counter[str] = Counter()
        self._previous: Counter[str] = Counter()

    def _roll(self) -> None:
        elapsed = self._clock() - self._start
        if elapsed < self.window_s:
            return
        self._previous = self._current if elapsed < 2 * self.window_s else Counter()
        self._current = Counter()
        self._start = self._clock()

    def add(self, token: str, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self._roll()
            self._current[token] += n

    def over_share(self, token: str) -> bool:
        """Whether ``token`` sent at least its fair share of the recent records (False when
        nobody sent any)."""
        with self._lock:
            self._roll()
            recent = self._current + self._previous
            total = sum(recent.values())
            return total > 0 and recent[token] * len(recent) >= total
