"""The source contract: records with their positions, committed after the store has them."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

#: The operations a source counts its retried failures by (``Source.failures``).
SOURCE_OPERATIONS = ("read", "commit")


@dataclass(slots=True)
class Record:
    """One raw record. ``next_offset`` is the position to resume from after it."""

    value: bytes
    partition: int
    offset: int
    next_offset: int
    received_at: float
    key: bytes | None = None
    #: Set when ``value`` holds only the first bytes of an oversize record.
    full_size: int | None = None
    #: Fetch generation (Kafka: bumped by rebalances and rewinds).
    generation: int = 0
    #: Set when the source could not decode the record at all, to say why (a Kafka batch in a
    #: codec this build lacks, or damaged): ``value`` is then empty and the record a dead letter.
    undecodable: str | None = None


class Rebalance(Protocol):
    """What a source calls when partitions move (Kafka groups); files have one partition."""

    def assigned(self, partitions: list[int]) -> Mapping[int, int]:
        """Partitions gained; return the stored next offset of each one that has one."""
        ...

    def revoked(self, partitions: list[int]) -> None:
        """Partitions lost; called when nothing is in flight."""
        ...


class Source(Protocol):
    #: Checkpoint key in the offsets table, e.g. ``kafka:GROUP:TOPIC`` or ``file:/abs/path``.
    name: str

    def open(self, rebalance: Rebalance) -> None: ...

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        """Up to ``max_records`` records; an empty list when none came in time."""
        ...

    @property
    def exhausted(self) -> bool:
        """True when a finite source has no more records."""
        ...

    def commit(self, offsets: Mapping[int, int]) -> None:
        """Tell the source these next offsets are durable (after the store commit)."""
        ...

    def guard(self, records: list[Record]) -> AbstractContextManager[bool]:
        """Held while a batch is processed and committed; yields False if the batch is stale
        (fetched before a rebalance or rewind) and must be dropped."""
        ...

    def rewind(self) -> None:
        """Forget fetched records and seek back to the stored offsets."""
        ...

    def lag(self) -> dict[int, int]:
        """Records behind the end, per partition, where known."""
        ...

    def failures(self) -> Mapping[str, int]:
        """Failed attempts the source retried since it was built, by operation (``read``: a poll
        the broker or the database refused; ``commit``: an informational offset commit). The
        pipeline adds them to ``oversight_source_errors_total{operation}``."""
        ...

    def ready(self) -> bool: ...

    def close(self) -> None: ...


@runtime_checkable
class ReadAhead(Protocol):
    """A source that takes records off an input that cannot give them back (a pipe): on a
    stop, the pipeline processes what it already took instead of dropping it."""

    def take_read_ahead(self, max_records: int) -> list[Record]:
        """Up to ``max_records`` records already read, without waiting; ``[]`` when none are left.
        The first call also stops further reading."""
        ...
