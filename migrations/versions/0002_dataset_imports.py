"""Dataset imports run in the worker: dataset state (importing, ready, failed) and its reason.

An importing dataset has no content yet, so its content columns (rows, sha256, size_bytes) become nullable;
every dataset that existed before is `ready`.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as b:
        b.add_column(sa.Column("state", sa.String(length=16), server_default="ready", nullable=False))
        b.add_column(sa.Column("error_type", sa.String(length=64), nullable=True))
        b.add_column(sa.Column("error_message", sa.Text(), nullable=True))
        b.add_column(sa.Column("import_attempts", sa.Integer(), server_default="0", nullable=False))
        b.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
        b.alter_column("rows", existing_type=sa.Integer(), nullable=True)
        b.alter_column("sha256", existing_type=sa.String(length=64), nullable=True)
        b.alter_column("size_bytes", existing_type=sa.BigInteger(), nullable=True)
        b.create_check_constraint(op.f("ck_datasets_state"), "state IN ('importing', 'ready', 'failed')")
        b.create_index("ix_datasets_state_updated", ["state", "updated_at"])


def downgrade() -> None:
    op.execute("DELETE FROM datasets WHERE state != 'ready'")
    with op.batch_alter_table("datasets") as b:
        b.drop_index("ix_datasets_state_updated")
        b.drop_constraint(op.f("ck_datasets_state"), type_="check")
        b.alter_column("size_bytes", existing_type=sa.BigInteger(), nullable=False)
        b.alter_column("sha256", existing_type=sa.String(length=64), nullable=False)
        b.alter_column("rows", existing_type=sa.Integer(), nullable=False)
        b.drop_column("updated_at")
        b.drop_column("import_attempts")
        b.drop_column("error_message")
        b.drop_column("error_type")
        b.drop_column("state")
