"""Datasets: parse and validate with `spafit_core.data`, store the bytes as a blob and the row, in one
transaction (a killed upload leaves nothing visible). Everything is scoped to a tenant."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from spafit_core import data as core_data
from spafit_core.errors import DataError

from ..errors import Conflict, NotFound
from ..models import Dataset, Job
from ..schemas import DatasetUploadFields, HfDatasetCreate
from . import blobs
from .pagination import paginate

# A Hub id: "name" or "owner/name". Anything else (absolute or relative paths, "..") is refused in server
# mode, because `load_hf_dataset` also opens local files and folders of the server.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


@dataclass(frozen=True)
class Upload:
    """A file as received: its bytes (already size-capped), its name and the form fields next to it."""

    content: bytes
    filename: str | None
    fields: DatasetUploadFields


def create(session: Session, tenant_id: uuid.UUID, source: Upload | HfDatasetCreate, *,
           allow_local_paths: bool = False) -> Dataset:
    """Register an upload or a Hugging Face import (what POST /v1/datasets calls)."""
    if isinstance(source, HfDatasetCreate):
        return create_from_hf(session, tenant_id, source, allow_local_paths=allow_local_paths)
    f = source.fields
    return create_from_bytes(session, tenant_id, source.content, filename=source.filename, name=f.name,
                             format=f.format, text_fields=f.text_fields, label_field=f.label_field,
                             task_type=f.task_type)


def create_from_bytes(session: Session, tenant_id: uuid.UUID, content: bytes, *, filename: str | None = None,
                      name: str | None = None, format: str | None = None, text_fields: list[str] | None = None,
                      label_field: str | None = None,
                      task_type: str = "single_label_classification") -> Dataset:
    """Register an uploaded CSV / TSV / JSON Lines file. `DataError` (422) if it is unreadable or has errors."""
    fmt = format or core_data.detect_format(filename, content[:64 * 1024])
    table = core_data.read_table(content, fmt)
    nul = content.find(b"\x00")
    if nul >= 0:  # valid UTF-8, but never text data (often UTF-16 without a BOM), and Postgres cannot store it
        line = content.count(b"\n", 0, nul) + 1
        raise DataError(f"line {line}: a NUL byte (\\x00); save the file as UTF-8 text")
    return _register(session, tenant_id, table, content, fmt, name or _basename(filename) or f"upload.{fmt}",
                     text_fields, label_field, task_type, source="upload", source_detail=None)


def create_from_hf(session: Session, tenant_id: uuid.UUID, req: HfDatasetCreate, *,
                   allow_local_paths: bool = False) -> Dataset:
    """Import a split of a Hugging Face dataset; it is stored as JSON Lines like an upload."""
    hf = req.hf
    if not allow_local_paths and (not HUB_ID.fullmatch(hf.name) or ".." in hf.name or Path(hf.name).exists()):
        raise DataError(f"{hf.name!r} is not a Hugging Face Hub dataset id (e.g. 'imdb' or 'owner/name')",
                        field="hf.name")
    table = core_data.load_hf_dataset(hf.name, hf.split, hf.config_name)
    content = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in table.records).encode()
    name = req.name or f"{hf.name}{f'/{hf.config_name}' if hf.config_name else ''}:{hf.split}"
    return _register(session, tenant_id, table, content, "jsonl", name, req.text_fields, req.label_field,
                     req.task_type, source="hf", source_detail=hf.model_dump())


def _register(session: Session, tenant_id: uuid.UUID, table: core_data.Table, content: bytes, fmt: str, name: str,
              text_fields: list[str] | None, label_field: str | None, task_type: str, *, source: str,
              source_detail: dict[str, Any] | None) -> Dataset:
    text_fields, label_field = core_data.infer_fields(table, text_fields, label_field)
    report = core_data.validate(table, text_fields, label_field, task_type)
    if not report.ok:
        try:
            report.raise_for_errors()
        except DataError as e:
            errors = [dataclasses.asdict(p) for p in report.errors]
            raise DataError(e.message, field=e.field, detail={"errors": errors, "report": report.to_dict()}) from None
    sha = blobs.put(session, content)
    dataset = Dataset(tenant_id=tenant_id, name=name[:200], format=fmt, task_type=task_type, rows=report.rows,
                      columns=report.columns, text_fields=report.text_fields, label_field=report.label_field,
                      label_counts=report.label_counts or None, sha256=sha, size_bytes=len(content),
                      report=report.to_dict(), source=source, source_detail=source_detail)
    session.add(dataset)
    session.commit()
    return dataset


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
    return dataset, blobs.get(session, dataset.sha256)


def delete(session: Session, tenant_id: uuid.UUID, dataset_id: uuid.UUID) -> None:
    """Delete the dataset, and its blob if nothing else uses it. `Conflict` if a job references it."""
    dataset = get(session, tenant_id, dataset_id)
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
    try:
        with session.begin_nested():
            blobs.delete_if_unreferenced(session, sha)
    except IntegrityError:  # the same bytes were just registered again: keep the blob
        pass
    session.commit()
