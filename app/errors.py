"""The one place errors become HTTP responses: problem+json (RFC 9457) with a stable `type` URI.

- `spafit_core.errors.SpafitError` subclasses and the `AppError` classes below -> their `status`,
  `type` = PROBLEM_BASE + slug, `detail` = the message, plus `field` / `errors` where known;
- request validation -> 422 listing each error's location (`body.method.rank`) and message;
- `HTTPException` (404 for unknown routes, 405, ...) -> problem+json;
- the database being unreachable -> 503 with Retry-After;
- a value the database cannot store (NUL characters, an out-of-range number) -> 422;
- anything else -> 500 with no internals in the body, logged here with the request id.

Services raise these classes; handlers never build error responses themselves.
"""

from __future__ import annotations

import json
import logging
import uuid
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError as DatabaseDataError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException

from spafit_core.errors import BaseModelUnavailable, SpafitError

log = logging.getLogger("spafit.errors")

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "https://spafit.dev/problems/"
DB_RETRY_AFTER_SECONDS = 5
_RESERVED = {"type", "title", "status", "detail", "instance", "field", "errors"}


class AppError(Exception):
    """An error of the service layer (not the core). Same shape as `SpafitError`: a stable slug `type`,
    an HTTP `status`, a message, optionally the offending `field` and a list of `errors`."""

    type = "error"
    status = 400
    title: str | None = None  # default: derived from `type`

    def __init__(self, message: str, *, field: str | None = None, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.message = message
        self.field = field
        self.errors = errors
        self.headers = headers or {}
        self.extra = extra


class InvalidInput(AppError):
    """A request value is well-formed JSON but not acceptable (a bad cursor, an unknown scope)."""

    type = "invalid-input"
    status = 422


class Unauthorized(AppError):
    type = "unauthorized"
    status = 401

    def __init__(self, message: str = "a valid API key is required", **kw: Any):
        kw.setdefault("headers", {"WWW-Authenticate": 'Bearer realm="spafit"'})
        super().__init__(message, **kw)


class Forbidden(AppError):
    type = "forbidden"
    status = 403


class UntrustedHost(AppError):
    """The `Host` header names no host in `allowed_hosts` (a DNS-rebinding page, or a misconfigured proxy)."""

    type = "untrusted-host"
    status = 400


class LoopbackOnly(AppError):
    """Auth is off (embedded mode) and the request came in on a network address, not loopback."""

    type = "loopback-only"
    status = 403


class CrossOriginRefused(AppError):
    """A state-changing browser request from another origin that carries no API key (request forgery)."""

    type = "cross-origin-refused"
    status = 403


class WebhookUrlRefused(AppError):
    """A webhook URL the service will not call: not http(s), or (in server mode) an address inside the network."""

    type = "webhook-url-refused"
    status = 422


class NotFound(AppError):
    """Also what another tenant's resource looks like: never reveal that it exists."""

    type = "not-found"
    status = 404


class Conflict(AppError):
    type = "conflict"
    status = 409


class TooManyJobs(AppError):
    """The tenant already has `max_active_jobs_per_tenant` training jobs queued or running."""

    type = "too-many-jobs"
    status = 429


class TooManyRows(AppError):
    """A batch prediction or evaluation over a dataset with more rows than `batch_max_rows_per_job`."""

    type = "too-many-rows"
    status = 422


class ResultTooLarge(AppError):
    """A batch prediction whose result would be (or grew) larger than its budget: `batch_max_rows_per_job` x
    `RESULT_BYTES_PER_PREDICTION` (app/services/batch.py)."""

    type = "result-too-large"
    status = 422


class StorageQuotaExceeded(AppError):
    """What a tenant stores would pass SPAFIT_TENANT_MAX_STORED_BYTES (app/services/quota.py). 403, as a refusal
    that no retry changes: the tenant deletes something first."""

    type = "storage-quota-exceeded"
    status = 403


class ResultsNotReady(AppError):
    """A batch prediction's results asked for before the job succeeded."""

    type = "results-not-ready"
    status = 409


class TooManyImports(AppError):
    """The tenant already has `max_concurrent_imports` dataset imports in progress."""

    type = "too-many-imports"
    status = 429


class DatasetNotReady(AppError):
    """A job named a dataset that is still importing, or whose import failed."""

    type = "dataset-not-ready"
    status = 422


class TooManyConversions(AppError):
    """The tenant already has a PEFT conversion (an export or import that loads the base model) running in this
    process (`app/services/conversions.py`)."""

    type = "too-many-conversions"
    status = 429


class TooManyLookups(AppError):
    """The tenant already has `webhooks.LOOKUPS_PER_TENANT` webhook host lookups in flight in this process (each
    holds a thread until the system resolver gives up on a name that does not answer)."""

    type = "too-many-lookups"
    status = 429


class TooManyUploads(AppError):
    """The tenant already has a dataset upload being read and checked in this process (`datasets.py`: a large file
    holds a core and hundreds of megabytes for seconds)."""

    type = "too-many-uploads"
    status = 429


class TooManyStreams(AppError):
    """The tenant already holds `sse_max_streams_per_tenant` live event streams (across every API replica)."""

    type = "too-many-streams"
    status = 429


class TenantQueueFull(AppError):
    """The tenant already has `batch_max_queue_per_tenant` prediction rows waiting: it retries after `Retry-After`
    seconds while other tenants are served (503 `overloaded` is for the whole queue being full)."""

    type = "tenant-queue-full"
    status = 429


class RangeNotSatisfiable(AppError):
    """A `Range` that starts past the end of the file: 416 with `Content-Range: bytes */<size>`."""

    type = "range-not-satisfiable"
    status = 416

    def __init__(self, size: int):
        super().__init__(f"the requested range starts past the end of the {size}-byte file", field="Range",
                         headers={"Content-Range": f"bytes */{size}"})


class ClientClosedRequest(AppError):
    """The client went away before its answer was ready; its work was dropped. Nobody reads this response."""

    type = "client-closed-request"
    status = 499
    title = "Client closed request"


class PayloadTooLarge(AppError):
    type = "payload-too-large"
    status = 413


class UnsupportedMediaType(AppError):
    type = "unsupported-media-type"
    status = 415


class ServiceUnavailable(AppError):
    type = "service-unavailable"
    status = 503


class BlobIntegrityError(AppError):
    """Stored bytes no longer match their sha256: corruption, never the client's fault."""

    type = "blob-corrupted"
    status = 500


def problem_type(slug: str) -> str:
    return PROBLEM_BASE + slug


def _title(slug: str) -> str:
    return slug.replace("-", " ").capitalize()


class ProblemResponse(JSONResponse):
    """JSON that no message can fail to render: a lone surrogate echoed from the input (a JSON escape such as
    \\ud800) goes out as that escape instead of raising while the error is reported."""

    media_type = PROBLEM_MEDIA_TYPE

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8", "backslashreplace")


def problem(status: int, slug: str | None, detail: str, *, request: Request | None = None,
            title: str | None = None, headers: dict[str, str] | None = None, **members: Any) -> JSONResponse:
    """A problem+json response. `slug=None` means "about:blank": the status code says it all (RFC 9457 4.2.1)."""
    if slug is None:
        body: dict[str, Any] = {"type": "about:blank", "title": title or HTTPStatus(status).phrase}
    else:
        body = {"type": problem_type(slug), "title": title or _title(slug)}
    body.update(status=status, detail=detail)
    if request is not None:
        body["instance"] = request.url.path
    body.update({k: v for k, v in members.items() if v is not None})
    return ProblemResponse(jsonable_encoder(body), status_code=status, headers=headers)


def _location(loc: tuple | list) -> str:
    return ".".join(str(p) for p in loc)


def validation_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic errors as [{field: "body.method.rank", message, type}]."""
    return [{"field": _location(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type", "")}
            for e in errors]


async def _spafit_error(request: Request, exc: SpafitError) -> JSONResponse:
    extra = {k: v for k, v in exc.detail.items() if k not in _RESERVED}  # e.g. a DataReport's `problems`
    return problem(exc.status, exc.type, exc.message, request=request, field=exc.field,
                   errors=exc.detail.get("errors"), **extra)


async def _app_error(request: Request, exc: AppError) -> JSONResponse:
    if exc.status >= 500:
        log.error("%s on %s %s: %s", exc.type, request.method, request.url.path, exc.message)
    extra = {k: v for k, v in exc.extra.items() if k not in _RESERVED}
    return problem(exc.status, exc.type, exc.message, request=request, title=exc.title, headers=exc.headers,
                   field=exc.field, errors=exc.errors, **extra)


async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = validation_errors(list(exc.errors()))
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
    # `field` names the first offending input as the service's own errors do: `method.rank`, not `body.method.rank`
    # (a query or path parameter keeps its `query.` / `path.` prefix, so it is never mistaken for a body field).
    first = errors[0]["field"] if errors else None
    field = first.removeprefix("body.") if first and first != "body" else None
    return problem(422, "validation-error", detail, request=request, title="Request validation failed",
                   field=field, errors=errors)


async def _http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    slug = {401: Unauthorized.type, 403: Forbidden.type, 404: NotFound.type, 409: Conflict.type,
            413: PayloadTooLarge.type}.get(exc.status_code)
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return problem(exc.status_code, slug, detail, request=request, headers=getattr(exc, "headers", None))


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.error("database unavailable on %s %s: %s", request.method, request.url.path, exc.__class__.__name__,
              exc_info=exc)
    return problem(503, "database-unavailable", "the database is unreachable; retry shortly", request=request,
                   title="Database unavailable", headers={"Retry-After": str(DB_RETRY_AFTER_SECONDS)})


async def _unstorable(request: Request, exc: Exception) -> JSONResponse:
    """A value the database refuses to store or compare (text with NUL characters, a number out of its column's
    range) that got past validation: the client's input, so 422, and the transaction was rolled back."""
    log.warning("database refused a value on %s %s: %s", request.method, request.url.path,
                str(getattr(exc, "orig", exc)).splitlines()[0][:200])
    return problem(422, InvalidInput.type, "a value in the request cannot be stored: text with NUL (\\x00) "
                   "characters, or a number out of range", request=request)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    ref = getattr(request.state, "request_id", None) or uuid.uuid4().hex  # set by RequestIdMiddleware
    log.exception("unhandled error on %s %s (ref %s)", request.method, request.url.path, ref, exc_info=exc)
    return problem(500, "internal-error", f"an unexpected error occurred (ref {ref})", request=request,
                   title="Internal server error", reference=ref)


class ErrorBoundary:
    """Pure ASGI middleware, the innermost one: an exception that escapes every handler becomes the same
    problem+json 500 as `_unexpected` (logged with its reference) and goes no further. Starlette's outermost
    ServerErrorMiddleware would answer it too but then re-raise, and uvicorn closes the connection of a request
    that raised ("Exception in ASGI application"), dropping a keep-alive client's next request with it. Once a
    response has started nothing else can be sent: the exception is logged and re-raised (a streamed body cut
    short is all HTTP allows)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracking(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            if started:
                log.exception("error after the response started on %s %s", scope.get("method"), scope.get("path"))
                raise
            response = await _unexpected(Request(scope), exc)
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(SpafitError, _spafit_error)
    # A backbone the service cannot load is the deployment's problem, and its message names paths: a 500 with a
    # reference, the details in the log (the CLI, on the user's own machine, shows it as invalid input).
    app.add_exception_handler(BaseModelUnavailable, _unexpected)
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(HTTPException, _http_exception)
    for db_error in (OperationalError, InterfaceError, PoolTimeoutError):
        app.add_exception_handler(db_error, _database_unavailable)
    app.add_exception_handler(DatabaseDataError, _unstorable)
    app.add_exception_handler(Exception, _unexpected)  # runs in ServerErrorMiddleware, outermost
    app.add_middleware(ErrorBoundary)  # added first: innermost, inside the request id and metrics middleware
