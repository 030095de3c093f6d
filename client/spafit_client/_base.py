"""What the sync and async clients share: configuration, the retry policy, request specs (`Call`), the
server-sent-events decoder and the input normalisation. No I/O happens here."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Generic, TypeVar, cast

import httpx
import pydantic
from pydantic import BaseModel, TypeAdapter

from ._version import __version__
from .errors import APIConnectionError, JobCancelled, JobFailed
from .models import Job

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 60.0
# A live event stream idles up to 15 s between keep-alive comments; reads wait longer than that.
STREAM_READ_TIMEOUT = 60.0
RETRY_STATUSES = frozenset({429, 502, 503, 504})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def resolve_base_url(base_url: str | None) -> str:
    return (base_url or os.environ.get("SPAFIT_URL") or DEFAULT_BASE_URL).rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else (os.environ.get("SPAFIT_API_KEY") or None)


def as_timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    return timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)


def stream_timeout(timeout: httpx.Timeout, read: float | None = None) -> httpx.Timeout:
    """The client's timeout with a read timeout long enough for a quiet event stream."""
    return httpx.Timeout(connect=timeout.connect, read=read or STREAM_READ_TIMEOUT, write=timeout.write,
                         pool=timeout.pool)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of failed attempts: on 429/502/503/504 and connection errors, only for requests that are
    safe to repeat (idempotent methods, POSTs carrying an Idempotency-Key, and the read-only POSTs of
    predict). The wait doubles from `backoff` up to `max_backoff`, with jitter (half of it random); a
    Retry-After header replaces it, capped at `max_retry_after`."""

    max_retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt + 1` (attempt counts from 0)."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        d = min(self.max_backoff, self.backoff * 2.0 ** attempt)
        return d / 2 + random.uniform(0, d / 2)


T = TypeVar("T")


@dataclass
class Call(Generic[T]):
    """One API call: the request, whether it may be retried, and how to read the answer (`model`: a
    pydantic model for the JSON body; `raw`: hand back the response itself; neither: None)."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    content: bytes | None = None
    files: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    retry: bool | None = None  # None: decided by the method and the Idempotency-Key header
    model: Any = None
    raw: bool = False
    done_if: frozenset[int] | None = None  # statuses that, on a retry, mean an earlier attempt went through

    @property
    def retryable(self) -> bool:
        if self.retry is not None:
            return self.retry
        return self.method in IDEMPOTENT_METHODS or "Idempotency-Key" in self.headers


def default_headers(api_key: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = {"User-Agent": f"spafit-client/{__version__}", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    headers.update(extra or {})
    return headers


def request_kwargs(call: Call[Any], base_url: str, headers: dict[str, str]) -> dict[str, Any]:
    params = {k: v for k, v in (call.params or {}).items() if v is not None} or None
    kwargs: dict[str, Any] = {"method": call.method, "url": base_url + call.path, "params": params,
                              "headers": {**headers, **call.headers}}
    for name in ("json", "content", "files", "data"):
        value = getattr(call, name)
        if value is not None:
            kwargs[name] = value
    return kwargs


def parse(call: Call[T], response: httpx.Response) -> T:
    """The answer as the call's type: its model, the response itself (`raw`), or None."""
    if call.raw:
        return cast(T, response)
    if response.status_code == 204 or call.model is None or (call.done_if and response.status_code in call.done_if):
        return cast(T, None)
    try:
        return cast(T, _adapter(call.model).validate_json(response.content))
    except pydantic.ValidationError as e:
        from .errors import APIResponseError
        raise APIResponseError(f"the answer of {response.request.method} {response.request.url} is not what the "
                               f"service sends: {e.error_count()} problem(s), e.g. {e.errors()[0]['msg']}",
                               url=str(response.request.url)) from None


@cache
def _adapter(model: Any) -> TypeAdapter[Any]:
    return TypeAdapter(model)


def resource_id(value: Any) -> str:
    """An id from a string, a UUID or a model that has `.id` (a Dataset, a Job)."""
    return str(getattr(value, "id", value))


def dump(value: BaseModel | dict[str, Any] | None) -> dict[str, Any] | None:
    """A method / hyperparameters argument as JSON: only what the caller set."""
    if value is None:
        return None
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    return dict(value)


def predict_inputs(inputs: str | Sequence[Any]) -> list[Any]:
    """Texts, (text, text_pair) tuples or {text, text_pair} dicts, as the service takes them; a single
    string is one input."""
    if isinstance(inputs, str):
        return [inputs]
    out: list[Any] = []
    for x in inputs:
        if isinstance(x, tuple):
            text, pair = x
            out.append({"text": text, "text_pair": pair})
        elif isinstance(x, BaseModel):
            out.append(x.model_dump(exclude_none=True))
        else:
            out.append(x)
    return out


@dataclass
class ServerSentEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None


class SSEDecoder:
    """Lines in, events out (the text/event-stream format: `id:`, `event:`, `data:`, `:` comments, a blank
    line ends an event)."""

    def __init__(self) -> None:
        self._event: str = ""
        self._id: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> ServerSentEvent | None:
        if not line:
            if not self._data and not self._event:
                return None
            sse = ServerSentEvent(event=self._event or "message", data="\n".join(self._data), id=self._id)
            self._event, self._data, self._id = "", [], None
            return sse
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        return None


def finished(job: Job) -> Job:
    """The job if it succeeded; JobFailed / JobCancelled if it ended otherwise."""
    if job.status == "failed":
        raise JobFailed(job)
    if job.status == "cancelled":
        raise JobCancelled(job)
    return job


class ResultRows:
    """A batch prediction's result file, fed as bytes, as row dicts. Lines end at "\n" only (httpx's iter_lines,
    like str.splitlines, also ends them at U+2028, U+0085, ... inside an id or a label), and a quoted CSV cell may
    hold a newline."""

    def __init__(self, is_csv: bool):
        self.is_csv, self.buf, self.pending = is_csv, b"", ""
        self.header: list[str] | None = None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return [row for line in lines for row in self._line(line + b"\n")]

    def flush(self) -> list[dict[str, Any]]:
        rest, self.buf = self.buf, b""
        return self._line(rest + b"\n") if rest or self.pending else []

    def _line(self, raw: bytes) -> list[dict[str, Any]]:
        import json

        try:
            return self._parse(raw.decode())
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:  # a proxy's page, not the service's
            from .errors import APIResponseError

            raise APIResponseError(f"the batch results are not the service's JSON Lines or CSV: {e}") from None

    def _parse(self, line: str) -> list[dict[str, Any]]:
        import csv
        import json

        if not self.is_csv:
            row = json.loads(line) if line.strip() else None
            if row is not None and not isinstance(row, dict):
                raise ValueError(f"a result line is {type(row).__name__}, not an object")
            return [] if row is None else [row]
        self.pending += line
        if self.pending.count('"') % 2:  # inside a quoted cell: its newline is part of it
            return []
        text, self.pending = self.pending, ""
        if not text.strip():
            return []
        row = next(csv.reader([text]))
        if self.header is None:
            self.header = row
            return []
        return [dict(zip(self.header, row, strict=False))]


# Failures before the request left: a retry after one of these cannot meet an earlier attempt's effects.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def stream_closed(url: str) -> APIConnectionError:
    return APIConnectionError(f"the event stream of {url} kept closing before the job ended", url=url)
