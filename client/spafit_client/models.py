"""Typed models of the service's responses (and of the method / hyperparameters a job takes).

Response models keep members they do not know (`extra="allow"`), so a newer service never breaks an
older SDK; enumerations the service may grow (job status, event type, task type) are plain strings with
the known values listed in the docstring. Ids are strings.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

FINAL_JOB_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class SpafitModel(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Page(SpafitModel, Generic[T]):
    """One page of a listing; pass `next_cursor` back as `cursor` for the next (None on the last)."""

    items: list[T]
    next_cursor: str | None = None


# ---------------------------------------------------------------------------------------------- health
class Health(SpafitModel):
    status: str


class Readiness(SpafitModel):
    status: str
    checks: dict[str, dict[str, Any]] = Field(default_factory=dict)


class StoredBytes(SpafitModel):
    datasets: int = 0
    adapters: int = 0
    batch_results: int = 0


class Usage(SpafitModel):
    """What the tenant stores in the service's database (`GET /v1/usage`); `limit_bytes` None: no quota."""

    stored_bytes: int
    by_kind: StoredBytes
    limit_bytes: int | None = None
    available_bytes: int | None = None


# --------------------------------------------------------------------------------------------- datasets
class DatasetError(SpafitModel):
    type: str
    message: str = ""


class Dataset(SpafitModel):
    """An uploaded (or imported) dataset, validated on arrival; `report` is the validation report.
    `state`: `ready` (uploads at once), or for a Hub import `importing` (content fields empty) until the
    service's worker makes it `ready` or `failed` (`error` says why)."""

    id: str
    name: str
    state: str = "ready"
    error: DatasetError | None = None
    format: str
    source: str
    task_type: str | None = None
    rows: int | None = None
    columns: list[str] = Field(default_factory=list)
    sha256: str | None = None
    size_bytes: int | None = None
    text_fields: list[str]
    label_field: str | None = None
    label_counts: dict[str, int] | None = None
    report: dict[str, Any] = Field(default_factory=dict)
    source_detail: dict[str, Any] | None = None
    created_at: datetime


# ------------------------------------------------------------------------------------------------- jobs
class Method(SpafitModel):
    """What trains. `spafit` splits the L layers at n1 < n2 into frozen [0, n1), bias-only [n1, n2) and
    LoRA + bias [n2, L); an int is a layer index, a float a fraction of L. `lora` and `bitfit` are the
    baselines. Unset fields take the service's defaults."""

    name: str = "spafit"
    n1: int | float | None = None
    n2: int | float | None = None
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    targets: list[str] | None = None
    group3_bias: bool | None = None
    sweep: dict[str, Any] | None = None


class Hyperparameters(SpafitModel):
    """Optimisation settings; unset fields take the service's defaults (epochs 3, batch 16, lr 1e-3, ...)."""

    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    head_learning_rate: float | None = None
    bias_learning_rate: float | None = None
    lora_learning_rate: float | None = None
    validation_fraction: float | None = None
    max_seq_length: int | None = None
    warmup_ratio: float | None = None
    seed: int | None = None
    early_stopping_patience: int | None = None
    weight_decay: float | None = None
    gradient_accumulation_steps: int | None = None
    max_grad_norm: float | None = None
    prefix_cache: bool | None = None
    checkpoint_every_steps: int | None = None


class Progress(SpafitModel):
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    eta_seconds: float | None = None


class JobError(SpafitModel):
    type: str
    message: str
    error_id: str | None = None  # an internal error's details are in the service's log under this id


class Job(SpafitModel):
    """A fine-tuning job. `status`: queued, running, succeeded, failed or cancelled."""

    id: str
    kind: str = "train"  # train | sweep | trial | predict (batch prediction) | evaluate
    task: str
    task_type: str
    base_model: str
    status: str
    progress: Progress | None = None
    metrics: dict[str, Any] | None = None
    error: JobError | None = None
    adapter_version: int | None = None
    attempts: int = 0
    cancel_requested: bool = False
    method: dict[str, Any] = Field(default_factory=dict)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    train_dataset: str
    validation_dataset: str | None = None
    text_fields: list[str] = Field(default_factory=list)
    label_field: str | None = None
    parent_job: str | None = None
    webhook_url: str | None = None
    webhook_on_eval: bool = False
    time_limit_s: int | None = None  # the job's own wall-clock limit, if it set one
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def done(self) -> bool:
        """Whether the job is final (succeeded, failed or cancelled)."""
        return self.status in FINAL_JOB_STATUSES


class JobEvent(SpafitModel):
    """One event of a job, in order (`seq` from 1). `type`: status, progress, eval, checkpoint, resumed,
    early_stop, trial, log, ...; `data` depends on it (progress: step, total_steps, epoch, loss, lr,
    eta_seconds; eval: epoch, metrics, is_best; status: status, error)."""

    seq: int
    type: str
    data: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None


# ------------------------------------------------------------------------------------------------ tasks
class AdapterVersion(SpafitModel):
    """One immutable adapter version of a task."""

    id: str
    version: int
    active: bool
    sha256: str
    size_bytes: int
    base_model: str
    base_fingerprint: str
    method: dict[str, Any] = Field(default_factory=dict)
    task_type: str
    labels: list[str] = Field(default_factory=list)
    trainable_params: int | None = None
    param_counts: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    max_seq_length: int | None = None
    job_id: str | None = None
    evaluations: list[dict[str, Any]] = Field(default_factory=list)  # {dataset, job, rows, metrics, ...}
    created_at: datetime


class Task(SpafitModel):
    """A task and the adapter version that predict serves (None until one exists)."""

    name: str
    version_count: int
    active_version: AdapterVersion | None = None
    created_at: datetime
    updated_at: datetime


# ---------------------------------------------------------------------------------------------- predict
class LabelScore(SpafitModel):
    label: str
    score: float


class Prediction(SpafitModel):
    """`label`/`score`: the best label and its probability (regression: label None, score = the value);
    `scores`: labels best first; `labels`: multi-label, every label at or above 0.5."""

    label: str | None = None
    score: float
    scores: list[LabelScore] = Field(default_factory=list)
    labels: list[str] | None = None
    value: float | None = None


class TaskPredictions(SpafitModel):
    """The answer of one task: the adapter version that answered and one prediction per input."""

    task: str
    version: int
    predictions: list[Prediction]


class FanOutPredictions(SpafitModel):
    """The answer of `predict_many`: one `TaskPredictions` per task, in the order asked;
    `result["sentiment"]` picks one by name."""

    results: list[TaskPredictions]

    def __getitem__(self, task: str) -> TaskPredictions:
        for r in self.results:
            if r.task == task:
                return r
        raise KeyError(task)
