"""Datasets: parse and validate with `spafit_core.data`, store the bytes as a blob and the row, in one
transaction (a killed upload leaves nothing visible). Everything is scoped to a tenant.

An upload is validated in the request and is `ready` at once. A Hugging Face import is only recorded in the
request (`importing`) and read by the worker (`run_import`, task `spafit.import_dataset`), bounded in rows
and bytes, which makes it `ready` or `failed` with a stable error type and a reason in words. With auth on
(or in server mode) an import names a Hub dataset only: never a path of the server.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from spafit_core import data as core_data
from spafit_core.errors import DataError, SpafitError

from ..db import Database
from ..errors import (
    Conflict,
    DatasetNotReady,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    StorageQuotaExceeded,
    TooManyImports,
    TooManyUploads,
)
from ..models import Dataset, Job, Tenant, utcnow
from ..schemas import DatasetUploadFields, HfDatasetCreate
from ..settings import Settings
from . import blobs, quota
from .pagination import paginate
from .work_slots import TenantSlots

log = logging.getLogger("spafit.datasets")
HUB_ID = core_data.HUB_ID
MAX_IMPORT_ATTEMPTS = 3  # deliveries of one import (a worker lost mid-import) before it fails
ImportSender = Callable[[uuid.UUID], None]


@dataclass(frozen=True)
class Upload:
    """A file as received: its bytes (already size-capped), its name and the form fields next to it."""

    content: bytes
    filename: str | None
    fields: DatasetUploadFields


def local_paths_allowed(settings: Settings) -> bool:
    """Server paths are only for the local user of an embedded, auth-off service on loopback: never for key
    holders, nor for whoever reaches an embedded service bound to the network (`insecure_bind`)."""
    return settings.mode == "embedded" and not settings.auth_enabled and not settings.insecure_bind


def upload_slots(settings: Settings) -> TenantSlots:
    """The turns uploads take to be read and checked in an API process (`work_slots`): reading a file of a million
    short rows holds a core (and the interpreter) for about 4 s and 250 MB, next to every tenant's predictions."""
    return TenantSlots("dataset upload", "SPAFIT_UPLOADS_IN_FLIGHT", settings.uploads_in_flight,
                       settings.upload_wait_s, lambda message: TooManyUploads(message, headers={"Retry-After": "1"}))


def create(session: Session, tenant_id: uuid.UUID, source: Upload, *, max_rows: int | None = None,
           max_stored_bytes: int = 0) -> Dataset:
    """Register an upload (what POST /v1/datasets calls for a multipart body, in the tenant's upload slot)."""
    f = source.fields
    return create_from_bytes(session, tenant_id, source.content, filename=source.filename, name=f.name,
                             format=f.format, text_fields=f.text_fields, label_field=f.label_field,
                             task_type=f.task_type, max_rows=max_rows, max_stored_bytes=max_stored_bytes)


def create_from_bytes(session: Session, tenant_id: uuid.UUID, content: bytes, *, filename: str | None = None,
                      name: str | None = None, format: str | None = None, text_fields: list[str] | None = None,
                      label_field: str | None = None, task_type: str = "single_label_classification",
                      max_rows: int | None = None, max_stored_bytes: int = 0) -> Dataset:
    """Register an uploaded CSV / TSV / JSON Lines file. `DataError` (422) if it is unreadable or has errors;
    `PayloadTooLarge` (413) past `max_rows` rows; `StorageQuotaExceeded` (403) past the tenant's quota."""
    quota.reserve(session, max_stored_bytes, tenant_id, len(content), "this upload", field="file", lock=False)
    session.rollback()  # the look held a pooled connection: not while the file is parsed
    nul = content.find(b"\x00")
    if nul >= 0:  # never text data (often UTF-16 without a BOM), and Postgres cannot store it: before parsing, whose
        line = content.count(b"\n", 0, nul) + 1  # message about such a file would be garbled by the NULs
        raise DataError(f"line {line}: a NUL byte (\\x00); save the file as UTF-8 text (not UTF-16)")
    fmt = format or core_data.detect_format(filename, content[:64 * 1024])
    table = core_data.read_table(content, fmt, max_rows=max_rows)
    if table.truncated_rows:
        raise PayloadTooLarge(f"the file has more than {max_rows} rows, the upload limit (SPAFIT_MAX_UPLOAD_ROWS); "
                              "upload a part of it, or import the dataset from the Hugging Face Hub", field="file",
                              limit_rows=max_rows)
    # a JSON escape \u0000 (the bytes hold no NUL): in a label or a column name it was a 500 from a jsonb column
    if bad := next((c for c in table.columns if "\x00" in c), None):
        raise DataError(f"column name {bad!r} holds a NUL character (\\u0000), which is never text data")
    for record, line in zip(table.records, table.lines, strict=True):
        if _has_nul(record):
            raise DataError(f"line {line}: a NUL character (\\u0000), which is never text data")
    report = _checked_report(table, text_fields, label_field, task_type)
    quota.reserve(session, max_stored_bytes, tenant_id, len(content), "this upload", field="file")
    dataset = Dataset(tenant_id=tenant_id, name=(name or _basename(filename) or f"upload.{fmt}")[:200], format=fmt,
                      task_type=task_type, source="upload", source_detail=None, state="ready")
    _fill(dataset, report, blobs.put(session, content), len(content))
    session.add(dataset)
    session.commit()
    return dataset


def _checked_report(table: core_data.Table, text_fields: list[str] | None, label_field: str | None,
                    task_type: str) -> core_data.DataReport:
    text_fields, label_field = core_data.infer_fields(table, text_fields, label_field)
    report = core_data.validate(table, text_fields, label_field, task_type)
    if not report.ok:
        try:
            report.raise_for_errors()
        except DataError as e:
            errors = [dataclasses.asdict(p) for p in report.errors]
            raise DataError(e.message, field=e.field, detail={"errors": errors, "report": report.to_dict()}) from None
    return report


def _fill(dataset: Dataset, report: core_data.DataReport, sha: str, size: int) -> None:
    dataset.rows, dataset.columns, dataset.text_fields = report.rows, report.columns, report.text_fields
    dataset.label_field, dataset.label_counts = report.label_field, report.label_counts or None
    dataset.sha256, dataset.size_bytes, dataset.report = sha, size, report.to_dict()


# ------------------------------------------------------------------------------------------ imports


def start_import(session: Session, tenant_id: uuid.UUID, req: HfDatasetCreate, settings: Settings) -> Dataset:
    """Record an import as `importing` (the worker reads it). With auth on, the name must be a Hub id
    (`UnsafeDataSource`, 422); a tenant has at most `max_concurrent_imports` in progress (429)."""
    hf = req.hf
    core_data.check_source(hf.name, hub_only=not local_paths_allowed(settings))
    if req.max_rows is not None and req.max_rows > settings.max_import_rows:
        raise DataError(f"max_rows {req.max_rows} is above this service's import limit of "
                        f"{settings.max_import_rows} rows", field="max_rows")
    # One tenant's imports are counted under its row lock, so concurrent requests cannot pass the limit together.
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
    running = session.scalar(select(func.count()).select_from(Dataset).where(
        Dataset.tenant_id == tenant_id, Dataset.state == "importing"))
    if running >= settings.max_concurrent_imports:
        session.rollback()
        raise TooManyImports(f"{running} dataset import(s) of this tenant are still in progress (the limit is "
                             f"{settings.max_concurrent_imports}); wait for one to finish",
                             headers={"Retry-After": "10"}, limit=settings.max_concurrent_imports)
    quota.reserve(session, settings.tenant_max_stored_bytes, tenant_id, 0, "an import")
    name = req.name or f"{hf.name}{f'/{hf.config_name}' if hf.config_name else ''}:{hf.split}"
    detail = {**hf.model_dump(), "max_rows": req.max_rows, "text_fields": req.text_fields,
              "label_field": req.label_field}
    dataset = Dataset(tenant_id=tenant_id, name=name[:200], format="jsonl", task_type=req.task_type, rows=None,
                      columns=[], text_fields=list(req.text_fields or []), label_field=req.label_field,
                      sha256=None, size_bytes=None, report={}, source="hf", source_detail=detail,
                      state="importing")
    session.add(dataset)
    session.commit()
    return dataset


def dispatch_import(session: Session, send: ImportSender, dataset: Dataset) -> None:
    """Hand the import to the broker; if that fails, the dataset is `failed` (service-unavailable, so it holds no
    import slot) and the client may retry (503)."""
    try:
        send(dataset.id)
    except Exception as e:
        log.warning("could not send dataset import %s to the broker (%s)", dataset.id, e)
        session.execute(update(Dataset).where(Dataset.id == dataset.id, Dataset.state == "importing")
                        .values(state="failed", error_type="service-unavailable",
                                error_message="the import could not be queued; retry shortly"))
        session.commit()
        raise ServiceUnavailable("the import could not be queued (the broker is unreachable); retry shortly",
                                 headers={"Retry-After": "5"}) from None


def _fail(db: Database, dataset_id: uuid.UUID, error_type: str, message: str, report: dict | None = None) -> None:
    with db.transaction() as s:
        values: dict[str, Any] = {"state": "failed", "error_type": error_type[:64], "error_message": message}
        if report is not None:
            values["report"] = report
        s.execute(update(Dataset).where(Dataset.id == dataset_id, Dataset.state == "importing").values(**values))


def run_import(db: Database, dataset_id: uuid.UUID, settings: Settings) -> str:
    """Read an `importing` dataset's Hub split, bounded, validate and store it: `ready`, or `failed` with a
    reason. Safe to run twice (a re-delivered message): only an importing dataset is touched, and only the
    first to finish writes. Returns the outcome: ready | failed | final | gave_up."""
    with db.transaction() as s:
        res = s.execute(update(Dataset).where(Dataset.id == dataset_id, Dataset.state == "importing",
                                              Dataset.import_attempts < MAX_IMPORT_ATTEMPTS)
                        .values(import_attempts=Dataset.import_attempts + 1, updated_at=utcnow()))
        claimed = res.rowcount == 1
        ds = s.get(Dataset, dataset_id)
        if ds is None or ds.state != "importing":
            return "final"
        detail, task_type = dict(ds.source_detail or {}), ds.task_type or "single_label_classification"
    if not claimed:
        _fail(db, dataset_id, "worker-lost", f"the import stopped its worker {MAX_IMPORT_ATTEMPTS} times; "
              "giving up")
        return "gave_up"
    try:
        table = core_data.load_hf_dataset(
            detail["name"], detail.get("split") or "train", detail.get("config_name"),
            max_rows=detail.get("max_rows"), limit_rows=settings.max_import_rows,
            limit_bytes=settings.max_import_bytes, hub_only=not local_paths_allowed(settings))
        if any(_has_nul(r) for r in table.records):  # never text data, and Postgres cannot store it
            raise DataError("the dataset holds NUL (\\x00) characters, which are never text data")
        content = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in table.records).encode()
        if len(content) > (settings.max_import_bytes or len(content)):  # the reader counts the same bytes
            raise core_data.ImportTooLarge(f"the dataset is larger than {settings.max_import_bytes} bytes")
        report = _checked_report(table, detail.get("text_fields"), detail.get("label_field"), task_type)
    except SpafitError as e:
        report = (e.detail or {}).get("report")
        _fail(db, dataset_id, e.type, e.message, report if isinstance(report, dict) else None)
        return "failed"
    except Exception as e:  # SoftTimeLimitExceeded, or a bug: the reason in words, the internals in the log
        timeout = type(e).__name__ == "SoftTimeLimitExceeded"
        ref = uuid.uuid4().hex[:12]
        log.exception("dataset import %s failed (ref %s)", dataset_id, ref)
        _fail(db, dataset_id, "import-timeout" if timeout else "internal-error",
              f"the import took longer than {settings.import_timeout_s:g} s" if timeout
              else f"the import failed unexpectedly (ref {ref})")
        return "failed"
    try:
        with db.transaction() as s:
            ds = s.get(Dataset, dataset_id, with_for_update=True)
            if ds is None or ds.state != "importing":  # deleted meanwhile, or another delivery finished first
                return "final"
            quota.reserve(s, settings.tenant_max_stored_bytes, ds.tenant_id, len(content), "this import")
            _fill(ds, report, blobs.put(s, content), len(content))
            ds.state, ds.error_type, ds.error_message = "ready", None, None
    except StorageQuotaExceeded as e:
        _fail(db, dataset_id, e.type, e.message)
        return "failed"
    except Exception:  # a value the database refuses: the import fails in words, the details stay in the log
        ref = uuid.uuid4().hex[:12]
        log.exception("dataset import %s could not be stored (ref %s)", dataset_id, ref)
        _fail(db, dataset_id, "internal-error", f"the imported data could not be stored (ref {ref})")
        return "failed"
    return "ready"


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


def requeue_imports(db: Database, send: ImportSender, settings: Settings) -> tuple[int, int]:
    """The API's periodic look at imports in progress: (1) fail those a worker took and then went silent on for
    longer than `import_timeout_s` (its process killed where no re-delivery happens); (2) send again those no
    worker has taken for that long (their message may be lost: the API died before sending it, or a broker
    restart dropped it), at most once per `import_timeout_s`. A duplicate message is harmless: an import that
    is no longer `importing` is never touched. Returns (failed, re-sent)."""
    stale = utcnow() - timedelta(seconds=settings.import_timeout_s + 60)
    with db.transaction() as s:
        failed = s.execute(update(Dataset).where(Dataset.state == "importing", Dataset.import_attempts > 0,
                                                 Dataset.updated_at < stale)
                           .values(state="failed", error_type="worker-lost",
                                   error_message="the worker importing this dataset stopped; import it again")).rowcount
        waiting = list(s.scalars(select(Dataset.id).where(Dataset.state == "importing", Dataset.import_attempts == 0,
                                                          Dataset.updated_at < stale).limit(100)))
        if waiting:  # touched first: the next look waits another import_timeout_s
            s.execute(update(Dataset).where(Dataset.id.in_(waiting)).values(updated_at=utcnow()))
    resent = 0
    for dataset_id in waiting:
        try:
            send(dataset_id)
            resent += 1
        except Exception as e:  # the broker is away: the next round tries again
            log.warning("could not re-send dataset import %s (%s)", dataset_id, e)
    if failed or resent:
        log.info("imports: %d failed as lost, %d re-sent to the broker", failed, resent)
    return failed, resent


def _basename(filename: str | None) -> str | None:
    return filename.replace("\\", "/").rsplit("/", 1)[-1] if filename else None


def get(session: Session, tenant_id: uuid.UUID, dataset_id: uuid.UUID) -> Dataset:
    """The dataset, if it belongs to `tenant_id`; another tenant's is `NotFound`, like a missing one."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id:
        raise NotFound(f"dataset {dataset_id} not found")
    return dataset


def list_page(session: Session, tenant_id: uuid.UUID, *, limit: int, cursor: str | None) -> tuple[list[Dataset], str | None]:
    return paginate(session, select(Dataset).where(Dataset.tenant_id == tenant_id), Dataset,
                    limit=limit, cursor=cursor)


def content(session: Session, tenant_id: uuid.UUID, dataset_id: uuid.UUID) -> tuple[Dataset, bytes]:
    """The dataset row and its verified bytes (what a worker reads with `read_table(bytes, dataset.format)`)."""
    dataset = get(session, tenant_id, dataset_id)
    if dataset.state != "ready" or dataset.sha256 is None:
        raise DatasetNotReady(f"dataset {dataset_id} is {dataset.state}, not ready", field="dataset")
    return dataset, blobs.get(session, dataset.sha256)


def delete(session: Session, tenant_id: uuid.UUID, dataset_id: uuid.UUID) -> None:
    """Delete the dataset, and its blob if nothing else uses it. `Conflict` if a job references it."""
    dataset = get(session, tenant_id, dataset_id)
    if dataset.state == "importing" and dataset.import_attempts > 0:
        # a worker is importing it and reads the row only when it stores the result: deleted now, the import would
        # run on uncounted, and a tenant could go past its import limit by deleting imports as it starts them
        raise Conflict(f"dataset {dataset_id} is being imported by a worker; delete it once its import has "
                       "finished or failed (GET /v1/datasets/{id} shows its state)")
    used_by = session.scalars(select(Job.id).where(
        or_(Job.train_dataset_id == dataset.id, Job.validation_dataset_id == dataset.id)).limit(5)).all()
    if used_by:
        raise Conflict(f"dataset {dataset_id} is used by job(s) {', '.join(map(str, used_by))}; delete those first",
                       jobs=[str(j) for j in used_by])
    sha = dataset.sha256
    session.delete(dataset)
    try:
        session.flush()
    except IntegrityError:  # a job referenced it after the check above
        session.rollback()
        raise Conflict(f"dataset {dataset_id} was just referenced by a new job; delete that first") from None
    if sha is not None:  # an import that never became ready stored nothing; bytes just stored again are kept
        blobs.drop_if_unreferenced(session, sha)
    session.commit()
