"""The synchronous client: `Client` and its resources (datasets, jobs, tasks)."""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
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
from .pagination import SyncPager
from .progress import JobProgress

T = TypeVar("T")


class Client:
    """The SPAFIT service over HTTP.

    `base_url` defaults to $SPAFIT_URL, then http://127.0.0.1:8000; `api_key` to $SPAFIT_API_KEY (an
    embedded, auth-off service needs none). Failed attempts are retried (see `RetryPolicy`) up to
    `max_retries` times. Use it as a context manager, or call `close()`.
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT, max_retries: int = 3,
                 retry: RetryPolicy | None = None, headers: dict[str, str] | None = None,
                 http_client: httpx.Client | None = None):
        self.base_url = resolve_base_url(base_url)
        self.api_key = resolve_api_key(api_key)
        self.timeout = as_timeout(timeout)
        self.retry = retry or RetryPolicy(max_retries=max_retries)
        self._headers = default_headers(self.api_key, headers)
        self._http = http_client or httpx.Client(timeout=self.timeout)
        self._owns_http = http_client is None
        self.datasets = Datasets(self)
        self.jobs = Jobs(self)
        self.tasks = Tasks(self)
        self.batch = BatchPredictions(self)

    # ----------------------------------------------------------------------------------- top level
    def health(self) -> Health:
        """Liveness (`/healthz`)."""
        return self._call(E.health())

    def ready(self) -> Readiness:
        """Readiness (`/readyz`); OverloadedError while a dependency is not ready."""
        return self._call(E.ready())

    def usage(self) -> Usage:
        """Bytes the tenant stores, by kind, against its quota (`GET /v1/usage`)."""
        return self._call(E.usage())

    def predict_many(self, tasks: Sequence[str], inputs: str | Sequence[Any], *,
                     top_k: int | None = None) -> FanOutPredictions:
        """Every input asked of every task in one pass (`POST /v1/predict`)."""
        return self._call(E.predict_many(list(tasks), inputs, top_k=top_k))

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(base_url={self.base_url!r})"

    # ----------------------------------------------------------------------------------- transport
    _sleep = staticmethod(time.sleep)

    def _call(self, call: Call[T]) -> T:
        response = self._send(call)
        return parse(call, response)

    def _send(self, call: Call[Any], *, stream: bool = False, timeout: httpx.Timeout | None = None) -> httpx.Response:
        """One call, retried per the policy; an error status raises its typed exception."""
        kwargs = request_kwargs(call, self.base_url, self._headers)
        attempt = 0
        maybe_applied = False  # an earlier attempt may have been carried out (its answer lost), not just refused
        while True:
            request = self._http.build_request(**kwargs, timeout=timeout or self.timeout)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                maybe_applied = maybe_applied or not isinstance(e, NOT_SENT)
                if call.retryable and attempt < self.retry.max_retries:
                    self._sleep(self.retry.delay(attempt))
                    attempt += 1
                    continue
                raise error_from_transport(e, str(request.url)) from e
            except UnicodeError as e:  # a host name IDNA cannot encode (an empty label: "api..example.com")
                raise APIConnectionError(f"could not reach {request.url}: {e}", url=str(request.url)) from e
            if response.status_code < 400:
                return response
            response.read()
            response.close()
            if maybe_applied and call.done_if is not None and response.status_code in call.done_if:
                return response  # an earlier attempt went through; its answer was lost
            if response.status_code in RETRY_STATUSES and call.retryable and attempt < self.retry.max_retries:
                # a gateway's 502 / 504: the service behind it may have carried the request out
                maybe_applied = maybe_applied or response.status_code in (502, 504)
                self._sleep(self.retry.delay(attempt, parse_retry_after(response.headers.get("retry-after"))))
                attempt += 1
                continue
            raise error_from_response(response)

    @contextmanager
    def _stream(self, call: Call[Any], read_timeout: float | None = None, *,
                convert: bool = True) -> Iterator[httpx.Response]:
        """The response with its body unread. A body cut or stalled after the answer began is the SDK's
        connection error, except with `convert=False` (the event stream resumes on httpx's own)."""
        response = self._send(call, stream=True, timeout=stream_timeout(self.timeout, read_timeout))
        try:
            yield response
        except httpx.TransportError as e:
            if not convert:
                raise
            raise error_from_transport(e, str(response.request.url)) from e
        finally:
            response.close()


IMPORT_POLL_SECONDS = (0.25, 2.0)  # first and longest pause between polls of an importing dataset


class Datasets:
    """`/v1/datasets`: upload CSV / TSV / JSON Lines files, import Hugging Face Hub datasets; get, list, delete."""

    def __init__(self, client: Client):
        self._c = client

    def upload(self, path: E.FileInput, *, name: str | None = None, text_fields: list[str] | str | None = None,
               label_field: str | None = None, task_type: str | None = None, format: str | None = None) -> Dataset:
        """Upload a file (a path, bytes or a binary file); the service validates it and says how it read it.
        Fields not given are inferred (text columns, the label column, the format)."""
        return self._c._call(E.upload_dataset(path, name=name, text_fields=text_fields, label_field=label_field,
                                              task_type=task_type, format=format))

    def import_hf(self, name: str, *, split: str = "train", config_name: str | None = None,
                  max_rows: int | None = None, dataset_name: str | None = None,
                  text_fields: list[str] | str | None = None, label_field: str | None = None,
                  task_type: str | None = None, wait: bool = True, timeout: float | None = 600.0) -> Dataset:
        """Import a split of a Hugging Face Hub dataset (`name` or `owner/name`). The service's worker reads
        it (bounded by its row and byte limits; `max_rows` keeps only the first rows). With `wait` (default)
        this returns the dataset once `ready`, or raises DatasetImportFailed (its `error_type` says why) or
        ImportWaitTimeout; with `wait=False`, the dataset as accepted (`state` `importing`)."""
        dataset = self._c._call(E.import_dataset(name, split=split, config_name=config_name, max_rows=max_rows,
                                                 dataset_name=dataset_name, text_fields=text_fields,
                                                 label_field=label_field, task_type=task_type))
        return self.wait(dataset, timeout=timeout) if wait else dataset

    def wait(self, dataset: str | Dataset, *, timeout: float | None = 600.0) -> Dataset:
        """Poll an importing dataset until it is `ready` (returned) or `failed` (DatasetImportFailed);
        ImportWaitTimeout after `timeout` seconds (the import goes on)."""
        dataset_id = resource_id(dataset)
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = IMPORT_POLL_SECONDS[0]
        while True:
            current = self.get(dataset_id)
            if current.state == "failed":
                raise DatasetImportFailed(current)
            if current.state != "importing":
                return current
            if deadline is not None and time.monotonic() + pause > deadline:
                raise ImportWaitTimeout(dataset_id, timeout or 0)
            time.sleep(pause)
            pause = min(pause * 2, IMPORT_POLL_SECONDS[1])

    def get(self, dataset: str | Dataset) -> Dataset:
        return self._c._call(E.get_dataset(dataset))

    def list(self, *, limit: int | None = None, cursor: str | None = None) -> SyncPager[Dataset]:
        """Every dataset, newest first, fetched `limit` at a time as iteration goes."""
        return SyncPager(lambda c: self._c._call(E.list_datasets(limit=limit, cursor=c)), cursor)

    def delete(self, dataset: str | Dataset) -> None:
        self._c._call(E.delete_dataset(dataset))


class Jobs:
    """`/v1/jobs`: start fine-tuning, follow it live, cancel it."""

    def __init__(self, client: Client):
        self._c = client

    def create(self, *, task: str, train_dataset: str | Dataset, validation_dataset: str | Dataset | None = None,
               method: Method | dict[str, Any] | None = None,
               hyperparameters: Hyperparameters | dict[str, Any] | None = None, base_model: str | None = None,
               text_fields: list[str] | None = None, label_field: str | None = None, task_type: str | None = None,
               idempotency_key: str | None = None,
               webhook_url: str | None = None, webhook_on_eval: bool = False,
               time_limit_s: int | None = None) -> Job:
        """Queue a job that trains an adapter for `task` (202). An Idempotency-Key (a fresh uuid4 unless
        given) goes with the request, so retries of this call never start a second job; pass your own key
        to make separate calls safe to repeat too. `time_limit_s`: fail the job past this wall-clock time
        (within the service's limit). Past the tenant's job limit: RateLimitError (`retry_after`)."""
        return self._c._call(E.create_job(
            task=task, train_dataset=train_dataset, validation_dataset=validation_dataset, method=method,
            hyperparameters=hyperparameters, base_model=base_model, text_fields=text_fields,
            label_field=label_field, task_type=task_type, idempotency_key=idempotency_key,
            webhook_url=webhook_url, webhook_on_eval=webhook_on_eval, time_limit_s=time_limit_s))

    def get(self, job: str | Job) -> Job:
        return self._c._call(E.get_job(job))

    def list(self, *, status: str | None = None, task: str | None = None, limit: int | None = None,
             cursor: str | None = None) -> SyncPager[Job]:
        """Every job (optionally of one status / task), newest first, across pages."""
        return SyncPager(lambda c: self._c._call(E.list_jobs(status=status, task=task, limit=limit, cursor=c)),
                         cursor)

    def cancel(self, job: str | Job) -> Job:
        """Cancel a queued job at once or a running one at its next step (`cancel_requested` is set)."""
        call = E.cancel_job(job)
        response = self._c._send(call)
        if response.status_code == 409:  # a retry after the first attempt went through (its answer lost)
            return self.get(job)
        return parse(call, response)

    def delete(self, job: str | Job) -> None:
        """Delete a finished job with its events (409 while queued or running: cancel it first). The adapter
        version it produced stays; its datasets can be deleted afterwards."""
        self._c._call(E.delete_job(job))

    def events(self, job: str | Job, *, after: int = 0, limit: int | None = None) -> builtins.list[JobEvent]:
        """The events recorded so far (a snapshot; see `stream_events` to follow them live)."""
        return self._c._call(E.job_events(job, after=after, limit=limit))

    def stream_events(self, job: str | Job, *, after: int = 0) -> Iterator[JobEvent]:
        """The job's events live, in order, from the first with `seq > after` until the job ends. A dropped
        connection is resumed where it stopped (Last-Event-ID), up to the client's `max_retries` in a row."""
        for event in self._event_stream(resource_id(job), after):
            if event is not None:
                yield event

    def wait(self, job: str | Job, *, progress: bool = True, timeout: float | None = None,
             file: TextIO | None = None) -> Job:
        """Block until the job ends; return it if it succeeded. A progress bar follows the live events on
        stderr (`file`) unless `progress=False`. Raises JobFailed (with the job's error type and message),
        JobCancelled, or WaitTimeout after `timeout` seconds (the job itself goes on)."""
        job_id = resource_id(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        view = JobProgress(job_id, file=file) if progress else None
        seen = 0
        try:
            while True:
                current = self.get(job_id)
                if current.done:
                    return finished(current)
                read = None if deadline is None else max(0.5, min(STREAM_READ_TIMEOUT, deadline - time.monotonic()))
                for event in self._event_stream(job_id, seen, read_timeout=read):
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

    def _event_stream(self, job_id: str, after: int, *, read_timeout: float | None = None
                      ) -> Generator[JobEvent | None, None, None]:
        """Events from the server-sent stream; None marks a quiet moment (a keep-alive, a reconnect) so that
        callers can look at the clock. Ends at the service's `end` event."""
        last, failures = after, 0
        while True:
            call = E.stream_job_events(job_id, after=after, last_event_id=last)
            error: httpx.TransportError | None = None
            resume = False
            try:
                with self._c._stream(call, read_timeout, convert=False) as response:
                    decoder = SSEDecoder()
                    for line in response.iter_lines():
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
            self._c._sleep(self._c.retry.delay(failures - 1))


class Tasks:
    """`/v1/tasks`: the adapter registry (versions, roll back, export / import) and predict."""

    def __init__(self, client: Client):
        self._c = client

    def list(self, *, limit: int | None = None, cursor: str | None = None) -> SyncPager[Task]:
        return SyncPager(lambda c: self._c._call(E.list_tasks(limit=limit, cursor=c)), cursor)

    def get(self, task: str) -> Task:
        return self._c._call(E.get_task(task))

    def versions(self, task: str, *, limit: int | None = None, cursor: str | None = None) -> SyncPager[AdapterVersion]:
        """The task's versions, newest first, across pages."""
        return SyncPager(lambda c: self._c._call(E.list_versions(task, limit=limit, cursor=c)), cursor)

    def activate(self, task: str, version: int) -> Task:
        """Serve `version` from now on (roll back or forward)."""
        return self._c._call(E.activate_version(task, version))

    def delete(self, task: str) -> None:
        """Delete the task and all its versions."""
        self._c._call(E.delete_task(task))

    def download(self, task: str, path: str | os.PathLike[str] | None = None, *, version: int | None = None,
                 format: str | None = None) -> Path:
        """Save a version (default: the active one) as a zip at `path` (a folder: `<task>-v<N>.zip` in it;
        default: that name in the current folder). `format="peft"`: a zipped PEFT LoRA folder. Returns where
        it went."""
        return E.save_archive(self._c._call(E.download_adapter(task, version=version, format=format)), task, path)

    def import_adapter(self, task: str, path_or_zip: E.FileInput) -> AdapterVersion:
        """Register an adapter trained elsewhere (a zip, or an adapter folder as `spafit train` writes it) as
        the task's new, active version."""
        return self._c._call(E.import_adapter(task, E.adapter_archive(path_or_zip)))

    def predict(self, task: str, inputs: str | Sequence[Any], *, top_k: int | None = None) -> TaskPredictions:
        """Predict with the task's active version: texts, (text, text_pair) tuples or {text, text_pair}."""
        return self._c._call(E.predict(task, inputs, top_k=top_k))

    def evaluate(self, task: str, version: int, dataset: str | Dataset, *, text_fields: builtins.list[str] | None = None,
                 label_field: str | None = None, idempotency_key: str | None = None) -> Job:
        """Start a job (kind `evaluate`) computing `version`'s metrics on a labelled dataset; wait for it with
        `client.jobs.wait`. The metrics are then on the job and in the version's `evaluations`."""
        return self._c._call(E.evaluate_version(task, version, dataset=dataset, text_fields=text_fields,
                                                label_field=label_field, idempotency_key=idempotency_key))

    def compare(self, task: str, a: int, b: int) -> dict[str, Any]:
        """Versions `a` and `b` side by side on each dataset both were evaluated on: {task, versions, datasets:
        [{dataset, a, b, delta}]} (delta: b - a per metric)."""
        return self._c._call(E.compare_versions(task, a, b))["compare"]


class BatchPredictions:
    """`/v1/batch-predictions`: predict every row of an uploaded dataset on the workers (a job of kind `predict`),
    then download the result file (JSON Lines or CSV), streamed."""

    def __init__(self, client: Client):
        self._c = client

    def create(self, *, task: str | None = None, dataset: str | Dataset, version: int | None = None,
               tasks: builtins.list[str | dict | tuple[str, int | None]] | None = None,
               text_fields: builtins.list[str] | None = None, id_field: str | None = None, top_k: int | None = None,
               format: str | None = None, all_scores: bool = False, idempotency_key: str | None = None) -> Job:
        """One `task` (and `version`), or several `tasks` (names, {task, version} or (task, version)) over the
        same dataset in one job: each result row then carries every task's prediction
        (`{id, results: {task: {label, score}}}`; CSV: `<task>.label`, `<task>.score`, `<task>.scores` columns)."""
        return self._c._call(E.create_batch_prediction(
            task=task, dataset=dataset, version=version, text_fields=text_fields, id_field=id_field, top_k=top_k,
            format=format, all_scores=all_scores, idempotency_key=idempotency_key, tasks=tasks))

    def get(self, job: str | Job) -> Job:
        return self._c._call(E.get_batch_prediction(job))

    def list(self, *, limit: int | None = None, cursor: str | None = None) -> SyncPager[Job]:
        return SyncPager(lambda c: self._c._call(E.list_batch_predictions(limit=limit, cursor=c)), cursor)

    def wait(self, job: str | Job, *, progress: bool = True, timeout: float | None = None,
             file: TextIO | None = None) -> Job:
        """See `client.jobs.wait` (the bar counts rows)."""
        return self._c.jobs.wait(job, progress=progress, timeout=timeout, file=file)

    def cancel(self, job: str | Job) -> Job:
        return self._c.jobs.cancel(job)

    def download(self, job: str | Job, path: str | os.PathLike[str], *, resume: bool = False) -> Path:
        """Write a succeeded job's result file to `path`, streamed; returns the path. `resume=True`: a file already
        at `path` (a download cut short) is completed from where it stopped (a `Range` request), not fetched again."""
        out = Path(path)
        have = E.partial_size(out, resume)
        try:
            with self._c._stream(E.batch_results(job, have)) as response, \
                    out.open("ab" if response.status_code == 206 else "wb") as f:
                for part in response.iter_bytes():
                    f.write(part)
        except SpafitAPIError as e:
            if e.status != 416 or not have:
                raise
            if not E.download_complete(e, have):  # longer than the file: not a start of it, fetched whole
                return self.download(job, out)
        return out

    def results(self, job: str | Job) -> Iterator[dict[str, Any]]:
        """A succeeded job's result rows as dicts ({id, label, score[, scores]}), streamed."""
        with self._c._stream(E.batch_results(job)) as response:
            rows = ResultRows(response.headers.get("content-type", "").startswith("text/csv"))
            for part in response.iter_bytes():
                yield from rows.feed(part)
            yield from rows.flush()
