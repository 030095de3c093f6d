"""The predict fast path (app/fast_path.py) answers exactly what the whole stack answers: every request below goes
to two apps on one database, one with `predict_fast_path` and one without, and both answers must be the same
(status, problem body, the headers a client reads). The fast path must also be the one that answered the
requests it is for."""

from __future__ import annotations

import json

import pytest

from app import fast_path

from .adapters import (
    TEXTS,
    register,
)

PAIRS = [{"text": "a good film", "text_pair": "I liked it"}, {"text": "dull", "text_pair": "fell asleep"}]


@pytest.fixture
def tenant(tenant_key, db, adapter, apps):
    """A tenant with `sentiment` active and `draft` registered but not active; keys with and without `predict`,
    each verified once by both apps (so that both hold them in their key cache)."""
    key = tenant_key("predict")
    key.train = tenant_key("train", tenant=key.tenant_id)
    key.other = tenant_key("predict")
    register(db, key.tenant_id, "sentiment", *adapter)
    register(db, key.tenant_id, "draft", *adapter, activate=False)
    register(db, key.other.tenant_id, "theirs", *adapter)
    for app in apps:
        for k in (key, key.train, key.other):
            app.get("/v1/tasks", headers=k.headers)
    return key


def _requests(tenant):
    """(name, path, headers, body bytes) of what to send; the body as a client would send it."""
    auth = {"Authorization": f"Bearer {tenant.key}"}
    js = {**auth, "Content-Type": "application/json"}

    def body(value) -> bytes:
        return json.dumps(value).encode()

    ok = body({"inputs": TEXTS[:2]})
    return [
        ("valid", "/v1/tasks/sentiment/predict", js, ok),
        ("top_k", "/v1/tasks/sentiment/predict", js, body({"inputs": TEXTS[:3], "top_k": 1})),
        ("pairs", "/v1/tasks/sentiment/predict", js, body({"inputs": PAIRS})),
        ("top_k as text", "/v1/tasks/sentiment/predict", js, body({"inputs": TEXTS[:1], "top_k": "1"})),
        ("charset", "/v1/tasks/sentiment/predict", {**auth, "Content-Type": "application/json; charset=utf-8"}, ok),
        ("X-API-Key", "/v1/tasks/sentiment/predict", {"X-API-Key": tenant.key, "Content-Type": "application/json"}, ok),
        ("Basic with X-API-Key", "/v1/tasks/sentiment/predict",
         {"Authorization": "Basic dTpw", "X-API-Key": tenant.key, "Content-Type": "application/json"}, ok),
        ("bearer spelled oddly", "/v1/tasks/sentiment/predict",
         {"Authorization": f"bEaReR   {tenant.key}  ", "Content-Type": "application/json"}, ok),
        ("request id", "/v1/tasks/sentiment/predict", {**js, "X-Request-ID": "client-id-1"}, ok),
        ("unknown task", "/v1/tasks/nope/predict", js, ok),
        ("another tenant's task", "/v1/tasks/theirs/predict", js, ok),
        ("no active version", "/v1/tasks/draft/predict", js, ok),
        ("bad task name", "/v1/tasks/Bad_Name/predict", js, ok),
        ("task name too long", f"/v1/tasks/{'a' * 65}/predict", js, ok),
        ("not JSON", "/v1/tasks/sentiment/predict", js, b"{inputs: nope"),
        ("NaN", "/v1/tasks/sentiment/predict", js, b'{"inputs": ["x"], "top_k": NaN}'),
        ("huge integer", "/v1/tasks/sentiment/predict", js, b'{"inputs": ["x"], "top_k": 100000000000000000000000}'),
        ("lone surrogate", "/v1/tasks/sentiment/predict", js, b'{"inputs": ["a \\ud800 b"]}'),
        ("UTF-16", "/v1/tasks/sentiment/predict", js, json.dumps({"inputs": ["x"]}).encode("utf-16")),
        ("BOM", "/v1/tasks/sentiment/predict", js, b"\xef\xbb\xbf" + ok),
        ("duplicate key", "/v1/tasks/sentiment/predict", js, b'{"inputs": ["x"], "inputs": ["y", "z"]}'),
        ("a list", "/v1/tasks/sentiment/predict", js, b'["x"]'),
        ("no inputs", "/v1/tasks/sentiment/predict", js, body({"inputs": []})),
        ("too many inputs", "/v1/tasks/sentiment/predict", js, body({"inputs": ["x"] * 5})),
        ("empty text", "/v1/tasks/sentiment/predict", js, body({"inputs": ["x", "  "]})),
        ("long text", "/v1/tasks/sentiment/predict", js, body({"inputs": ["x" * 201]})),
        ("mixed kinds", "/v1/tasks/sentiment/predict", js, body({"inputs": ["x", PAIRS[0]]})),
        ("extra field", "/v1/tasks/sentiment/predict", js, body({"inputs": ["x"], "model": "y"})),
        ("top_k 0", "/v1/tasks/sentiment/predict", js, body({"inputs": ["x"], "top_k": 0})),
        ("text/plain", "/v1/tasks/sentiment/predict", {**auth, "Content-Type": "text/plain"}, ok),
        ("+json", "/v1/tasks/sentiment/predict", {**auth, "Content-Type": "application/vnd.api+json"}, ok),
        ("no content type", "/v1/tasks/sentiment/predict", auth, ok),
        ("no key", "/v1/tasks/sentiment/predict", {"Content-Type": "application/json"}, ok),
        ("wrong key", "/v1/tasks/sentiment/predict",
         {"Authorization": f"Bearer {tenant.key[:-3]}xyz", "Content-Type": "application/json"}, ok),
        ("no predict scope", "/v1/tasks/sentiment/predict",
         {"Authorization": f"Bearer {tenant.train.key}", "Content-Type": "application/json"}, ok),
        ("foreign Host", "/v1/tasks/sentiment/predict", {**js, "Host": "evil.example"}, ok),
        ("foreign Origin", "/v1/tasks/sentiment/predict", {**js, "Origin": "https://evil.example"}, ok),
        ("over the body cap", "/v1/tasks/sentiment/predict", js, body({"inputs": ["x" * 150] * 30})),
        ("trailing slash", "/v1/tasks/sentiment/predict/", js, ok),
    ]


def _answer(response) -> tuple:
    """What a client reads of a response, less what differs between two requests (a generated request id, the
    500's reference to it)."""
    body = response.json() if response.headers.get("content-type", "").endswith("json") else response.text
    if isinstance(body, dict):
        body.pop("reference", None)
        if isinstance(body.get("detail"), str) and "(ref " in body["detail"]:
            body["detail"] = body["detail"].split("(ref ")[0]
    headers = {k: response.headers.get(k) for k in ("content-type", "retry-after", "www-authenticate", "location")}
    return response.status_code, headers, body


def test_every_request_gets_the_stacks_answer(apps, tenant):
    fast, stack = apps
    for name, path, headers, body in _requests(tenant):
        a = fast.post(path, content=body, headers=headers, follow_redirects=False)
        b = stack.post(path, content=body, headers=headers, follow_redirects=False)
        assert _answer(a) == _answer(b), name
        assert a.headers.get("x-request-id") and b.headers.get("x-request-id"), name
        if name == "request id":
            assert a.headers["x-request-id"] == b.headers["x-request-id"] == "client-id-1"


def test_the_fast_path_answers_what_it_is_for_and_nothing_else(apps, tenant, monkeypatch):
    fast, _ = apps
    answered: list[bool] = []
    taken = fast_path.FastPredict._taken

    def counted(self, *args, **kwargs):
        result = taken(self, *args, **kwargs)
        answered.append(result is not None)
        return result

    monkeypatch.setattr(fast_path.FastPredict, "_taken", counted)
    expected = {"valid", "top_k", "pairs", "top_k as text", "charset", "X-API-Key", "Basic with X-API-Key",
                "bearer spelled oddly", "request id", "unknown task", "another tenant's task", "no active version",
                "duplicate key", "foreign Origin"}
    for name, path, headers, body in _requests(tenant):
        answered.clear()
        fast.post(path, content=body, headers=headers, follow_redirects=False)
        assert any(answered) == (name in expected), name


def test_a_key_not_yet_cached_goes_through_the_stack_and_is_cached(apps, tenant_key, db, adapter):
    fast, _ = apps
    key = tenant_key("predict")
    register(db, key.tenant_id, "sentiment", *adapter)
    first = fast.post("/v1/tasks/sentiment/predict", json={"inputs": TEXTS[:1]}, headers=key.headers)
    assert first.status_code == 200, first.text
    assert fast.serving.cache.get(("key", fast_path.keys._digest(key.key))) is not None


def test_metrics_count_fast_answers_under_the_routes_label(apps, tenant):
    fast, _ = apps
    assert fast.post("/v1/tasks/sentiment/predict", json={"inputs": ["x"]}, headers=tenant.headers).status_code == 200
    assert fast.post("/v1/tasks/draft/predict", json={"inputs": ["x"]}, headers=tenant.headers).status_code == 409
    text = fast.app.state.metrics.exposition()[0].decode()
    for status in ("200", "409"):
        assert (f'spafit_http_request_duration_seconds_count{{method="POST",route="/v1/tasks/{{task}}/predict",'
                f'status="{status}"}}') in text
