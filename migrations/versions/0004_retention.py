"""Retention: job deletion, indexes for the garbage collector and event pruning.

The collector (app/services/retention.py) looks blobs up by every column that references them (the foreign
key checks of a blob delete do too: without these indexes each deleted blob scans `jobs`), walks blobs by
age for its grace period, and prunes old events by `created_at`.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = [
    ("ix_jobs_checkpoint_sha256", "jobs", ["checkpoint_sha256"]),
    ("ix_jobs_result_sha256", "jobs", ["result_sha256"]),
    ("ix_job_events_created_at", "job_events", ["created_at"]),
    ("ix_blobs_created_at", "blobs", ["created_at"]),
]


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
