"""Stage 2, validate: episode schema v1, validation of raw records, and the dead-letter sinks that
receive what validation (or a later step of the batch) refuses, with its reason."""

from monitor.episodes.validate import (
    DEAD_LETTER_REASONS,
    DEFAULT_STREAM,
    MAX_ID_CHARS,
    MAX_METADATA_DEPTH,
    MAX_MODEL_CHARS,
    MAX_STREAM_CHARS,
    PIPELINE_REASONS,
    REASONS,
    SCHEMA_VERSION,
    Episode,
    InvalidEpisode,
    parse_episode,
    parse_timestamp,
)

__all__ = [
    "DEAD_LETTER_REASONS",
    "DEFAULT_STREAM",
    "MAX_ID_CHARS",
    "MAX_METADATA_DEPTH",
    "MAX_MODEL_CHARS",
    "MAX_STREAM_CHARS",
    "PIPELINE_REASONS",
    "REASONS",
    "SCHEMA_VERSION",
    "Episode",
    "InvalidEpisode",
    "parse_episode",
    "parse_timestamp",
]
