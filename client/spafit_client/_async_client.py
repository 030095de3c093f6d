"""The asynchronous client: `AsyncClient` and its resources, call for call the twin of `Client` (the
requests themselves are built once, in `_endpoints`)."""

from __future__ import annotations

import asyncio
import builtins
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any, TextIO, TypeVar

import httpx

from . import _endpoints as E
from ._base import (
    DEFAULT_TIMEOUT,
    NOT_SENT,
    RETRY_STATUSES,
    STREAM_READ_TIMEOUT,
    Call,
    ResultRows,
    RetryPolicy,
    SSEDecoder,
    as_timeout,
    default_headers,
    finished,
    parse,
    request_kwargs,
    resolve_api_key,
    resolve_base_url,
    resource_id,
    stream_closed,
    stream_timeout,
)
from .errors import (
    APIConnectionError,
    DatasetImportFailed,
    ImportWaitTimeout,
    SpafitAPIError,
    WaitTimeout,
    error_from_response,
    error_from_transport,
    parse_retry_after,
)
from .models import (
    AdapterVersion,
    Dataset,
    FanOutPredictions,
    Health,
    Hyperparameters,
    Job,
    JobEvent,
    Method,
    Readiness,
    Task,
    TaskPredictions,
    Usage,
)
from .pagination import AsyncPager
from .progress import JobProgress

T = TypeVar("T")


class AsyncClient:
    """`Client` for asyncio: the same arguments, resources and methods, each awaited (listings are
    `async for`-able pagers, `stream_events` an async iterator). Use `async with`, or `await aclose()`."""

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT, max_retries: int = 3,
                 retry: RetryPolicy | None = None, headers: dict[str, str] | None = None,
                 http_client: httpx.AsyncClient | None = None):
        self.base_url = resolve_base_url(base_url)
        self.api_key = resolve_api_key(api_key)
        self.timeout = as_timeout(timeout)
        self.retry = retry or RetryPolicy(max_retries=max_retries)
        self._headers = default_headers(self.api_key, headers)
        self._http = http_client or httpx.AsyncClient(timeout=self.timeout)
        self._owns_http = http_client is None
        self.datasets = AsyncDatasets(self)
        self.jobs = AsyncJobs(self)
        self.tasks = AsyncTasks(self)
        self.batch = AsyncBatchPredictions(self)

    async def health(self) -> Health:
        return await self._call(E.health())

    async def ready(self) -> Readiness:
        return await self._call(E.ready())

    async def usage(self) -> Usage:
        return await self._call(E.usage())

    async def predict_many(self, tasks: Sequence[str], inputs: str | Sequence[Any], *,
                           top_k: int | None = None) -> FanOutPredictions:
        return await self._call(E.predict_many(list(tasks), inputs, top_k=top_k))

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncClient(base_url={self.base_url!r})"

    # ----------------------------------------------------------------------------------- transport
    _sleep = staticmethod(asyncio.sleep)

    async def _call(self, call: Call[T]) -> T:
        return parse(call, await self._send(call))

    async def _send(self, call: Call[Any], *, stream: bool = False,
                    timeout: httpx.Timeout | None = None) -> httpx.Response:
        kwargs = request_kwargs(call, self.base_url, self._headers)
        attempt = 0
        maybe_applied = False  # an earlier attempt may have been carried out (its answer lost), not just refused
        while True:
            request = self._http.build_request(**kwargs, timeout=timeout or self.timeout)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                maybe_applied = maybe_applied or not isinstance(e, NOT_SENT)
                if call.retryable and attempt < self.retry.max_retries:
                    await self._sleep(self.retry.delay(attempt))
                    attempt += 1
                    continue
                raise error_from_transport(e, str(request.url)) from e
            except UnicodeError as e:  # a host name IDNA cannot encode (an empty label: "api..example.com")
                raise APIConnectionError(f"could not reach {request.url}: {e}", url=str(request.url)) from e
            if response.status_code < 400:
                return response
            await response.aread()
            await response.aclose()
            if maybe_applied and call.done_if is not None and response.status_code in call.done_if:
                return response  # an earlier attempt went through; its answer was lost
            if response.status_code in RETRY_STATUSES and call.retryable and attempt < self.retry.max_retries:
                # a gateway's 502 / 504: the service behind it may have carried the request out
                maybe_applied = maybe_applied or response.status_code in (502, 504)
                await self._sleep(self.retry.delay(attempt, parse_retry_after(response.headers.get("retry-after"))))
                attempt += 1
                continue
            raise error_from_response(response)

    @asynccontextmanager
    async def _stream(self, call: Call[Any], read_timeout: float | None = None, *,
                      convert: bool = True) -> AsyncIterator[httpx.Response]:
        """The response with its body unread. A body cut or stalled after the answer began is the SDK's
        connection error, except with `convert=False` (the event stream resumes on httpx's own)."""
        response = await self._send(call, stream=True, timeout=stream_timeout(self.timeout, read_timeout))
        try:
            yield response
        except httpx.TransportError as e:
            if not convert:
                raise
            raise error_from_transport(e, str(response.request.url)) from e
        finally:
            await response.aclose()


class AsyncDatasets:
    def __init__(self, client: AsyncClient):
        self._c = client

    async def upload(self, path: E.FileInput, *, name: str | None = None,
                     text_fields: list[str] | str | None = None, label_field: str | None = None,
                     task_type: str | None = None, format: str | None = None) -> Dataset:
        return await self._c._call(E.upload_dataset(path, name=name, text_fields=text_fields,
                                                    label_field=label_field, task_type=task_type, format=format))

    async def import_hf(self, name: str, *, split: str = "train", config_name: str | None = None,
                        max_rows: int | None = None, dataset_name: str | None = None,
                        text_fields: list[str] | str | None = None, label_field: str | None = None,
                        task_type: str | None = None, wait: bool = True, timeout: float | None = 600.0) -> Dataset:
        """See `Client.datasets.import_hf`."""
        dataset = await self._c._call(E.import_dataset(name, split=split, config_name=config_name,
                                                       max_rows=max_rows, dataset_name=dataset_name,
                                                       text_fields=text_fields, label_field=label_field,
                                                       task_type=task_type))
        return await self.wait(dataset, timeout=timeout) if wait else dataset

    async def wait(self, dataset: str | Dataset, *, timeout: float | None = 600.0) -> Dataset:
        """See `Client.datasets.wait`."""
        from ._client import IMPORT_POLL_SECONDS

        dataset_id = resource_id(dataset)
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = IMPORT_POLL_SECONDS[0]
        while True:
            current = await self.get(dataset_id)
            if current.state == "failed":
                raise DatasetImportFailed(current)
            if current.state != "importing":
                return current
            if deadline is not None and time.monotonic() + pause > deadline:
                raise ImportWaitTimeout(dataset_id, timeout or 0)
            await asyncio.sleep(pause)
            pause = min(pause * 2, IMPORT_POLL_SECONDS[1])

    async def get(self, dataset: str | Dataset) -> Dataset:
        return await self._c._call(E.get_dataset(dataset))

    def list(self, *, limit: int | None = None, cursor: str | None = None) -> AsyncPager[Dataset]:
        return AsyncPager(lambda c: self._c._call(E.list_datasets(limit=limit, cursor=c)), cursor)

    async def delete(self, dataset: str | Dataset) -> None:
        await self._c._call(E.delete_dataset(dataset))


class AsyncJobs:
    def __init__(self, client: AsyncClient):
        self._c = client

    async def create(self, *, task: str, train_dataset: str | Dataset,
                     validation_dataset: str | Dataset | None = None, method: Method | dict[str, Any] | None = None,
                     hyperparameters: Hyperparameters | dict[str, Any] | None = None, base_model: str | None = None,
                     text_fields: list[str] | None = None, label_field: str | None = None,
                     task_type: str | None = None, idempotency_key: str | None = None,
                     webhook_url: str | None = None, webhook_on_eval: bool = False,
                     time_limit_s: int | None = None) -> Job:
        return await self._c._call(E.create_job(
            task=task, train_dataset=train_dataset, validation_dataset=validation_dataset, method=method,
            hyperparameters=hyperparameters, base_model=base_model, text_fields=text_fields,
            label_field=label_field, task_type=task_type, idempotency_key=idempotency_key,
            webhook_url=webhook_url, webhook_on_eval=webhook_on_eval, time_limit_s=time_limit_s))

    async def get(self, job: str | Job) -> Job:
        return await self._c._call(E.get_job(job))

    def list(self, *, status: str | None = None, task: str | None = None, limit: int | None = None,
             cursor: str | None = None) -> AsyncPager[Job]:
        return AsyncPager(lambda c: self._c._call(E.list_jobs(status=status, task=task, limit=limit, cursor=c)),
                          cursor)

    async def cancel(self, job: str | Job) -> Job:
        call = E.cancel_job(job)
        response = await self._c._send(call)
        if response.status_code == 409:  # a retry after the first attempt went through (its answer lost)
            return await self.get(job)
        return parse(call, response)

    async def delete(self, job: str | Job) -> None:
        await self._c._call(E.delete_job(job))

    async def events(self, job: str | Job, *, after: int = 0, limit: int | None = None) -> builtins.list[JobEvent]:
        return await self._c._call(E.job_events(job, after=after, limit=limit))

    async def stream_events(self, job: str | Job, *, after: int = 0) -> AsyncIterator[JobEvent]:
        async with aclosing(self._event_stream(resource_id(job), after)) as events:
            async for event in events:
                if event is not None:
                    yield event

    async def wait(self, job: str | Job, *, progress: bool = True, timeout: float | None = None,
                   file: TextIO | None = None) -> Job:
        job_id = resource_id(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        view = JobProgress(job_id, file=file) if progress else None
        seen = 0
        try:
            while True:
                current = await self.get(job_id)
                if current.done:
                    return finished(current)
                read = None if deadline is None else max(0.5, min(STREAM_READ_TIMEOUT, deadline - time.monotonic()))
                async with aclosing(self._event_stream(job_id, seen, read_timeout=read)) as events:
                    async for event in events:
                        if deadline is not None and time.monotonic() > deadline:
                            raise WaitTimeout(job_id, timeout or 0)
                        if event is not None:
                            seen = event.seq
                            if view is not None:
                                view(event)
                if deadline is not None and time.monotonic() > deadline:
                    raise WaitTimeout(job_id, timeout or 0)
        finally:
            if view is not None:
                view.close()

    async def _event_stream(self, job_id: str, after: int, *, read_timeout: float | None = None
                            ) -> AsyncGenerator[JobEvent | None, None]:
        last, failures = after, 0
        while True:
            call = E.stream_job_events(job_id, after=after, last_event_id=last)
            error: httpx.TransportError | None = None
            resume = False
            try:
                async with self._c._stream(call, read_timeout, convert=False) as response:
                    decoder = SSEDecoder()
                    async for line in response.aiter_lines():
                        sse = decoder.feed(line)
                        if sse is None:
                            if line.startswith(":"):
                                yield None
                            continue
                        if sse.event == "end":
                            return
                        if sse.event == "reconnect":  # the stream's time is up: resume at once from `last`
                            resume = True
                            break
                        if sse.id is None:  # a control event of a later service version: not a job event
                            continue
                        event = JobEvent.model_validate_json(sse.data)
                        if event.seq > last:
                            last, failures = event.seq, 0
                            yield event
            except httpx.TransportError as e:
                error = e
            if resume:  # not a failure: the server ends every stream after its maximum duration
                yield None
                continue
            failures += 1
            url = self._c.base_url + call.path
            if failures > self._c.retry.max_retries:
                raise error_from_transport(error, url) if error is not None else stream_closed(url)
            yield None
            await self._c._sleep(self._c.retry.delay(failures - 1))


class AsyncTasks:
    def __init__(self, client: AsyncClient):
        self._c = client

    def list(self, *, limit: int | None = None, cursor: str | None = None) -> AsyncPager[Task]:
        return AsyncPager(lambda c: self._c._call(E.list_tasks(limit=limit, cursor=c)), cursor)

    async def get(self, task: str) -> Task:
        return await self._c._call(E.get_task(task))

    def versions(self, task: str, *, limit: int | None = None,
                 cursor: str | None = None) -> AsyncPager[AdapterVersion]:
        return AsyncPager(lambda c: self._c._call(E.list_versions(task, limit=limit, cursor=c)), cursor)

    async def activate(self, task: str, version: int) -> Task:
        return await self._c._call(E.activate_version(task, version))

    async def delete(self, task: str) -> None:
        await self._c._call(E.delete_task(task))

    async def download(self, task: str, path: str | os.PathLike[str] | None = None, *,
                       version: int | None = None, format: str | None = None) -> Path:
        return E.save_archive(await self._c._call(E.download_adapter(task, version=version, format=format)),
                              task, path)

    async def import_adapter(self, task: str, path_or_zip: E.FileInput) -> AdapterVersion:
        return await self._c._call(E.import_adapter(task, E.adapter_archive(path_or_zip)))

    async def predict(self, task: str, inputs: str | Sequence[Any], *, top_k: int | None = None) -> TaskPredictions:
        return await self._c._call(E.predict(task, inputs, top_k=top_k))

    async def evaluate(self, task: str, version: int, dataset: Any, *, text_fields: list[str] | None = None,
                       label_field: str | None = None, idempotency_key: str | None = None) -> Job:
        """See `Client.tasks.evaluate`."""
        return await self._c._call(E.evaluate_version(task, version, dataset=dataset, text_fields=text_fields,
                                                      label_field=label_field, idempotency_key=idempotency_key))

    async def compare(self, task: str, a: int, b: int) -> dict[str, Any]:
        """See `Client.tasks.compare`."""
        return (await self._c._call(E.compare_versions(task, a, b)))["compare"]


class AsyncBatchPredictions:
    """See `Client.batch`."""

    def __init__(self, client: AsyncClient):
        self._c = client

    async def create(self, *, task: str | None = None, dataset: Any, version: int | None = None,
                     tasks: list[Any] | None = None, text_fields: list[str] | None = None,
                     id_field: str | None = None, top_k: int | None = None, format: str | None = None,
                     all_scores: bool = False, idempotency_key: str | None = None) -> Job:
        """See `Client.batch.create`."""
        return await self._c._call(E.create_batch_prediction(
            task=task, dataset=dataset, version=version, text_fields=text_fields, id_field=id_field, top_k=top_k,
            format=format, all_scores=all_scores, idempotency_key=idempotency_key, tasks=tasks))

    async def get(self, job: Any) -> Job:
        return await self._c._call(E.get_batch_prediction(job))

    def list(self, *, limit: int | None = None, cursor: str | None = None) -> AsyncPager[Job]:
        return AsyncPager(lambda c: self._c._call(E.list_batch_predictions(limit=limit, cursor=c)), cursor)

    async def wait(self, job: Any, *, progress: bool = True, timeout: float | None = None,
                   file: TextIO | None = None) -> Job:
        return await self._c.jobs.wait(job, progress=progress, timeout=timeout, file=file)

    async def cancel(self, job: Any) -> Job:
        return await self._c.jobs.cancel(job)

    async def download(self, job: Any, path: str | os.PathLike[str], *, resume: bool = False) -> Path:
        out = Path(path)
        have = E.partial_size(out, resume)
        try:
            async with self._c._stream(E.batch_results(job, have)) as response:
                with out.open("ab" if response.status_code == 206 else "wb") as f:
                    async for part in response.aiter_bytes():
                        f.write(part)
        except SpafitAPIError as e:
            if e.status != 416 or not have:
                raise
            if not E.download_complete(e, have):  # longer than the file: not a start of it, fetched whole
                return await self.download(job, out)
        return out

    async def results(self, job: Any) -> AsyncIterator[dict[str, Any]]:
        async with self._c._stream(E.batch_results(job)) as response:
            rows = ResultRows(response.headers.get("content-type", "").startswith("text/csv"))
            async for part in response.aiter_bytes():
                for row in rows.feed(part):
                    yield row
            for row in rows.flush():
                yield row
