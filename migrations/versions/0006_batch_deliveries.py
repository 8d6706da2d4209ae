"""batch events are their own deliveries: webhook_deliveries.job_id nullable (issue 13)

A batch's "ended" event used to borrow its last job's id: it showed up in that job's
``/deliveries``, and a batch canceled before any input had no job to borrow and sent none.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 10:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.alter_column("job_id", existing_type=sa.String(length=32), nullable=True)
        batch_op.create_check_constraint(
            batch_op.f("ck_webhook_deliveries_owner"), "job_id IS NOT NULL OR batch_id IS NOT NULL"
        )
    # Batch events written before: detach them from the job they borrowed.
    op.execute("UPDATE webhook_deliveries SET job_id = NULL WHERE batch_id IS NOT NULL")


def downgrade() -> None:
    # A batch event has no job to go back to: it is dropped with the nullable column.
    op.execute("DELETE FROM webhook_deliveries WHERE job_id IS NULL")
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_webhook_deliveries_owner"), type_="check")
        batch_op.alter_column("job_id", existing_type=sa.String(length=32), nullable=False)
