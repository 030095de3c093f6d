"""Request and response models of the HTTP API (pydantic v2)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")
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
    name: str = Field(min_length=1, max_length=300, description="Hugging Face Hub dataset id, e.g. `glue`")
    split: str = Field(default="train", min_length=1, max_length=100)
    config_name: str | None = Field(default=None, max_length=100, description="e.g. `sst2` for `glue`")


class HfDatasetCreate(BaseModel):
    """JSON body of `POST /v1/datasets` that imports a Hugging Face dataset instead of uploading a file."""

    model_config = ConfigDict(extra="forbid")

    hf: HfSource
    name: str | None = Field(default=None, max_length=200)
    text_fields: list[str] | None = Field(default=None, min_length=1, max_length=2)
    label_field: str | None = None
    task_type: TaskType = "single_label_classification"


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    format: str
    source: str
    task_type: str | None
    rows: int
    columns: list[str]
    sha256: str
    size_bytes: int
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


_STATUS_TEXT = {400: "Bad request", 401: "Missing or invalid API key", 403: "The API key lacks the required scope",
                404: "Not found (or another tenant's)", 409: "Conflict with the current state",
                413: "Request body or upload too large", 415: "Unsupported content type",
                422: "Invalid request or data", 503: "A dependency (database, broker, engine) is unavailable"}


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status documented with the Problem schema (main.py's OpenAPI hook
    files it under application/problem+json)."""
    return {code: {"model": Problem, "description": _STATUS_TEXT.get(code, "Error")} for code in codes}
