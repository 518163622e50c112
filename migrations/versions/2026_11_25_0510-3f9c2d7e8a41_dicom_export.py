"""DICOM SEG export requests (dicom_export)

Revision ID: 3f9c2d7e8a41
Revises: b3d9e1f2a7c4
Create Date: 2026-11-25 05:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3f9c2d7e8a41"
down_revision: str | None = "b3d9e1f2a7c4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = sa.DateTime(timezone=True)
STATUS = sa.Enum(
    "PENDING", "RUNNING", "DONE", "FAILED", name="dicomexportstatus", native_enum=False, length=16
)


def upgrade() -> None:
    op.create_table(
        "dicom_export",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mask_group_id", sa.Integer(), nullable=False),
        sa.Column("status", STATUS, nullable=False),
        sa.Column("requested_by", sa.Text(), nullable=True),
        sa.Column("requested_at", UTC_DATETIME, nullable=False),
        sa.Column("claimed_at", UTC_DATETIME, nullable=True),
        sa.Column("finished_at", UTC_DATETIME, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("segment_count", sa.Integer(), nullable=True),
        sa.Column("frame_count", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["mask_group_id"],
            ["annotation_mask_group.id"],
            name=op.f("fk_dicom_export_mask_group_id_annotation_mask_group"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dicom_export")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_dicom_export_mask_group_id"), "dicom_export", ["mask_group_id"], unique=False
    )
    op.create_index(op.f("ix_dicom_export_status"), "dicom_export", ["status"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_dicom_export_status"), table_name="dicom_export")
    op.drop_index(op.f("ix_dicom_export_mask_group_id"), table_name="dicom_export")
    op.drop_table("dicom_export")
