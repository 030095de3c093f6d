"""/v1/tasks: the adapter registry as clients see it. List and inspect tasks and their versions, roll back
(activate an older version), delete, download a version as a zip and import one trained elsewhere.
Tenant-scoped; another tenant's task is a 404. Reading needs `predict` or `train`; changing, downloading or
importing needs `train` (training is what produces adapters)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response

from ..deps import ConversionsDep, ServingDep, SessionDep, SettingsDep, TaskReaderPrincipal, TrainPrincipal
from ..errors import UnsupportedMediaType
from ..schemas import DB_INT_MAX, AdapterVersionOut, Page, TaskOut, problem_responses
from ..services import registry
from ..services.pagination import DEFAULT_LIMIT, MAX_LIMIT

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

TaskName = Annotated[str, Path(pattern=f"^{registry.TASK_NAME.pattern}$", description=registry.TASK_NAME_RULE)]
ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/octet-stream")

_ZIP_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/zip": {"schema": {"type": "string", "format": "binary",
                                   "description": "spafit_adapter.json + adapter.safetensors, as downloaded; or a "
                                                  "PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)"}}}}}
_ZIP_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
          "description": "the adapter archive; `ETag` is its sha256"},
    304: {"description": "`If-None-Match` names this archive's ETag"},
}


async def adapter_archive(request: Request) -> bytes:
    """The body of PUT /v1/tasks/{task}/adapter: the zip itself (its size is capped by the body limit)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ZIP_TYPES:
        raise UnsupportedMediaType("send the adapter zip as the request body with Content-Type: application/zip")
    return await request.body()


@router.get("", response_model=Page[TaskOut], summary="List tasks, newest first",
            responses=problem_responses(401, 403, 422))
def list_tasks(*, principal: TaskReaderPrincipal, session: SessionDep,
               limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
               cursor: Annotated[str | None, Query(max_length=500)] = None) -> Any:
    tasks, next_cursor = registry.list_page(session, principal.tenant_id, limit=limit, cursor=cursor)
    return {"items": registry.tasks_out(session, tasks), "next_cursor": next_cursor}


@router.get("/{task}", response_model=TaskOut, summary="A task and its active version",
            responses=problem_responses(401, 403, 404, 422))
def get_task(*, task: TaskName, principal: TaskReaderPrincipal, session: SessionDep) -> Any:
    return registry.task_out(session, registry.get_task(session, principal.tenant_id, task))


class VersionsPage(Page[AdapterVersionOut]):
    compare: dict[str, Any] | None = None


@router.get("/{task}/versions", response_model=VersionsPage, summary="A task's versions, newest first",
            responses=problem_responses(401, 403, 404, 409, 422))
def list_versions(*, task: TaskName, principal: TaskReaderPrincipal, session: SessionDep,
                  limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
                  cursor: Annotated[str | None, Query(max_length=500)] = None,
                  compare: Annotated[str | None, Query(max_length=40, description=(
                      "`v1,v2`: also compare two versions' latest evaluations on each dataset both were evaluated "
                      "on (metrics side by side, with the deltas b - a)"))] = None) -> Any:
    from ..services import batch

    row = registry.get_task(session, principal.tenant_id, task)
    versions, next_cursor = registry.versions_page(session, row, limit=limit, cursor=cursor)
    evaluations = batch.evaluations(session, row)
    items = []
    for v in versions:
        out = registry.version_out(v, active=v.id == row.active_version_id)
        out.evaluations = [e.model_dump(mode="json") for e in evaluations.get(v.version, [])]
        items.append(out)
    return {"items": items, "next_cursor": next_cursor,
            "compare": batch.compare(session, principal.tenant_id, task, compare) if compare is not None else None}


@router.post("/{task}/versions/{version}/activate", response_model=TaskOut,
             summary="Serve this version from now on (roll back or forward)",
             responses=problem_responses(401, 403, 404, 422))
def activate_version(*, task: TaskName, version: Annotated[int, Path(ge=1, le=DB_INT_MAX)],
                     principal: TrainPrincipal, session: SessionDep) -> Any:
    registry.activate(session, principal.tenant_id, task, version)
    return registry.task_out(session, registry.get_task(session, principal.tenant_id, task))


@router.delete("/{task}", status_code=204, response_class=Response,
               summary="Delete a task and all its versions", responses=problem_responses(401, 403, 404, 422))
def delete_task(*, task: TaskName, principal: TrainPrincipal, session: SessionDep, serving: ServingDep) -> Response:
    serving.evict(registry.delete_task(session, principal.tenant_id, task))
    return Response(status_code=204)


@router.get("/{task}/adapter", response_class=Response, summary="Download a version as a zip",
            responses={**_ZIP_RESPONSE, **problem_responses(401, 403, 404, 409, 422, 429, 503)})
def download_adapter(*, task: TaskName, principal: TrainPrincipal, session: SessionDep, conversions: ConversionsDep,
                     version: Annotated[int | None, Query(ge=1, le=DB_INT_MAX,
                                                          description="default: the active version")] = None,
                     format: Annotated[Literal["spafit", "peft"], Query(
                         description="spafit: spafit_adapter.json + adapter.safetensors; peft: a PEFT LoRA folder "
                                     "(adapter_config.json + adapter_model.safetensors + spafit_export.json) for "
                                     "peft.PeftModel.from_pretrained on the stock classifier")] = "spafit",
                     if_none_match: Annotated[str | None, Header()] = None) -> Response:
    archive, sha, number = registry.archive(session, principal.tenant_id, task, version)
    etag = f'"{sha}"' if format == "spafit" else f'"{sha}-{format}"'  # the PEFT zip is a function of ours
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if if_none_match is not None and etag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    if format == "peft":
        session.close()  # the conversion loads the base model: hold no database connection meanwhile
        archive = conversions.export(principal.tenant_id, sha, archive, registry.peft_archive)
    suffix = "" if format == "spafit" else f"-{format}"
    headers["Content-Disposition"] = f'attachment; filename="{task}-v{number}{suffix}.zip"'
    return Response(archive, media_type="application/zip", headers=headers)


@router.put("/{task}/adapter", status_code=201, response_model=AdapterVersionOut,
            summary="Import an adapter trained elsewhere as the task's new, active version",
            responses=problem_responses(401, 403, 413, 415, 422, 429, 503), openapi_extra=_ZIP_BODY)
def import_adapter(*, task: TaskName, response: Response, archive: Annotated[bytes, Depends(adapter_archive)],
                   principal: TrainPrincipal, session: SessionDep, serving: ServingDep, settings: SettingsDep,
                   conversions: ConversionsDep,
                   format: Annotated[Literal["spafit", "peft"] | None, Query(
                       description="default: told from the archive (PEFT's adapter_model.safetensors means peft)")]
                   = None,
                   base_model: Annotated[str | None, Query(
                       max_length=300, description="peft: the base model [default: the PEFT config's "
                                                   "base_model_name_or_path]; one this service serves")] = None,
                   labels: Annotated[list[str] | None, Query(
                       max_length=10_000, description="peft: label names in head order (repeat the parameter) "
                                                      "[default: from a SPAFIT export, else LABEL_0..]")] = None) -> Any:
    from spafit_core.peft_interop import is_peft_archive

    if format == "peft" or (format is None and is_peft_archive(archive)):
        session.close()  # no pooled connection held while waiting for a slot (it opens again when used)
        with conversions.slot(principal.tenant_id):  # it loads the base model
            archive = registry.from_peft_archive(session, archive, base_model=base_model, labels=labels,
                                                 default_base_model=settings.default_base_model,
                                                 max_bytes=2 * (settings.max_request_bytes or len(archive)))
    version = serving.import_adapter(session, principal.tenant_id, task, archive,
                                     max_stored_bytes=settings.tenant_max_stored_bytes)
    response.headers["Location"] = f"/v1/tasks/{task}"
    return registry.version_out(version, active=True)
