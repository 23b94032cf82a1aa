"""stage_runs: at most one running attempt per (job, stage, generation)

A stage claim is one statement; two claims of the same stage that race (a message and
its duplicate delivered at once) are told apart by this index rather than by a second
read after the job lock. Older running rows that an upgrade finds duplicated are marked
abandoned first, as a claim would have.

Revision ID: 0004_running_unique
Revises: 0003_operations
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_running_unique"
down_revision: str | Sequence[str] | None = "0003_operations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "UPDATE stage_runs r SET status = 'abandoned', finished_at = now(),"
        " error = 'lease expired: the worker running it stopped'"
        " WHERE r.status = 'running' AND EXISTS (SELECT 1 FROM stage_runs o"
        " WHERE o.job_id = r.job_id AND o.stage = r.stage AND o.generation = r.generation"
        " AND o.status = 'running' AND o.id > r.id)"
    )
    op.create_index(
        "ux_stage_runs_running",
        "stage_runs",
        ["job_id", "stage", "generation"],
        unique=True,
        postgresql_where=sa.text("status = 'running'"),
    )


def downgrade() -> None:
    op.drop_index("ux_stage_runs_running", table_name="stage_runs")
