"""Table definitions (SQLAlchemy Core). Migrations in ``migrations/`` create them."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")

# Sampled episodes only (any channel); the bulk of traffic is counted, not kept.
episodes = sa.Table(
    "episodes",
    metadata,
    sa.Column("episode_id", sa.String(128), primary_key=True),
    sa.Column("stream", sa.String(128), nullable=False),
    sa.Column("model", sa.String(256)),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("response", sa.Text, nullable=False),
    sa.Column("metadata", JsonType),
    sa.Column("source", sa.String(512), nullable=False),
    sa.Column("position", sa.String(64), nullable=False),
    sa.Column("ingested_at", sa.Float, nullable=False),
    # Schema v2's conversation (NULL for v1); prompt and response hold its flattening (migration 0006).
    sa.Column("messages", JsonType),
    sa.Index("ix_episodes_stream_ts", "stream", "ts"),
)

# One row per (episode, channel) that sampled it; the human rows are the review queue.
samples = sa.Table(
    "samples",
    metadata,
    sa.Column("episode_id", sa.String(128), sa.ForeignKey("episodes.episode_id"), primary_key=True),
    sa.Column("channel", sa.String(16), primary_key=True),
    sa.Column("stream", sa.String(128), nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("inclusion_probability", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("ix_samples_stream_channel_ts", "stream", "channel", "ts"),
    sa.Index("ix_samples_channel_status", "channel", "status"),
)

# Results of the inference workers that run as a process of their own (`oversight infer`,
# ``inference.external``): a row claims a waiting sample's model work for a worker until
# ``claimed_until``, then holds the result (``done``) until the pipeline feeds it and marks the
# sample, in one transaction that also deletes the row. So the table holds the backlog in flight,
# never history, and a result is a cache: the effects happen once, in the pipeline's commit.
inference_results = sa.Table(
    "inference_results",
    metadata,
    sa.Column("episode_id", sa.String(128), primary_key=True),
    sa.Column("stage", sa.String(16), primary_key=True),  # embedding | score
    sa.Column("worker", sa.String(128), nullable=False),
    sa.Column("claimed_until", sa.Float, nullable=False),
    sa.Column("done", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("version", sa.String(128)),  # the reward-model version of a score
    sa.Column("score", sa.Float),
    sa.Column("vector", sa.LargeBinary),  # float32, little-endian
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("ix_inference_results_stage_done", "stage", "done"),
)

# Episodes per stream per minute of event time: the population size N that
# Horvitz-Thompson estimates over all traffic need.
traffic = sa.Table(
    "traffic",
    metadata,
    sa.Column("stream", sa.String(128), primary_key=True),
    sa.Column("bucket", sa.BigInteger, primary_key=True),
    sa.Column("episodes", sa.BigInteger, nullable=False),
)

# Next offset to consume per source partition, written in the same
# transaction as the rows it produced: the database, not Kafka, is the
# source of truth for what has been processed.
offsets = sa.Table(
    "offsets",
    metadata,
    sa.Column("source", sa.String(255), primary_key=True),
    sa.Column("partition", sa.Integer, primary_key=True),
    sa.Column("next_offset", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    # The batch that moved it last (migration 0015): a retried commit recognises its own.
    sa.Column("commit_id", sa.String(32), nullable=True),
)

# Per-stream state checkpoint (sampling clock, budget, boosts; detectors later).
stream_state = sa.Table(
    "stream_state",
    metadata,
    sa.Column("stream", sa.String(128), primary_key=True),
    sa.Column("component", sa.String(64), primary_key=True),
    sa.Column("state", JsonType, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

# The service's own keyed state, which belongs to no stream (migration 0005): the input index
# of a non-Kafka source (``input_index:<source name>``), the action worker's cursor
# (``actions:cursor``), the simulation's Kafka feed (``simulate:kafka_feed``) and the write
# probe (``health:write_probe``). A key is unbounded text: a source's name is an absolute path.
internal_state = sa.Table(
    "internal_state",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("state", JsonType, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

# -- human review (migration 0002) --------------------------------------------

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("password_hash", sa.String(255), nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.Float, nullable=False),
)

# Only a hash of the session token is stored: a database leak yields no live sessions.
auth_sessions = sa.Table(
    "auth_sessions",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("csrf", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
)

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
)

login_failures = sa.Table(
    "login_failures",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("address", sa.String(64), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Index("ix_login_failures_name_at", "name", "at"),
    sa.Index("ix_login_failures_address_at", "address", "at"),
)

# One row per (human-sampled episode, reviewer slot); ``fence`` grows with every claim so a
# submit under an old lease is refused.
review_tasks = sa.Table(
    "review_tasks",
    metadata,
    sa.Column("episode_id", sa.String(128), sa.ForeignKey("episodes.episode_id"), primary_key=True),
    sa.Column("slot", sa.Integer, primary_key=True),
    sa.Column("stream", sa.String(128), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("lease_user_id", sa.Integer),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("fence", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("done_at", sa.Float),
    # The stream's guidelines version when the item was last claimed (migration 0010); the
    # label copies it, so it records what the reviewer was told, not what was current later.
    sa.Column("guidelines_version", sa.Integer),
    sa.Index("ix_review_tasks_status_created", "status", "created_at"),
    sa.Index("ix_review_tasks_stream_status", "stream", "status"),
)

labels = sa.Table(
    "labels",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("episode_id", sa.String(128), sa.ForeignKey("episodes.episode_id"), nullable=False),
    sa.Column("slot", sa.Integer, nullable=False),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("stream", sa.String(128), nullable=False),
    sa.Column("skipped", sa.Boolean, nullable=False),
    sa.Column("skip_reason", sa.String(500)),
    sa.Column("rating", sa.Integer),
    sa.Column("flags", JsonType, nullable=False),
    sa.Column("critique", sa.Text, nullable=False),
    sa.Column("preference", sa.String(16)),
    sa.Column("time_spent_ms", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    # What was rated in a conversation (schema v2): final_turn or conversation; NULL for a v1
    # episode, a skip, and labels from before migration 0008.
    sa.Column("rated", sa.String(16)),
    # The stream's guidelines version in effect when the item was claimed (migration 0010);
    # NULL when the stream had none, and for labels from before.
    sa.Column("guidelines_version", sa.Integer),
    # The assistance experiment and the condition the reviewer labelled under (migration 0011);
    # NULL when no experiment ran, and for labels from before.
    sa.Column("assist_experiment", sa.String(32)),
    sa.Column("assist_condition", sa.String(32)),
    sa.UniqueConstraint("episode_id", "user_id", name="uq_labels_episode_user"),
    sa.Index("ix_labels_stream_created", "stream", "created_at"),
    # The reviewer's labels: her claim number (canaries), her day's count (migration 0018).
    sa.Index("ix_labels_user_created", "user_id", "created_at"),
)

# Reviewer guidelines per stream (migration 0010): every save is a new version, never an update.
guidelines = sa.Table(
    "guidelines",
    metadata,
    sa.Column("stream", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("markdown", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("created_by", sa.String(64), nullable=False),
)

# -- canaries (migration 0011) -------------------------------------------------------

# Perturbed copies of stored episodes, mixed blind into one reviewer's queue (monitor/review/canary.py).
# Their own tables, never ``review_tasks``/``labels``: estimates, reward-model training data, drift
# signals and agreement statistics read those and so never see a canary, with no filter to forget.
# ``id`` is what the reviewer sees (shaped like the stream's episode ids); ``episode_id`` is the
# source, never shown. ``presentation``: original (unchanged), perturbed, or pair (original as
# ``response``, perturbed as ``alternative``, order ``alternative_first``). The lease columns work
# as in ``review_tasks``.
canaries = sa.Table(
    "canaries",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("episode_id", sa.String(128), sa.ForeignKey("episodes.episode_id"), nullable=False),
    sa.Column("stream", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("presentation", sa.String(16), nullable=False),
    sa.Column("perturbed", sa.Text, nullable=False),
    sa.Column("detail", JsonType, nullable=False),
    sa.Column("alternative_first", sa.Boolean, nullable=False),
    sa.Column("shown_ts", sa.Float, nullable=False),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("fence", sa.Integer, nullable=False, server_default="0"),
    sa.Column("guidelines_version", sa.Integer),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("done_at", sa.Float),
    sa.Index("ix_canaries_user_status", "user_id", "status"),
)

# A reviewer's answer on a canary: the fields of ``labels`` plus what the quality measures need.
canary_labels = sa.Table(
    "canary_labels",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("canary_id", sa.String(128), sa.ForeignKey("canaries.id"), nullable=False),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("episode_id", sa.String(128), nullable=False),
    sa.Column("stream", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("presentation", sa.String(16), nullable=False),
    sa.Column("skipped", sa.Boolean, nullable=False),
    sa.Column("skip_reason", sa.String(500)),
    sa.Column("rating", sa.Integer),
    sa.Column("flags", JsonType, nullable=False),
    sa.Column("critique", sa.Text, nullable=False),
    sa.Column("preference", sa.String(16)),
    sa.Column("time_spent_ms", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("rated", sa.String(16)),
    sa.Column("guidelines_version", sa.Integer),
    sa.Column("assist_experiment", sa.String(32)),
    sa.Column("assist_condition", sa.String(32)),
    sa.UniqueConstraint("canary_id", "user_id", name="uq_canary_labels_canary_user"),
    sa.Index("ix_canary_labels_user_created", "user_id", "created_at"),
)

# -- drift detection (migration 0003) -----------------------------------------

drift_events = sa.Table(
    "drift_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("stream", sa.String(128), nullable=False),
    sa.Column("signal", sa.String(64), nullable=False),
    sa.Column("detector", sa.String(32), nullable=False),
    sa.Column("statistic", sa.Float),
    sa.Column("threshold", sa.Float),
    sa.Column("p_val", sa.Float),
    sa.Column("episode_id", sa.String(128), nullable=False),
    sa.Column("input_index", sa.BigInteger, nullable=False),
    sa.Column("event_ts", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("published_at", sa.Float),
    # What the detector measured (migration 0009): shift and interval, window, n, bucket; or
    # statistic, threshold and ERT. NULL before 0009.
    sa.Column("detail", JsonType),
    sa.UniqueConstraint("stream", "signal", "episode_id", name="uq_drift_events_stream_signal_episode"),
    sa.Index("ix_drift_events_stream_created", "stream", "created_at"),
    # The outbox's read (migration 0019): only the rows still to publish are in it.
    sa.Index(
        "ix_drift_events_unpublished",
        "id",
        sqlite_where=sa.text("published_at IS NULL"),
        postgresql_where=sa.text("published_at IS NULL"),
    ),
)

# Re-reference requests and what became of them: the audit trail of acknowledged changes.
drift_audit = sa.Table(
    "drift_audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("stream", sa.String(128), nullable=False),
    sa.Column("signal", sa.String(64)),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("reason", sa.String(500), nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("applied_at", sa.Float),
)

# -- reward model and actions (migration 0004) ---------------------------------

# Every reward-model version ever trained: its directory, lineage, data window and metrics.
rm_versions = sa.Table(
    "rm_versions",
    metadata,
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("parent", sa.String(64)),
    sa.Column("path", sa.String(1024), nullable=False),
    # candidate -> active | rejected | undecided; active -> retired when another is promoted
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("data_window", JsonType, nullable=False),
    sa.Column("metrics", JsonType, nullable=False),
    sa.Column("gate", JsonType),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("promoted_at", sa.Float),
)

# Exactly one active version per stream set (one row per set; the generation orders swaps).
rm_active = sa.Table(
    "rm_active",
    metadata,
    sa.Column("stream_set", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(64), sa.ForeignKey("rm_versions.version"), nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

# One score per episode and version: the primary key makes re-scoring after a crash a no-op.
rm_scores = sa.Table(
    "rm_scores",
    metadata,
    sa.Column("episode_id", sa.String(128), sa.ForeignKey("episodes.episode_id"), primary_key=True),
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("stream", sa.String(128), nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("published_at", sa.Float),
    sa.Index("ix_rm_scores_stream_ts", "stream", "ts"),
    # The oversight gauges' windows of the active version (migration 0017).
    sa.Index("ix_rm_scores_version_stream_ts", "version", "stream", "ts"),
    # The outbox's read in commit order (migration 0019): only the rows still to publish are in it.
    sa.Index(
        "ix_rm_scores_unpublished",
        "created_at",
        "episode_id",
        "version",
        sqlite_where=sa.text("published_at IS NULL"),
        postgresql_where=sa.text("published_at IS NULL"),
    ),
)

# Reward-model update and policy retraining requests: one per drift incident (the key), with
# the state that the admin view shows and the sinks' delivery outcome.
action_requests = sa.Table(
    "action_requests",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # rm_update | retrain
    sa.Column("key", sa.String(255), nullable=False),
    sa.Column("stream", sa.String(128)),
    sa.Column("state", sa.String(16), nullable=False),  # pending, running, sent, done, failed, rejected
    sa.Column("payload", JsonType, nullable=False),
    sa.Column("result", JsonType),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.String(1000)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.UniqueConstraint("kind", "key", name="uq_action_requests_kind_key"),
)

# -- HTTP ingest (migration 0007) ---------------------------------------------------

# Records accepted by ``POST /v1/episodes`` in the embedded hand-off, in the order they were
# committed (id): the inbox source consumes them by id, its position in ``offsets`` (source
# "inbox"). AUTOINCREMENT on SQLite: a deleted highest id is never reused (a reused id below the
# consumer's position would never be read). (stream, episode_id) UNIQUE: a retried request is a
# no-op, and no stream's id makes another stream's record a "duplicate" (migration 0016).
inbox = sa.Table(
    "inbox",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("episode_id", sa.String(128), nullable=False),
    sa.Column("stream", sa.String(128), nullable=False),
    sa.Column("raw", sa.LargeBinary, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.UniqueConstraint("stream", "episode_id", name="uq_inbox_stream_episode"),
    sqlite_autoincrement=True,
)

# Bearer tokens of the ingest API (never the reviewers' accounts): only a SHA-256 of each token
# is kept; ``streams`` null means every stream.
ingest_tokens = sa.Table(
    "ingest_tokens",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("streams", JsonType),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
)

# -- adjudications (migration 0012) --------------------------------------------------

# An administrator's final label of an item whose reviewers disagreed (monitor/review/adjudication.py).
# Append-only: a later row for the same episode supersedes the earlier one, which stays as the
# audit trail. ``label_ids``: the labels the adjudicator was shown; ``reasons``: why they
# disagreed (rating, flags, preference). Estimates and training data use the newest row of an
# episode in place of its labels (monitor/quality/adjudication.py); agreement statistics do not.
adjudications = sa.Table(
    "adjudications",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("episode_id", sa.String(128), sa.ForeignKey("episodes.episode_id"), nullable=False),
    sa.Column("stream", sa.String(128), nullable=False),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("rating", sa.Integer, nullable=False),
    sa.Column("flags", JsonType, nullable=False),
    sa.Column("preference", sa.String(16)),
    sa.Column("note", sa.Text, nullable=False),
    sa.Column("label_ids", JsonType, nullable=False),
    sa.Column("reasons", JsonType, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("ix_adjudications_episode", "episode_id"),
    sa.Index("ix_adjudications_stream_created", "stream", "created_at"),
)
