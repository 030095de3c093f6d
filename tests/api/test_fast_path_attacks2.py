"""Second round of attacks on the predict fast path (app/fast_path.py) and the small middleware changes beside it:
with `predict_fast_path` the app must give every request the answer and the side effects (metrics labels, in-flight,
cancelled rows) of the same app without it."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException

from app import fast_path
from app.errors import TenantQueueFull
from spafit_core.errors import BaseModelUnavailable, RequestTimeoutError

from .adapters import TEXTS, register
from .fast_path_support import answer as _answer
from .fast_path_support import never_answering, raw

ROUTE = fast_path.ROUTE
PATH = "/v1/tasks/sentiment/predict"
OK = json.dumps({"inputs": TEXTS[:2]}).encode()


@pytest.fixture
def tenant(tenant_key, db, adapter, apps):
    """A tenant with `sentiment` active and its key in both apps' key caches."""
    key = tenant_key("predict")
    register(db, key.tenant_id, "sentiment", *adapter)
    for app in apps:
        r = app.post(PATH, json={"inputs": TEXTS[:1]}, headers=key.headers)
        assert r.status_code == 200, r.text
    yield key
    for app in apps:
        app.serving.admission._saturated.pop(str(key.tenant_id), None)


def _headers(key: str | None) -> list[tuple[str, str]]:
    h = [("host", "testserver"), ("content-type", "application/json")]
    return h + ([("authorization", f"Bearer {key}")] if key else [])


def _durations(client) -> dict[tuple[str, str], float]:
    """{(route label, status): requests counted} for POSTs."""
    out = {}
    for sample in client.app.state.metrics.http_request_duration.collect()[0].samples:
        if sample.name.endswith("_count") and sample.labels["method"] == "POST":
            out[(sample.labels["route"], sample.labels["status"])] = sample.value
    return out


def _delta(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def _both(apps, path, headers, chunks, **kw) -> list[tuple[tuple, dict]]:
    """[(answer, metrics delta)] of the fast app, then of the stack."""
    out = []
    for app in apps:
        before = _durations(app)
        answer = _answer(*raw(app, path, headers, chunks, **kw))
        out.append((answer, _delta(before, _durations(app))))
    return out


# ------------------------------------------------------------------------------- errors while reading the body


def test_a_body_streamed_past_the_cap_is_counted_under_the_routes_label(apps, tenant):
    """No Content-Length, the body passes the cap while it streams: the stack reads the body inside the route (the
    router has put the route in the scope), so the 413 is counted under `/v1/tasks/{task}/predict`, and so must the
    fast path's (a first version answered it before the route was in the scope: `<unmatched>`)."""
    chunks = [b'{"inputs": ["' + b"x" * 1500, b"x" * 1500, b"x" * 1500, b'"]}']
    fast, stack = _both(apps, PATH, _headers(tenant.key), chunks)
    assert stack[0][0] == 413 and stack[1] == {(ROUTE, "413"): 1}
    assert fast == stack


def test_an_error_from_receive_while_the_body_is_read_is_the_stacks_400(apps, tenant):
    """`receive` raising while the body is read (anything but the cap's 413): FastAPI answers 400 "There was an
    error parsing the body" (routing.py: `except Exception` around `request.body()`), counted under the route; so
    must the fast path (a first version made it a 500 internal-error, logged as a crash)."""
    fast, stack = _both(apps, PATH, _headers(tenant.key), [OK[:5], OK[5:]], fail_at=1)
    assert stack[0][0] == 400 and stack[1] == {(ROUTE, "400"): 1}
    assert fast == stack


# ------------------------------------------------------------------------------- the body cap's digit limit


def test_a_content_length_with_many_leading_zeros_is_not_a_500(apps, tenant):
    """`Content-Length: 000…0042` (5000 zeros) is 42, and is served (200). `int()` refuses over 4300 characters
    (ValueError): the body cap once passed it the zeros too, and outside the error boundary that was the server's
    text/plain 500 in both apps."""
    headers = _headers(tenant.key) + [("content-length", "0" * 5000 + str(len(OK)))]
    fast, stack = _both(apps, PATH, headers, [OK])
    assert stack[0][0] == 200, stack
    assert fast[0][:2] == stack[0][:2]


@pytest.mark.parametrize("extra, status", [(0, 200), (1, 413)], ids=["at-the-cap", "one-past"])
def test_a_valid_body_padded_to_the_cap(apps, tenant, extra, status):
    """(Passes: kept.) A valid body padded with JSON whitespace to exactly the cap (4096 bytes), streamed in pieces
    with no Content-Length: served; one byte more: the 413, under the route's label, in both."""
    head, tail = b'{"inputs": ["good movie"]', b"}"
    body = head + b" " * (4096 - len(head) - len(tail) + extra) + tail
    chunks = [body[i:i + 1000] for i in range(0, len(body), 1000)]
    fast, stack = _both(apps, PATH, _headers(tenant.key), chunks)
    assert stack[0][0] == status
    if status == 200:
        assert fast[0][:2] == stack[0][:2] and fast[1] == stack[1]
    else:
        assert fast[0] == stack[0]


# ------------------------------------------------------------------------------- errors of the prediction


ERRORS = {
    "tenant queue full": lambda: TenantQueueFull("share taken", headers={"Retry-After": "3"}),
    "timeout": lambda: RequestTimeoutError("prediction did not finish within 1.0s"),
    "HTTPException subclass with headers": lambda: type("Teapot", (HTTPException,), {})(
        418, "short and stout", headers={"X-Teapot": "yes"}),
    "database away": lambda: OperationalError("SELECT 1", {}, Exception("gone")),
    "backbone unavailable": lambda: BaseModelUnavailable("no model at /secret/path"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_raised_by_the_prediction_get_the_stacks_answer(apps, tenant, monkeypatch, case):
    """(Pass: kept.) The fast path answers the prediction's errors with the app's handlers outside
    ExceptionMiddleware: the same status, problem body (`instance`, `type`, `detail`), headers and metrics label."""
    for app in apps:
        async def boom(*a, **kw):
            raise ERRORS[case]()

        monkeypatch.setattr(app.serving, "predict", boom)
    fast, stack = _both(apps, PATH, _headers(tenant.key), [OK])
    assert stack[0][0] >= 400
    assert fast == stack


# ------------------------------------------------------------------------------- replay, then more receive


def test_a_handed_on_request_whose_client_leaves_during_the_prediction(apps, tenant_key, db, adapter,
                                                                       monkeypatch):
    """(Passes: kept.) A key no cache holds yet: the fast path reads the body and hands the request on with it
    replayed; the route's disconnect watcher then reads past the replay and gets the client's http.disconnect:
    499, the work cancelled, counted under the route."""
    key = tenant_key("predict")
    register(db, key.tenant_id, "sentiment", *adapter)
    got = []
    for app in apps:
        cancelled = never_answering(app, monkeypatch)
        before = _durations(app)
        status, _, _ = raw(app, PATH, _headers(key.key), [OK[:7], OK[7:]], disconnect_after_body=True)
        time.sleep(0.1)
        got.append((status, _delta(before, _durations(app)), bool(cancelled)))
    assert got[0] == got[1] == (499, {(ROUTE, "499"): 1}, True)


# ------------------------------------------------------------------------------- what is served


def test_text_pairs_and_a_top_k_past_the_labels_are_the_stacks_answer(apps, tenant):
    """(Passes: kept.) Text pairs with top_k larger than the task's labels (as 100.0, a float pydantic takes):
    the same predictions."""
    body = json.dumps({"inputs": [{"text": "good movie", "text_pair": "awful"}, {"text": "ok", "text_pair": "fine"}],
                       "top_k": 100.0}).encode()
    fast, stack = _both(apps, PATH, _headers(tenant.key), [body])
    assert stack[0][0] == 200
    f, s = fast[0][2], stack[0][2]
    assert f["task"] == s["task"] and f["version"] == s["version"]
    for a, b in zip(f["predictions"], s["predictions"], strict=True):
        assert a["label"] == b["label"] and [x["label"] for x in a["scores"]] == [x["label"] for x in b["scores"]]
        assert abs(a["score"] - b["score"]) < 1e-5
    assert fast[1] == stack[1]
