"""Deleted groups kept for DELETED_GROUP_RETENTION (annotation_mask_group.deleted_at, deleted_by)

Revision ID: 9d4e6b1c2f73
Revises: d5e7a9c1b3f2
Create Date: 2026-11-25 05:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9d4e6b1c2f73"
down_revision: str | None = "d5e7a9c1b3f2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("annotation_mask_group") as batch:
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("deleted_by", sa.Text(), nullable=True))
        batch.create_index("ix_annotation_mask_group_deleted_at", ["deleted_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("annotation_mask_group") as batch:
        batch.drop_index("ix_annotation_mask_group_deleted_at")
        batch.drop_column("deleted_by")
        batch.drop_column("deleted_at")
