"""queue: claim and fair-share indexes

Revision ID: 0002
Revises: 0004
Create Date: 2026-11-26 07:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
# Written on 0001; chained after 0004 (batches, iface) when main was merged in.
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_jobs_status_queue_api_key_id_created_at",
            ["status", "queue", "api_key_id", "created_at"],
            unique=False,
        )
        batch_op.create_index(
            "ix_jobs_api_key_id_started_at", ["api_key_id", "started_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_api_key_id_started_at")
        batch_op.drop_index("ix_jobs_status_queue_api_key_id_created_at")
