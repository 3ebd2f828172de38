"""Counters that account for every episode handed to a client, and per-episode results."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

# accepted: stored by the server (a durable hand-off) for the first time; duplicate: the server
# already held this episode_id (a retry whose first answer was lost, or a repeated id); rejected:
# the server refused the record, with a reason (final, never retried); dropped: the full buffer
# discarded it (on_full="drop_oldest"); failed: not delivered (retries exhausted, a non-retryable
# HTTP error such as 401, or the client closed before it went out). Whether a failed episode was
# stored is unknown only when its last attempt died in flight; re-logging it is safe (idempotent).
Status = Literal["accepted", "duplicate", "rejected", "dropped", "failed"]
STATUSES: tuple[Status, ...] = ("accepted", "duplicate", "rejected", "dropped", "failed")


@dataclass(frozen=True)
class Result:
    """The final outcome of one episode, given to the ``on_result`` callback."""

    episode_id: str
    status: Status
    # The server's reason for a rejection (e.g. "missing_field"), or why delivery failed.
    reason: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class Stats:
    """A consistent snapshot. Every episode passed to ``log()`` is in ``enqueued``, and
    ``enqueued == accepted + duplicates + rejected + dropped + failed + pending`` always holds."""

    enqueued: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    dropped: int = 0
    failed: int = 0
    # Waiting in the buffer or in a request not yet answered.
    pending: int = 0
    # Attempts repeated after a retryable error (429, 5xx, connection errors), and requests made.
    retries: int = 0
    requests: int = 0

    @property
    def delivered(self) -> int:
        """Episodes the server holds (accepted now or before)."""
        return self.accepted + self.duplicates


_FIELD = {
    "accepted": "accepted",
    "duplicate": "duplicates",
    "rejected": "rejected",
    "dropped": "dropped",
    "failed": "failed",
}


class Counters:
    """The mutable, thread-safe counters behind :class:`Stats`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._n: dict[str, int] = dict.fromkeys(
            ("enqueued", "accepted", "duplicates", "rejected", "dropped", "failed", "pending", "retries", "requests"), 0
        )

    def enqueued(self) -> None:
        with self._lock:
            self._n["enqueued"] += 1
            self._n["pending"] += 1

    def unenqueue(self) -> None:
        """Undo ``enqueued()`` for an episode the buffer refused."""
        with self._lock:
            self._n["enqueued"] -= 1
            self._n["pending"] -= 1

    def finished(self, status: Status, n: int = 1) -> None:
        """``n`` pending episodes reached ``status``."""
        with self._lock:
            self._n[_FIELD[status]] += n
            self._n["pending"] -= n

    def add(self, name: Literal["retries", "requests"], n: int = 1) -> None:
        with self._lock:
            self._n[name] += n

    def snapshot(self) -> Stats:
        with self._lock:
            return Stats(**self._n)
