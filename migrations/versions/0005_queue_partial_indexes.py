"""queue: partial indexes for the claim, the jobs in flight and the fair order (issue 13)

The claim index held every job, deduplicated into posting lists that Postgres cannot mark
dead entry by entry, and the fair order's backward scan walked each key's queued rows: rows
visited per job grew with the backlog (bench/RESULTS.md, "Backlog").

Revision ID: 0005
Revises: 0002
Create Date: 2026-11-26 10:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUEUED = sa.text("status = 'queued'")
RUNNING = sa.text("status = 'running'")
STARTED = sa.text("started_at IS NOT NULL")
UNFINISHED = sa.text("status IN ('queued', 'running')")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_status_queue_api_key_id_created_at")
        batch_op.drop_index("ix_jobs_api_key_id_started_at")
        batch_op.create_index(
            "ix_jobs_queued_claim",
            ["queue", "api_key_id", "created_at", "id"],
            unique=False,
            postgresql_where=QUEUED,
            sqlite_where=QUEUED,
        )
        batch_op.create_index(
            "ix_jobs_running_api_key_id",
            ["api_key_id", "id"],
            unique=False,
            postgresql_where=RUNNING,
            sqlite_where=RUNNING,
        )
        batch_op.create_index(
            "ix_jobs_api_key_id_started_at",
            ["api_key_id", "started_at"],
            unique=False,
            postgresql_where=STARTED,
            sqlite_where=STARTED,
        )
        batch_op.create_index(
            "ix_jobs_batch_unfinished",
            ["batch_id", "id"],
            unique=False,
            postgresql_where=UNFINISHED,
            sqlite_where=UNFINISHED,
        )

    if op.get_bind().dialect.name == "postgresql":
        # A queue table: every job leaves dead index entries behind (queued, then running),
        # which claims walk until vacuum removes them. Vacuum and analyze it by a fixed
        # number of changes, not by a share of a table that keeps every finished job (the
        # default 20% meant ever rarer vacuums as history grows), so the planner also sees
        # a batch that just landed.
        op.execute(
            "ALTER TABLE jobs SET (autovacuum_vacuum_scale_factor = 0,"
            " autovacuum_vacuum_threshold = 2000, autovacuum_analyze_scale_factor = 0,"
            " autovacuum_analyze_threshold = 2000)"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "ALTER TABLE jobs RESET (autovacuum_vacuum_scale_factor,"
            " autovacuum_vacuum_threshold, autovacuum_analyze_scale_factor,"
            " autovacuum_analyze_threshold)"
        )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_batch_unfinished")
        batch_op.drop_index("ix_jobs_api_key_id_started_at")
        batch_op.drop_index("ix_jobs_running_api_key_id")
        batch_op.drop_index("ix_jobs_queued_claim")
        batch_op.create_index(
            "ix_jobs_api_key_id_started_at", ["api_key_id", "started_at"], unique=False
        )
        batch_op.create_index(
            "ix_jobs_status_queue_api_key_id_created_at",
            ["status", "queue", "api_key_id", "created_at"],
            unique=False,
        )
