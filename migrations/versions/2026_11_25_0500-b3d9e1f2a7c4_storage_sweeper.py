"""The storage sweeper: URL expiry per deletion record, and the job runner's table

Revision ID: b3d9e1f2a7c4
Revises: 7c1e9a2b4d10
Create Date: 2026-11-25 05:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b3d9e1f2a7c4"
down_revision: str | None = "7c1e9a2b4d10"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("storage_deletion") as batch:
        batch.add_column(sa.Column("urls_expire_at", UTC_DATETIME, nullable=True))
    op.create_index(
        op.f("ix_storage_deletion_mask_group_id"), "storage_deletion", ["mask_group_id"]
    )
    op.create_table(
        "job_run",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("next_run_at", UTC_DATETIME, nullable=False),
        sa.Column("locked_until", UTC_DATETIME, nullable=True),
        sa.Column("locked_by", sa.Text(), nullable=True),
        sa.Column("last_finished_at", UTC_DATETIME, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_job_run")),
    )


def downgrade() -> None:
    op.drop_table("job_run")
    op.drop_index(op.f("ix_storage_deletion_mask_group_id"), table_name="storage_deletion")
    with op.batch_alter_table("storage_deletion") as batch:
        batch.drop_column("urls_expire_at")
