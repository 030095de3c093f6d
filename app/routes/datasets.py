"""/v1/datasets: upload (multipart CSV / TSV / JSONL; 201, ready) or import (JSON naming a Hugging Face Hub
dataset; 202, importing, read by the worker), list, get, delete. Tenant-scoped; another tenant's dataset is
a 404."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from ..deps import MetricsDep, SessionDep, SettingsDep, TrainPrincipal
from ..errors import PayloadTooLarge, UnsupportedMediaType
from ..schemas import DatasetOut, DatasetUploadFields, HfDatasetCreate, Page, problem_responses
from ..services import datasets
from ..services.pagination import DEFAULT_LIMIT, MAX_LIMIT

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
READ_CHUNK = 1 << 20

_UPLOAD_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary", "description": "CSV, TSV or JSON Lines"},
                       **{k: {"type": "string", "description": v.description or ""}
                          for k, v in DatasetUploadFields.model_fields.items()}}}},
    "application/json": {"schema": {"$ref": "#/components/schemas/HfDatasetCreate"}},
}}}


def _invalid(e: ValidationError, *prefix: str) -> RequestValidationError:
    return RequestValidationError([{**err, "loc": ("body", *prefix, *err["loc"])} for err in e.errors()])


def _text_fields(value: str | None) -> list[str] | None:
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass  # validated below as a string, which fails with a clear message
    return [v.strip() for v in value.split(",") if v.strip()]


def _nul_path(value: Any, path: tuple = ()) -> tuple | None:
    """Where in a parsed body a string holds a NUL character, if anywhere."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return next((p for k, v in items if (p := _nul_path(v, (*path, k))) is not None), None)


async def _read_capped(upload: UploadFile, limit: int) -> bytes:
    buf = bytearray()
    while chunk := await upload.read(READ_CHUNK):
        buf += chunk
        if len(buf) > limit:
            raise PayloadTooLarge(f"the file is larger than the {limit}-byte upload limit", field="file",
                                  limit_bytes=limit)
    return bytes(buf)


async def dataset_source(request: Request, settings: SettingsDep) -> datasets.Upload | HfDatasetCreate:
    """The body of POST /v1/datasets: a multipart upload, or JSON `{hf: {name, split, config_name}}`."""
    try:
        return await _read_source(request, settings)
    except ClientDisconnect:  # the client's doing, not the service's: once logged as an unhandled 500 with a traceback
        raise HTTPException(400, "the upload was cut short: the client went away before the body ended") from None


async def _read_source(request: Request, settings: SettingsDep) -> datasets.Upload | HfDatasetCreate:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            req = HfDatasetCreate.model_validate_json(await request.body())
        except ValidationError as e:
            raise _invalid(e) from None
        if nul := _nul_path(req.model_dump()):  # stored in the row (and jsonb): once a 422 naming no field
            raise RequestValidationError([{"type": "value_error", "loc": ("body", *nul), "input": None,
                                           "msg": "a NUL character (\\u0000) is never text"}])
        return req
    if content_type != "multipart/form-data":
        raise UnsupportedMediaType("send the file as multipart/form-data, or JSON {hf: {...}} as application/json")
    async with request.form(max_files=1, max_fields=20) as form:
        upload = form.get("file")
        fields = {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
        if nul := next((k for k, v in fields.items() if "\x00" in v), None):  # once a 422 naming no field
            raise RequestValidationError([{"type": "value_error", "loc": ("body", nul), "input": None,
                                           "msg": "a NUL character (\\x00) is never text"}])
        try:
            parsed = DatasetUploadFields.model_validate({**fields, "text_fields": _text_fields(fields.get("text_fields"))})
        except ValidationError as e:
            raise _invalid(e) from None
        if not isinstance(upload, UploadFile):
            raise RequestValidationError([{"type": "missing", "loc": ("body", "file"),
                                           "msg": "a file part named 'file' is required", "input": None}])
        content = await _read_capped(upload, settings.max_upload_bytes)
        return datasets.Upload(content=content, filename=upload.filename, fields=parsed)


@router.post("", status_code=201, response_model=DatasetOut, summary="Upload (201, ready) or import (202, importing)",
             responses={202: {"model": DatasetOut, "description": "the import was accepted: the dataset is "
                              "`importing`; poll it until it is `ready` or `failed`"},
                        **problem_responses(400, 401, 403, 413, 415, 422, 429, 503)}, openapi_extra=_UPLOAD_BODY)
def create_dataset(*, request: Request, response: Response, principal: TrainPrincipal,
                   source: Annotated[datasets.Upload | HfDatasetCreate, Depends(dataset_source)],
                   session: SessionDep, settings: SettingsDep, metrics: MetricsDep) -> Any:
    if isinstance(source, HfDatasetCreate):
        dataset = datasets.start_import(session, principal.tenant_id, source, settings)
        datasets.dispatch_import(session, request.app.state.send_import, dataset)
        response.status_code = 202
        response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    else:
        with request.app.state.uploads.slot(principal.tenant_id):  # one per tenant, a few per process (429 / 503)
            dataset = datasets.create(session, principal.tenant_id, source, max_rows=settings.max_upload_rows,
                                      max_stored_bytes=settings.tenant_max_stored_bytes)
    metrics.datasets_created.labels(dataset.source).inc()
    return dataset


@router.get("", response_model=Page[DatasetOut], summary="List datasets, newest first",
            responses=problem_responses(401, 403, 422))
def list_datasets(*, principal: TrainPrincipal, session: SessionDep,
                  limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
                  cursor: Annotated[str | None, Query(max_length=500)] = None) -> Any:
    items, next_cursor = datasets.list_page(session, principal.tenant_id, limit=limit, cursor=cursor)
    return {"items": items, "next_cursor": next_cursor}


@router.get("/{dataset_id}", response_model=DatasetOut, summary="Get a dataset",
            responses=problem_responses(401, 403, 404, 422))
def get_dataset(*, dataset_id: uuid.UUID, principal: TrainPrincipal, session: SessionDep) -> Any:
    return datasets.get(session, principal.tenant_id, dataset_id)


@router.delete("/{dataset_id}", status_code=204, response_class=Response, summary="Delete a dataset",
               responses=problem_responses(401, 403, 404, 409, 422))
def delete_dataset(*, dataset_id: uuid.UUID, principal: TrainPrincipal, session: SessionDep) -> Response:
    datasets.delete(session, principal.tenant_id, dataset_id)
    return Response(status_code=204)
