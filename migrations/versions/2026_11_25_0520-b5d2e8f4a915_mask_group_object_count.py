"""Stored object count per mask group, for storage usage without aggregating masks

Revision ID: b5d2e8f4a915
Revises: 3f9c2d7e8a41
Create Date: 2026-11-25 05:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b5d2e8f4a915"
down_revision: str | None = "3f9c2d7e8a41"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN: batch mode would rebuild the table on SQLite and lose AUTOINCREMENT
    # (ids would be reused). The server default stays for rows other writers insert.
    op.add_column(
        "annotation_mask_group",
        sa.Column("object_count", sa.Integer(), nullable=False, server_default="0"),
    )
    op.execute(
        "UPDATE annotation_mask_group SET object_count = (SELECT count(*) FROM annotation_mask "
        "WHERE annotation_mask.mask_group_id = annotation_mask_group.id)"
    )


def downgrade() -> None:
    # SQLite 3.35+ drops a column in place (a batch rebuild would lose AUTOINCREMENT).
    op.drop_column("annotation_mask_group", "object_count")
