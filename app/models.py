"""The registry schema: tenants, API keys, blobs, datasets, jobs and their events, tasks, adapter versions.

Portable across Postgres and SQLite: UUID ids (native `uuid` on Postgres, CHAR(32) on SQLite), JSON that is
JSONB on Postgres, timestamps always timezone-aware UTC. Every tenant-owned table starts its indexes with
`tenant_id`; lists paginate by `(created_at, id)`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import false

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
JOB_FINAL_STATUSES = ("succeeded", "failed", "cancelled")
JOB_KINDS = ("train", "sweep", "trial", "predict", "evaluate")  # a sweep is a parent whose trials are jobs of their own;
# predict (batch prediction) and evaluate run a registered version over a dataset (worker/batch.py)
DATASET_SOURCES = ("upload", "hf")
DATASET_STATES = ("importing", "ready", "failed")  # an upload is ready at once; an import starts importing

# Stable constraint names, so migrations can refer to (and drop) them on every backend.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = JSON().with_variant(JSONB(), "postgresql")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """`timestamptz` on Postgres; on SQLite (no time zones) stored as naive UTC and read back as aware UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass a timezone-aware value (e.g. datetime.now(UTC))")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONType, list[Any]: JSONType,
                           uuid.UUID: Uuid()}


def _id() -> Mapped[uuid.UUID]:
    return mapped_column(primary_key=True, default=uuid.uuid4)


def _created() -> Mapped[datetime]:
    return mapped_column(default=utcnow)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = _id()
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = _created()
    # Signs this tenant's webhooks (`whsec_` + base64); made on first use, rotated by an admin. The previous
    # secret also signs until `webhook_secret_rotated_at` + SPAFIT_WEBHOOK_SECRET_OVERLAP_S.
    webhook_secret: Mapped[str | None] = mapped_column(String(100))
    webhook_secret_previous: Mapped[str | None] = mapped_column(String(100))
    webhook_secret_rotated_at: Mapped[datetime | None]
    # The workers' time this tenant's webhook attempts have used, as a virtual clock (GCRA's theoretical arrival
    # time): an attempt of d seconds moves it d / SPAFIT_WEBHOOK_TENANT_SHARE on from max(it, now), and an attempt
    # waits while it runs more than SPAFIT_WEBHOOK_TENANT_BURST_S ahead of now (worker/webhooks.py). None: unused.
    webhook_busy_until: Mapped[datetime | None]


class ApiKey(Base):
    """A key is `spafit_<prefix>_<secret>`; we keep the prefix (to find the row) and sha256(secret)."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[Any]]  # subset of settings.SCOPES; "admin" implies the others
    created_at: Mapped[datetime] = _created()
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class Blob(Base):
    """Content-addressed bytes (datasets, adapters, checkpoints). Kept in the database so every API and
    worker replica reaches them with only the database shared. `data` is deferred: load it on purpose."""

    __tablename__ = "blobs"
    __table_args__ = (Index("ix_blobs_created_at", "created_at"),)  # the collector's grace period

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = _created()


class Dataset(Base):
    """A validated dataset. An import is created `importing` (content columns null), and a worker makes it
    `ready` (content filled in) or `failed` (`error_type` + `error_message`). Only a ready one can train."""

    __tablename__ = "datasets"
    __table_args__ = (
        Index("ix_datasets_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_datasets_state_updated", "state", "updated_at"),  # finding imports whose worker was lost
        CheckConstraint(_one_of("source", DATASET_SOURCES), name="source"),
        CheckConstraint(_one_of("state", DATASET_STATES), name="state"),
    )

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16))  # csv | tsv | jsonl | hf
    task_type: Mapped[str | None] = mapped_column(String(40))
    rows: Mapped[int | None] = mapped_column(Integer)  # null while importing
    columns: Mapped[list[Any]]
    text_fields: Mapped[list[Any]]
    label_field: Mapped[str | None] = mapped_column(String(200))
    label_counts: Mapped[dict[str, Any] | None]
    # The content hash is also the blob reference: the bytes live in `blobs` under this key.
    sha256: Mapped[str | None] = mapped_column(String(64), ForeignKey("blobs.sha256"), index=True)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    report: Mapped[dict[str, Any]]  # DataReport.to_dict(); {} while importing
    source: Mapped[str] = mapped_column(String(8), default="upload")
    source_detail: Mapped[dict[str, Any] | None]  # for hf: {name, split, config_name, max_rows}
    state: Mapped[str] = mapped_column(String(16), default="ready", server_default="ready")
    error_type: Mapped[str | None] = mapped_column(String(64))  # a stable slug when failed
    error_message: Mapped[str | None] = mapped_column(Text)  # the reason in words, no internals
    import_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime | None] = mapped_column(default=utcnow, onupdate=utcnow)

    @property
    def error(self) -> dict[str, str] | None:
        """Why a failed import failed: {type, message}."""
        return {"type": self.error_type, "message": self.error_message or ""} if self.error_type else None


class Task(Base):
    """A named task per tenant; predict serves its active adapter version."""

    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(64))
    active_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL", use_alter=True)
    )
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Job(Base):
    """One fine-tuning run. State lives here (not in the Celery result backend); workers claim a job by
    setting `claimed_by`/`claimed_at`, prove liveness with `heartbeat_at` and save `checkpoint_sha256`.
    A claim increments `attempts`; (claimed_by, attempts) is the fencing token every later write of that
    worker carries in its WHERE clause (worker/lease.py)."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_jobs_tenant_status", "tenant_id", "status"),
        Index("ix_jobs_tenant_task", "tenant_id", "task_name"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),  # finding stale running jobs
        Index("ix_jobs_status_enqueued", "status", "enqueued_at"),  # finding queued jobs nobody claimed
        CheckConstraint(_one_of("status", JOB_STATUSES), name="status"),
        CheckConstraint(_one_of("kind", JOB_KINDS), name="kind"),
    )

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    kind: Mapped[str] = mapped_column(String(8), default="train")
    task_name: Mapped[str] = mapped_column(String(64))
    task_type: Mapped[str] = mapped_column(String(40), default="single_label_classification")
    base_model: Mapped[str] = mapped_column(String(300))
    train_dataset_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("datasets.id"), index=True)
    validation_dataset_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("datasets.id"), index=True)
    text_fields: Mapped[list[Any]]
    label_field: Mapped[str | None] = mapped_column(String(200))
    method: Mapped[dict[str, Any]]  # MethodConfig as a dict
    hyperparameters: Mapped[dict[str, Any]]  # TrainConfig as a dict
    status: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[dict[str, Any] | None]  # {step, total_steps, epoch, eta_seconds}
    metrics: Mapped[dict[str, Any] | None]  # latest evaluation metrics
    error_type: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)  # in words: never SQL, paths or tracebacks
    error_id: Mapped[str | None] = mapped_column(String(32))  # an internal error's details are in the log under it
    # This job's wall-clock limit in seconds from its first start (within SPAFIT_JOB_TIME_LIMIT_S).
    time_limit_s: Mapped[int | None] = mapped_column(Integer)
    adapter_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL", use_alter=True)
    )
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))  # same key + other body -> 409
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    claimed_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    # When the job was last handed to the broker, and which broker incarnation took it: a broker that
    # restarted without persistence (new epoch) lost the message, so the job is sent again.
    enqueued_at: Mapped[datetime | None]
    broker_epoch: Mapped[str | None] = mapped_column(String(64))
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64), ForeignKey("blobs.sha256"), index=True)
    # A sweep trial's trained adapter (packed zip), kept until the sweep registers the best trial.
    result_sha256: Mapped[str | None] = mapped_column(String(64), ForeignKey("blobs.sha256"), index=True)
    parent_job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id"), index=True)  # sweep trials
    webhook_url: Mapped[str | None] = mapped_column(String(2048))  # POSTed to when the job ends (app/services/webhooks.py)
    webhook_on_eval: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())  # ... and each eval
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class JobEvent(Base):
    """An append-only log per job (progress, metrics, state changes); `seq` counts from 1 per job."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_created_at", "created_at"),)  # the collector prunes old events

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = _created()


WEBHOOK_DELIVERY_STATUSES = ("pending", "delivered", "failed")


class WebhookDelivery(Base):
    """One webhook message (a job ended, or evaluated) and its delivery state. The row is the truth, the broker
    message only says "try delivery X": `next_attempt_at` is when the next attempt is due (and, while an attempt
    runs, its lease); a pending delivery overdue by more than a lease is sent to the broker again. `id` is the
    `webhook-id` header, the same on every attempt, so receivers can drop duplicates."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),  # finding overdue deliveries
        CheckConstraint(_one_of("status", WEBHOOK_DELIVERY_STATUSES), name="status"),
    )

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(32))  # job.succeeded | job.failed | job.cancelled | job.eval
    dedupe_key: Mapped[str] = mapped_column(String(120), unique=True)  # one message per job end / eval step
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    # waiting for its tenant's turn (worker/webhooks.py): such deliveries wait in line, one after another
    waiting_turn: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    enqueued_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    finished_at: Mapped[datetime | None]


class AdapterVersion(Base):
    """An immutable trained adapter: the blob holds the adapter archive; `job_id` is unique so a job
    can never register two versions (a retried worker hits the constraint instead)."""

    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("task_id", "version"),
        Index("ix_adapter_versions_task_created", "task_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = _id()
    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    blob_sha256: Mapped[str] = mapped_column(String(64), ForeignKey("blobs.sha256"), index=True)
    config: Mapped[dict[str, Any]]  # adapter config (method, task spec, label map, ...)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any] | None]
    param_counts: Mapped[dict[str, Any] | None]  # {trainable, total, by_group: {...}}
    method: Mapped[dict[str, Any]]
    base_model: Mapped[str] = mapped_column(String(300))
    base_fingerprint: Mapped[str] = mapped_column(String(128))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), unique=True)
    created_at: Mapped[datetime] = _created()


class BatchChunk(Base):
    """One finished chunk of a batch prediction job's result (rows [chunk * chunk_rows, ...) of its dataset, in
    the job's output format). Written under the job's fenced lease, keyed by (job, chunk): a resumed job starts
    after its last chunk, and no chunk can be written twice. The result file is the chunks in order."""

    __tablename__ = "batch_chunks"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    chunk: Mapped[int] = mapped_column(Integer, primary_key=True)
    rows: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = _created()


class VersionEvaluation(Base):
    """A version's metrics on a labelled dataset, written by an `evaluate` job."""

    __tablename__ = "version_evaluations"
    __table_args__ = (Index("ix_version_evaluations_version_created", "version_id", "created_at"),)

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    version_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("adapter_versions.id", ondelete="CASCADE"))
    dataset_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), unique=True)
    rows: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = _created()
