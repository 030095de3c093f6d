"""Webhooks: a job's webhook_url and per-tenant signing secrets.

New: `jobs.webhook_url` / `jobs.webhook_on_eval` (where and when a job reports), the tenant's signing secret
(current, previous and when it was rotated), and `webhook_deliveries`, one row per message with its delivery
state, so a delivery survives a broker or worker restart. `ix_webhook_deliveries_status_next` serves the
requeuer's scan for overdue deliveries.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("tenants") as b:
        b.add_column(sa.Column("webhook_secret", sa.String(length=100), nullable=True))
        b.add_column(sa.Column("webhook_secret_previous", sa.String(length=100), nullable=True))
        b.add_column(sa.Column("webhook_secret_rotated_at", TS, nullable=True))
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("webhook_url", sa.String(length=2048), nullable=True))
        b.add_column(sa.Column("webhook_on_eval", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("dedupe_key", sa.String(length=120), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("enqueued_at", TS, nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name=op.f("ck_webhook_deliveries_status")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_webhook_deliveries_job_id_jobs"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_webhook_deliveries_tenant_id_tenants"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_webhook_deliveries_dedupe_key")),
    )
    op.create_index(op.f("ix_webhook_deliveries_job_id"), "webhook_deliveries", ["job_id"], unique=False)
    op.create_index("ix_webhook_deliveries_tenant_created", "webhook_deliveries", ["tenant_id", "created_at", "id"],
                    unique=False)
    op.create_index("ix_webhook_deliveries_status_next", "webhook_deliveries", ["status", "next_attempt_at"],
                    unique=False)


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_status_next", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_tenant_created", table_name="webhook_deliveries")
    op.drop_index(op.f("ix_webhook_deliveries_job_id"), table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    with op.batch_alter_table("jobs") as b:
        b.drop_column("webhook_on_eval")
        b.drop_column("webhook_url")
    with op.batch_alter_table("tenants") as b:
        b.drop_column("webhook_secret_rotated_at")
        b.drop_column("webhook_secret_previous")
        b.drop_column("webhook_secret")
