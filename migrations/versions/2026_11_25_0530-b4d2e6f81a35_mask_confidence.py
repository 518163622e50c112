"""per-slice model confidence on masks

Revision ID: b4d2e6f81a35
Revises: b5d2e8f4a915
Create Date: 2026-11-25 05:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b4d2e6f81a35"
down_revision: str | None = "b5d2e8f4a915"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE on both databases (SQLite >= 3.35 drops columns itself): a batch
# "move and copy" would rebuild the table without its expression index.


def upgrade() -> None:
    op.add_column("annotation_mask", sa.Column("confidence", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("annotation_mask", "confidence")
