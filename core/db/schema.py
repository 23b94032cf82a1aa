"""The database schema as SQLAlchemy Core tables. Alembic migrations are the only way it changes;
``tests/integration/test_migrations.py`` checks the migrations produce exactly this."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSON, JSONB, UUID

metadata = MetaData()

NOW = text("now()")

batches = Table(
    "batches",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("tenant", Text, nullable=False, server_default="default"),
    Column("size", Integer, nullable=False),
    Column("callback_url", Text),
    Column("metadata", JSONB),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("tenant", Text, nullable=False, server_default="default"),
    Column("status", Text, nullable=False),
    Column("current_stage", Text),
    Column("progress_percentage", Float, nullable=False, server_default="0"),
    Column("generation", Integer, nullable=False, server_default="1"),
    Column("request", JSONB, nullable=False),
    # Documents written once and read whole are json: kept as sent, not parsed (0009).
    Column("result", JSON),
    Column("error_message", Text),
    Column("error", JSONB),
    Column("callback_url", Text),
    Column("callback_events", JSONB),
    Column("metadata", JSONB),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("started_at", DateTime(timezone=True)),
    Column("completed_at", DateTime(timezone=True)),
    Column("batch_id", UUID(as_uuid=True), ForeignKey("batches.id", ondelete="SET NULL")),
    Index("ix_jobs_tenant_created", "tenant", "created_at", "id"),
    # Not (status, updated_at): a progress update changes only unindexed columns, so it
    # is a HOT update (no index writes) while the page has room (fillfactor 80, 0006).
    Index("ix_jobs_status", "status"),
    Index("ix_jobs_batch", "batch_id"),
    # The run-time estimate reads the 50 most recently completed jobs (0007).
    Index(
        "ix_jobs_completed_recent",
        "completed_at",
        postgresql_where=text("status = 'completed' AND started_at IS NOT NULL"),
    ),
)

stage_runs = Table(
    "stage_runs",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("job_id", UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("stage", Text, nullable=False),
    Column("generation", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("status", Text, nullable=False),
    Column("output", JSON),
    Column("error", Text),
    Column("error_type", Text),
    Column("provider", Text),
    Column("model", Text),
    Column("prompt_tokens", Integer, nullable=False, server_default="0"),
    Column("completion_tokens", Integer, nullable=False, server_default="0"),
    Column("cost", Float, nullable=False, server_default="0"),
    Column("lease_until", DateTime(timezone=True)),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("finished_at", DateTime(timezone=True)),
    Index("ix_stage_runs_job", "job_id", "stage", "generation"),
    # Exactly one successful output per (job, stage, generation), whatever is redelivered.
    Index(
        "ux_stage_runs_succeeded",
        "job_id",
        "stage",
        "generation",
        unique=True,
        postgresql_where=text("status = 'succeeded'"),
    ),
    # At most one attempt running: two racing claims of a stage cannot both win.
    Index(
        "ux_stage_runs_running",
        "job_id",
        "stage",
        "generation",
        unique=True,
        postgresql_where=text("status = 'running'"),
    ),
)

job_events = Table(
    "job_events",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("job_id", UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("generation", Integer, nullable=False),
    Column("stage", Text, nullable=False),
    Column("stage_number", Integer, nullable=False),
    Column("total_stages", Integer, nullable=False),
    Column("progress_percentage", Float, nullable=False),
    Column("status", Text, nullable=False),
    Column("details", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Index("ix_job_events_job", "job_id", "id"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("topic", Text, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("attributes", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Index("ix_outbox_created", "created_at"),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("job_id", UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("tenant", Text, nullable=False, server_default="default"),
    Column("event_id", Text, nullable=False, unique=True),
    Column("event_type", Text, nullable=False),
    Column("url", Text, nullable=False),
    Column("payload", JSON, nullable=False),
    Column("status", Text, nullable=False),
    Column("attempt_count", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("last_status_code", Integer),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("delivered_at", DateTime(timezone=True)),
    # When the event happened: deliveries of one job are sent in this order.
    Column("occurred_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    # What the next attempt is: "schedule", "manual" (redeliver) or "recover" (bulk).
    Column("trigger", Text, nullable=False, server_default="schedule"),
    Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    Index("ix_webhook_deliveries_job", "job_id"),
)

webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column(
        "delivery_id",
        UUID(as_uuid=True),
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("attempt", Integer, nullable=False),
    Column("trigger", Text, nullable=False, server_default="schedule"),
    Column("url", Text, nullable=False),
    Column("status_code", Integer),
    Column("latency_ms", Float),
    Column("error", Text),
    Column("response_excerpt", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Index("ix_webhook_attempts_delivery", "delivery_id", "attempt"),
)

webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("tenant", Text, nullable=False, server_default="default"),
    Column("url", Text, nullable=False),
    Column("status", Text, nullable=False, server_default="enabled"),
    Column("consecutive_failures", Integer, nullable=False, server_default="0"),
    Column("failing_since", DateTime(timezone=True)),
    Column("disabled_at", DateTime(timezone=True)),
    Column("disabled_reason", Text),
    # Per-endpoint signing secret (else WEBHOOK_SECRET); the previous one signs too until
    # previous_secret_expires_at, so receivers can rotate without missing a beat.
    Column("secret", Text),
    Column("previous_secret", Text),
    Column("previous_secret_expires_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Index("ux_webhook_endpoints_tenant_url", "tenant", "url", unique=True),
)

broker_subscriptions = Table(
    "broker_subscriptions",
    metadata,
    Column("name", Text, primary_key=True),
    Column("topic", Text, nullable=False),
    Column("max_delivery_attempts", Integer, nullable=False, server_default="5"),
    Column("dead_letter_topic", Text),
    Column("ack_deadline_seconds", Float, nullable=False, server_default="60"),
    Column("min_backoff_seconds", Float, nullable=False, server_default="1"),
    Column("max_backoff_seconds", Float, nullable=False, server_default="60"),
    Index("ix_broker_subscriptions_topic", "topic"),
)

broker_messages = Table(
    "broker_messages",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("subscription", Text, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("attributes", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("available_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Index("ix_broker_messages_ready", "subscription", "available_at", "id"),
)

# Submission idempotency: a repeated Idempotency-Key (same tenant, within 24 h) returns
# the job it created; ``request_hash`` tells a retry from a different request.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("tenant", Text, primary_key=True),
    Column("key", Text, primary_key=True),
    Column("request_hash", Text, nullable=False),
    Column("job_id", UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Index("ix_idempotency_keys_created", "created_at"),
)

# Who replayed, cancelled or re-drove a job, when, why, and the generation it produced.
job_operations = Table(
    "job_operations",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("job_id", UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("action", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("reason", Text),
    Column("from_stage", Text),
    Column("previous_status", Text),
    Column("generation", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Index("ix_job_operations_job", "job_id", "id"),
)

# Stage messages that reached a dead-letter topic, and what the dead-letter consumer did.
dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("job_id", UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("stage", Text, nullable=False),
    Column("generation", Integer, nullable=False),
    Column("subscription", Text, nullable=False),
    Column("message_id", Text),
    Column("attempts", Integer),
    Column("outcome", Text, nullable=False),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("replayed_at", DateTime(timezone=True)),
    Index("ix_dead_letters_created", "created_at"),
    Index("ix_dead_letters_job", "job_id"),
)

# API keys: only a SHA-256 of the key is stored; ``prefix`` (the first characters) lets an
# operator recognise a key in ``blogpipe keys list`` without being able to use it.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Text, primary_key=True),
    Column("tenant", Text, nullable=False),
    Column("name", Text),
    Column("prefix", Text, nullable=False),
    Column("key_hash", Text, nullable=False),
    Column("scopes", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("revoked_at", DateTime(timezone=True)),
    Column("last_used_at", DateTime(timezone=True)),
    Index("ux_api_keys_hash", "key_hash", unique=True),
    Index("ix_api_keys_tenant", "tenant", "created_at"),
)

# Operator actions (replay, cancel, redeliver, key changes): who, when, what, on what.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("occurred_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("tenant", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("key_id", Text),
    Column("action", Text, nullable=False),
    Column("target", Text, nullable=False),
    Column("details", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Index("ix_audit_log_tenant", "tenant", "occurred_at"),
)
