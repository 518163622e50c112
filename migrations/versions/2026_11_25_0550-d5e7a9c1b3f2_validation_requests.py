"""validation job: requests and the mask count a report saw

Revision ID: d5e7a9c1b3f2
Revises: c7a1f3e9d2b8
Create Date: 2026-11-25 05:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d5e7a9c1b3f2"
down_revision: str | None = "c7a1f3e9d2b8"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("mask_group_validation") as batch:
        batch.add_column(sa.Column("mask_count", sa.Integer(), nullable=True))
    op.create_table(
        "mask_group_validation_request",
        sa.Column("mask_group_id", sa.Integer(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["mask_group_id"],
            ["annotation_mask_group.id"],
            name=op.f("fk_mask_group_validation_request_mask_group_id_annotation_mask_group"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("mask_group_id", name=op.f("pk_mask_group_validation_request")),
    )
    op.create_index(
        op.f("ix_mask_group_validation_request_due_at"),
        "mask_group_validation_request",
        ["due_at"],
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_mask_group_validation_request_due_at"),
        table_name="mask_group_validation_request",
    )
    op.drop_table("mask_group_validation_request")
    with op.batch_alter_table("mask_group_validation") as batch:
        batch.drop_column("mask_count")
