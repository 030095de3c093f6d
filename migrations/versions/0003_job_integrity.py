"""Job integrity: claim fencing, wall-clock limits.

Fencing needs no column: every claim increments `attempts` under a compare-and-swap, so (claimed_by, attempts)
is the claim's token. New: a job's own wall-clock limit (`time_limit_s`, within the deployment's) and the id
under which the log holds an internal error's details (`error_id`). `ix_jobs_status_enqueued` serves the
requeuer's scan for queued jobs nobody claimed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("time_limit_s", sa.Integer(), nullable=True))
        b.add_column(sa.Column("error_id", sa.String(length=32), nullable=True))
        b.create_index("ix_jobs_status_enqueued", ["status", "enqueued_at"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as b:
        b.drop_index("ix_jobs_status_enqueued")
        b.drop_column("error_id")
        b.drop_column("time_limit_s")
