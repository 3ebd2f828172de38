"""The ingest API's inbox as a source: the rows ``POST /v1/episodes`` committed, in id order.

The position is the next inbox id to read, committed as the offset of partition 0 under the
source name ``inbox`` in the same transaction as the batch (like a file's byte offset), so a
restart resumes exactly after the last committed batch. Ids become visible in the order they were
given out (the writer serialises its transactions: ``monitor.store.ingest``), so reading
``id >= position`` never skips a row.

Retention: rows below the committed position (consumed) are deleted on a background thread once
they are older than ``ingest.inbox_retention_s`` (default one hour; 0: as soon as consumed), so
the table holds the backlog plus at most that much history.

The table is reached through :class:`InboxReader` (the store's ``Inbox`` implements it): sources
sit below the store in the house, so this module names no store class.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

from monitor.sources.base import Rebalance, Record

log = logging.getLogger(__name__)

NAME = "inbox"
IDLE_WAIT_S = 0.05  # between reads of an empty inbox while a poll waits for rows
PURGE_EVERY_S = 10.0


class InboxItem(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def raw(self) -> bytes: ...
    @property
    def received_at(self) -> float: ...
    @property
    def full_size(self) -> int | None: ...
    @property
    def undecodable(self) -> str | None: ...


class InboxReader(Protocol):
    def read(self, from_id: int, limit: int, max_bytes: int | None = None) -> Sequence[InboxItem]:
        """Up to ``limit`` rows with id >= ``from_id``, in id order, each cut past ``max_bytes``."""
        ...

    def purge(self, older_than_s: float, now: float | None = None) -> int:
        """Delete consumed rows older than ``older_than_s``; how many."""
        ...


class InboxSource:
    def __init__(
        self,
        reader: InboxReader,
        retention_s: float = 3600.0,
        *,
        purge_every_s: float = PURGE_EVERY_S,
        max_bytes: int | None = None,
        stall_s: float | None = None,
    ):
        self.name = NAME
        self._reader = reader
        self._retention_s = retention_s
        self._purge_every_s = purge_every_s
        self._max_bytes = max_bytes
        # A read in flight for longer than this makes the source not ready: a database frozen by a
        # storage stall answers nothing, raises nothing, and /readyz said ready throughout.
        self._stall_s = stall_s
        self._reading_since: float | None = None
        self._pos = 0
        self._rebalance: Rebalance | None = None
        self._ok = True
        self._read_errors = 0  # reads refused in a database outage (the pipeline's thread only)
        self._stop = threading.Event()
        self._purger: threading.Thread | None = None

    def open(self, rebalance: Rebalance) -> None:
        self._rebalance = rebalance
        self._pos = int(rebalance.assigned([0]).get(0, 0))
        if self._purger is None:
            self._stop.clear()
            self._purger = threading.Thread(target=self._purge_loop, name="inbox-purge", daemon=True)
            self._purger.start()

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        """Rows after the position; waits up to ``timeout_s`` for some. A database outage is an
        empty poll (and not ready) rather than an error: the service waits it out."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self._read(max_records)
            if rows or time.monotonic() >= deadline or self._stop.is_set():
                break
            time.sleep(min(IDLE_WAIT_S, max(0.0, deadline - time.monotonic())))
        out = [
            Record(bytes(r.raw), 0, r.id, r.id + 1, r.received_at, full_size=r.full_size, undecodable=r.undecodable)
            for r in rows
        ]
        if out:
            self._pos = out[-1].next_offset
        return out

    def _read(self, max_records: int) -> Sequence[InboxItem]:
        self._reading_since = time.monotonic()
        try:
            rows = self._reader.read(self._pos, max_records, self._max_bytes)
        except Exception as e:  # an outage of the database: said once, then retried by the next poll
            if self._ok:
                log.warning("reading the inbox failed (retrying): %s", str(e).splitlines()[0][:300] if str(e) else e)
            self._ok = False
            self._read_errors += 1
            return []
        finally:
            self._reading_since = None
        self._ok = True
        return rows

    @property
    def exhausted(self) -> bool:
        return False  # rows keep coming while the ingest API runs

    def commit(self, offsets: Mapping[int, int]) -> None:
        """Nothing to do: the store holds the position."""

    def guard(self, records: list[Record]) -> AbstractContextManager[bool]:
        return nullcontext(True)

    def rewind(self) -> None:
        assert self._rebalance is not None
        self._pos = int(self._rebalance.assigned([0]).get(0, 0))

    def lag(self) -> dict[int, int]:
        return {}

    def failures(self) -> Mapping[str, int]:
        return {"read": self._read_errors}  # the position lives in the store: nothing to commit here

    def ready(self) -> bool:
        since = self._reading_since
        stalled = self._stall_s is not None and since is not None and time.monotonic() - since > self._stall_s
        return self._ok and not stalled

    def close(self) -> None:
        self._stop.set()
        if self._purger is not None:
            self._purger.join(timeout=2)
            self._purger = None

    def _purge_loop(self) -> None:
        while not self._stop.wait(self._purge_every_s):
            self.purge_now()

    def purge_now(self) -> int:
        """Delete the consumed rows past retention now; 0 (logged) on an outage."""
        try:
            n = self._reader.purge(self._retention_s)
        except Exception as e:
            log.warning("purging consumed inbox rows failed (retrying later): %s", type(e).__name__)
            return 0
        if n:
            log.debug("purged %d consumed inbox rows", n)
        return n
