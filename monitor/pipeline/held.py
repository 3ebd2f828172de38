"""The streams a replica holds in memory, and their limit.

A stream is a name the producer chooses, and each one the pipeline meets costs it state in memory
for as long as it runs: the sampler's clock and budget, the drift monitor's reference and
detectors for every signal, the run's counts (about 6 KB a stream with the default signals), and
a checkpoint row per component in the database. A producer that puts a request or user id in
``stream`` (a bug, or an attack) makes a new stream per record: at 1,000 records a second the
service held 100,000 streams within two minutes (719 MB) and ran out of memory within hours.

:class:`HeldStreams` bounds them. Past ``pipeline.max_streams`` a record of a stream not held yet
is refused (dead-lettered as ``too_many_streams``, with its raw bytes) while the streams already
held go on as before, unless the stream is known: the store holds its checkpoint, so it was a
stream this service served before. The set is emptied when the pipeline forgets its state (a
restart, a Kafka rebalance, a rewind), and without that exception a producer of a stream per
record would take every place within seconds of each restart, and the deployment's own streams,
arriving a moment later, would be refused until the next one. A stream becomes known only by being
held, so an attack makes at most ``max_streams`` known streams per restart, and over restarts they
add up: unbounded, a producer that sent new names and then every name it had used before was held
200, 400, ... 1,000 streams after five restarts at a limit of 200. So the known streams held beyond
the limit are bounded too: a replica holds at most twice ``max_streams`` streams, whatever happened
before it started.

Whether the store knows a stream is one read, and at the limit a producer of a new name per record
made one per record (0.49 ms of CPU each on SQLite, 12 times a record's cost; a round trip each on
PostgreSQL). The pipeline asks for a batch's undecided names at once (:meth:`HeldStreams.undecided`,
:meth:`HeldStreams.learn`): one read per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

__all__ = ["HeldStreams"]


#: Refused names remembered, so that a refused stream's records cost no read each: cleared when full.
REFUSED_MAX = 100_000


class HeldStreams:
    """The streams admitted since the pipeline last forgot its state: at most ``limit`` (None:
    no limit), and up to ``limit`` more that ``known`` says the store knows.

    ``known(names)``: those of ``names`` the store knows.

    >>> held = HeldStreams(2, known=lambda names: {n for n in names if n.startswith("search")})
    >>> held.admit("chat"), held.admit("user-8812"), held.admit("chat")
    (True, True, True)
    >>> held.admit("user-9140")  # a third stream, unknown: refused; the two held go on
    False
    >>> held.admit("search"), held.admit("search-eu")  # known to the store: held beyond the limit
    (True, True)
    >>> held.admit("search-us")  # ... up to twice the limit
    False
    >>> held.forget(); held.admit("user-9140")
    True
    """

    def __init__(self, limit: int | None, known: Callable[[Collection[str]], set[str]] | None = None) -> None:
        if limit is not None and limit <= 0:
            raise ValueError("limit must be positive (None: no limit)")
        self.limit = limit
        self._known = known
        self._held: set[str] = set()
        self._refused: set[str] = set()
        self._told: set[str] = set()  # known to the store, learnt in a batch's read and not held yet

    def admit(self, stream: str) -> bool:
        """Whether a record of ``stream`` may be processed (holding the stream if it is new)."""
        if stream in self._held:
            return True
        n = len(self._held)
        if self.limit is not None and n >= self.limit and (n >= 2 * self.limit or not self._is_known(stream)):
            return False
        self._held.add(stream)
        return True

    def undecided(self, stream: str) -> bool:
        """Whether admitting ``stream`` now would need a read of the store (see :meth:`learn`). Asked
        for every record: a held stream, the common case, answers at the first test."""
        if stream in self._held or self._known is None or self.limit is None:
            return False
        return (
            self.limit <= len(self._held) < 2 * self.limit and stream not in self._refused and stream not in self._told
        )

    def learn(self, streams: Iterable[str]) -> None:
        """Read at once whether the store knows ``streams``, for the :meth:`admit` calls that follow."""
        asked = {s for s in streams if self.undecided(s)}
        if not asked or self._known is None:
            return
        known = self._known(asked)
        self._told |= known
        for s in asked - known:
            self._remember_refused(s)

    def _is_known(self, stream: str) -> bool:
        if self._known is None or stream in self._refused:
            return False
        if stream in self._told:
            self._told.discard(stream)
            return True
        if self._known([stream]):
            return True
        self._remember_refused(stream)
        return False

    def _remember_refused(self, stream: str) -> None:
        if len(self._refused) >= REFUSED_MAX:
            self._refused.clear()
        self._refused.add(stream)

    @property
    def count(self) -> int:
        return len(self._held)

    def forget(self) -> None:
        self._held.clear()
        self._refused.clear()
        self._told.clear()
