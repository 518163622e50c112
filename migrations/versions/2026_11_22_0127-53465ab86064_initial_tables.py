"""initial tables: annotations, mask groups, masks, pending uploads, storage deletions

Revision ID: 53465ab86064
Revises:
Create Date: 2026-11-22 01:27:11
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "53465ab86064"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "annotation_annotation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("label", sa.Text(), nullable=True),
        sa.Column("created_by", sa.Text(), nullable=True),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotation_annotation")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_annotation_annotation_study_instance_uid"),
        "annotation_annotation",
        ["study_instance_uid"],
    )
    op.create_index(
        op.f("ix_annotation_annotation_series_instance_uid"),
        "annotation_annotation",
        ["series_instance_uid"],
    )

    op.create_table(
        "annotation_mask_group",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("annotation_id", sa.Integer(), nullable=False),
        sa.Column("group_name", sa.Text(), nullable=True),
        sa.Column("model_name", sa.Text(), nullable=True),
        sa.Column("version", sa.Text(), nullable=True),
        sa.Column("modality", sa.Text(), nullable=True),
        sa.Column("slice_count", sa.Integer(), nullable=False),
        sa.Column("mask_type", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("inference_parameters", sa.JSON(), nullable=True),
        sa.Column("created_by", sa.Text(), nullable=True),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "PENDING",
                "UPLOADING",
                "COMPLETE",
                name="maskgroupstatus",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("uploaded_slice_count", sa.Integer(), nullable=False),
        sa.Column("total_bytes", sa.BigInteger(), nullable=False),
        sa.Column("upload_expires_at", UTC_DATETIME, nullable=True),
        sa.ForeignKeyConstraint(
            ["annotation_id"],
            ["annotation_annotation.id"],
            name=op.f("fk_annotation_mask_group_annotation_id_annotation_annotation"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotation_mask_group")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_annotation_mask_group_annotation_id"), "annotation_mask_group", ["annotation_id"]
    )
    op.create_index(
        op.f("ix_annotation_mask_group_model_name"), "annotation_mask_group", ["model_name"]
    )

    op.create_table(
        "annotation_mask",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mask_group_id", sa.Integer(), nullable=False),
        sa.Column("slice_index", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("label_name", sa.String(length=64), nullable=True),
        sa.Column("file_path", sa.Text(), nullable=False),
        sa.Column("mime_type", sa.String(length=64), nullable=False),
        sa.Column("file_size", sa.BigInteger(), nullable=False),
        sa.Column("checksum", sa.String(length=36), nullable=False),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["mask_group_id"],
            ["annotation_mask_group.id"],
            name=op.f("fk_annotation_mask_mask_group_id_annotation_mask_group"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotation_mask")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_annotation_mask_mask_group_id"), "annotation_mask", ["mask_group_id"])
    op.create_index(
        "uq_annotation_mask_slice",
        "annotation_mask",
        ["mask_group_id", "slice_index", sa.text("coalesce(label_name, '')")],
        unique=True,
    )

    op.create_table(
        "annotation_mask_upload",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mask_group_id", sa.Integer(), nullable=False),
        sa.Column("slice_index", sa.Integer(), nullable=False),
        sa.Column("label_name", sa.String(length=64), nullable=True),
        sa.Column("file_path", sa.Text(), nullable=False),
        sa.Column("content_type", sa.String(length=64), nullable=False),
        sa.Column("file_size", sa.BigInteger(), nullable=False),
        sa.Column("content_md5", sa.String(length=32), nullable=False),
        sa.Column("expires_at", UTC_DATETIME, nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["mask_group_id"],
            ["annotation_mask_group.id"],
            name=op.f("fk_annotation_mask_upload_mask_group_id_annotation_mask_group"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotation_mask_upload")),
    )
    op.create_index(
        op.f("ix_annotation_mask_upload_mask_group_id"), "annotation_mask_upload", ["mask_group_id"]
    )
    op.create_index(
        "uq_annotation_mask_upload_slice",
        "annotation_mask_upload",
        ["mask_group_id", "slice_index", sa.text("coalesce(label_name, '')")],
        unique=True,
    )

    op.create_table(
        "storage_deletion",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prefix", sa.Text(), nullable=False),
        sa.Column("mask_group_id", sa.Integer(), nullable=True),
        sa.Column("not_before", UTC_DATETIME, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_storage_deletion")),
    )
    op.create_index(op.f("ix_storage_deletion_not_before"), "storage_deletion", ["not_before"])


def downgrade() -> None:
    op.drop_table("storage_deletion")
    op.drop_table("annotation_mask_upload")
    op.drop_table("annotation_mask")
    op.drop_table("annotation_mask_group")
    op.drop_table("annotation_annotation")
