"""Request and response models of /v1/jobs."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt

from .schemas import TaskType

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


# Bounds of every numeric knob: far above any useful value, low enough that no request can make a worker
# allocate without limit or overflow (rank 2^31), and 422 naming the field beyond them. Floats must be finite.
MAX_RANK = 256
MAX_SEED = 2**32 - 1


def _not_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("a layer index (int) or a fraction of the depth (float), not a boolean")
    return value


def _not_bool_number(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("a number, not a boolean")
    return value


# `true` is not 1: pydantic's lax mode would take it as a rank, an epoch count or a learning rate of 1
NotBoolInt = Annotated[int, BeforeValidator(_not_bool_number)]
NotBoolFloat = Annotated[float, BeforeValidator(_not_bool_number)]
LayerValue = Annotated[int | float, BeforeValidator(_not_bool)]  # an int is a layer index, a float a fraction


class SweepIn(BaseModel):
    """A search over SPAFIT's stratification: every combination of the listed values is one trial."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n1: list[LayerValue] | None = Field(default=None, min_length=1, max_length=12, description="values of n1 to try")
    n2: list[LayerValue] | None = Field(default=None, min_length=1, max_length=12, description="values of n2 to try")
    rank: list[Annotated[StrictInt, Field(ge=1, le=MAX_RANK)]] | None = Field(
        default=None, min_length=1, max_length=6, description=f"values of rank to try (each in [1, {MAX_RANK}])")
    max_trials: NotBoolInt = Field(default=16, ge=1, le=64, description="cap on the number of trials")
    max_trainable_params: NotBoolInt | None = Field(
        default=None, ge=1, le=2**62, description="only trials under this trainable-parameter budget are eligible")


class MethodIn(BaseModel):
    """SPAFIT and its baselines. n1/n2: an int is a layer index, a float a fraction of the depth L."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: Literal["spafit", "lora", "bitfit"] = Field(
        default="spafit", description="`full` fine-tuning is not offered: it yields a whole model, not an adapter")
    n1: LayerValue | None = Field(default=None, ge=-1024, le=1024, description="first bias-only layer (default L/3)")
    n2: LayerValue | None = Field(default=None, ge=-1024, le=1024, description="first LoRA layer (default 2L/3)")
    rank: NotBoolInt = Field(default=8, ge=1, le=MAX_RANK, description=f"LoRA rank, in [1, {MAX_RANK}]")
    alpha: NotBoolFloat = Field(default=16.0, gt=0, le=4096, description="LoRA alpha, in (0, 4096]; the update is scaled "
                         "by alpha / rank")
    dropout: NotBoolFloat = Field(default=0.0, ge=0, lt=1, description="dropout on the LoRA input, in [0, 1)")
    targets: list[str] | None = Field(
        default=None, description="LoRA targets among query, key, value, attention_output, ffn_in, ffn_out "
        "(default: the four attention projections)")
    group3_bias: bool = Field(default=True, description="also train biases in the LoRA layers")
    sweep: SweepIn | None = Field(default=None, description="train several stratifications and keep the best")


class HyperparametersIn(BaseModel):
    """Every field bounded; epochs x steps per epoch is also bounded (SPAFIT_JOB_MAX_STEPS) and max_seq_length
    by the base model's position embeddings, both checked when the job is created."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: NotBoolInt = Field(default=3, ge=1, le=100)
    batch_size: NotBoolInt = Field(default=16, ge=1, le=1024)
    learning_rate: NotBoolFloat | None = Field(default=None, gt=0, le=0.1, description="default: 1e-3 for adapters")
    head_learning_rate: NotBoolFloat | None = Field(default=None, gt=0, le=0.1,
                                             description="the classifier head's; default: learning_rate")
    bias_learning_rate: NotBoolFloat | None = Field(default=None, gt=0, le=0.1,
                                             description="the bias deltas'; default: learning_rate")
    lora_learning_rate: NotBoolFloat | None = Field(default=None, gt=0, le=0.1,
                                             description="the LoRA factors'; default: learning_rate")
    validation_fraction: NotBoolFloat = Field(default=0.1, ge=0, le=0.5, description="without a validation dataset, "
                                       "this stratified, seeded share of the training rows becomes one (when it "
                                       "and the rest have at least 8 rows each); 0: none")
    max_seq_length: NotBoolInt = Field(default=128, ge=8, le=8192, description="at most the base model's positions; "
                                "default 128, or fewer when the model takes fewer")
    warmup_ratio: NotBoolFloat = Field(default=0.06, ge=0, lt=1)
    seed: NotBoolInt = Field(default=42, ge=0, le=MAX_SEED)
    early_stopping_patience: NotBoolInt | None = Field(default=None, ge=1, le=100)
    weight_decay: NotBoolFloat = Field(default=0.0, ge=0, le=1, description="AdamW's decoupled weight decay, in [0, 1]")
    gradient_accumulation_steps: NotBoolInt = Field(default=1, ge=1, le=1024)
    max_grad_norm: NotBoolFloat | None = Field(default=1.0, gt=0, le=1e6)
    prefix_cache: bool = Field(default=False, description="SPAFIT: compute the frozen prefix once per example")
    checkpoint_every_steps: NotBoolInt | None = Field(default=None, ge=1, le=1_000_000,
                                               description="default: the server's setting")


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="the task the adapter serves; created on first success", examples=["sentiment"])
    base_model: str | None = Field(default=None, max_length=300, description="default: the server's backbone")
    train_dataset: uuid.UUID
    validation_dataset: uuid.UUID | None = None
    text_fields: list[str] | None = Field(default=None, min_length=1, max_length=2)
    label_field: str | None = None
    task_type: TaskType | None = Field(default=None, description="default: the training dataset's")
    method: MethodIn = Field(default_factory=MethodIn)
    hyperparameters: HyperparametersIn = Field(default_factory=HyperparametersIn)
    time_limit_s: NotBoolInt | None = Field(
        default=None, ge=60, le=365 * 24 * 3600,
        description="wall-clock limit from the job's first start, in seconds (at most the service's "
        "SPAFIT_JOB_TIME_LIMIT_S, which is the default); past it the job fails with type `time-limit`")
    webhook_url: str | None = Field(
        default=None, min_length=1, max_length=2048, examples=["https://example.com/hooks/spafit"],
        description="POSTed to (signed: see the README's Webhooks section) when the job ends; http(s) only, and "
        "in server mode not to loopback, link-local or private addresses")
    webhook_on_eval: bool = Field(default=False, description="also POST each evaluation (needs webhook_url)")


class Progress(BaseModel):
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    eta_seconds: float | None = None


class JobError(BaseModel):
    type: str = Field(description="a stable slug: invalid-dataset, non-finite, time-limit, worker-lost, "
                      "internal-error, ...")
    message: str = Field(description="in words; never SQL, server paths or tracebacks")
    error_id: str | None = Field(default=None, description="for an internal error: the id under which the "
                                 "service's log holds its details")


class JobOut(BaseModel):
    id: uuid.UUID
    kind: Literal["train", "sweep", "trial", "predict", "evaluate"] = Field(
        description="`sweep`: a parent whose trials are jobs of their own (see its `trial` events)")
    task: str
    task_type: str
    base_model: str
    status: JobStatus
    progress: Progress | None
    metrics: dict[str, Any] | None = Field(description="the latest evaluation metrics")
    error: JobError | None = Field(description="why the job failed, in words")
    adapter_version: int | None = Field(description="the version of the task this job produced")
    attempts: int
    cancel_requested: bool
    method: dict[str, Any]
    hyperparameters: dict[str, Any]
    train_dataset: uuid.UUID
    validation_dataset: uuid.UUID | None
    text_fields: list[str]
    label_field: str | None
    parent_job: uuid.UUID | None = None
    time_limit_s: int | None = Field(default=None, description="this job's own wall-clock limit, if it set one")
    webhook_url: str | None = None
    webhook_on_eval: bool = False
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobEventOut(BaseModel):
    seq: int
    type: str = Field(description="status | progress | eval | checkpoint | trial | log | ...")
    data: dict[str, Any]
    created_at: datetime
