"""Request and response models of the HTTP API (pydantic v2)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")
DB_INT_MAX = 2**31 - 1  # the largest version number or event seq the registry can hold (INTEGER columns)
TaskType = Literal["single_label_classification", "multi_label_classification", "regression"]
DatasetFormat = Literal["csv", "tsv", "jsonl"]


class Problem(BaseModel):
    """An error response (RFC 9457 problem+json). `type` is stable: clients branch on it."""

    type: str = Field(examples=["https://spafit.dev/problems/invalid-dataset"])
    title: str
    status: int
    detail: str
    instance: str | None = None
    field: str | None = Field(default=None, description="the offending input, where there is one")
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="each problem: validation errors carry `field` and `message`, dataset "
        "problems `code`, `message`, `line` and `column`")
    model_config = ConfigDict(extra="allow")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(description="pass as `cursor` to get the next page; null on the last one")


class HfSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=300, description="Hugging Face Hub dataset id (`name` or "
                      "`owner/name`), e.g. `glue`. Local paths only in embedded mode with auth off.")
    split: str = Field(default="train", min_length=1, max_length=100)
    config_name: str | None = Field(default=None, max_length=100, description="e.g. `sst2` for `glue`")


class HfDatasetCreate(BaseModel):
    """JSON body of `POST /v1/datasets` that imports a Hugging Face dataset instead of uploading a file. The
    import runs in the worker: the answer is 202 with the dataset `importing`; poll it until `ready` or
    `failed`. The service's import limits (rows and bytes) apply; `max_rows` keeps only the first rows."""

    model_config = ConfigDict(extra="forbid")

    hf: HfSource
    max_rows: int | None = Field(default=None, ge=1, le=2**31 - 1,
                                 description="import only the first rows of the split (at most the service's limit)")
    name: str | None = Field(default=None, max_length=200)
    text_fields: list[str] | None = Field(default=None, min_length=1, max_length=2)
    label_field: str | None = None
    task_type: TaskType = "single_label_classification"


DatasetState = Literal["importing", "ready", "failed"]


class DatasetError(BaseModel):
    type: str = Field(description="a stable slug, e.g. `unsafe-data-source`, `import-too-large`, `invalid-dataset`")
    message: str = Field(description="the reason, in words")


class DatasetOut(BaseModel):
    """A dataset. Uploads are `ready` at once; an import is `importing` (content fields null or empty) until
    the worker makes it `ready` or `failed` (`error` says why). Only a ready dataset can train."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    state: DatasetState = "ready"
    error: DatasetError | None = None
    format: str
    source: str
    task_type: str | None
    rows: int | None
    columns: list[str]
    sha256: str | None
    size_bytes: int | None
    text_fields: list[str]
    label_field: str | None
    label_counts: dict[str, int] | None
    report: dict[str, Any] = Field(description="the validation report: shape, fields, label counts, warnings")
    source_detail: dict[str, Any] | None = None
    created_at: datetime


class CheckResult(BaseModel):
    ok: bool
    duration_ms: float
    error: str | None = None


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: dict[str, CheckResult]


class DatasetUploadFields(BaseModel):
    """The text fields of a multipart dataset upload (next to the `file` part)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200, description="default: the file name")
    format: DatasetFormat | None = Field(default=None, description="default: from the extension or the content")
    text_fields: list[str] | None = Field(default=None, min_length=1, max_length=2,
                                          description="comma-separated or a JSON list; default: inferred")
    label_field: str | None = Field(default=None, description="default: inferred (label, labels, score, ...)")
    task_type: TaskType = "single_label_classification"


_STATUS_TEXT = {400: "The body could not be parsed (JSON that is not UTF-8, broken multipart)", 401: "Missing or invalid API key",
                403: "The API key lacks the required scope",
                404: "Not found (or another tenant's)", 409: "Conflict with the current state",
                413: "Request body or upload too large", 415: "Unsupported content type",
                422: "Invalid request or data", 503: "A dependency (database, broker, engine) is unavailable"}


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status documented with the Problem schema (main.py's OpenAPI hook
    files it under application/problem+json)."""
    return {code: {"model": Problem, "description": _STATUS_TEXT.get(code, "Error")} for code in codes}


# ----------------------------------------------------------------------------------- tasks and predict
MAX_FANOUT_TASKS = 32  # tasks in one POST /v1/predict: each is one more row per input in the fan-out pass


class AdapterVersionOut(BaseModel):
    """One immutable adapter version of a task."""

    id: uuid.UUID = Field(description="the version's id (also the name the engine holds the adapter under)")
    version: int
    active: bool = Field(description="whether predict serves this version now")
    sha256: str = Field(description="sha256 of the adapter weights (adapter.safetensors)")
    size_bytes: int = Field(description="size of the adapter weights")
    base_model: str
    base_fingerprint: str = Field(description="sha256 over the base model's weights the adapter was trained on")
    method: dict[str, Any] = Field(description="the method and its parameters (spafit n1/n2/rank, lora, bitfit)")
    task_type: TaskType
    labels: list[str] = Field(description="the label map: index -> label (empty for regression)")
    trainable_params: int | None = Field(default=None, description="trainable parameters, head included")
    param_counts: dict[str, Any] | None = Field(
        default=None, description="total, without_head, head, per_group, base_model, trainable_fraction")
    metrics: dict[str, Any] | None = Field(default=None, description="validation metrics recorded at training")
    max_seq_length: int | None = None
    stratification: dict[str, Any] | None = Field(
        default=None, description="num_layers, n1, n2 and layer_groups: the SPAFIT group of each layer "
        "(1 frozen, 2 bias-only, 3 LoRA + bias)")
    job_id: uuid.UUID | None = Field(default=None, description="the job that trained it; null when imported or once that job was deleted")
    evaluations: list[dict[str, Any]] = Field(default_factory=list, description=(
        "every evaluation of this version on a labelled dataset (POST .../evaluate), oldest first"))
    created_at: datetime


class TaskOut(BaseModel):
    """A task and the adapter version predict serves."""

    name: str
    version_count: int
    active_version: AdapterVersionOut | None = Field(description="null until a version exists or is activated")
    created_at: datetime
    updated_at: datetime


class TextPair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    text_pair: str | None = Field(default=None, description="the second text of a sentence-pair task")


PredictInput = str | TextPair


class PredictRequest(BaseModel):
    """`POST /v1/tasks/{task}/predict`. Limits (inputs per request, characters per text) are the service's
    `max_predict_inputs` and `max_input_chars` settings."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[PredictInput] = Field(min_length=1, description="texts, or {text, text_pair} objects; "
                                       "one request holds only one of the two kinds")
    top_k: int | None = Field(default=None, ge=1, description="class scores to return per input "
                              "(default: all, best first)")


class FanOutRequest(BaseModel):
    """`POST /v1/predict`: every input asked of every task; the backbone's shared prefix runs once per input."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(min_length=1, max_length=MAX_FANOUT_TASKS, description="task names, each once")
    inputs: list[PredictInput] = Field(min_length=1, description="texts, or {text, text_pair} objects")
    top_k: int | None = Field(default=None, ge=1)


class LabelScore(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    label: str | None = Field(description="the best label (null for regression)")
    score: float = Field(description="its probability (the value for regression)")
    scores: list[LabelScore] = Field(description="labels with their probabilities, best first (top_k of them)")
    labels: list[str] | None = Field(default=None, description="multi-label: every label at or above 0.5")
    value: float | None = Field(default=None, description="regression: the predicted value")


class TaskPredictions(BaseModel):
    task: str
    version: int = Field(description="the adapter version that answered")
    predictions: list[Prediction] = Field(description="one per input, in order")


class FanOutResponse(BaseModel):
    results: list[TaskPredictions] = Field(description="one per task, in the order asked")
