"""Large JSON columns compressed with lz4 where the server supports it

The final result, stage outputs and webhook payloads are 5-20 KB of JSON each, stored
out of line and compressed. pglz (the default) cost more Postgres CPU per job than any
statement of the pipeline; lz4 compresses and decompresses several times faster. Only
new values use it; a server built without lz4 keeps pglz.

Revision ID: 0005_lz4_json
Revises: 0004_running_unique
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005_lz4_json"
down_revision: str | Sequence[str] | None = "0004_running_unique"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    ("jobs", "request"),
    ("jobs", "result"),
    ("stage_runs", "output"),
    ("webhook_deliveries", "payload"),
)


def _set_compression(method: str) -> None:
    statements = " ".join(
        f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION {method};"
        for table, column in COLUMNS
    )
    op.execute(
        "DO $$ BEGIN"
        " IF EXISTS (SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression'"
        f" AND '{method}' = ANY(enumvals)) THEN {statements} END IF;"
        " END $$"
    )


def upgrade() -> None:
    _set_compression("lz4")


def downgrade() -> None:
    _set_compression("pglz")
