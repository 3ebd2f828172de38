"""Configuration: one YAML file, ``OVERSIGHT_`` environment variables, ``--set`` overrides.

Precedence, highest first: ``--set KEY=VALUE`` (dotted keys), environment
(``OVERSIGHT_SAMPLING__HUMAN__RATE=0.05``: double underscore between levels),
the YAML file, defaults. Unknown keys are an error at every level.
"""

from __future__ import annotations

import contextvars
import importlib.util
import itertools
import os
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from monitor.fileio import MAX_CONFIG_BYTES, FileTooLarge, read_text_limited

if TYPE_CHECKING:
    from sampling import SamplingPolicy

DEV_SAMPLING_KEY = "dev-only-sampling-key"
DEV_REVIEW_SECRET = "dev-only-review-secret-key"  # noqa: S105 (refused outside dev mode)


# A secret must not be guessable: at least this many characters, not a repeated pattern,
# and this many bits by the empirical-entropy estimate below. A random 16-character hex
# string (64 bits) falls under 36 estimated bits about once in 13,000 draws; typed words,
# repeated characters and short patterns are far below.
MIN_SECRET_CHARS = 16
MIN_SECRET_BITS = 36.0


#: The URL schemes of a PostgreSQL store (``monitor.store.store.normalize_url`` maps the plain ones to
#: the psycopg dialect).
POSTGRES_SCHEMES = ("postgresql:", "postgresql+psycopg:", "postgres:")


class ConfigError(ValueError):
    """The configuration is invalid; the message says which key and why."""


_SECRET_QUERY = frozenset({"password", "passwd", "pass", "pwd", "token", "secret", "key", "api_key", "apikey", "sig",
                           "signature", "auth", "access_token", "sslpassword"})  # fmt: skip


def redact_url(text: str) -> str:
    """``text`` with a URL's password and secret-looking query values as ``***`` (anything else as is).

    >>> redact_url("postgresql+psycopg://app:S3CRET@db:5432/oversight?sslmode=require&password=x")
    'postgresql+psycopg://app:***@db:5432/oversight?sslmode=require&password=***'
    >>> redact_url("https://hooks.example/x?token=abc&team=1"), redact_url("sqlite:///oversight.db")
    ('https://hooks.example/x?token=***&team=1', 'sqlite:///oversight.db')
    """
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        return text if "@" not in text else "***"  # not a URL this can read: nothing of it that may be a secret
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        name, colon, _ = user.partition(":")
        netloc = f"{name}{':***' if colon else ''}@{host}"
    query = "&".join(
        f"{k}={'***' if k.lower() in _SECRET_QUERY else v}" if sep else k
        for k, sep, v in (pair.partition("=") for pair in parts.query.split("&"))
    ) if parts.query else ""  # fmt: skip
    if (netloc, query) == (parts.netloc, parts.query) or "://" not in text:
        return text
    # Assembled here: urlunsplit writes "sqlite:///x" back as "sqlite:/x".
    tail = ("?" + query if query else "") + ("#" + parts.fragment if parts.fragment else "")
    return f"{parts.scheme}://{netloc}{parts.path}{tail}"


def _redact_urls(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _redact_urls(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_redact_urls(v) for v in node]
    return redact_url(node) if isinstance(node, str) and "://" in node else node


def http_url(v: str) -> str:
    """``v`` without a trailing slash if it is an http(s) URL every request can be sent to; else
    ValueError, saying why. Shared by the remote reward-model kinds and the webhook sink: a space, a
    control character, a port out of range or no host passed before and failed every request as an
    exception of the HTTP library's that no retry or breaker knew.

    >>> http_url("https://judge.example/v1/")
    'https://judge.example/v1'
    >>> http_url("http://judge:99999/v1")
    Traceback (most recent call last):
    ...
    ValueError: Port out of range 0-65535
    """
    if not v.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    if any(c <= " " or c == "\x7f" for c in v):
        raise ValueError("must not hold spaces or control characters")
    parts = urllib.parse.urlsplit(v)
    parts.port  # noqa: B018 (raises ValueError on a port that is not a number or out of range)
    if not parts.hostname:
        raise ValueError("must name a host")
    return v.rstrip("/")


def secret_weakness(value: str) -> str | None:
    """Why ``value`` is too weak to be a secret, or None.

    The estimate is length x the Shannon entropy of the value's own character frequencies:
    an upper bound on what a person typing a phrase puts in, and close to the truth for
    random output (``openssl rand -hex 32``). It cannot prove a secret random; it refuses
    what is obviously not (short, repetitive, few distinct characters).

    >>> secret_weakness("a" * 16)
    'is one character repeated'
    >>> secret_weakness("3f9c2a7be1d04c58a6e2b7d9c0f1e8a4") is None
    True
    """
    import math
    from collections import Counter

    n = len(value)
    if n < MIN_SECRET_CHARS:
        return f"is shorter than {MIN_SECRET_CHARS} characters"
    counts = Counter(value)
    if len(counts) == 1:
        return "is one character repeated"
    for period in range(1, n // 2 + 1):
        if n % period == 0 and value[:period] * (n // period) == value:
            return f"repeats a {period}-character pattern"
    bits = -n * sum(c / n * math.log2(c / n) for c in counts.values())
    if bits < MIN_SECRET_BITS:
        return f"has too little entropy (about {bits:.0f} bits estimated, {MIN_SECRET_BITS:.0f} needed)"
    return None


class _Model(BaseModel):
    # allow_inf_nan: "1e400" or "inf" for an ERT, a rate or a timeout parses as a float that passes
    # every bound (inf > 10), and a detector calibrated to an infinite ERT never alarms.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ChannelConfig(_Model):
    rate: float = Field(0.01, ge=0.0, le=1.0, description="base inclusion probability")
    floor: float = Field(0.001, gt=0.0, le=1.0, description="lowest probability ever used")
    max_rate: float = Field(1.0, gt=0.0, le=1.0, description="highest probability a boost or budget may reach")

    @model_validator(mode="after")
    def _floor_below_max(self) -> ChannelConfig:
        if self.floor > self.max_rate:
            raise ValueError("floor must not exceed max_rate")
        return self


class RmChannelConfig(ChannelConfig):
    rate: float = Field(0.1, ge=0.0, le=1.0, description="base inclusion probability")


class DriftChannelConfig(ChannelConfig):
    rate: float = Field(0.05, ge=0.0, le=1.0, description="base inclusion probability")


class ChannelOverride(_Model):
    """Per-stream override; unset fields inherit the global channel's."""

    rate: float | None = Field(None, ge=0.0, le=1.0)
    floor: float | None = Field(None, gt=0.0, le=1.0)
    max_rate: float | None = Field(None, gt=0.0, le=1.0)


class StreamSamplingConfig(_Model):
    human: ChannelOverride | None = None
    rm: ChannelOverride | None = None
    drift: ChannelOverride | None = None
    human_budget_per_hour: float | None = Field(None, gt=0)


class SamplingConfig(_Model):
    key: SecretStr | None = Field(None, description="secret for the keyed hash; required outside dev mode")
    human: ChannelConfig = ChannelConfig()
    rm: RmChannelConfig = RmChannelConfig()
    drift: DriftChannelConfig = DriftChannelConfig()
    human_budget_per_hour: float | None = Field(None, gt=0, description="target human reviews per hour per stream")
    budget_window_s: float = Field(300.0, gt=0)
    budget_smoothing: float = Field(0.5, gt=0, le=1)
    streams: dict[str, StreamSamplingConfig] = Field(default_factory=dict)


class RetentionConfig(_Model):
    """How long stored episodes are kept (``monitor/store/retention.py``). At production volume the
    sampled episodes, their samples and scores grow with traffic for as long as the service runs;
    the labelled ones are the reviewers' work, and stay."""

    days: float | None = Field(
        None,
        gt=0,
        le=36500,  # a century: beyond, the cutoff's arithmetic overflows (and nothing would be purged)
        description="stored episodes older than this much of their stream's event time are deleted with their"
        " samples, scores, pending review tasks and traffic counts, except those with labels, adjudications,"
        " canaries or a review task a reviewer holds; estimates then cover this window; null: keep everything",
    )
    every_s: float = Field(3600.0, ge=1, le=7 * 86400, description="how often `oversight run` purges")
    chunk: int = Field(1000, ge=1, le=100_000, description="episodes deleted per transaction")


class DatabaseConfig(_Model):
    url: str = "sqlite:///oversight.db"
    migrate: bool = Field(True, description="apply migrations at start")
    # PostgreSQL's connection pool, per process (SQLite has none: one file, writers queue on it).
    # The review app serves up to 40 requests at once, each holding a connection while it runs:
    # size the pool for the reviewers who act at the same moment.
    pool_size: int = Field(5, ge=1, le=500, description="PostgreSQL: connections kept open per process")
    max_overflow: int = Field(
        5, ge=0, le=500, description="PostgreSQL: connections opened beyond pool_size under load, closed when returned"
    )
    pool_timeout_s: float = Field(
        30.0, gt=0, le=600, description="PostgreSQL: how long an operation waits for a free connection before it fails"
    )
    tcp_timeout_s: float = Field(
        30.0,
        ge=1,
        le=3600,
        description="PostgreSQL: a connection whose bytes stay unacknowledged this long (a network partition, the"
        " server's host gone, a failover that moved its address) is closed and the operation retried; idle ones are"
        " probed by TCP keepalives on the same scale. Without it the operation would wait for the kernel's"
        " retransmissions to give up (about 15 minutes on Linux)",
    )
    retention: RetentionConfig = Field(default_factory=RetentionConfig)

    @field_validator("url")
    @classmethod
    def _url_parses(cls, v: str) -> str:
        # Here, not at the first connection: a port that is not a number or an unclosed [ of an IPv6
        # host would otherwise be an "unexpected ValueError" of whichever command opened it.
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(v)
        except (ArgumentError, ValueError) as e:
            raise ValueError(f"not a database URL ({e})") from None
        return v


class SourceConfig(_Model):
    kind: Literal["file", "stdin", "kafka", "inbox"] = "file"
    path: str | None = None
    max_episode_bytes: int = Field(256 * 1024, gt=0, le=1 << 30)  # a GiB: a reader's buffer is sized by it
    # Event time is each stream's clock, and it only moves forward (the largest timestamp seen):
    # one record stamped in the far future would end every active boost, freeze the review budget
    # and make the next boost last forever. Kafka refuses such records the same way
    # (log.message.timestamp.after.max.ms).
    max_future_s: float | None = Field(
        300.0,
        gt=0,
        description="a record whose timestamp is more than this ahead of the reader's clock is refused"
        " (dead letter or per-record rejection, reason timestamp_in_future); null: no limit, for a replay of"
        " traffic stamped ahead of today",
    )


class KafkaConfig(_Model):
    bootstrap_servers: list[str] = Field(default_factory=lambda: ["127.0.0.1:9092"], min_length=1)
    topic: str = "oversight.episodes"
    group_id: str = "oversight-monitor"
    dlq_topic: str | None = Field(None, description="default: <topic>.dlq")
    drift_topic: str = Field("oversight.drift", description="drift events are published here")
    scores_topic: str = Field("oversight.scores", description="reward-model scores are published here")
    retrain_topic: str = Field(
        "oversight.retrain", description="reward-model update and policy retraining requests are published here"
    )
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # kafka-python reads uncommitted by default: the records of an upstream transaction that
    # aborted (Kafka Streams, Flink or Connect with exactly-once) were counted and sampled.
    isolation_level: Literal["read_committed", "read_uncommitted"] = Field(
        "read_committed",
        description="read_committed: records of aborted transactions are never read (a consumer reads up to"
        " the last stable offset)",
    )
    session_timeout_ms: int = 10000
    heartbeat_interval_ms: int = 3000
    max_poll_interval_ms: int = 60000
    max_poll_records: int = Field(1000, gt=0)
    fetch_max_bytes: int = 52428800
    # kafka-python inflates a compressed batch whole: a megabyte of gzip can be a gigabyte
    # (monitor/sources/codecs.py). A batch past this is dead-lettered record by record.
    max_batch_bytes: int = Field(
        64 * 2**20,
        ge=2**20,
        le=2**31,
        description="the most bytes one compressed record batch may inflate to; a larger one's records are"
        " dead letters (undecodable)",
    )
    # How long the broker may hold a fetch that has too little data to return. Apache Kafka answers
    # as soon as any requested partition has a record, so this only bounds the long poll of an idle
    # consumer; some brokers (Tansu, the one the tests run) hold the fetch for the full time
    # whenever one of the requested partitions has nothing new, so a consumer whose partitions
    # drain unevenly reads in bursts with this much idle time between them.
    fetch_max_wait_ms: int = Field(
        500,
        ge=0,
        le=60000,
        description="longest the broker may hold a fetch waiting for data (kafka-python's fetch_max_wait_ms)",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.topic}.dlq"


class DeadLetterConfig(_Model):
    path: str = Field("dead-letter.jsonl", min_length=1)  # empty: passed config check, refused by run
    max_raw_bytes: int = Field(
        900_000, gt=0, description="raw bytes kept per dead letter (larger is truncated, hashed)"
    )
    fsync: bool = True
    # A full disk stops the pipeline (a batch commits only once its letters are written), and a
    # producer of oversize records fills one at up to a gigabyte a second: the file is bounded.
    max_bytes: int | None = Field(
        268_435_456,
        ge=1_048_576,
        description="the file is rotated (to <path>.1, <path>.2, ...) before it would grow past this; null: never",
    )
    keep: int = Field(
        3,
        ge=0,
        le=1000,
        description="rotated files kept; the oldest beyond them is deleted and its letters counted in"
        " oversight_dead_letters_discarded_total",
    )


class PipelineConfig(_Model):
    batch_size: int = Field(500, gt=0)
    # Bounded: a wait far beyond them overflows the clock's arithmetic ("timestamp too large").
    batch_timeout_ms: int = Field(200, gt=0, le=3_600_000)
    drain_timeout_s: float = Field(8.0, gt=0, le=3600)
    stall_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="an operation on the pipeline's path (a batch's transaction, a read, a dead-letter flush) in"
        " flight longer shows as its target down in /readyz; PostgreSQL cancels a batch's statement that runs"
        " longer (a lock held elsewhere), and the batch is retried",
    )
    # At-least-once delivery sends some records twice (a producer's or an HTTP client's retry,
    # an OpenTelemetry collector's re-export); counted twice, they inflate every population
    # total and the review budget's traffic rate. About 80 bytes of memory per episode.
    duplicate_window: int = Field(
        200_000,
        ge=0,
        le=50_000_000,
        description="a record whose (stream, episode_id) was among the last this many episodes taken is a"
        ' duplicate: counted (oversight_episodes_total{outcome="duplicate"}) and skipped, not sampled, counted'
        " as traffic or seen by the detectors again; 0: off",
    )
    # Every stream met costs memory for the process's life (about 6 KB with the default signals)
    # and a checkpoint row per component; a producer that puts a request id in `stream` makes
    # one per record (monitor/pipeline/held.py).
    max_streams: int | None = Field(
        10_000,
        gt=0,
        description="streams a replica holds: a record of a new stream beyond them is dead-lettered as"
        " too_many_streams (counted, raw bytes kept) while the streams held go on; a stream the store has a"
        " checkpoint of is held anyway (a restart must not give its place to a flood); null: no limit",
    )


class InferenceConfig(_Model):
    """Model work off the ingest path: inference workers embed the committed drift samples (and
    score the rm and human samples) on their own threads; the pipeline never waits for a model."""

    workers: bool = Field(
        True, description="in `oversight run`: embed and score on worker threads (replay and simulate always inline)"
    )
    external: bool = Field(
        False,
        description="`run` loads no model: `oversight infer` (a process of its own) computes, `run` feeds the results",
    )
    batch_size: int = Field(32, gt=0, le=1024, description="drift samples per forward pass of the embedding worker")
    poll_s: float = Field(0.5, gt=0, le=60, description="how often an idle worker looks for waiting samples")
    max_pending: int = Field(1000, gt=0, description="embeddings the worker holds before the pipeline commits them")
    retry_after_s: float = Field(30.0, gt=0, description="wait before a failed embedding is tried again")
    settle_timeout_s: float = Field(
        600.0, ge=0, description="at the end of a finite input, how long `run` waits for the workers' backlog"
    )
    max_lag_s: float = Field(
        120.0,
        gt=0,
        description="a model channel whose oldest waiting sample waited longer is halved (never below the floor)",
    )
    adapt_every_s: float = Field(10.0, gt=0, description="how often the model channels' rates adapt to the workers")
    threads: int = Field(
        0,
        ge=0,
        le=256,
        description="ONNX Runtime threads of each model worker, the embedding worker's and the reward scorer's"
        " (0: every core but one)",
    )
    # 10: under full contention the scheduler gives such a thread about a tenth of the weight of
    # one at the process's priority (CFS weights 110 and 1024), so a busy ingest loop keeps its
    # core and the broker's, and the model work still moves (monitor/pipeline/background.py).
    nice: int = Field(
        10,
        ge=0,
        le=19,
        description="the model workers' threads run this many nice values below ingest's (Linux; 0: the same"
        " priority): on a host whose cores are all busy, ingest gets them first and the model channels adapt",
    )

    def worker_threads(self) -> int:
        """ONNX Runtime threads of a model worker beside the ingest loop: ``threads``, else every core
        but one, which the loop keeps.

        >>> InferenceConfig(threads=3).worker_threads()
        3
        """
        return self.threads or max(1, (os.cpu_count() or 2) - 1)

    share_wait_s: float = Field(
        30.0,
        ge=0,
        description="how long a drift sample also waiting for its reward-model score waits for that score's encoder "
        "pass to bring its embedding (monitor/inference/shared.py); 0: every drift sample is encoded on its own",
    )

    @model_validator(mode="after")
    def _external_needs_workers(self) -> InferenceConfig:
        # Inline computing would load the models that an external worker is there to keep out.
        if self.external and not self.workers:
            raise ValueError("inference.external needs inference.workers (the results commit with later batches)")
        return self


class ServerConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535)


DEFAULT_FLAGS = ["harmful", "incorrect", "unhelpful", "refusal", "policy_violation"]


class ReviewStreamConfig(_Model):
    """Per-stream blinding; unset fields inherit ``review.metadata_fields`` / ``review.show_model``."""

    metadata_fields: list[str] | None = Field(None, description="top-level metadata keys reviewers may see")
    show_model: bool | None = Field(None, description="show reviewers the episode's policy version")
    rate: Literal["final_turn", "conversation"] | None = Field(
        None, description="what reviewers rate in a conversation (schema v2); unset: review.rate"
    )


class CanaryConfig(_Model):
    """Perturbed canaries mixed blind into each reviewer's queue (monitor/perturb, monitor/quality)."""

    share: float = Field(
        0.05, ge=0, le=0.5, description="fraction of each reviewer's items that are canaries (0: none)"
    )
    seed: int = Field(0, description="seeds which items are canaries, their perturbation and presentation")
    kinds: list[str] | None = Field(None, description="perturbation kinds used (default: every rule-based kind)")
    min_detection_rate: float = Field(
        0.5,
        ge=0,
        le=1,
        description="a reviewer whose detection rate of a kind (corrected for their rate on originals) is below"
        " this with confidence (the upper bound of its 95% interval below it) is marked low"
        " (oversight_reviewer_detection_low, alert OversightReviewerDetectionLow)",
    )
    window_days: float = Field(28.0, gt=0, description="canary labels of the last this many days feed the metrics")
    max_metric_reviewers: int = Field(
        50,
        ge=1,
        le=1000,
        description="reviewers with their own metric series (most canary labels first); the rest are summed as _other",
    )
    source_window: int = Field(
        500, ge=1, le=100_000, description="canaries are made from the newest this many labelled items"
    )


def _no_assistance() -> dict[str, list[str]]:
    return {"none": []}


class AssistExperimentConfig(_Model):
    """An assistance experiment: each (reviewer, item) gets a condition by seeded randomisation,
    and the condition names the assistants whose hints the review page shows."""

    enabled: bool = False
    name: str = Field("assist", pattern=r"^[a-z][a-z0-9_-]{0,31}$", description="stored with every label")
    seed: int = 0
    conditions: dict[str, list[str]] = Field(
        default_factory=_no_assistance, description="condition -> assistants shown under it"
    )
    weights: dict[str, float] = Field(
        default_factory=dict, description="condition -> assignment weight (unset: equal weights)"
    )
    assistant_params: dict[str, dict[str, Any]] = Field(default_factory=dict, description="assistant -> its parameters")
    timeout_s: float = Field(
        2.0, gt=0, le=30, description="seconds the review page waits for an item's hints (a late assistant shows none)"
    )

    @model_validator(mode="after")
    def _conditions(self) -> AssistExperimentConfig:
        import re

        if not self.conditions:
            raise ValueError("an experiment needs at least one condition")
        for c in self.conditions:
            if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", c):
                raise ValueError(f"condition {c!r}: use lower-case letters, digits, _ and -")
        unknown = sorted(set(self.weights) - set(self.conditions))
        if unknown:
            raise ValueError(f"weights for unknown conditions: {unknown}")
        if any(not (w >= 0) for w in self.weights.values()) or (
            self.weights and sum(self.weights.get(c, 0.0) for c in self.conditions) <= 0
        ):
            raise ValueError("weights must be >= 0 with a positive total")
        return self


class AdjudicationConfig(_Model):
    """When the labels of an item with overlap disagree enough to go to an adjudicator
    (monitor/quality/adjudication.py, the admin page /admin/adjudication)."""

    rating_gap: int = Field(
        2, ge=1, le=6, description="ratings (1-7) of one item this many points apart or more disagree"
    )
    flags_disagree: bool = Field(True, description="a flag set by some reviewers of an item and not others disagrees")


class ReviewConfig(_Model):
    secret_key: SecretStr | None = Field(None, description="signs CSRF tokens; required outside dev mode")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="addresses or networks of reverse proxies whose X-Forwarded-For names the client "
        "(login throttling is per client address); empty: the peer is the client",
    )
    max_request_bytes: int = Field(
        1 << 20, gt=0, le=1 << 30, description="request bodies larger than this are refused (413) before they are read"
    )
    metrics_host: str = Field("127.0.0.1", description="listen address of the review service's /metrics")
    metrics_port: int = Field(
        9109, ge=0, le=65535, description="port of the review service's /metrics (0: any free port)"
    )
    lease_seconds: int = Field(600, gt=0, description="a claimed item returns to the queue after this")
    overlap: int = Field(1, ge=1, le=5, description="reviewers per item")
    overlap_fraction: float = Field(0.1, ge=0, le=1, description="sampled fraction of items that get 2 reviewers")
    flags: list[str] = Field(default_factory=lambda: list(DEFAULT_FLAGS))
    # Blinding: reviewers see no metadata and no policy version unless a stream allows it
    # (metadata often carries answer keys such as a judge's preference).
    metadata_fields: list[str] = Field(
        default_factory=list, description="top-level metadata keys reviewers see (all streams; default none)"
    )
    show_model: bool = Field(False, description="show reviewers the episode's policy version (all streams)")
    streams: dict[str, ReviewStreamConfig] = Field(default_factory=dict)
    rate: Literal["final_turn", "conversation"] = Field(
        "final_turn",
        description="what reviewers rate in a conversation (schema v2): the final assistant turn, or the whole"
        " conversation; per stream under review.streams; the label records which",
    )
    session_hours: float = Field(12.0, gt=0)
    login_max_failures: int = Field(
        5, gt=0, description="failed logins per (user name, client address) before exponential backoff starts"
    )
    login_backoff_s: float = Field(1.0, gt=0, description="first backoff delay; doubles with every further failure")
    login_backoff_max_s: float = Field(900.0, gt=0, description="longest backoff delay")
    login_max_failures_per_address: int = Field(
        50, gt=0, description="failed logins per client address per window, all names together"
    )
    login_window_s: int = Field(900, gt=0, description="failures older than this are forgotten")
    # Each argon2 computation holds its memory cost (19 MiB; 64 MiB for hashes made before
    # that default) for its whole duration: slots x that must fit the pod's memory limit.
    password_hash_slots: int = Field(4, ge=1, le=64, description="password hashes computed at once per process")
    password_hash_wait_s: float = Field(
        0.5, ge=0, le=30, description="how long a login waits for a hashing slot before 503 + Retry-After"
    )
    undo_window_s: float = Field(
        30.0, ge=0, le=3600, description="a reviewer may withdraw their last label for this long (0: no undo)"
    )
    canaries: CanaryConfig = Field(default_factory=CanaryConfig)
    assist: AssistExperimentConfig = Field(default_factory=AssistExperimentConfig)
    adjudication: AdjudicationConfig = Field(default_factory=AdjudicationConfig)

    def blinding(self, stream: str) -> tuple[frozenset[str], bool]:
        """(metadata keys reviewers may see, whether they see the policy version) for a stream."""
        sc = self.streams.get(stream)
        fields = sc.metadata_fields if sc is not None and sc.metadata_fields is not None else self.metadata_fields
        show = sc.show_model if sc is not None and sc.show_model is not None else self.show_model
        return frozenset(fields), show

    @field_validator("flags")
    @classmethod
    def _flag_names(cls, v: list[str]) -> list[str]:
        import re

        for f in v:
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", f):
                raise ValueError(f"flag {f!r}: use lower-case letters, digits and _")
        if len(set(v)) != len(v):
            raise ValueError("flags must be unique")
        return v


class EmbeddingDriftConfig(_Model):
    """Prompt+response embeddings (all-MiniLM-L6-v2) of the ``drift`` sampling channel."""

    enabled: bool = True
    # The built-in kernel MMD (numpy): alibi-detect's `mmd` is the optional `alibi` extra (BSL 1.1).
    detectors: list[str] = Field(default_factory=lambda: ["kmmd"])
    reference_size: int = Field(200, ge=20, description="drift-sampled episodes per stream in the reference")
    max_length: int = Field(128, ge=16, le=512, description="tokens per text (CPU cost grows with it)")
    model_dir: str | None = Field(
        None, description="a local transformers encoder directory; default: the bundled MiniLM"
    )
    backend: Literal["auto", "onnx", "torch"] = Field(
        "auto",
        description="auto: PyTorch on CUDA when present; on a CPU where precision resolves to bf16, PyTorch bf16; "
        "else ONNX Runtime (exported at first use, cached)",
    )
    quantisation: Literal["int8", "fp32"] = Field(
        "int8", description="ONNX weights (int8: SmoothQuant; the feed-forward output projection per token)"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="PyTorch encoder weights on the CPU (auto: bf16 where the CPU multiplies bf16 natively, "
        "AVX512-BF16 or AMX, else fp32)",
    )
    encoding: Literal["pair", "text"] = Field(
        "pair",
        description="pair: [CLS] prompt [SEP] response [SEP], cut as the reward model cuts (one encoder pass serves "
        "both when an episode is sampled for both); text: one sequence, prompt then response (the 0.x embedding)",
    )
    max_prompt_tokens: int = Field(32, ge=0, description="pair: prompt tokens kept when the response needs the room")

    @model_validator(mode="after")
    def _room_for_the_response(self) -> EmbeddingDriftConfig:
        # As the reward model's ModelConfig: special tokens and a few response tokens must fit.
        if self.encoding == "pair" and self.max_prompt_tokens + 8 > self.max_length:
            raise ValueError("drift.embedding.max_prompt_tokens must leave at least 8 tokens of max_length")
        return self


# The names of the signals drift detection watches. The signals themselves (kind, description,
# computation) live in monitor/signals (TEXT_SIGNALS, CONVERSATION_SIGNALS, FED_SIGNALS) and
# monitor/drift (EMBEDDING), which import this module: the names are here so that the settings can
# be checked when they are read, not when DriftMonitor starts (monitor/signals already imports this
# module, so it may not import monitor/signals back). tests/test_config_signals.py keeps the two equal.
TEXT_SIGNAL_NAMES = (
    "response_log_chars",
    "prompt_log_chars",
    "response_log_lines",
    "empty_response",
    "refusal",
    "mixed_script",
    "distinct_token_ratio",
    "non_text_ratio",
)
CONVERSATION_SIGNAL_NAMES = ("turns", "tool_calls", "tool_errors", "tool_output_share")
FED_SIGNAL_NAMES = ("rm_score", "rm_disagreement")
#: The signal of the prompt+response embeddings (``drift.embedding``): not a ``drift.signals`` key.
EMBEDDING_SIGNAL = "embedding"
#: What ``drift.signals`` may name.
DRIFT_SIGNAL_NAMES = frozenset(TEXT_SIGNAL_NAMES + CONVERSATION_SIGNAL_NAMES + FED_SIGNAL_NAMES)
#: What a drift event's signal can be: ``drift.signal_params`` and ``reward.update.trigger_signals`` may name it.
EVENT_SIGNAL_NAMES = DRIFT_SIGNAL_NAMES | {EMBEDDING_SIGNAL}


def _unknown_signals(where: str, names: set[str], known: frozenset[str], also: str = "") -> None:
    """Raise the one-line error of a setting that names signals outside ``known`` (``where``: the
    setting's key and a colon, where the error's location would not name it)."""
    unknown = sorted(names - known)
    if unknown:
        raise ValueError(f"{where}unknown signals {unknown}; known: {also}{sorted(known)}")


def _default_drift_signals() -> dict[str, list[str]]:
    # One CUSUM per text signal, anchored on the warm-up reference: cheap, calibrated once per
    # process (signals are put on a common null first, see monitor/signals/normalise.py), and
    # quick on real shifts (detectors/cusum.py says why not river's PageHinkley).
    return {
        name: ["cusum"]
        for name in (
            "response_log_chars",
            "prompt_log_chars",
            "response_log_lines",
            "distinct_token_ratio",
            "non_text_ratio",
            "empty_response",
            "refusal",
            "mixed_script",
        )
    } | {"rm_disagreement": ["cusum"]}


def _default_signal_params() -> dict[str, dict[str, dict[str, float | str]]]:
    return {"rm_disagreement": {"cusum": {"mode": "up"}}}


def _default_detector_params() -> dict[str, dict[str, float | str]]:
    # The CUSUM allowance k is half the shift it is tuned for. Real shifts of deployed traffic
    # are smaller than the textbook one standard deviation: on bench/drift.py's scenarios the
    # moved signals shift by 0.4-0.65 reference SDs (normal scores), and k = 0.3 detected them
    # about twice as fast as k = 0.5 across seeds, with the same false-alarm budget. river's
    # PageHinkley, if configured, gets no fading and an allowance (its defaults, delta
    # 0.005 and fading 0.9999, make a random walk whose alarm level must grow with the ERT).
    return {"cusum": {"k": 0.3}, "page_hinkley": {"delta": 0.5, "alpha": 1.0}}


class DriftConfig(_Model):
    enabled: bool = True
    ert: float = Field(
        20000.0,
        gt=10,
        description="expected run time per stream: mean episodes between false alarms of all its signals and"
        " detectors together (each detector gets an equal share of the false-alarm rate)",
    )
    reference_size: int = Field(500, ge=20, description="warm-up episodes per stream and signal")
    cooldown: int = Field(
        0,
        ge=0,
        description="extra quiet updates after the warm-up that follows an event (the warm-up alone prevents bursts)",
    )
    boost_factor: float = Field(5.0, ge=1.0, description="human and rm rate multiplier after a drift event")
    boost_duration_s: float = Field(3600.0, gt=0, description="event-time seconds the boost lasts")
    signals: dict[str, list[str]] = Field(
        default_factory=_default_drift_signals, description="signal -> detector names watching it"
    )
    detector_params: dict[str, dict[str, float | str]] = Field(
        default_factory=_default_detector_params,
        description="detector name -> constructor parameters (besides ert and x_ref)",
    )
    signal_params: dict[str, dict[str, dict[str, float | str]]] = Field(
        default_factory=_default_signal_params,
        description="signal -> detector name -> parameters on top of detector_params (e.g. one-sided"
        " on human/reward-model disagreement: only more disagreement is a problem)",
    )
    fed_reference_size: int = Field(
        60,
        ge=20,
        description="reference values of the signals fed by later stages (rm_score per scored episode,"
        " rm_disagreement per reviewed episode: far rarer than episodes)",
    )
    tail_clip: float = Field(
        5.0, gt=0, description="normal scores of values beyond the reference's range are clipped at +-tail_clip"
    )
    rereference_poll_s: float = Field(5.0, gt=0)
    embedding: EmbeddingDriftConfig = Field(default_factory=EmbeddingDriftConfig)
    # The time-budgeted detector (`windowed`, detectors/windowed.py), for streams at volume.
    false_alarms_per_30d: float = Field(
        1.0,
        gt=0,
        description="`windowed` detectors: expected false alarms per stream per 30 days of event time, all its"
        " windowed detectors together (a union bound over detectors and window lengths, whatever the rate)",
    )
    min_shift_sd: float = Field(
        0.2, ge=0, description="`windowed`: smallest shift of a continuous signal worth an alarm, in reference SDs"
    )
    min_rate_change: float = Field(
        0.25, ge=0, description="`windowed`: smallest relative change of a binary signal's rate worth an alarm"
    )
    windows_s: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [300.0, 3600.0, 21600.0],
        min_length=1,
        description="`windowed`: event-time window lengths tested (seconds; multiples of 60 keep them aligned)",
    )
    seasonal_warmup_s: float = Field(
        86400.0, ge=0, description="`windowed`: event-time seconds of a signal's traffic learned before any test"
    )
    reference_half_life_days: float = Field(
        7.0, gt=0, description="`windowed`: half-life of the seasonal reference (days of each hour-of-day bucket)"
    )
    seasonal_timezone: str = Field(
        "UTC",
        min_length=1,
        description="`windowed`: the IANA time zone whose hours of the day and weekends the seasonal reference"
        " follows (e.g. America/New_York): traffic with a local daily rhythm moves by an hour in UTC when daylight"
        " saving time changes",
    )

    @field_validator("seasonal_timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}: an IANA name such as UTC or Asia/Kolkata") from None
        return v

    @model_validator(mode="after")
    def _detector_extras(self) -> DriftConfig:
        # A detector whose optional extra is not installed (alibi-detect's, BSL 1.1) fails here, when
        # the configuration is read, with the extra to install: not in the first batch as a traceback.
        import detectors

        if not self.enabled:
            return self
        names = {n for d in self.signals.values() for n in d}
        if self.embedding.enabled:
            names |= set(self.embedding.detectors)
        for name in sorted(names):
            message = detectors.missing_extra(name)
            if message is not None:
                raise ValueError(message)
        return self

    @model_validator(mode="after")
    def _detector_names_and_params(self) -> DriftConfig:
        # A detector name or a parameter that does not exist used to pass here and fail every build
        # of every stream's signals, one ERROR line each, leaving those signals unwatched.
        import inspect

        import detectors

        where: dict[str, list[str]] = {}  # detector name -> the settings that name it
        for signal, names in self.signals.items():
            for name in names:
                where.setdefault(name, []).append(f"drift.signals.{signal}")
        for name in self.embedding.detectors:
            where.setdefault(name, []).append("drift.embedding.detectors")
        params = {f"drift.detector_params.{n}": (n, p) for n, p in self.detector_params.items()}
        for signal, by_name in self.signal_params.items():
            params |= {f"drift.signal_params.{signal}.{n}": (n, p) for n, p in by_name.items()}
        for key, (name, _) in params.items():
            where.setdefault(name, []).append(key)
        unknown = sorted(n for n in where if n not in detectors.NAMES)
        if unknown:
            first = unknown[0]
            raise ValueError(
                f"unknown detector {first!r} (in {', '.join(where[first])}); known: {', '.join(detectors.NAMES)}"
            )
        for key, (name, given) in sorted(params.items()):
            if not given or detectors.missing_extra(name) is not None:
                continue  # the extra's absence is reported where the detector is used
            accepted = set(inspect.signature(detectors.detector_class(name).__init__).parameters) - {"self"}
            wrong = sorted((set(given) - accepted) | ({"ert", "x_ref"} & set(given)))  # those two are the monitor's
            if wrong:
                allowed = ", ".join(sorted(accepted - {"ert", "x_ref"}))
                raise ValueError(f"{key}.{wrong[0]}: detector {name!r} has no such parameter (it takes {allowed})")
        return self

    @model_validator(mode="after")
    def _signal_names(self) -> DriftConfig:
        # An unknown signal used to pass `config check` and stop `run` at start (DriftMonitor); in
        # signal_params it had no effect at all, nor had a detector that does not watch the signal.
        _unknown_signals("drift.signals: ", set(self.signals), DRIFT_SIGNAL_NAMES)
        _unknown_signals("drift.signal_params: ", set(self.signal_params), EVENT_SIGNAL_NAMES)
        if "signal_params" not in self.model_fields_set:
            # The default (rm_disagreement's one-sided CUSUM) is not the operator's doing: a
            # drift.signals that leaves that signal or that detector out just leaves it unused.
            return self
        for signal, by_name in sorted(self.signal_params.items()):
            if signal == EMBEDDING_SIGNAL:
                listed, where = self.embedding.detectors, "drift.embedding.detectors"
            else:
                listed, where = self.signals.get(signal, []), f"drift.signals.{signal}"
            if by_name and not listed:
                raise ValueError(
                    f"drift.signal_params.{signal}: {signal} is not watched ({where} lists no detector),"
                    " so these parameters would have no effect"
                )
            extra = sorted(set(by_name) - set(listed))
            if extra:
                raise ValueError(
                    f"drift.signal_params.{signal}.{extra[0]}: {where} does not list detector {extra[0]!r}"
                    f" (it lists {', '.join(listed)}), so these parameters would have no effect"
                )
        return self


class RewardUpdateConfig(_Model):
    """When and how a reward-model update runs (train on fresh labels -> gate -> promote)."""

    enabled: bool = True
    trigger_signals: list[str] = Field(
        default_factory=lambda: ["*"],
        description="drift events on these signals request an update ('*': any signal)",
    )
    min_labels: int = Field(40, ge=4, description="fresh human labels from the drifted stream needed before training")
    # The gate's intervals narrow as labels come; an undecided verdict is a request for more of them
    # (its needs_more), so the update runs again when they have arrived instead of leaving the
    # incident's overseer in place for good (monitor/actions/worker.py).
    regates: int = Field(
        2,
        ge=0,
        description="an update the gate left undecided trains and is gated again, on every label then, once the"
        " fresh labels it needs have arrived (the gate's needs_more: at least min_labels more, at most as many"
        " again as it had); at most this many more times, within max_wait_s of the incident (0: never)",
    )
    max_wait_s: float = Field(
        86400.0,
        gt=0,
        description="a request still short of labels after this long (wall clock) is marked failed; one that an"
        " undecided round put back to wait is marked done with that round's verdict",
    )
    holdout_fraction: float = Field(0.3, gt=0, lt=1, description="share of prompts held out for the gate")
    margin: float = Field(0.02, ge=0, description="the candidate must beat the active version by this on new labels")
    max_regression: float = Field(0.02, ge=0, description="allowed drop on the older held-out labels")
    rating_gap: int = Field(1, ge=1, description="minimum rating difference for two ratings to form a pair")
    pairing: Literal["prompt", "absolute"] = Field(
        "absolute",
        description="'prompt': pairs only within a prompt; 'absolute': ratings are on one scale for every prompt"
        " (pointwise targets), so responses to different prompts are paired too (see rm pairs_from_ratings)",
    )
    partners: int = Field(8, ge=1, description="'absolute' pairing: other-prompt partners drawn per rated response")
    lease_s: float = Field(
        300.0, gt=0, description="a running update whose worker sent no heartbeat for this long is taken over"
    )
    train: dict[str, Any] = Field(default_factory=dict, description="training config overrides (rm train --set)")
    start: Literal["active", "fresh"] = Field(
        "active",
        description="the built-in model's candidate trains from a copy of the active version ('active'), or from a"
        " fresh head on the base encoder ('fresh': it starts at 'the longer answer wins', see length_anchor)",
    )
    poll_s: float = Field(5.0, gt=0, description="how often the embedded worker looks for requests")
    # The gate's statistics (monitor/reward/update.py): below min_gate_pairs the intervals (normal
    # approximations on pairs that share responses) are not trusted to promote.
    min_gate_pairs: int = Field(
        100, ge=1, description="new held-out pairs below which the gate never promotes (undecided; bootstrap excepted)"
    )
    gate_confidence: float = Field(
        0.95, gt=0.5, lt=1, description="one-sided confidence of each bound of the gate's intervals"
    )
    # Sensitivity per perturbation kind (monitor/reward/sensitivity.py): the candidate and the active
    # version score the same seeded probe pairs; a significant loss beyond the tolerance refuses.
    sensitivity_pairs: int = Field(
        40, ge=0, le=1000, description="probe pairs per perturbation kind scored at the gate (0: not measured)"
    )
    sensitivity_min_pairs: int = Field(
        20, ge=1, description="probe pairs a kind needs before a loss of sensitivity on it can refuse a candidate"
    )
    max_sensitivity_loss: float | None = Field(
        0.05,
        ge=0,
        le=1,
        description="refuse a candidate whose detection rate on any kind drops by more than this (absolute) with"
        " its lower bound above 0; null: measured and reported, never refuses",
    )
    sensitivity_floor: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="a kind can refuse only where the active version detects it: the lower bound of its"
        " detection rate above this (0.5: better than a coin)",
    )
    sensitivity_seed: int = Field(0, description="seeds the probe set (which texts, which edits)")
    # Ratings alone taught candidates to forget what the gate protects (an inserted sentence makes
    # an answer longer); see monitor/reward/augment.py for why these pairs do not teach to the test.
    perturbation_pairs: int = Field(
        40,
        ge=0,
        le=1000,
        description="per perturbation kind, training pairs of a reviewed answer (rated at least the median) chosen"
        " over a copy made worse, with sentences the gate's probes never use, never of a prompt the gate holds"
        " out or probes (0: ratings only)",
    )
    perturbation_share: float = Field(
        0.25,
        ge=0,
        le=10,
        description="the perturbation pairs in all, at most this share of the ratings' training pairs (with few"
        " labels they would otherwise outnumber the ratings and drown what the update is for)",
    )

    @field_validator("trigger_signals")
    @classmethod
    def _trigger_signal_names(cls, v: list[str]) -> list[str]:
        # A misspelt signal was accepted and silently left its drift events without updates.
        _unknown_signals("", set(v) - {"*"}, EVENT_SIGNAL_NAMES, also="'*' or ")
        return v


class RewardConfig(_Model):
    """Reward-model scoring of the rm channel, and its versioned updates."""

    enabled: bool = True
    models_dir: str = Field("./models", description="registry directory holding one folder per version")
    stream_set: str = Field("default", description="streams scored by one active version")
    batch_size: int = Field(32, gt=0)
    swap_poll_s: float = Field(2.0, gt=0, description="how often the scorer checks for a newly promoted version")
    device: str | None = Field(None, description="torch device; default: cuda when present, else cpu")
    # PyTorch by default: ONNX exports each promoted version once (about 20 s on 2 cores), which
    # replay and simulate pay at the swap (`oversight run` loads it off the ingest thread). ONNX int8
    # scores 2.2x faster on CPU at the same accuracy (bench/encoder.py): `auto` + `int8` to use it.
    backend: Literal["auto", "onnx", "torch"] = Field(
        "torch",
        description="scoring encoder: torch, onnx (ONNX Runtime, exported per version and cached), "
        "or auto (PyTorch on CUDA when present or where precision resolves to bf16, else ONNX Runtime)",
    )
    quantisation: Literal["int8", "fp32"] = Field("fp32", description="ONNX encoder weights for scoring")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="PyTorch encoder weights for scoring on the CPU (auto: bf16 where the CPU multiplies bf16 "
        "natively, AVX512-BF16 or AMX, else fp32)",
    )
    update: RewardUpdateConfig = Field(default_factory=RewardUpdateConfig)
    # Bring your own reward model (monitor/reward/kinds/): which kind a version is, and so how it is
    # scored, is recorded with the version; these say what `rm register` registers by default and
    # how the backlog of a remote kind (scored off the pipeline's thread) is worked.
    kind: Literal["builtin", "hf", "judge", "http"] = Field(
        "builtin", description="default kind of `oversight rm register` (builtin, hf, judge, http)"
    )
    backlog_max: int = Field(
        1000, gt=0, description="remote kinds: scores held in memory waiting for their commit (the rest wait in the DB)"
    )
    backlog_poll_s: float = Field(1.0, gt=0, description="remote kinds: how often the background scorer looks for work")
    backlog_give_up_after: int = Field(
        5,
        ge=0,
        description="an episode whose score failed this many times, each time while other episodes were scored"
        " (a judge that refuses its prompt, an answer that cannot be parsed), leaves the backlog for good"
        " (samples status unscorable, oversight_rm_async_scored_total{outcome=given_up}); 0: retried forever",
    )


class WebhookConfig(_Model):
    url: str | None = Field(None, description="POST target for requests (JSON body, HMAC-SHA256 signature header)")
    secret_file: str | None = Field(
        "/var/run/secrets/oversight/webhook-secret",
        description="file holding the HMAC secret (where the chart mounts it)",
    )
    timeout_s: float = Field(10.0, gt=0, le=3600, description="per attempt: the whole exchange, headers and body")
    max_attempts: int = Field(5, ge=1, le=100)
    backoff_s: float = Field(1.0, gt=0, le=3600, description="first retry delay; doubles each attempt")


class KubernetesJobConfig(_Model):
    templates_dir: str = Field(
        "/etc/oversight-jobs",
        description="Job manifests rm-update-job.yaml, retrain-job.yaml and rm-training-job.yaml (from the chart)",
    )
    namespace: str | None = Field(None, description="default: the pod's own namespace")
    timeout_s: float = Field(
        30.0,
        gt=0,
        le=600,
        description="the whole request to the API server: one that never answers held the action worker for good",
    )


RetrainSink = Literal["kafka", "webhook", "kubernetes", "log"]
UpdateSink = Literal["kafka", "webhook", "kubernetes", "local"]


class ActionsConfig(_Model):
    """Where reward-model update and policy retraining requests go."""

    retrain_sinks: list[RetrainSink] = Field(
        default_factory=lambda: list[RetrainSink](["log"]), description="sinks for policy retraining requests"
    )
    rm_update_sinks: list[UpdateSink] = Field(
        default_factory=lambda: list[UpdateSink](["local"]),
        description="'local': the embedded worker trains, gates and promotes; others hand the request to a trainer",
    )
    rm_training_sinks: list[RetrainSink] = Field(
        default_factory=lambda: list[RetrainSink](["log"]),
        description="sinks for reward-model training requests of a brought-in judge/http kind (its owner retrains it)",
    )
    oversight_window: int = Field(
        200, ge=10, description="scored episodes per span in the reward-hacking comparison and agreement window"
    )
    gauges_duty: float = Field(
        0.1,
        gt=0,
        le=1,
        description="the largest share of time the oversight gauges' refresh may take (its database work"
        " grows with the labels people made): after a refresh of t seconds the next is at least t / gauges_duty"
        " seconds later (and a round, reward.update.poll_s, at the soonest)",
    )
    incident_gap_s: float = Field(
        3600.0, gt=0, description="drift events of a stream closer than this (event time) form one incident"
    )
    incident_timeout_s: float = Field(
        86400.0,
        gt=0,
        description="an open incident with no new drift event for this long (event time) closes; acknowledgement"
        " (`oversight drift rereference`) or a promotion closes it at once",
    )
    max_requests_per_stream_per_day: int = Field(
        3, ge=1, description="new incidents (each one rm_update and one retrain request) per stream per 24 h"
    )
    worker: bool = Field(
        True, description="run the action worker (incidents, updates, requests) inside `oversight run`"
    )
    redeliver_for_s: float = Field(
        86400.0,
        ge=0,
        le=30 * 86400,
        description="a request whose sinks failed only transiently (a receiver down or overloaded, a timeout),"
        " after each sink's own retries, goes back to pending and is sent again with a growing delay"
        " (redeliver_backoff_s), until it is this old (since it was created): then it is failed. 0: failed at once",
    )
    redeliver_backoff_s: float = Field(
        60.0, gt=0, le=3600, description="the delay before a request's first resend; it doubles each time, up to 1 h"
    )
    webhook: WebhookConfig = Field(default_factory=WebhookConfig)
    kubernetes: KubernetesJobConfig = Field(default_factory=KubernetesJobConfig)


class SimulateConfig(_Model):
    """``oversight simulate``: the simulated reviewer pool and the starting reward model."""

    reviewers: int = Field(3, ge=1, le=100, description="simulated reviewers, each with an API token")
    seconds_per_label: float = Field(
        20.0, gt=0, description="mean event-time seconds a reviewer spends on one item (exponential, seeded)"
    )
    answer_key: str = Field(
        "judge_pref",
        pattern=r"^[A-Za-z0-9_]{1,64}$",
        description="metadata key the reviewers answer from (never read by detectors or the reward model)",
    )
    cutpoints: list[float] = Field(
        default_factory=lambda: [1e-4, 1e-3, 1e-2, 0.2],
        min_length=1,
        max_length=6,
        description="answer values at which the rating steps up: rating = 1 + number of cutpoints <= value"
        " (judge_pref is a probability concentrated near 0: these bins are its log-odds)",
    )
    noise: float = Field(0.1, ge=0, le=1, description="probability a rating moves one step up or down")
    seed: int = 0
    round_episodes: int = Field(50, ge=1, description="episodes between reviewer and worker rounds")
    gauges_every: int = Field(2, ge=1, description="rounds between oversight gauge refreshes")
    bootstrap_pairs: str | None = Field(
        "bundled",
        description="pairs the starting reward model is trained on when no version is active ('bundled':"
        " 400 HH-RLHF harmless pairs shipped with the package; null: start without a reward model)",
    )
    bootstrap_train: dict[str, Any] = Field(default_factory=dict, description="training overrides for that model")
    eval_margin: float = Field(
        1.0, ge=0, description="judge log-odds margin below which two responses make no evaluation pair"
    )
    # Canaries (review.canaries): how the simulated reviewers answer them. The simulation's oracle is
    # the canaries table (like the truth key for real items): a reviewer looks up what a canary is.
    sensitivity: dict[str, float] = Field(
        default_factory=dict,
        description="perturbation kind -> probability a simulated reviewer detects it (flags it, rates it 1,"
        " prefers the original of a pair); unset kinds: default_sensitivity",
    )
    default_sensitivity: float = Field(0.7, ge=0, le=1, description="detection probability of unlisted kinds")
    false_flag_rate: float = Field(
        0.05, ge=0, le=1, description="probability a simulated reviewer flags an unperturbed canary original"
    )
    assist_gain: float = Field(
        0.0,
        ge=-1,
        le=1,
        description="added to the detection probability (clipped to [0, 1]) when the item's assistance condition"
        " shows at least one assistant",
    )

    @field_validator("cutpoints")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError("cutpoints must increase")
        return v


class IngestConfig(_Model):
    """``oversight ingest serve``: the HTTP ingest API (``POST /v1/episodes``) and its durable hand-off."""

    host: str = "127.0.0.1"
    port: int = Field(8090, ge=0, le=65535, description="listen port (0: any free port)")
    handoff: Literal["inbox", "kafka"] = Field(
        "inbox",
        description="where accepted records go before the 2xx: the database table inbox (one transaction;"
        " `oversight run` with source.kind=inbox consumes it) or kafka.topic (acks=all, keyed by stream)",
    )
    max_request_bytes: int = Field(
        16 * 1024 * 1024, gt=0, description="request body limit (after gzip) of /v1/episodes and /v1/traces, else 413"
    )
    max_records_per_request: int = Field(10_000, gt=0, description="records per request, else 413")
    max_inflight: int = Field(8, gt=0, description="requests processed at once; more get 429 + Retry-After")
    # A request holds one of max_inflight slots while its body arrives (the slot bounds the memory
    # bodies take): a client that declares a body and never sends it would hold one for ever.
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="the whole request body must arrive within this, else 408 and the connection closed"
        " (POST /v1/episodes and /v1/traces)",
    )
    max_backlog: int = Field(
        100_000, gt=0, description="inbox mode: unconsumed inbox rows above which requests get 429 + Retry-After"
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After of a 429 or 503")
    token_refresh_s: float = Field(
        5.0, ge=0, description="seconds a token list read from the database is used (a revocation takes this long)"
    )
    inbox_retention_s: float = Field(
        3600.0, ge=0, description="consumed inbox rows older than this are deleted by the consumer"
    )
    kafka_timeout_s: float = Field(10.0, gt=0, description="kafka mode: longest wait for the broker's acks")
    inbox_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="inbox mode, PostgreSQL: longest a request's transaction may wait (a lock) or sit idle; then"
        " 503, and the server ends a stopped writer's transaction, whose ordering lock would hold every other",
    )


class MetricsConfig(_Model):
    max_streams: int = Field(50, gt=0, description="streams beyond this share the label _other")


_LOAD: contextvars.ContextVar[tuple[dict[str, Any], dict[str, Any]]] = contextvars.ContextVar("_LOAD", default=({}, {}))


class _DictSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], which: int):
        super().__init__(settings_cls)
        self._which = which

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _LOAD.get()[self._which]


class QualityConfig(_Model):
    """How labels become estimates (monitor/quality)."""

    reliability_weighting: bool = Field(
        False,
        description="weight each reviewer's ratings by an estimated reliability (per-reviewer bias and noise,"
        " fitted by EM on overlapping labels) in the quality estimates and reward-model training data",
    )
    reliability_prior_labels: float = Field(
        5.0,
        gt=0,
        le=1000,
        description="each reviewer's bias and noise are shrunk towards none and the pooled noise with a prior"
        " worth this many overlapping labels",
    )
    # Labels are kept for ever (retention keeps what people made), so estimates over every label
    # grew without end: 200,000 of them took the admin summary 10 s and 280 MB of the review
    # service per computation. A window bounds that by the reviewers' pace, and it is what an
    # estimate of a stream's quality now should cover.
    window_days: float | None = Field(
        30.0,
        gt=0,
        le=36500,
        description="the estimates over all traffic, reviewer agreement, the estimates chart and the quality gauge"
        " cover each stream's last N days of traffic (event time, up to the end of its latest traffic minute,"
        " as retention measures it); null: every label kept",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="OVERSIGHT_",
        env_nested_delimiter="__",
        # "null" in a variable is None, as in the YAML file and --set: otherwise an optional setting
        # whose default is a value (quality.window_days, 30) could not be unset from the environment,
        # which is all a container's configuration may have.
        env_parse_none_str="null",
        extra="forbid",
        validate_assignment=True,
        allow_inf_nan=False,
    )

    dev: bool = Field(False, description="development mode: allows the built-in sampling key")
    database: DatabaseConfig = DatabaseConfig()
    source: SourceConfig = SourceConfig()
    kafka: KafkaConfig = KafkaConfig()
    dead_letter: DeadLetterConfig = DeadLetterConfig()
    sampling: SamplingConfig = SamplingConfig()
    pipeline: PipelineConfig = PipelineConfig()
    inference: InferenceConfig = InferenceConfig()
    server: ServerConfig = ServerConfig()
    metrics: MetricsConfig = MetricsConfig()
    review: ReviewConfig = ReviewConfig()
    drift: DriftConfig = DriftConfig()
    reward: RewardConfig = RewardConfig()
    actions: ActionsConfig = ActionsConfig()
    simulate: SimulateConfig = SimulateConfig()
    ingest: IngestConfig = IngestConfig()
    quality: QualityConfig = QualityConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _DictSource(settings_cls, 1), env_settings, _DictSource(settings_cls, 0))

    @field_validator("database", mode="after")
    @classmethod
    def _db_url(cls, v: DatabaseConfig) -> DatabaseConfig:
        if not v.url.startswith(("sqlite:", *POSTGRES_SCHEMES)):
            raise ValueError("database.url must be sqlite:///PATH or postgresql://...")
        # The driver is the optional `postgres` extra (12.7 MB with its libpq): a missing one fails
        # when the settings are read, naming the extra, not as an import error at the first connection.
        if v.url.startswith(POSTGRES_SCHEMES) and importlib.util.find_spec("psycopg") is None:
            raise ValueError(
                "a PostgreSQL database.url needs its driver, which the default install leaves out:"
                " pip install 'oversight-monitor[postgres]'"
            )
        return v

    def check_secrets(self) -> None:
        """Outside dev mode, refuse a secret that is set but guessable (``load_settings`` calls
        this, so every command fails closed at start, ``config check`` included). Dev mode
        accepts anything: it already allows the built-in keys, which are public."""
        if self.dev:
            return
        for name, secret in (("sampling.key", self.sampling.key), ("review.secret_key", self.review.secret_key)):
            value = secret.get_secret_value() if secret is not None else ""
            why = secret_weakness(value) if value else None
            if why is not None:
                raise ConfigError(f"{name} {why}: use a long random secret (e.g. the output of `openssl rand -hex 32`)")

    def sampling_key(self) -> bytes:
        """The keyed-hash secret; the built-in one only in dev mode."""
        if self.sampling.key is not None and self.sampling.key.get_secret_value():
            key = self.sampling.key.get_secret_value()
            if key == DEV_SAMPLING_KEY and not self.dev:
                raise ConfigError("sampling.key is the built-in dev key; set a secret or run with --dev")
            self.check_secrets()
            return key.encode()
        if self.dev:
            return DEV_SAMPLING_KEY.encode()
        raise ConfigError(
            "sampling.key is not set: set OVERSIGHT_SAMPLING__KEY to a secret "
            "(a policy that can predict the key can predict which episodes are reviewed), or run with --dev"
        )

    def review_secret(self) -> bytes:
        """The key that signs CSRF tokens; a built-in one only in dev mode."""
        key = self.review.secret_key.get_secret_value() if self.review.secret_key is not None else ""
        if key and key != DEV_REVIEW_SECRET:
            self.check_secrets()
            return key.encode()
        if self.dev:
            return DEV_REVIEW_SECRET.encode()
        raise ConfigError(
            "review.secret_key is not set (or is the built-in dev value): set OVERSIGHT_REVIEW__SECRET_KEY "
            "to a long random secret, or run with --dev"
        )

    def redacted(self) -> dict[str, Any]:
        """The settings as ``config show`` prints them: secrets (``SecretStr``) masked, and every URL's
        credentials (``database.url``'s password, a webhook's ``user:password@`` or ``?token=``)
        replaced. A plain dump printed the database password that the chart keeps in a Secret."""
        shown: dict[str, Any] = _redact_urls(self.model_dump(mode="json"))
        return shown

    def sampling_policy(self) -> SamplingPolicy:
        from sampling import ChannelPolicy, SamplingPolicy

        def pol(c: ChannelConfig, o: ChannelOverride | None = None) -> ChannelPolicy:
            rate, floor, mx = c.rate, c.floor, c.max_rate
            if o is not None:
                rate = o.rate if o.rate is not None else rate
                floor = o.floor if o.floor is not None else floor
                mx = o.max_rate if o.max_rate is not None else mx
            return ChannelPolicy(rate=rate, floor=floor, max_rate=mx)

        s = self.sampling
        base = {"human": s.human, "rm": s.rm, "drift": s.drift}
        streams = {}
        budgets: dict[str, float] = {}
        if s.human_budget_per_hour is not None:
            budgets["*"] = s.human_budget_per_hour
        for name, sc in s.streams.items():
            streams[name] = {ch: pol(base[ch], getattr(sc, ch)) for ch in base}
            if sc.human_budget_per_hour is not None:
                budgets[name] = sc.human_budget_per_hour
        try:
            return SamplingPolicy(
                channels={ch: pol(c) for ch, c in base.items()},
                streams=streams,
                budgets=budgets,
                budget_window_s=s.budget_window_s,
                budget_smoothing=s.budget_smoothing,
            )
        except ValueError as e:
            raise ConfigError(f"invalid sampling configuration: {e}") from None


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: the safe loader keeps the
    last one silently, so a setting written twice in a long file would change without a word."""


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool):
            continue  # a list or a mapping as a key: construct_mapping refuses it (unhashable)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def load_yaml(text: str) -> Any:
    """YAML as ``yaml.safe_load`` reads it, except that a key given twice in one mapping, and nesting
    too deep for the parser (a RecursionError otherwise), raise ``yaml.YAMLError`` with a message.

    >>> load_yaml("a: 1\\nb: {c: 2}")
    {'a': 1, 'b': {'c': 2}}
    >>> try:
    ...     load_yaml("a: 1\\na: 2")
    ... except yaml.YAMLError as e:
    ...     print(str(e).splitlines()[0])
    the key 'a' is given twice in one mapping
    """
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``KEY=VALUE``, the value read as YAML (``[a, b]`` a list, ``0.05`` a number), or
    ``KEY:=VALUE``, the value the string as given.

    >>> parse_override("sampling.human.rate=0.05")
    (['sampling', 'human', 'rate'], 0.05)
    >>> parse_override("source.path:=2024-01-01")
    (['source', 'path'], '2024-01-01')
    """
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    key, _, raw = item.partition("=")
    literal = key.endswith(":")
    key = key.removesuffix(":")
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"--set has an empty key segment in {key!r}")
    if literal:
        return parts, raw
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def literal_override(key: str, value: str) -> str:
    """The override that sets ``key`` to the string ``value`` as given: what a command's own flags
    (``--db``, ``--input``, a folder) use. Read as YAML, a file named ``2024-01-01`` was a date,
    ``a: b.jsonl`` a mapping and ``sqlite:///:memory:`` a mapping too, each refused as "Input should
    be a valid string", and one named ``null`` no path at all.

    >>> parse_override(literal_override("source.path", "a: b.jsonl"))
    (['source', 'path'], 'a: b.jsonl')
    """
    return f"{key}:={value}"


def _nest(overrides: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in overrides:
        parts, value = parse_override(item)
        cur = out
        for p in parts[:-1]:
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {'.'.join(parts)} conflicts with an earlier --set")
            cur = nxt
        cur[parts[-1]] = value
    return out


def load_settings(config_file: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Settings:
    """Build the effective settings, raising :class:`ConfigError` with a readable message."""
    from pydantic import ValidationError

    file_data = _read_config_file(Path(config_file)) if config_file is not None else {}
    set_data = _nest(overrides or [])
    _check_environment()
    token = _LOAD.set((file_data, set_data))
    try:
        settings = Settings()
        settings.check_secrets()
        return settings
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {loc}: {msg}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
    except SettingsError as e:  # an OVERSIGHT_ variable holding a complex value that is not JSON
        raise ConfigError(f"invalid configuration:\n  {e}: set it to JSON (or use --set / the config file)") from None
    finally:
        _LOAD.reset(token)


def _read_config_file(path: Path) -> dict[str, Any]:
    """The mapping a YAML configuration file holds (empty for an empty file)."""
    try:
        loaded = load_yaml(read_text_limited(path))
    except FileTooLarge:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes: not a configuration") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:  # a binary file, or a text in another encoding
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    strange = [k for k in loaded if not isinstance(k, str)]
    if strange:  # every top-level key names a section; 1: 2 would fail as a keyword argument
        raise ConfigError(f"config file {path}: top-level key {strange[0]!r} is not a setting's name")
    return loaded


def _check_environment() -> None:
    """Refuse an ``OVERSIGHT_`` variable that names no section, or a key under a plain value: a typo
    would otherwise be ignored. In any case of letters, as pydantic-settings reads them
    (``oversight_dev`` sets ``dev``, so ``oversight_bogus`` must be refused like ``OVERSIGHT_BOGUS``)."""
    known = {name.upper(): f.annotation for name, f in Settings.model_fields.items()}
    for var in os.environ:
        if not var.upper().startswith("OVERSIGHT_"):
            continue
        head, *below = var[len("OVERSIGHT_") :].upper().split("__")
        if head not in known:
            raise ConfigError(f"invalid configuration:\n  environment variable {var}: unknown key")
        section = known[head]
        # A key below a plain value (OVERSIGHT_DEV__X) is dropped by the reader, not refused.
        if below and not (isinstance(section, type) and issubclass(section, BaseModel)):
            raise ConfigError(
                f"invalid configuration:\n  environment variable {var}: {head.lower()} is a value, not a section"
            )


def settings_json_schema(reserved: dict[str, str] | None = None) -> dict[str, Any]:
    """JSON schema of a configuration file (what ``--config`` reads), for tools that check one before the service
    starts: the Helm chart's values.schema.json (``make schema``) rejects a typo under ``config:`` at render time
    instead of a crash-looping pod.

    Self-contained (references inlined, so any draft-07 validator reads it) and closed like the models
    (``extra="forbid"`` makes pydantic emit ``additionalProperties: false`` for every section). Titles and
    defaults are dropped: they do not validate anything, and defaults would make the schema change with every new
    default. Secrets (``SecretStr``) are left out: they come from the environment or a secret store, never from a
    file someone commits. Each dotted key of ``reserved`` keeps its place but accepts any value and carries only
    the given description, so a tool can refuse it with a message of its own (the chart's render says which value
    to set instead); a reserved key that is not a setting is an error, so such a list cannot go stale. Cross-field
    rules (a floor above max_rate, a short review.secret_key) stay with the service, which checks them at start.
    """
    raw = Settings.model_json_schema()
    defs: dict[str, Any] = raw.get("$defs", {})
    schema: dict[str, Any] = _inline_schema(raw, defs, ())
    for dotted, description in (reserved or {}).items():
        _reserve_key(schema, raw, defs, dotted, description)
    return schema


def _inline_schema(node: Any, defs: dict[str, Any], seen: tuple[str, ...]) -> Any:
    """``node`` with every ``$ref`` replaced by its definition, titles, defaults and secrets dropped
    (see :func:`settings_json_schema`); ``seen`` holds the definitions being inlined, to refuse a loop."""
    if isinstance(node, list):
        return [_inline_schema(v, defs, seen) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        if name in seen:
            raise ValueError(f"settings model {name} refers to itself and cannot be inlined")
        out.update(_inline_schema(defs[name], defs, (*seen, name)))
    for key, value in node.items():
        if key in ("$ref", "$defs", "title", "default"):
            continue
        if key == "properties":
            # Property names are setting names, not schema keywords: never filter them as keywords.
            out[key] = {
                name: _inline_schema(sub, defs, seen) for name, sub in value.items() if not _is_secret_schema(sub)
            }
        elif key == "required":
            out[key] = [r for r in value if not _is_secret_schema(node.get("properties", {}).get(r, {}))]
        else:
            out[key] = _inline_schema(value, defs, seen)
    return out


def _reserve_key(
    schema: dict[str, Any], raw: dict[str, Any], defs: dict[str, Any], dotted: str, description: str
) -> None:
    """Replace the setting at ``dotted`` in ``schema`` by one that accepts anything and only says
    ``description``; ``raw`` (the schema before inlining) tells whether it is a setting at all."""
    *parents, leaf = dotted.split(".")
    if _schema_at(raw, defs, dotted) is None:
        raise ValueError(f"reserved key {dotted!r} is not a setting")
    section = schema
    for part in parents:
        section = _object_branch(section)["properties"][part]
    _object_branch(section)["properties"][leaf] = {"description": description}


def _object_branch(node: dict[str, Any]) -> dict[str, Any]:
    # An optional section is anyOf [section, null]: its keys live in the branch that has properties.
    return next(b for b in [node, *node.get("anyOf", [])] if "properties" in b)


def _is_secret_schema(node: dict[str, Any]) -> bool:
    # pydantic renders SecretStr as a string of format "password" (inside anyOf when optional).
    return any(b.get("format") == "password" for b in node.get("anyOf", [node]) if isinstance(b, dict))


def _schema_at(node: dict[str, Any], defs: dict[str, Any], dotted: str) -> dict[str, Any] | None:
    """The schema of the dotted setting below ``node`` (through references and optional sections), or None."""
    current: dict[str, Any] | None = node
    for part in dotted.split("."):
        if current is None:
            return None
        branches = [current, *current.get("anyOf", [])]
        resolved = [defs.get(b["$ref"].rsplit("/", 1)[-1], {}) if "$ref" in b else b for b in branches]
        current = next((b["properties"][part] for b in resolved if part in b.get("properties", {})), None)
    return current
