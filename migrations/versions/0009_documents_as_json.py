"""Stage outputs, job results and webhook payloads are stored as json, not jsonb

These documents are written once, read whole and never queried inside: jsonb bought
nothing for them and cost the most PostgreSQL CPU of any part of a job. Each is 5-20 KB,
and parsing it into jsonb's binary form (de-escaping every string, sorting every
object's keys) was 18% of PostgreSQL's CPU in the concurrency benchmark, then turning
it back into text on every read cost more. json keeps the text as sent, checked for
validity only, and gives it back unchanged: the key order the stages wrote, and a
webhook's stored payload byte for byte as it was signed and sent.

The rewrite takes an ACCESS EXCLUSIVE lock on jobs, stage_runs and webhook_deliveries
while it copies them: on a large database, run it in a maintenance window (or run
``blogpipe cleanup`` first). Code from before this revision still works against it and
the other way round: json and jsonb convert to each other on assignment. The columns
are set to lz4 compression again (0005), which a change of type resets.

Revision ID: 0009_documents_as_json
Revises: 0008_broker_notify_available
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009_documents_as_json"
down_revision: str | Sequence[str] | None = "0008_broker_notify_available"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    ("jobs", "result"),
    ("stage_runs", "output"),
    ("webhook_deliveries", "payload"),
)


def _retype(kind: str) -> None:
    for table, column in COLUMNS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE {kind} USING {column}::{kind}")
    # A new type resets the column's compression to the server's default: lz4 again
    # where the server has it (as 0005 set it).
    statements = " ".join(
        f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION lz4;"
        for table, column in COLUMNS
    )
    op.execute(
        "DO $$ BEGIN"
        " IF EXISTS (SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression'"
        f" AND 'lz4' = ANY(enumvals)) THEN {statements} END IF;"
        " END $$"
    )


def upgrade() -> None:
    _retype("json")


def downgrade() -> None:
    _retype("jsonb")
