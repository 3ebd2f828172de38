"""The streams a replica holds in memory, and their limit.

A stream is a name the producer chooses, and each one the pipeline meets costs it state in memory
for as long as it runs: the sampler's clock and budget, the drift monitor's reference and
detectors for every signal, the run's counts (about 6 KB a stream with the default signals), and
a checkpoint row per component in the database. A producer that puts a request or user id in
``stream`` (a bug, or an attack) makes a new stream per record: at 1,000 records a second the
service held 100,000 streams within two minutes (719 MB) and ran out of memory within hours.

:class:`HeldStreams` bounds them. Past ``pipeline.max_streams`` a record of a stream not held yet
is refused (dead-lettered as ``too_many_streams``, with its raw bytes) while the streams already
held go on as before. The set is emptied when the pipeline forgets its state (a Kafka rebalance,
a rewind), as every per-stream state is.
"""

from __future__ import annotations

__all__ = ["HeldStreams"]


class HeldStreams:
    """The streams admitted since the pipeline last forgot its state: at most ``limit`` (None:
    no limit).

    >>> held = HeldStreams(2)
    >>> held.admit("chat"), held.admit("search"), held.admit("chat")
    (True, True, True)
    >>> held.admit("user-8812")  # a third stream: refused; the two held go on
    False
    >>> held.forget(); held.admit("user-8812")
    True
    """

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit <= 0:
            raise ValueError("limit must be positive (None: no limit)")
        self.limit = limit
        self._held: set[str] = set()

    def admit(self, stream: str) -> bool:
        """Whether a record of ``stream`` may be processed (holding the stream if it is new)."""
        if stream in self._held:
            return True
        if self.limit is not None and len(self._held) >= self.limit:
            return False
        self._held.add(stream)
        return True

    @property
    def count(self) -> int:
        return len(self._held)

    def forget(self) -> None:
        self._held.clear()
