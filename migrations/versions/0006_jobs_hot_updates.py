"""Progress updates of a job are HOT updates

A job row is updated about nine times on its way through the stages, and each update
set ``updated_at``, which the (status, updated_at) index covered: every update wrote a
new entry into each of the table's four indexes. Indexed on status alone, with a
fillfactor that leaves room on each page, the updates that change only progress, the
current stage and ``updated_at`` are HOT updates and write no index at all. The stuck-job
sweep still finds processing jobs through the status index.

Revision ID: 0006_jobs_hot_updates
Revises: 0005_lz4_json
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006_jobs_hot_updates"
down_revision: str | Sequence[str] | None = "0005_lz4_json"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_jobs_status", "jobs", ["status"], unique=False)
    op.drop_index("ix_jobs_status_updated", table_name="jobs")
    op.execute("ALTER TABLE jobs SET (fillfactor = 80)")


def downgrade() -> None:
    op.execute("ALTER TABLE jobs RESET (fillfactor)")
    op.create_index("ix_jobs_status_updated", "jobs", ["status", "updated_at"], unique=False)
    op.drop_index("ix_jobs_status", table_name="jobs")
