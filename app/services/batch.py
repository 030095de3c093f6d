"""Batch prediction and evaluation: jobs of kinds `predict` and `evaluate` in the one job system (the same queue,
claim, fencing, cancel, events, progress and per-tenant active-job limit as training jobs: app/services/jobs.py,
worker/runner.py); the worker side is worker/batch.py.

A job of either kind names its dataset in `train_dataset_id` (the dataset deletion check and retention see it like
any job's), the adapter version it runs in `adapter_version_id`, and its options in `hyperparameters`. A batch
prediction's result is stored as chunks (`batch_chunks`, keyed by (job, chunk)) and streamed back in order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from spafit_core.errors import ConfigError, DataError

from ..db import Database
from ..errors import Conflict, NotFound, RangeNotSatisfiable, ResultsNotReady, ResultTooLarge, TooManyRows
from ..models import AdapterVersion, BatchChunk, Dataset, Job, Task, VersionEvaluation
from ..schemas import MAX_FANOUT_TASKS
from ..settings import Settings
from . import events, jobs, quota, registry
from .blobs import byte_length  # noqa: F401  (batch.byte_length: the worker sums result sizes with it)

MAX_TOP_K = 1000
CSV_HEADER = ("id", "label", "score")
GLUE_HUB_NAMES = ("glue", "nyu-mll/glue")  # a dataset imported from these names a GLUE preset (its config)
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs a cell starting so as a formula
# What one stored prediction may take on average: a job's result is bounded by batch_max_rows_per_job times this.
# Without it a row's size grew with the adapter's labels (all_scores, or a multi-label version's `labels`): a 1000-row
# upload over an imported 10,000-label adapter stored gigabytes of result for one tenant, in the shared database.
RESULT_BYTES_PER_PREDICTION = 2048
SCORE_ENTRY_BYTES = 48  # {"label":"","score":0.12345678901234567} and its CSV quoting, without the name


class TaskRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(max_length=64, examples=["sentiment"])
    version: int | None = Field(default=None, ge=1, le=2**31 - 1, description="default: the task's active version")


class BatchPredictionCreate(BaseModel):
    """One task (`task`, `version`), or several over the same dataset in one job (`tasks`): then each row runs
    through the engine's fan-out path (the layers below the adapters' first trained layer once per row, then one
    branch per task) and each result row carries every task's prediction. The tasks must share one base model
    (422 otherwise: run them as separate jobs). The per-job row limit counts rows x tasks."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(default=None, max_length=64, description="the task whose adapter predicts",
                             examples=["sentiment"])
    version: int | None = Field(default=None, ge=1, le=2**31 - 1, description="default: the task's active version")
    tasks: list[str | TaskRef] | None = Field(
        default=None, min_length=1, max_length=MAX_FANOUT_TASKS,
        description="instead of `task`: several tasks, each a name (its active version) or {task, version}, each "
                    "once; the results then carry each task's prediction per row",
        examples=[["sentiment", {"task": "topic", "version": 2}]])
    dataset: uuid.UUID = Field(description="a ready dataset of this tenant: the rows to predict")
    text_fields: list[str] | None = Field(default=None, min_length=1, max_length=2,
                                          description="the input column(s) (a second one is the text pair); "
                                                      "default: the dataset's")
    id_field: str | None = Field(default=None, max_length=200, description=(
        "the column whose value is each result row's `id`; default: `id` where the dataset has it, else the "
        "row's 0-based index"))
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K, description=(
        "the best k labels' scores per row (as `all_scores`, at most k of them); alone it implies all_scores"))
    format: Literal["jsonl", "csv"] = "jsonl"
    all_scores: bool = Field(default=False, description="also every label's score (JSONL: a list; CSV: a JSON column)")

    @model_validator(mode="after")
    def _one_form(self) -> BatchPredictionCreate:
        if (self.task is None) == (self.tasks is None):
            raise ValueError("give either `task` (one task) or `tasks` (several), not both or neither")
        if self.tasks is not None and self.version is not None:
            raise ValueError("`version` goes with `task`; with `tasks`, give {task, version} items")
        if self.top_k is not None and not self.all_scores:  # top_k alone asks for the best k scores (it was
            self.all_scores = True                              # silently ignored: no scores at all)
        return self

    @field_validator("all_scores")
    @classmethod
    def _scores_for_top_k(cls, value: bool, info: ValidationInfo) -> bool:
        """Runs only when the client sent `all_scores` (defaults are not validated): false with `top_k` is a 422
        naming this field."""
        if not value and info.data.get("top_k") is not None:
            raise ValueError("`top_k` limits the scores `all_scores` adds; with all_scores false there are none")
        return value

    def task_refs(self) -> list[TaskRef]:
        if self.tasks is None:
            return [TaskRef(task=self.task or "", version=self.version)]
        return [t if isinstance(t, TaskRef) else TaskRef(task=t) for t in self.tasks]


class EvaluateCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: uuid.UUID = Field(description="a ready, labelled dataset of this tenant")
    text_fields: list[str] | None = Field(default=None, min_length=1, max_length=2)
    label_field: str | None = Field(default=None, max_length=200, description="default: the dataset's")


class EvaluationOut(BaseModel):
    id: uuid.UUID
    version: int
    dataset: uuid.UUID
    job: uuid.UUID | None
    rows: int
    metrics: dict[str, Any]
    created_at: Any


def _version(session: Session, tenant_id: uuid.UUID, task_name: str, number: int | None) -> AdapterVersion:
    task = registry.get_task(session, tenant_id, task_name)
    return registry.active_version(session, task) if number is None else registry.get_version(session, task, number)


def _dataset(session: Session, tenant_id: uuid.UUID, dataset_id: uuid.UUID, settings: Settings,
             tasks: int = 1) -> Dataset:
    """The ready dataset; its rows x `tasks` (the rows the engine predicts) within the per-job limit."""
    ds = jobs._check_dataset(session, tenant_id, dataset_id, "dataset")
    limit = settings.batch_max_rows_per_job
    if (ds.rows or 0) * tasks > limit:
        what = f"{ds.rows} rows" if tasks == 1 else f"{ds.rows} rows x {tasks} tasks = {ds.rows * tasks} predictions"
        raise TooManyRows(f"dataset {dataset_id} has {what}; a batch job may take at most {limit} "
                          "(SPAFIT_BATCH_MAX_ROWS_PER_JOB, rows x tasks): split it",
                          field="dataset", rows=ds.rows, tasks=tasks, limit=limit)
    return ds


def _task_versions(session: Session, tenant_id: uuid.UUID, refs: list[TaskRef],
                   several: bool) -> list[AdapterVersion]:
    """Each task's version, in order: 404/409 naming the task (`tasks[i]`) that has none, 422 for a task listed
    twice or tasks on different base models (the fan-out branches within one backbone: run those apart)."""
    out: list[AdapterVersion] = []
    seen: dict[str, int] = {}
    for i, ref in enumerate(refs):
        field = f"tasks[{i}]" if several else "task"
        try:
            registry.check_task_name(ref.task)
        except ConfigError as e:
            raise ConfigError(e.message, field=field) from None
        if ref.task in seen:
            raise ConfigError(f"task {ref.task!r} is listed twice (tasks[{seen[ref.task]}] and tasks[{i}])",
                              field=field)
        seen[ref.task] = i
        try:
            out.append(_version(session, tenant_id, ref.task, ref.version))
        except (NotFound, Conflict) as e:
            raise type(e)(e.message, field=field) from None
    bases = {v.base_model for v in out}
    if len(bases) > 1:
        listed = ", ".join(f"{r.task} on {v.base_model}" for r, v in zip(refs, out, strict=True))
        raise ConfigError(f"the tasks of one batch job must share a base model (the fan-out path runs one backbone); "
                          f"got {listed}: start one job per base model", field="tasks")
    return out


def _columns(ds: Dataset, wanted: list[str] | None, field: str) -> list[str]:
    fields = list(wanted or ds.text_fields or [])
    if not fields:
        raise DataError(f"dataset {ds.id} has no text column: pass {field} (columns: {ds.columns})", field=field)
    missing = [c for c in fields if c not in ds.columns]
    if missing:
        raise DataError(f"dataset {ds.id} has no column(s) {missing}; its columns are {ds.columns}", field=field)
    return fields


def _hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _replayed(session: Session, tenant_id: uuid.UUID, idempotency_key: str | None, digest: str) -> Job | None:
    """The job an earlier request with this Idempotency-Key created (409 if that request's body was another), checked
    before anything is resolved: a retry gets its job back even after the task's active version changed or the
    task was deleted, as with training jobs."""
    if idempotency_key is None:
        return None
    existing = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key))
    return None if existing is None else jobs._replay(existing, digest)


def _job(session: Session, tenant_id: uuid.UUID, kind: str, version: AdapterVersion, task: str, ds: Dataset,
         text_fields: list[str], label_field: str | None, options: dict, settings: Settings,
         idempotency_key: str | None, digest: str) -> tuple[Job, bool]:
    if idempotency_key is not None:  # again under the tenant's lock: a concurrent try of this request committed first
        existing = jobs.replayed_under_lock(session, tenant_id, idempotency_key)
        if existing is not None:
            return jobs._replay(existing, digest), False
    jobs._check_active_jobs(session, tenant_id, settings, 1)
    quota.reserve(session, settings.tenant_max_stored_bytes, tenant_id, 0,
                  "a batch prediction (its result)" if kind == "predict" else "an evaluation (its metrics)")
    task_type = ((version.config or {}).get("task") or {}).get("task_type") or "single_label_classification"
    job = Job(tenant_id=tenant_id, kind=kind, task_name=task, task_type=task_type, base_model=version.base_model,
              train_dataset_id=ds.id, text_fields=text_fields, label_field=label_field, method=dict(version.method or {}),
              hyperparameters={**options, "rows": ds.rows}, status="queued", idempotency_key=idempotency_key,
              request_hash=digest, max_attempts=settings.job_max_attempts, adapter_version_id=version.id)
    session.add(job)
    try:
        session.flush()
    except IntegrityError:  # the same Idempotency-Key, created concurrently; or a dataset or version deleted
        session.rollback()
        existing = None if idempotency_key is None else session.scalar(
            select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key))
        if existing is None:
            raise jobs.deleted_meanwhile() from None
        return jobs._replay(existing, digest), False
    events.append_in(session, job.id, "status", {"status": "queued"})
    session.commit()
    return job, True


def create_prediction(session: Session, tenant_id: uuid.UUID, body: BatchPredictionCreate, settings: Settings, *,
                      idempotency_key: str | None = None) -> tuple[Job, bool]:
    digest = _hash({"kind": "predict", **body.model_dump(mode="json")})  # the request as sent
    if (existing := _replayed(session, tenant_id, idempotency_key, digest)) is not None:
        return existing, False
    refs = body.task_refs()
    several = body.tasks is not None
    versions = _task_versions(session, tenant_id, refs, several)
    ds = _dataset(session, tenant_id, body.dataset, settings, tasks=len(refs))
    text_fields = _columns(ds, body.text_fields, "text_fields")
    id_field = body.id_field
    if id_field is not None and id_field not in ds.columns:
        raise DataError(f"dataset {ds.id} has no column {id_field!r}; its columns are {ds.columns}", field="id_field")
    if id_field is None and "id" in ds.columns:
        id_field = "id"
    options: dict[str, Any] = {"format": body.format, "all_scores": body.all_scores, "top_k": body.top_k,
                               "id_field": id_field, "chunk_rows": settings.batch_chunk_rows}
    if several:  # the job row names the first task and version; the worker runs them all
        options["tasks"] = [{"task": r.task, "version": v.version, "version_id": str(v.id)}
                            for r, v in zip(refs, versions, strict=True)]
    _check_result_size(ds, versions, body, settings)
    return _job(session, tenant_id, "predict", versions[0], refs[0].task, ds, text_fields, None, options, settings,
                idempotency_key, digest)


def result_budget(settings: Settings) -> int:
    """The most bytes one batch prediction's result may take (its chunks, all of them)."""
    return max(1, settings.batch_max_rows_per_job) * RESULT_BYTES_PER_PREDICTION


def row_bytes(version: AdapterVersion, all_scores: bool, top_k: int | None) -> int:
    """An upper estimate of the bytes one prediction of `version` takes in a result row: its label and score, and,
    where asked, a score per label (at most top_k) and, for multi-label, the predicted labels' names."""
    task = (version.config or {}).get("task") or {}
    labels = [str(x) for x in task.get("labels") or []]
    longest = 2 * max((len(x.encode()) for x in labels), default=0)  # quotes and escapes doubled at worst
    entry = longest + SCORE_ENTRY_BYTES
    size = entry
    if all_scores:
        size += min(top_k or len(labels), len(labels)) * entry
    if task.get("task_type") == "multi_label_classification":
        size += len(labels) * (longest + 4)
    return size


def _check_result_size(ds: Dataset, versions: list[AdapterVersion], body: BatchPredictionCreate,
                       settings: Settings) -> None:
    """422 `result-too-large` for a job whose result could pass `result_budget` (the worker holds it too)."""
    per_row = sum(row_bytes(v, body.all_scores, body.top_k) for v in versions)
    budget, rows = result_budget(settings), ds.rows or 0
    if rows * per_row > budget:
        fits = max(0, budget // max(per_row, 1))
        raise ResultTooLarge(
            f"the result of {rows} rows could take up to {rows * per_row} bytes ({per_row} per row: "
            f"{'every label scored' if body.all_scores else 'the predicted labels named'}), past the "
            f"{budget} bytes a batch prediction may store (SPAFIT_BATCH_MAX_ROWS_PER_JOB x "
            f"{RESULT_BYTES_PER_PREDICTION}); ask for fewer scores (top_k) or split the dataset (at most {fits} rows "
            "each)", field="top_k" if body.all_scores else "dataset", rows=rows, bytes_per_row=per_row,
            limit_bytes=budget)


def create_evaluation(session: Session, tenant_id: uuid.UUID, task: str, number: int, body: EvaluateCreate,
                      settings: Settings, *, idempotency_key: str | None = None) -> tuple[Job, bool]:
    digest = _hash({"kind": "evaluate", "task": task, "version": number, **body.model_dump(mode="json")})
    if (existing := _replayed(session, tenant_id, idempotency_key, digest)) is not None:
        return existing, False
    registry.check_task_name(task)
    version = _version(session, tenant_id, task, number)
    ds = _dataset(session, tenant_id, body.dataset, settings)
    text_fields = _columns(ds, body.text_fields, "text_fields")
    label_field = body.label_field or ds.label_field
    if label_field is None or label_field not in ds.columns:
        raise DataError(f"dataset {ds.id} has no label column{f' {label_field!r}' if label_field else ''}: an "
                        f"evaluation needs labels (columns: {ds.columns})", field="label_field")
    _check_labels(version, ds, label_field)
    preset = glue_preset(session, version, ds)
    return _job(session, tenant_id, "evaluate", version, task, ds, text_fields, label_field,
                {"glue_preset": preset} if preset else {}, settings, idempotency_key, digest)


def _check_labels(version: AdapterVersion, ds: Dataset, label_field: str) -> None:
    """422 at creation for what the worker would fail on at the first row: a multi-label version (not evaluated
    yet), or a dataset whose label column has labels the version does not know (from the upload's label counts)."""
    task = (version.config or {}).get("task") or {}
    task_type = task.get("task_type", "single_label_classification")
    if task_type == "multi_label_classification":
        raise ConfigError(f"version {version.version} is multi-label: evaluating multi-label versions is not "
                          "supported yet", field="version")
    if task_type != "single_label_classification" or ds.task_type != task_type or label_field != ds.label_field:
        return
    unknown = sorted(set(ds.label_counts or {}) - set(task.get("labels") or ()))
    if unknown:
        raise DataError(f"dataset {ds.id} has label(s) {unknown[:10]} in column {label_field!r} that version "
                        f"{version.version} does not know (its labels: {task.get('labels')})", field="label_field")


def _glue_import(ds: Dataset | None) -> str | None:
    detail = (ds.source_detail or {}) if ds is not None and ds.source == "hf" else {}
    if str(detail.get("name", "")).lower() not in GLUE_HUB_NAMES or not detail.get("config_name"):
        return None
    return str(detail["config_name"])


def glue_preset(session: Session, version: AdapterVersion, eval_ds: Dataset) -> str | None:
    """The GLUE preset whose metric an evaluation of `version` reports too: the one its training dataset was
    imported from (hf `glue`, config `cola`, ...), else the one the evaluation dataset was; only where the
    preset's task type and number of labels are the version's."""
    from spafit_core.errors import ConfigError as PresetError
    from spafit_core.glue import get_glue_task

    train = None
    if version.job_id is not None:
        job = session.get(Job, version.job_id)
        train = session.get(Dataset, job.train_dataset_id) if job is not None and job.train_dataset_id else None
    task = (version.config or {}).get("task") or {}
    for name in (_glue_import(train), _glue_import(eval_ds)):
        if name is None:
            continue
        try:
            preset = get_glue_task(name)
        except PresetError:
            continue
        if preset.task_type == task.get("task_type", "single_label_classification") and \
                len(preset.labels) == len(task.get("labels") or ()):
            return preset.name
    return None


def get_prediction(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    job = jobs.get(session, tenant_id, job_id)
    if job.kind != "predict":
        raise NotFound(f"batch prediction {job_id} not found")
    return job


def list_predictions(session: Session, tenant_id: uuid.UUID, *, limit: int, cursor: str | None):
    from .pagination import paginate

    return paginate(session, select(Job).where(Job.tenant_id == tenant_id, Job.kind == "predict"), Job,
                    limit=limit, cursor=cursor)


def media_type(job: Job) -> str:
    return "text/csv" if job.hyperparameters.get("format") == "csv" else "application/x-ndjson"


def check_results(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    job = get_prediction(session, tenant_id, job_id)
    if job.status != "succeeded":
        raise ResultsNotReady(f"batch prediction {job_id} is {job.status}; its results are there once it has "
                              "succeeded", status=job.status)
    return job


def task_names(job: Job) -> list[str] | None:
    """The tasks of a several-task job, in order; None for a one-task job."""
    tasks = (job.hyperparameters or {}).get("tasks")
    return [t["task"] for t in tasks] if tasks else None


def csv_header(tasks: list[str] | None) -> bytes:
    """One task: `id,label,score,scores`; several: `id` then `<task>.label,<task>.score,<task>.scores` per task."""
    cols = ["id", *(f"{t}.{c}" for t in tasks for c in ("label", "score", "scores"))] if tasks \
        else [*CSV_HEADER, "scores"]
    buf = io.StringIO()
    csv.writer(buf).writerow(cols)
    return buf.getvalue().encode()


def results_size(session: Session, job_id: uuid.UUID, fmt: str, tasks: list[str] | None = None) -> int:
    """The result file's length in bytes (its Content-Length), from the stored chunks' sizes."""
    body = session.scalar(select(func.coalesce(func.sum(byte_length(BatchChunk.data)), 0))
                          .where(BatchChunk.job_id == job_id))
    return int(body) + (len(csv_header(tasks)) if fmt == "csv" else 0)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range [start, stop) a `Range` header asks of a file of `size` bytes (RFC 9110: `bytes=a-b`,
    `bytes=a-`, `bytes=-n`); None where the whole file is the answer (no header, another unit, several ranges,
    a malformed one: a server may ignore those). A range that starts past the end raises `RangeNotSatisfiable`."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isascii() and first.isdigit() or first == "") or \
            not (last.isascii() and last.isdigit() or last == "") or first == last == "":
        return None
    if size == 0:  # no byte of an empty file can be asked for
        raise RangeNotSatisfiable(size)
    if first == "":  # the last n bytes
        n = int(last)
        if n == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - n), size
    start = int(first)
    stop = size if last == "" else min(int(last) + 1, size)
    if last != "" and int(last) < start:
        return None  # invalid: ignored
    if start >= size:
        raise RangeNotSatisfiable(size)
    return start, stop


def stream_results(db: Database, job_id: uuid.UUID, fmt: str, tasks: list[str] | None = None,
                   span: tuple[int, int] | None = None) -> Iterator[bytes]:
    """The result file, one stored chunk at a time (never the whole file in memory); a session per chunk, so a
    slow reader holds no pooled connection between chunks. `span`: only bytes [start, stop) of it (chunks before
    `start` are skipped by their stored sizes, not read)."""
    start, stop = span if span is not None else (0, None)
    at = 0  # the file offset of the next piece
    if fmt == "csv":
        head = csv_header(tasks)
        yield from _clip(head, at, start, stop)
        at += len(head)
    with db.session() as s:
        sizes = s.execute(select(BatchChunk.chunk, byte_length(BatchChunk.data))
                          .where(BatchChunk.job_id == job_id).order_by(BatchChunk.chunk)).all()
    for chunk, size in sizes:
        if stop is not None and at >= stop:
            return
        if at + size > start:
            with db.session() as s:
                data = s.scalar(select(BatchChunk.data).where(BatchChunk.job_id == job_id, BatchChunk.chunk == chunk))
            if data is None:  # the job was deleted meanwhile: the download ends short of its Content-Length
                return
            yield from _clip(bytes(data), at, start, stop)
        at += size


def _clip(piece: bytes, at: int, start: int, stop: int | None) -> Iterator[bytes]:
    """The part of `piece` (at file offset `at`) inside [start, stop)."""
    lo, hi = max(start - at, 0), len(piece) if stop is None else min(stop - at, len(piece))
    if lo < hi:
        yield piece[lo:hi]


def _one(p: dict, all_scores: bool) -> dict:
    row = {"label": p["label"], "score": p["score"]}
    if "labels" in p:
        row["labels"] = p["labels"]
    if all_scores:
        row["scores"] = p["scores"]
    return row


def jsonl_line(row: dict) -> str:
    """One JSON Lines row; U+2028, U+2029 and U+0085 escaped (valid JSON either way), since readers that split
    lines with str.splitlines (httpx's iter_lines too) would cut a row in two at them."""
    text = json.dumps(row, separators=(",", ":"), ensure_ascii=False)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")


def csv_cell(value: Any) -> Any:
    """An id or label as a CSV cell a spreadsheet shows as text (OWASP CSV injection: a leading `'` on text that
    starts with = + - @ tab or CR and is not a number); an id that is a JSON object or list as JSON."""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if not isinstance(value, str) or not value.startswith(FORMULA_START):
        return value
    try:
        float(value)
        return value  # "-3", "+1.5": a number
    except ValueError:
        return "'" + value


def encode_task_rows(rows: list[dict], tasks: list[str], fmt: str, all_scores: bool) -> bytes:
    """Result rows of a several-task job ({id, results: {task: prediction}}) in the job's format: JSONL
    `{"id", "results": {task: {label, score[, labels][, scores]}}}`; CSV three columns per task (no header)."""
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        for r in rows:
            cells: list[Any] = [csv_cell(r["id"])]
            for t in tasks:
                p = r["results"][t]
                cells += [csv_cell(p["label"]), p["score"],
                          json.dumps(p["scores"], separators=(",", ":")) if all_scores else ""]
            w.writerow(cells)
        return buf.getvalue().encode()
    out = [jsonl_line({"id": r["id"], "results": {t: _one(r["results"][t], all_scores) for t in tasks}})
           for r in rows]
    return ("\n".join(out) + "\n").encode() if out else b""


def encode_rows(rows: list[dict], fmt: str, all_scores: bool) -> bytes:
    """Result rows ({id, label, score, scores}) in the job's format; CSV without its header (added at download)."""
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        for r in rows:
            w.writerow([csv_cell(r["id"]), csv_cell(r["label"]), r["score"],
                        json.dumps(r["scores"], separators=(",", ":")) if all_scores else ""])
        return buf.getvalue().encode()
    out = []
    for r in rows:
        row = {"id": r["id"], "label": r["label"], "score": r["score"]}
        if "labels" in r:
            row["labels"] = r["labels"]
        if all_scores:
            row["scores"] = r["scores"]
        out.append(jsonl_line(row))
    return ("\n".join(out) + "\n").encode() if out else b""


# ------------------------------------------------------------------------------------------ evaluations
def evaluation_out(e: VersionEvaluation, version: int) -> EvaluationOut:
    return EvaluationOut(id=e.id, version=version, dataset=e.dataset_id, job=e.job_id, rows=e.rows,
                         metrics=e.metrics, created_at=e.created_at)


def evaluations(session: Session, task: Task) -> dict[int, list[EvaluationOut]]:
    """Every evaluation of the task's versions, by version number, oldest first."""
    rows = session.execute(select(VersionEvaluation, AdapterVersion.version)
                           .join(AdapterVersion, AdapterVersion.id == VersionEvaluation.version_id)
                           .where(AdapterVersion.task_id == task.id)
                           .order_by(VersionEvaluation.created_at, VersionEvaluation.id)).all()
    out: dict[int, list[EvaluationOut]] = {}
    for e, number in rows:
        out.setdefault(number, []).append(evaluation_out(e, number))
    return out


def compare(session: Session, tenant_id: uuid.UUID, task_name: str, spec: str) -> dict[str, Any]:
    """`v1,v2`: the two versions' latest evaluations on each dataset both were evaluated on, side by side."""
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and 0 < int(p) < 2**31 for p in parts):  # not "²"
        raise ConfigError(f"compare takes two version numbers, e.g. compare=1,2; got {spec[:50]!r}", field="compare")
    a, b = int(parts[0]), int(parts[1])
    task = registry.get_task(session, tenant_id, task_name)
    registry.get_version(session, task, a)
    registry.get_version(session, task, b)
    by_version = evaluations(session, task)
    latest = {v: {str(e.dataset): e for e in by_version.get(v, [])} for v in (a, b)}  # oldest first: last wins
    shared = sorted(set(latest[a]) & set(latest[b]))
    rows = []
    for ds in shared:
        ea, eb = latest[a][ds], latest[b][ds]
        delta = {k: eb.metrics[k] - ea.metrics[k] for k in ea.metrics
                 if isinstance(ea.metrics.get(k), int | float) and isinstance(eb.metrics.get(k), int | float)
                 and not isinstance(ea.metrics.get(k), bool)}
        rows.append({"dataset": ds, "a": ea.model_dump(mode="json"), "b": eb.model_dump(mode="json"), "delta": delta})
    if not rows:
        raise Conflict(f"versions {a} and {b} of task {task_name!r} were not evaluated on a common dataset: "
                       "evaluate both on the same dataset first")
    return {"task": task_name, "versions": [a, b], "datasets": rows}
