"""validation reports of mask groups

Revision ID: c7a1f3e9d2b8
Revises: b4d2e6f81a35
Create Date: 2026-11-25 05:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c7a1f3e9d2b8"
down_revision: str | None = "b4d2e6f81a35"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUS = sa.Enum("VALID", "INVALID", name="validationstatus", native_enum=False, length=16)


def upgrade() -> None:
    op.create_table(
        "mask_group_validation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mask_group_id", sa.Integer(), nullable=False),
        sa.Column("status", STATUS, nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("problem_count", sa.Integer(), nullable=False),
        sa.Column("problems", sa.JSON(), nullable=False),
        sa.Column("checked_by", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["mask_group_id"],
            ["annotation_mask_group.id"],
            name=op.f("fk_mask_group_validation_mask_group_id_annotation_mask_group"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mask_group_validation")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_mask_group_validation_mask_group_id"),
        "mask_group_validation",
        ["mask_group_id"],
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_mask_group_validation_mask_group_id"),
        table_name="mask_group_validation",
    )
    op.drop_table("mask_group_validation")
