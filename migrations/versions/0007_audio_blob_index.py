"""jobs.audio_blob indexed (issue 25): every job end asks whether another unfinished job
still needs its blob, and the retention purge asks which blobs no job names.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 18:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_jobs_audio_blob",
        "jobs",
        ["audio_blob"],
        postgresql_where=sa.text("audio_blob IS NOT NULL"),
        sqlite_where=sa.text("audio_blob IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_audio_blob", table_name="jobs")
