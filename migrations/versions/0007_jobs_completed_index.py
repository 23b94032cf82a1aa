"""The run-time estimate reads recent completed jobs through an index

Every process re-estimates how long a job takes every 30 s from the 50 most recently
completed jobs. Without an index that read sorted every completed job still retained;
with a partial index on completion time it reads 50 index entries.

Revision ID: 0007_jobs_completed_index
Revises: 0006_jobs_hot_updates
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_jobs_completed_index"
down_revision: str | Sequence[str] | None = "0006_jobs_hot_updates"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_jobs_completed_recent",
        "jobs",
        ["completed_at"],
        unique=False,
        postgresql_where=sa.text("status = 'completed' AND started_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_completed_recent", table_name="jobs")
