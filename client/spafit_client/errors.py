"""Everything the SDK raises, and the one place an HTTP error becomes a typed exception.

The service answers errors as problem+json (RFC 9457): `type` (a stable URI, branch on it), `title`,
`status`, `detail`, and where known `field` (the offending input) and `errors` (one entry per problem).
`error_from_response` picks the class by status; every member of the body stays on the exception.

    SpafitError
    ├── SpafitAPIError                 the service answered with an error
    │   ├── BadRequestError            any other 4xx (400, 415, ...)
    │   ├── AuthenticationError        401: missing or invalid API key
    │   ├── PermissionDeniedError      403: the key lacks a scope (or a keyless cross-origin write)
    │   │   └── StorageQuotaExceededError  403: the tenant's stored bytes are at its quota; delete to make room
    │   ├── NotFoundError              404 (also another tenant's resource)
    │   ├── ConflictError              409
    │   ├── PayloadTooLargeError       413
    │   ├── ValidationError            422: `field` / `errors` say what
    │   ├── RateLimitError             429
    │   └── ServerError                5xx
    │       └── OverloadedError        503: busy or a dependency is down; `retry_after`
    ├── APIConnectionError             no answer at all (also a builtin ConnectionError)
    │   ├── APITimeoutError            no answer in time (also a builtin TimeoutError)
    │   └── APIResponseError           a successful answer that is not the service's (another server, a proxy)
    ├── JobFailed                      jobs.wait(): the job failed; `error_type`, `message`
    ├── JobCancelled                   jobs.wait(): the job was cancelled
    ├── DatasetImportFailed            datasets.import_hf(): the import failed; `error_type`, `message`
    ├── WaitTimeout                    jobs.wait(timeout=...) ran out (also a builtin TimeoutError)
    │   └── ImportWaitTimeout          datasets.import_hf(timeout=...) / datasets.wait() ran out
    └── WebhookVerificationError       verify_webhook(): bad or missing signature, or a stale timestamp
"""

from __future__ import annotations

import builtins
import json
import time
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from .models import Job

PROBLEM_BASE = "https://spafit.dev/problems/"


class SpafitError(Exception):
    """Base class of every exception this SDK raises."""


class SpafitAPIError(SpafitError):
    """The service answered with an error status. Members of the problem+json body are attributes."""

    def __init__(self, status: int, type: str = "about:blank", title: str = "", detail: str = "", *,
                 field: str | None = None, errors: list[dict[str, Any]] | None = None,
                 body: dict[str, Any] | None = None, headers: httpx.Headers | None = None):
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.field = field
        self.errors = errors
        self.body = body or {}
        self.headers = headers if headers is not None else httpx.Headers()
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.status} {self.title or 'Error'}"
        if self.detail:
            text += f": {self.detail}"
        if self.field and self.field not in self.detail:
            text += f" (field: {self.field})"
        return text

    @property
    def slug(self) -> str:
        """The stable part of `type`: `not-found`, `invalid-dataset`, ..."""
        return self.type.removeprefix(PROBLEM_BASE)

    @property
    def request_id(self) -> str | None:
        value: str | None = self.headers.get("x-request-id")
        return value

    @property
    def retry_after(self) -> float | None:
        """Seconds the service asked us to wait (the Retry-After header), if it did."""
        return parse_retry_after(self.headers.get("retry-after"))


class BadRequestError(SpafitAPIError):
    """A 4xx without a more specific class (400, 415, ...)."""


class AuthenticationError(SpafitAPIError):
    """401: the API key is missing, unknown or revoked."""


class PermissionDeniedError(SpafitAPIError):
    """403: the API key is valid but lacks the scope (train, predict, admin) the call needs."""


class StorageQuotaExceededError(PermissionDeniedError):
    """403 `storage-quota-exceeded`: what the tenant stores (datasets, adapter versions, batch results) would pass
    its quota; no retry helps until it deletes something. `used_bytes`, `limit_bytes`, `adding_bytes` are in
    `body`; `Client.usage()` shows where the bytes are."""


class NotFoundError(SpafitAPIError):
    """404: no such resource for this tenant (another tenant's looks the same)."""


class ConflictError(SpafitAPIError):
    """409: the resource's state forbids it (cancelling a finished job, reusing an idempotency key)."""


class PayloadTooLargeError(SpafitAPIError):
    """413: the upload or request body is over the service's limit."""


class ValidationError(SpafitAPIError):
    # `type` .../webhook-url-refused: the job's webhook_url is not http(s) or points inside the network.
    # `type` .../unsafe-data-source: a dataset import named a path, or a card pointing outside the dataset.
    # `type` .../dataset-not-ready: a job named a dataset still importing, or whose import failed.
    # `type` .../too-many-rows: a batch prediction or evaluation over more rows than a job may take.
    # `type` .../result-too-large: a batch prediction whose result could pass the bytes a job may store.
    """422: the request is well-formed but not acceptable; `field` and `errors` say where."""


class RateLimitError(SpafitAPIError):
    """429: too many requests; `retry_after` says when to come back. `type` says which limit, e.g.
    `.../too-many-jobs` (the tenant's queued + running training jobs), `.../too-many-imports` (its dataset
    imports in progress), `.../tenant-queue-full` (its share of the prediction queue is in flight)."""


class ServerError(SpafitAPIError):
    """5xx: the service failed; the body carries a reference to quote. `.../prediction-failed`: the engine
    failed on this request's inputs even run apart from others (other requests were answered)."""


class OverloadedError(ServerError):
    """503: the prediction queue is full or a dependency (database, broker, engine) is unavailable."""


class APIConnectionError(SpafitError, builtins.ConnectionError):
    """The service could not be reached (refused, reset, DNS) after the retries allowed."""

    def __init__(self, message: str, *, url: str | None = None):
        super().__init__(message)
        self.url = url


class APITimeoutError(APIConnectionError, builtins.TimeoutError):
    """The service did not answer within the client's timeout."""


class JobFailed(SpafitError):
    """The job ended in `failed`; `error_type` is the service's slug (e.g. `invalid-dataset`, `non-finite`,
    `time-limit`, `internal-error`); `error_id`, for an internal error, is what the service's log holds it under."""

    def __init__(self, job: Job):
        self.job = job
        self.error_type = job.error.type if job.error else "unknown"
        self.message = job.error.message if job.error else "the job failed"
        self.error_id = job.error.error_id if job.error else None
        super().__init__(f"job {job.id} failed ({self.error_type}): {self.message}")


class JobCancelled(SpafitError):
    """The job ended in `cancelled`."""

    def __init__(self, job: Job):
        self.job = job
        super().__init__(f"job {job.id} was cancelled")


class DatasetImportFailed(SpafitError):
    """A dataset import ended in `failed`. `error_type` is the service's slug: `unsafe-data-source` (a path,
    or a dataset card whose data_files point outside the dataset), `import-too-large` (over the service's
    row or byte limit: ask for fewer with max_rows), `invalid-dataset`, `import-timeout`, `worker-lost`."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        error = getattr(dataset, "error", None)
        self.error_type = error.type if error else "unknown"
        self.message = error.message if error else "the import failed"
        super().__init__(f"dataset import {dataset.id} failed ({self.error_type}): {self.message}")


class WaitTimeout(SpafitError, builtins.TimeoutError):
    """`jobs.wait(timeout=...)` ran out before the job finished (the job goes on)."""

    def __init__(self, job_id: str, timeout: float):
        self.job_id = job_id
        self.timeout = timeout
        super().__init__(f"job {job_id} did not finish within {timeout:g}s")


class ImportWaitTimeout(WaitTimeout):
    """A dataset import did not end within the timeout (the import goes on)."""

    def __init__(self, dataset_id: str, timeout: float):
        super().__init__(dataset_id, timeout)
        self.dataset_id = dataset_id
        self.args = (f"dataset {dataset_id} was still importing after {timeout:g}s",)

    def __str__(self) -> str:
        return str(self.args[0])


_BY_STATUS: dict[int, type[SpafitAPIError]] = {
    401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError, 409: ConflictError,
    413: PayloadTooLargeError, 422: ValidationError, 429: RateLimitError, 503: OverloadedError,
}
_BY_TYPE: dict[tuple[int, str], type[SpafitAPIError]] = {(403, "storage-quota-exceeded"): StorageQuotaExceededError}


def error_from_response(response: httpx.Response) -> SpafitAPIError:
    """The exception for an error response: its class from the status, its fields from problem+json
    (or, for a body that is not JSON, the status line and the text)."""
    status = response.status_code
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else BadRequestError)
    try:
        body = json.loads(response.content) if response.content else {}
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    cls = _BY_TYPE.get((status, str(body.get("type") or "").removeprefix(PROBLEM_BASE)), cls)
    detail = body.get("detail")
    if not isinstance(detail, str):
        detail = json.dumps(detail) if detail is not None else response.text[:500].strip()
    return cls(status, str(body.get("type") or "about:blank"), str(body.get("title") or response.reason_phrase),
               detail, field=body.get("field"), errors=body.get("errors"), body=body, headers=response.headers)


def error_from_transport(exc: httpx.TransportError, url: str | None = None) -> APIConnectionError:
    """A connection-level failure as the SDK's wrapper (timeouts apart from the rest)."""
    where = f" {url}" if url else ""
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"timed out talking to{where}: {exc.__class__.__name__}", url=url)
    return APIConnectionError(f"could not reach{where}: {exc}", url=url)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class WebhookVerificationError(SpafitError, builtins.ValueError):
    """`verify_webhook`: a webhook whose signature does not match, whose headers are missing, or whose
    timestamp is outside the tolerance (a replay). Answer it with a 4xx and do not act on it."""


class APIResponseError(APIConnectionError):
    """A successful answer that is not the service's (not its JSON): the URL points elsewhere, or a proxy
    answered. (An error status from such a server is still its status's class, its text as `detail`.)"""
