"""Initial registry schema: tenants, api_keys, blobs, datasets, tasks, jobs, job_events, adapter_versions.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table('blobs',
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('data', sa.LargeBinary(), nullable=False),
        sa.Column('created_at', TS, nullable=False),
        sa.PrimaryKeyConstraint('sha256', name=op.f('pk_blobs'))
    )
    op.create_table('tenants',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('created_at', TS, nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_tenants')),
        sa.UniqueConstraint('name', name=op.f('uq_tenants_name'))
    )
    op.create_table('api_keys',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('tenant_id', sa.Uuid(), nullable=False),
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('prefix', sa.String(length=32), nullable=False),
        sa.Column('secret_hash', sa.String(length=64), nullable=False),
        sa.Column('scopes', JSON, nullable=False),
        sa.Column('created_at', TS, nullable=False),
        sa.Column('revoked_at', TS, nullable=True),
        sa.Column('last_used_at', TS, nullable=True),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_api_keys_tenant_id_tenants'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
        sa.UniqueConstraint('prefix', name=op.f('uq_api_keys_prefix'))
    )
    op.create_index(op.f('ix_api_keys_tenant_id'), 'api_keys', ['tenant_id'], unique=False)
    op.create_table('datasets',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('tenant_id', sa.Uuid(), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('format', sa.String(length=16), nullable=False),
        sa.Column('task_type', sa.String(length=40), nullable=True),
        sa.Column('rows', sa.Integer(), nullable=False),
        sa.Column('columns', JSON, nullable=False),
        sa.Column('text_fields', JSON, nullable=False),
        sa.Column('label_field', sa.String(length=200), nullable=True),
        sa.Column('label_counts', JSON, nullable=True),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('size_bytes', sa.BigInteger(), nullable=False),
        sa.Column('report', JSON, nullable=False),
        sa.Column('source', sa.String(length=8), nullable=False),
        sa.Column('source_detail', JSON, nullable=True),
        sa.Column('created_at', TS, nullable=False),
        sa.CheckConstraint("source IN ('upload', 'hf')", name=op.f('ck_datasets_source')),
        sa.ForeignKeyConstraint(['sha256'], ['blobs.sha256'], name=op.f('fk_datasets_sha256_blobs')),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_datasets_tenant_id_tenants')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_datasets'))
    )
    op.create_index(op.f('ix_datasets_sha256'), 'datasets', ['sha256'], unique=False)
    op.create_index('ix_datasets_tenant_created', 'datasets', ['tenant_id', 'created_at', 'id'], unique=False)
    op.create_table('tasks',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('tenant_id', sa.Uuid(), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('active_version_id', sa.Uuid(), nullable=True),
        sa.Column('created_at', TS, nullable=False),
        sa.Column('updated_at', TS, nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_tasks_tenant_id_tenants')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_tasks')),
        sa.UniqueConstraint('tenant_id', 'name', name=op.f('uq_tasks_tenant_id_name'))
    )
    op.create_table('jobs',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('tenant_id', sa.Uuid(), nullable=False),
        sa.Column('task_name', sa.String(length=64), nullable=False),
        sa.Column('task_type', sa.String(length=40), nullable=False),
        sa.Column('base_model', sa.String(length=300), nullable=False),
        sa.Column('train_dataset_id', sa.Uuid(), nullable=False),
        sa.Column('validation_dataset_id', sa.Uuid(), nullable=True),
        sa.Column('text_fields', JSON, nullable=False),
        sa.Column('label_field', sa.String(length=200), nullable=True),
        sa.Column('method', JSON, nullable=False),
        sa.Column('hyperparameters', JSON, nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('progress', JSON, nullable=True),
        sa.Column('metrics', JSON, nullable=True),
        sa.Column('error_type', sa.String(length=64), nullable=True),
        sa.Column('error_message', sa.Text(), nullable=True),
        sa.Column('adapter_version_id', sa.Uuid(), nullable=True),
        sa.Column('idempotency_key', sa.String(length=200), nullable=True),
        sa.Column('request_hash', sa.String(length=64), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('max_attempts', sa.Integer(), nullable=False),
        sa.Column('cancel_requested', sa.Boolean(), nullable=False),
        sa.Column('claimed_by', sa.String(length=200), nullable=True),
        sa.Column('claimed_at', TS, nullable=True),
        sa.Column('heartbeat_at', TS, nullable=True),
        sa.Column('kind', sa.String(length=8), nullable=False),
        sa.Column('result_sha256', sa.String(length=64), nullable=True),
        sa.Column('enqueued_at', TS, nullable=True),
        sa.Column('broker_epoch', sa.String(length=64), nullable=True),
        sa.Column('checkpoint_sha256', sa.String(length=64), nullable=True),
        sa.Column('parent_job_id', sa.Uuid(), nullable=True),
        sa.Column('created_at', TS, nullable=False),
        sa.Column('updated_at', TS, nullable=False),
        sa.Column('started_at', TS, nullable=True),
        sa.Column('finished_at', TS, nullable=True),
        sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name=op.f('ck_jobs_status')),
        sa.ForeignKeyConstraint(['checkpoint_sha256'], ['blobs.sha256'], name=op.f('fk_jobs_checkpoint_sha256_blobs')),
        sa.ForeignKeyConstraint(['result_sha256'], ['blobs.sha256'], name=op.f('fk_jobs_result_sha256_blobs')),
        sa.CheckConstraint("kind IN ('train', 'sweep', 'trial')", name=op.f('ck_jobs_kind')),
        sa.ForeignKeyConstraint(['parent_job_id'], ['jobs.id'], name=op.f('fk_jobs_parent_job_id_jobs')),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_jobs_tenant_id_tenants')),
        sa.ForeignKeyConstraint(['train_dataset_id'], ['datasets.id'], name=op.f('fk_jobs_train_dataset_id_datasets')),
        sa.ForeignKeyConstraint(['validation_dataset_id'], ['datasets.id'], name=op.f('fk_jobs_validation_dataset_id_datasets')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs')),
        sa.UniqueConstraint('tenant_id', 'idempotency_key', name=op.f('uq_jobs_tenant_id_idempotency_key'))
    )
    op.create_index(op.f('ix_jobs_parent_job_id'), 'jobs', ['parent_job_id'], unique=False)
    op.create_index('ix_jobs_status_heartbeat', 'jobs', ['status', 'heartbeat_at'], unique=False)
    op.create_index('ix_jobs_tenant_created', 'jobs', ['tenant_id', 'created_at', 'id'], unique=False)
    op.create_index('ix_jobs_tenant_status', 'jobs', ['tenant_id', 'status'], unique=False)
    op.create_index('ix_jobs_tenant_task', 'jobs', ['tenant_id', 'task_name'], unique=False)
    op.create_index(op.f('ix_jobs_train_dataset_id'), 'jobs', ['train_dataset_id'], unique=False)
    op.create_index(op.f('ix_jobs_validation_dataset_id'), 'jobs', ['validation_dataset_id'], unique=False)
    op.create_table('adapter_versions',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('task_id', sa.Uuid(), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('blob_sha256', sa.String(length=64), nullable=False),
        sa.Column('config', JSON, nullable=False),
        sa.Column('size_bytes', sa.BigInteger(), nullable=False),
        sa.Column('metrics', JSON, nullable=True),
        sa.Column('param_counts', JSON, nullable=True),
        sa.Column('method', JSON, nullable=False),
        sa.Column('base_model', sa.String(length=300), nullable=False),
        sa.Column('base_fingerprint', sa.String(length=128), nullable=False),
        sa.Column('job_id', sa.Uuid(), nullable=True),
        sa.Column('created_at', TS, nullable=False),
        sa.ForeignKeyConstraint(['blob_sha256'], ['blobs.sha256'], name=op.f('fk_adapter_versions_blob_sha256_blobs')),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_adapter_versions_job_id_jobs'), ondelete='SET NULL'),
        sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_adapter_versions_task_id_tasks'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_adapter_versions')),
        sa.UniqueConstraint('job_id', name=op.f('uq_adapter_versions_job_id')),
        sa.UniqueConstraint('task_id', 'version', name=op.f('uq_adapter_versions_task_id_version'))
    )
    op.create_index(op.f('ix_adapter_versions_blob_sha256'), 'adapter_versions', ['blob_sha256'], unique=False)
    op.create_index('ix_adapter_versions_task_created', 'adapter_versions', ['task_id', 'created_at', 'id'], unique=False)
    op.create_table('job_events',
        sa.Column('job_id', sa.Uuid(), nullable=False),
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('type', sa.String(length=32), nullable=False),
        sa.Column('data', JSON, nullable=False),
        sa.Column('created_at', TS, nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_events_job_id_jobs'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('job_id', 'seq', name=op.f('pk_job_events'))
    )

    # tasks.active_version_id and jobs.adapter_version_id point at adapter_versions, which points back at
    # tasks and jobs: add these two after all tables exist (batch mode: SQLite rebuilds the table).
    with op.batch_alter_table("tasks") as batch:
        batch.create_foreign_key(op.f("fk_tasks_active_version_id_adapter_versions"), "adapter_versions",
                                 ["active_version_id"], ["id"], ondelete="SET NULL")
    with op.batch_alter_table("jobs") as batch:
        batch.create_foreign_key(op.f("fk_jobs_adapter_version_id_adapter_versions"), "adapter_versions",
                                 ["adapter_version_id"], ["id"], ondelete="SET NULL")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("fk_jobs_adapter_version_id_adapter_versions"), type_="foreignkey")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_constraint(op.f("fk_tasks_active_version_id_adapter_versions"), type_="foreignkey")
    op.drop_table('job_events')
    op.drop_index('ix_adapter_versions_task_created', table_name='adapter_versions')
    op.drop_index(op.f('ix_adapter_versions_blob_sha256'), table_name='adapter_versions')
    op.drop_table('adapter_versions')
    op.drop_index(op.f('ix_jobs_validation_dataset_id'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_train_dataset_id'), table_name='jobs')
    op.drop_index('ix_jobs_tenant_task', table_name='jobs')
    op.drop_index('ix_jobs_tenant_status', table_name='jobs')
    op.drop_index('ix_jobs_tenant_created', table_name='jobs')
    op.drop_index('ix_jobs_status_heartbeat', table_name='jobs')
    op.drop_index(op.f('ix_jobs_parent_job_id'), table_name='jobs')
    op.drop_table('jobs')
    op.drop_table('tasks')
    op.drop_index('ix_datasets_tenant_created', table_name='datasets')
    op.drop_index(op.f('ix_datasets_sha256'), table_name='datasets')
    op.drop_table('datasets')
    op.drop_index(op.f('ix_api_keys_tenant_id'), table_name='api_keys')
    op.drop_table('api_keys')
    op.drop_table('tenants')
    op.drop_table('blobs')
