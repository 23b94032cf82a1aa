"""Queue rows staged already leased (handed to a consumer in the same process) send no NOTIFY

A hand-off can write the next stage's queue row leased to a consumer in the process that
wrote it, which then handles it without a wake-up. Such a row is not available to anyone
else, so waking every consumer of the subscription for it would only make them look and
find nothing. Rows written available (attempts = 0) still notify at commit.

Revision ID: 0008_broker_notify_available
Revises: 0007_jobs_completed_index
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008_broker_notify_available"
down_revision: str | Sequence[str] | None = "0007_jobs_completed_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DROP TRIGGER broker_messages_notify ON broker_messages")
    op.execute(
        "CREATE TRIGGER broker_messages_notify AFTER INSERT ON broker_messages "
        "FOR EACH ROW WHEN (NEW.attempts = 0) EXECUTE FUNCTION blogpipe_broker_notify()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER broker_messages_notify ON broker_messages")
    op.execute(
        "CREATE TRIGGER broker_messages_notify AFTER INSERT ON broker_messages "
        "FOR EACH ROW EXECUTE FUNCTION blogpipe_broker_notify()"
    )
