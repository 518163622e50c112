"""Stored object count per mask group, for storage usage without aggregating masks

Revision ID: b5d2e8f4a915
Revises: 7c1e9a2b4d10
Create Date: 2026-11-25 04:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b5d2e8f4a915"
down_revision: str | None = "7c1e9a2b4d10"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("annotation_mask_group") as batch:
        batch.add_column(
            sa.Column("object_count", sa.Integer(), nullable=False, server_default="0")
        )
    op.execute(
        "UPDATE annotation_mask_group SET object_count = (SELECT count(*) FROM annotation_mask "
        "WHERE annotation_mask.mask_group_id = annotation_mask_group.id)"
    )
    with op.batch_alter_table("annotation_mask_group") as batch:
        batch.alter_column("object_count", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("annotation_mask_group") as batch:
        batch.drop_column("object_count")
