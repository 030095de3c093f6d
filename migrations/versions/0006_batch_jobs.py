"""Batch jobs: batch prediction (`predict`) and evaluation (`evaluate`) are jobs of their own kinds.

New: the job kinds `predict` and `evaluate`; `batch_chunks`, a batch prediction's finished chunks of output keyed
by (job, chunk), so a resumed job starts after its last one and writes none twice; `version_evaluations`, a
version's metrics on a labelled dataset.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as b:
        b.drop_constraint(op.f("ck_jobs_kind"), type_="check")
        b.create_check_constraint("kind", "kind IN ('train', 'sweep', 'trial', 'predict', 'evaluate')")
    op.create_table(
        "batch_chunks",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_batch_chunks_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "chunk", name=op.f("pk_batch_chunks")),
    )
    op.create_table(
        "version_evaluations",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("version_id", sa.Uuid(), nullable=False),
        sa.Column("dataset_id", sa.Uuid(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_version_evaluations_tenant_id_tenants"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["version_id"], ["adapter_versions.id"],
                                name=op.f("fk_version_evaluations_version_id_adapter_versions"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"],
                                name=op.f("fk_version_evaluations_dataset_id_datasets"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_version_evaluations_job_id_jobs"),
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_version_evaluations")),
        sa.UniqueConstraint("job_id", name=op.f("uq_version_evaluations_job_id")),
    )
    op.create_index(op.f("ix_version_evaluations_dataset_id"), "version_evaluations", ["dataset_id"], unique=False)
    op.create_index("ix_version_evaluations_version_created", "version_evaluations", ["version_id", "created_at"],
                    unique=False)


def downgrade() -> None:
    op.drop_index("ix_version_evaluations_version_created", table_name="version_evaluations")
    op.drop_index(op.f("ix_version_evaluations_dataset_id"), table_name="version_evaluations")
    op.drop_table("version_evaluations")
    op.drop_table("batch_chunks")
    # Their events and webhook deliveries first: SQLite migrates with foreign keys off (migrations/env.py), so the
    # ON DELETE CASCADE would not run and the rows left pointing nowhere would fail every later migration.
    for table in ("job_events", "webhook_deliveries"):
        op.execute(f"DELETE FROM {table} WHERE job_id IN (SELECT id FROM jobs WHERE kind IN ('predict', 'evaluate'))")
    op.execute("DELETE FROM jobs WHERE kind IN ('predict', 'evaluate')")
    with op.batch_alter_table("jobs") as b:
        b.drop_constraint(op.f("ck_jobs_kind"), type_="check")
        b.create_check_constraint("kind", "kind IN ('train', 'sweep', 'trial')")
