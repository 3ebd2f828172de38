"""Where episodes come from: files and stdin (embedded), Kafka, and an in-memory test source."""

from monitor.sources.base import Record, Source

__all__ = ["Record", "Source"]
