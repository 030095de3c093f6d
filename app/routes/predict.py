"""Predict: one task over many inputs (`POST /v1/tasks/{task}/predict`, micro-batched with concurrent
requests of any task) and many tasks over each input (`POST /v1/predict`, one shared backbone prefix per
input). Needs the `predict` scope; another tenant's task is a 404. A request whose client goes away is
cancelled: its rows leave the engine's queue instead of running.

Most task predicts never reach this route: `app/fast_path.py` answers those every check lets through in front of
the middleware stack, with the same functions (`checked_inputs`, `unless_disconnected`, `_json`).

The answers are serialised by orjson in one call (`_json`), not validated field by field through the response
model: the engine's predictions already have its shape (`_PREDICTION_DEFAULTS` fills what pydantic would)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError

from spafit_core.adapter_schema import is_unicode

from ..deps import PredictPrincipal, ServingDep, SettingsDep
from ..errors import ClientClosedRequest
from ..schemas import (
    FanOutRequest,
    FanOutResponse,
    PredictInput,
    PredictRequest,
    Problem,
    TaskPredictions,
    problem_responses,
)
from ..services import registry
from ..services.serving import Input
from ..settings import Settings
from .tasks import TaskName

router = APIRouter(tags=["predict"])

T = TypeVar("T")

_RESPONSES = {
    **problem_responses(400, 401, 403, 404, 409, 413, 422),
    429: {"model": Problem, "description": "This tenant has its share of the prediction queue waiting already "
          "(`tenant-queue-full`): retry after `Retry-After` seconds"},
    500: {"model": Problem, "description": "The engine failed on these inputs even when run apart from other "
          "requests (`prediction-failed`, with a `reference` to the log)"},
    503: {"model": Problem, "description": "The prediction queue is full: retry after `Retry-After` seconds"},
    504: {"model": Problem, "description": "The prediction did not finish within the service's timeout"},
}


_PREDICTION_DEFAULTS = (("labels", None), ("value", None))  # Prediction's optional fields, as pydantic writes them


def _json(results: list[dict[str, Any]], body: dict[str, Any]) -> Response:
    """`body` as JSON in one orjson call, every prediction of `results` with `Prediction`'s optional fields."""
    for result in results:
        for prediction in result["predictions"]:
            for key, default in _PREDICTION_DEFAULTS:
                prediction.setdefault(key, default)
    return Response(orjson.dumps(body), media_type="application/json")


def _error(loc: tuple, kind: str, message: str) -> dict[str, Any]:
    return {"type": kind, "loc": loc, "msg": message, "input": None}


def checked_inputs(inputs: list[PredictInput], settings: Settings, *, one_kind: bool) -> list[Input]:
    """The inputs as the engine takes them, after the limits that depend on settings; a 422 naming each
    offending location (`body.inputs.3`, `body.inputs.3.text_pair`) otherwise."""
    if len(inputs) > settings.max_predict_inputs:
        raise RequestValidationError([_error(("body", "inputs"), "too_long", f"at most {settings.max_predict_inputs}"
                                             f" inputs per request; got {len(inputs)}")])
    errors, out = [], []
    limit = settings.max_input_chars
    for i, x in enumerate(inputs):
        if isinstance(x, str):
            texts = [(("body", "inputs", i), x)]
            out.append(x)
        else:
            texts = [(("body", "inputs", i, "text"), x.text)]
            if x.text_pair is not None:
                texts.append((("body", "inputs", i, "text_pair"), x.text_pair))
            out.append(x.text if x.text_pair is None else {"text": x.text, "text_pair": x.text_pair})
        for loc, text in texts:
            if not text.strip():
                errors.append(_error(loc, "string_too_short", "text must not be empty"))
            elif len(text) > limit:
                errors.append(_error(loc, "string_too_long", f"text is longer than {limit} characters"))
            elif not is_unicode(text):
                errors.append(_error(loc, "string_unicode", "text holds a lone surrogate (a \\ud800-\\udfff "
                                     "escape without its pair): not valid Unicode"))
    if one_kind and len({isinstance(x, str) for x in out}) > 1:
        errors.append(_error(("body", "inputs"), "value_error", "a mix of single texts and text pairs; "
                             "send each kind in its own request"))
    if errors:
        raise RequestValidationError(errors)
    return out


def checked_tasks(tasks: list[str]) -> list[str]:
    errors, seen = [], set()
    for i, name in enumerate(tasks):
        if not registry.TASK_NAME.fullmatch(name):
            errors.append(_error(("body", "tasks", i), "string_pattern_mismatch",
                                 f"invalid task name: {registry.TASK_NAME_RULE}"))
        elif name in seen:
            errors.append(_error(("body", "tasks", i), "value_error", f"task {name!r} is listed twice"))
        seen.add(name)
    if errors:
        raise RequestValidationError(errors)
    return tasks


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (the ASGI server then delivers
    `http.disconnect`; the request body has been read already, so nothing else can arrive)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        _abandon(task)
        raise
    finally:
        watcher.cancel()
    if not task.done():
        _abandon(task)
        raise ClientClosedRequest("the client went away; its prediction was dropped")
    return task.result()


def _abandon(task: asyncio.Future) -> None:
    """Cancel work nobody waits for any more. It may still end with an error of its own (a 429 decided just before
    the cancellation landed): retrieved here, or asyncio logs "Task exception was never retrieved" with a
    traceback for every client that went away."""
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


@router.post("/v1/tasks/{task}/predict", response_model=TaskPredictions, summary="Predict with a task's active "
             "version", responses=_RESPONSES)
async def predict(*, task: TaskName, body: PredictRequest, principal: PredictPrincipal, settings: SettingsDep,
                  serving: ServingDep, request: Request) -> Any:
    inputs = checked_inputs(body.inputs, settings, one_kind=True)
    serving.remember_key(request.headers, str(principal.tenant_id))
    result = await unless_disconnected(request, serving.predict(principal.tenant_id, task, inputs, body.top_k))
    return _json([result], result)


@router.post("/v1/predict", response_model=FanOutResponse, summary="Ask every input of several tasks at once",
             responses=_RESPONSES)
async def fan_out(*, body: FanOutRequest, principal: PredictPrincipal, settings: SettingsDep, serving: ServingDep,
                  request: Request) -> Any:
    tasks = checked_tasks(body.tasks)
    inputs = checked_inputs(body.inputs, settings, one_kind=False)
    serving.remember_key(request.headers, str(principal.tenant_id))
    results = await unless_disconnected(request, serving.fan_out(principal.tenant_id, tasks, inputs, body.top_k))
    return _json(results, {"results": results})
