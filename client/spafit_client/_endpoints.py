"""Every API call as a `Call` spec, in one place: path, method, body, retry safety and response model.
The sync and async resources only execute these."""

from __future__ import annotations

import io
import json
import os
import uuid
import zipfile
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

from ._base import Call, dump, predict_inputs, resource_id
from .models import (
    AdapterVersion,
    Dataset,
    FanOutPredictions,
    Health,
    Hyperparameters,
    Job,
    JobEvent,
    Method,
    Page,
    Readiness,
    Task,
    TaskPredictions,
    Usage,
)

ADAPTER_FILES = ("spafit_adapter.json", "adapter.safetensors")
# Other folders the service imports: ours before the config was renamed, and a PEFT LoRA folder.
_OTHER_ADAPTER_FILES = (("adapter_config.json", "adapter.safetensors"),
                        ("adapter_config.json", "adapter_model.safetensors", "spafit_export.json?"))
FileInput = str | os.PathLike[str] | bytes | BinaryIO


def _seg(value: Any) -> str:
    return quote(str(value), safe="")


# ------------------------------------------------------------------------------------------------ health
def health() -> Call[Health]:
    return Call("GET", "/healthz", model=Health)


def usage() -> Call[Usage]:
    return Call("GET", "/v1/usage", model=Usage)


def ready() -> Call[Readiness]:
    return Call("GET", "/readyz", model=Readiness)


# ---------------------------------------------------------------------------------------------- datasets
def _read(source: FileInput) -> tuple[str, bytes]:
    if isinstance(source, bytes):
        return "data", source  # no extension: the service sniffs the format (CSV, TSV or JSON Lines)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        return path.name, path.read_bytes()
    name = getattr(source, "name", None)
    return (Path(name).name if isinstance(name, str | os.PathLike) else "data"), source.read()


def upload_dataset(source: FileInput, *, name: str | None, text_fields: list[str] | str | None,
                   label_field: str | None, task_type: str | None, format: str | None) -> Call[Dataset]:
    filename, content = _read(source)
    if isinstance(text_fields, str):
        text_fields = [text_fields]
    fields = {"name": name, "label_field": label_field, "task_type": task_type, "format": format,
              "text_fields": json.dumps(list(text_fields)) if text_fields else None}
    # Not retried: the service takes no Idempotency-Key here, so a retry could make a second dataset.
    return Call("POST", "/v1/datasets", files={"file": (filename, content)},
                data={k: v for k, v in fields.items() if v is not None}, model=Dataset)


def import_dataset(name: str, *, split: str, config_name: str | None, max_rows: int | None,
                   dataset_name: str | None, text_fields: list[str] | str | None, label_field: str | None,
                   task_type: str | None) -> Call[Dataset]:
    if isinstance(text_fields, str):
        text_fields = [text_fields]
    body: dict[str, Any] = {"hf": {"name": name, "split": split, "config_name": config_name}}
    optional = {"max_rows": max_rows, "name": dataset_name, "text_fields": list(text_fields) if text_fields else None,
                "label_field": label_field, "task_type": task_type}
    body.update({k: v for k, v in optional.items() if v is not None})
    # Not retried: a retry could start a second import.
    return Call("POST", "/v1/datasets", json=body, model=Dataset)


def get_dataset(dataset: Any) -> Call[Dataset]:
    return Call("GET", f"/v1/datasets/{_seg(resource_id(dataset))}", model=Dataset)


def list_datasets(*, limit: int | None, cursor: str | None) -> Call[Page[Dataset]]:
    return Call("GET", "/v1/datasets", params={"limit": limit, "cursor": cursor}, model=Page[Dataset])


def delete_dataset(dataset: Any) -> Call[None]:
    return Call("DELETE", f"/v1/datasets/{_seg(resource_id(dataset))}", done_if=frozenset({404}))


# -------------------------------------------------------------------------------------------------- jobs
def create_job(*, task: str, train_dataset: Any, validation_dataset: Any, method: Method | dict[str, Any] | None,
               hyperparameters: Hyperparameters | dict[str, Any] | None, base_model: str | None,
               text_fields: list[str] | None, label_field: str | None, task_type: str | None,
               idempotency_key: str | None, webhook_url: str | None = None,
               webhook_on_eval: bool = False, time_limit_s: int | None = None) -> Call[Job]:
    body: dict[str, Any] = {"task": task, "train_dataset": resource_id(train_dataset)}
    optional = {"validation_dataset": resource_id(validation_dataset) if validation_dataset is not None else None,
                "method": dump(method), "hyperparameters": dump(hyperparameters), "base_model": base_model,
                "text_fields": text_fields, "label_field": label_field, "task_type": task_type,
                "webhook_url": webhook_url, "webhook_on_eval": webhook_on_eval or None,
                "time_limit_s": time_limit_s}
    body.update({k: v for k, v in optional.items() if v is not None})
    # The key is fixed here, once per call, so every retry of this call is the same request to the service.
    key = idempotency_key or f"spafit-client-{uuid.uuid4()}"
    return Call("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key}, model=Job)


def get_job(job: Any) -> Call[Job]:
    return Call("GET", f"/v1/jobs/{_seg(resource_id(job))}", model=Job)


def list_jobs(*, status: str | None, task: str | None, limit: int | None,
              cursor: str | None) -> Call[Page[Job]]:
    return Call("GET", "/v1/jobs", params={"status": status, "task": task, "limit": limit, "cursor": cursor},
                model=Page[Job])


def cancel_job(job: Any) -> Call[Job]:
    # Safe to repeat: a second cancel of the same job changes nothing (a finished job answers 409).
    return Call("POST", f"/v1/jobs/{_seg(resource_id(job))}/cancel", retry=True, model=Job, done_if=frozenset({409}))


def delete_job(job: Any) -> Call[None]:
    return Call("DELETE", f"/v1/jobs/{_seg(resource_id(job))}", done_if=frozenset({404}))


def job_events(job: Any, *, after: int, limit: int | None) -> Call[list[JobEvent]]:
    return Call("GET", f"/v1/jobs/{_seg(resource_id(job))}/events", params={"after": after, "limit": limit},
                model=list[JobEvent])


def stream_job_events(job: Any, *, after: int, last_event_id: int | None) -> Call[httpx.Response]:
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if last_event_id:
        headers["Last-Event-ID"] = str(last_event_id)
    return Call("GET", f"/v1/jobs/{_seg(resource_id(job))}/events", params={"after": after}, headers=headers, raw=True)


# ---------------------------------------------------------------------------------- batch predictions
def batch_tasks(tasks: Any) -> list[Any]:
    """`tasks` as the service takes it: names, {task, version} dicts, or (task, version) pairs."""
    out: list[Any] = []
    for t in tasks:
        if isinstance(t, tuple):
            name, version = t
            out.append({"task": name, "version": int(version)} if version is not None else name)
        else:
            out.append(t)
    return out


def create_batch_prediction(*, task: str | None, dataset: Any, version: int | None, text_fields: list[str] | None,
                            id_field: str | None, top_k: int | None, format: str | None, all_scores: bool,
                            idempotency_key: str | None, tasks: Any = None) -> Call[Job]:
    body: dict[str, Any] = {"dataset": resource_id(dataset)}
    if tasks is not None:
        body["tasks"] = batch_tasks(tasks)
    if task is not None:
        body["task"] = task
    optional = {"version": version, "text_fields": text_fields, "id_field": id_field, "top_k": top_k,
                "format": format, "all_scores": all_scores or None}
    body.update({k: v for k, v in optional.items() if v is not None})
    key = idempotency_key or f"spafit-client-{uuid.uuid4()}"
    return Call("POST", "/v1/batch-predictions", json=body, headers={"Idempotency-Key": key}, model=Job)


def get_batch_prediction(job: Any) -> Call[Job]:
    return Call("GET", f"/v1/batch-predictions/{_seg(resource_id(job))}", model=Job)


def list_batch_predictions(*, limit: int | None, cursor: str | None) -> Call[Page[Job]]:
    return Call("GET", "/v1/batch-predictions", params={"limit": limit, "cursor": cursor}, model=Page[Job])


def batch_results(job: Any, start: int = 0) -> Call[httpx.Response]:
    """The result file; from byte `start` on where it is above 0 (a 206, or the whole file in a 200 if the
    server's copy is not the one begun: `If-Range` names it by the job, whose results never change)."""
    job_id = resource_id(job)
    headers = {"Range": f"bytes={start}-", "If-Range": f'"{job_id}"'} if start > 0 else {}
    return Call("GET", f"/v1/batch-predictions/{_seg(job_id)}/results", headers=headers, raw=True)


def download_complete(error: Exception, have: int) -> bool:
    """Whether a resumed download's 416 says the `have` bytes already on disk are the whole file."""
    headers = getattr(error, "headers", None)
    return getattr(error, "status", None) == 416 and headers is not None and \
        headers.get("content-range") == f"bytes */{have}"


def partial_size(out: Path, resume: bool) -> int:
    return out.stat().st_size if resume and out.is_file() else 0


def evaluate_version(task: str, version: int, *, dataset: Any, text_fields: list[str] | None,
                     label_field: str | None, idempotency_key: str | None) -> Call[Job]:
    body: dict[str, Any] = {"dataset": resource_id(dataset)}
    body.update({k: v for k, v in {"text_fields": text_fields, "label_field": label_field}.items() if v is not None})
    key = idempotency_key or f"spafit-client-{uuid.uuid4()}"
    return Call("POST", f"/v1/tasks/{_seg(task)}/versions/{int(version)}/evaluate", json=body,
                headers={"Idempotency-Key": key}, model=Job)


def compare_versions(task: str, a: int, b: int) -> Call[dict[str, Any]]:
    return Call("GET", f"/v1/tasks/{_seg(task)}/versions", params={"compare": f"{int(a)},{int(b)}", "limit": 1},
                model=dict[str, Any])


# ------------------------------------------------------------------------------------------------- tasks
def list_tasks(*, limit: int | None, cursor: str | None) -> Call[Page[Task]]:
    return Call("GET", "/v1/tasks", params={"limit": limit, "cursor": cursor}, model=Page[Task])


def get_task(task: str) -> Call[Task]:
    return Call("GET", f"/v1/tasks/{_seg(task)}", model=Task)


def list_versions(task: str, *, limit: int | None, cursor: str | None) -> Call[Page[AdapterVersion]]:
    return Call("GET", f"/v1/tasks/{_seg(task)}/versions", params={"limit": limit, "cursor": cursor},
                model=Page[AdapterVersion])


def activate_version(task: str, version: int) -> Call[Task]:
    # Safe to repeat: activating the version that is already active changes nothing.
    return Call("POST", f"/v1/tasks/{_seg(task)}/versions/{int(version)}/activate", retry=True, model=Task)


def delete_task(task: str) -> Call[None]:
    return Call("DELETE", f"/v1/tasks/{_seg(task)}", done_if=frozenset({404}))


def download_adapter(task: str, *, version: int | None, format: str | None = None) -> Call[httpx.Response]:
    return Call("GET", f"/v1/tasks/{_seg(task)}/adapter", params={"version": version, "format": format},
                headers={"Accept": "application/zip, application/problem+json"}, raw=True)


def adapter_archive(source: FileInput) -> bytes:
    """A zip as the service takes it, from a zip (path, bytes or file) or an adapter folder (zipped here)."""
    if isinstance(source, str | os.PathLike) and Path(source).is_dir():
        folder = Path(source)
        missing = [n for n in ADAPTER_FILES if not (folder / n).is_file()]
        names = list(ADAPTER_FILES)
        for other in _OTHER_ADAPTER_FILES if missing else ():
            if all((folder / n).is_file() for n in other if not n.endswith("?")):
                names = [n.rstrip("?") for n in other if not n.endswith("?") or (folder / n.rstrip("?")).is_file()]
                missing = []
                break
        if missing:
            raise FileNotFoundError(f"{folder} is not an adapter folder: it lacks {', '.join(missing)}")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for n in names:
                z.write(folder / n, arcname=n)
        return buf.getvalue()
    return _read(source)[1]


def import_adapter(task: str, archive: bytes) -> Call[AdapterVersion]:
    # Not retried: every import registers a new version, so a repeat could register two.
    return Call("PUT", f"/v1/tasks/{_seg(task)}/adapter", content=archive,
                headers={"Content-Type": "application/zip"}, retry=False, model=AdapterVersion)


def save_archive(response: httpx.Response, task: str, path: str | os.PathLike[str] | None) -> Path:
    """Write a downloaded archive to `path` (a folder: the service's file name inside it)."""
    disposition = response.headers.get("content-disposition", "")
    # Only the name's last part, whatever the answer says ("../x.zip" or an absolute path from a proxy or a
    # tampered answer would write outside the folder asked for).
    filename = Path(disposition.partition('filename="')[2].rstrip('"')).name
    if filename in ("", ".", ".."):
        filename = f"{Path(task).name or 'adapter'}.zip"
    target = Path(path) if path is not None else Path(filename)
    if target.is_dir() or (path is not None and str(path).endswith(("/", os.sep))):
        target = target / Path(filename).name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(response.content)
    return target


# ----------------------------------------------------------------------------------------------- predict
# Predictions change nothing on the service, so these POSTs are retried like GETs (a full queue answers
# 503 with Retry-After precisely so that clients come back).
def predict(task: str, inputs: Any, *, top_k: int | None) -> Call[TaskPredictions]:
    body: dict[str, Any] = {"inputs": predict_inputs(inputs)}
    if top_k is not None:
        body["top_k"] = top_k
    return Call("POST", f"/v1/tasks/{_seg(task)}/predict", json=body, retry=True, model=TaskPredictions)


def predict_many(tasks: list[str], inputs: Any, *, top_k: int | None) -> Call[FanOutPredictions]:
    body: dict[str, Any] = {"tasks": list(tasks), "inputs": predict_inputs(inputs)}
    if top_k is not None:
        body["top_k"] = top_k
    return Call("POST", "/v1/predict", json=body, retry=True, model=FanOutPredictions)
