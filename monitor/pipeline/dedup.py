"""The episodes a stream delivered again: a producer's retry, an OpenTelemetry collector's re-export.

Kafka and the HTTP handoff to Kafka deliver at least once: a producer whose send timed out after
the broker had it sends it again, and so does a client whose request timed out after the server
had accepted it. Counted twice, a record inflates its stream's traffic (the population of every
Horvitz-Thompson total and mean, and the review budget's rate), its sampling counts, and what
the drift detectors see. The store ignores a second copy of a *sampled* episode; most episodes are
not sampled and never stored, so only the pipeline can tell.

:class:`RecentEpisodes` remembers the keys of the last ``size`` episodes the pipeline took. It is
exact within that window and bounded whatever the traffic (about 80 bytes per key). Retries come
within seconds to minutes. A copy that arrives later than the window, or after a restart or a
rebalance (the window is memory only), is counted again, as every copy was before.

The keys of a batch stay pending until the batch commits. A batch that is rolled back or redone
after an outage must find its own episodes new again, and so must an episode the store refused
(a dead letter now: a later copy is not a duplicate of anything stored).
"""

from __future__ import annotations

from collections import deque

__all__ = ["RecentEpisodes"]


class RecentEpisodes:
    """The (stream, episode id) keys of the last ``size`` episodes taken: committed, or pending in
    the batch being drafted. ``size`` 0 remembers nothing.

    Keys are Python's ``hash`` of the pair: SipHash with a per-process random key, so a producer
    cannot craft ids that collide with another stream's, and 64 bits make an accidental collision
    within a window of a million keys about one in 10^7.

    >>> recent = RecentEpisodes(2)
    >>> k = recent.key("s", "e1")
    >>> recent.seen(k)
    False
    >>> recent.take(k); recent.seen(k)  # a second copy in the same batch
    True
    >>> recent.discard(); recent.seen(k)  # the batch was rolled back: its episodes are new again
    False
    >>> for eid in ("e1", "e2", "e3"):
    ...     recent.take(recent.key("s", eid))
    >>> recent.commit()
    >>> [recent.seen(recent.key("s", eid)) for eid in ("e1", "e2", "e3")]  # the oldest left the window
    [False, True, True]
    """

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        self.size = size
        self._keys: set[int] = set()
        self._order: deque[int] = deque()
        self._pending: dict[int, None] = {}  # insertion-ordered

    @staticmethod
    def key(stream: str, episode_id: str) -> int:
        return hash((stream, episode_id))

    def seen(self, key: int) -> bool:
        """Whether the episode was taken within the window or earlier in this batch."""
        return key in self._pending or key in self._keys

    def take(self, key: int) -> None:
        """The episode is in the batch being drafted."""
        if self.size:
            self._pending[key] = None

    def drop(self, keys: list[int]) -> None:
        """Episodes of the pending batch that are not in it after all (the store refused them)."""
        for k in keys:
            self._pending.pop(k, None)

    def commit(self) -> None:
        """The pending batch committed: its keys join the window, the oldest leave it."""
        keys, order = self._keys, self._order
        for k in self._pending:
            if k not in keys:
                keys.add(k)
                order.append(k)
        self._pending.clear()
        while len(order) > self.size:
            keys.discard(order.popleft())

    def discard(self) -> None:
        """The pending batch did not commit: it is delivered again, and its episodes are new."""
        self._pending.clear()

    def forget(self) -> None:
        """Everything: a rewind reads committed episodes again because the database lost them (or
        another consumer owned them), so none of them may be taken for a copy."""
        self._pending.clear()
        self._keys.clear()
        self._order.clear()
