"""Stepping aside (SPAFIT_BATCH_YIELD_TO_LIGHT) end to end, over a real uvicorn server in a thread of this process
(so that the engine's layers can be slowed down: a tiny backbone's pass is otherwise too short to be stepped
aside from): a flooding tenant and a sparse light tenant get exactly their lone answers; a version activated,
or the task deleted, while passes step aside gives answers of exactly one version (or 404), never a 500;
client disconnects, mixed input lengths and fan-outs alongside, /readyz stays ready."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter

import httpx
import pytest

from tests.api.adapters import LORA, SPAFIT, TEXTS, random_adapter, register, settings_factory, tiny_backbone
from tests.live import uvicorn_in_thread, wait_ready

pytestmark = pytest.mark.serial  # timing-sensitive: passes must be long enough to step aside from

LAYER_SLEEP_S = 0.004  # per encoder layer run: a 4-layer pass takes >= 16 ms, long enough to step aside from
LONG = " ".join(["the plot was very boring and bad but the actor was fine"] * 4)
BODIES = [TEXTS[:1], TEXTS[1:5], [LONG, "ok", TEXTS[3]], TEXTS * 2 + [LONG, LONG], [LONG] * 3 + TEXTS[:5]]
LIGHT = [["good movie"], ["awful actor", "ok"], [LONG], [{"text": "good movie", "text_pair": LONG}]]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("tiny-yield"))


@pytest.fixture(scope="module")
def adapters(base):
    return {"v1": random_adapter(base, SPAFIT, seed=11), "v2": random_adapter(base, SPAFIT, seed=12),
            "light": random_adapter(base, LORA, labels=("a", "b", "c"), seed=13),
            "other": random_adapter(base, SPAFIT, seed=14)}


@pytest.fixture(scope="module")
def live(pg_url, redis_client, redis_url, redis_prefix, tmp_path_factory, base):
    """(url, app): the app with yielding on, its encoder layers slowed down."""
    with slow_layers(), settings_factory(pg_url, redis_url, redis_prefix, tmp_path_factory.mktemp("yield")) as make:
        yield from _serve(make(default_base_model=base, engine_device="cpu", preload_base_model=True,
                               batch_max_wait_ms=2, batch_max_size=16, max_predict_inputs=16,
                               batch_max_queue_per_tenant=1024, batch_max_queue=2048, batch_yield_to_light=True))


@contextlib.contextmanager
def slow_layers():
    """Every encoder layer run (any backbone, loaded now or later) sleeps LAYER_SLEEP_S first."""
    from spafit_core.layers import LayerGate

    run = LayerGate._run

    def slow(self, *args, **kwargs):
        time.sleep(LAYER_SLEEP_S)
        return run(self, *args, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LayerGate, "_run", slow)
        yield


def _serve(settings):
    from app.main import create_app

    app = create_app(settings)
    with uvicorn_in_thread(app) as url:
        wait_ready(url)
        yield url, app


@pytest.fixture
def tenants(tenant_key, db, adapters):
    """`flood` (tasks `main`: v1 active, v2 registered inactive; `other`) and `light` (task `small`); keys with
    predict and train scopes."""
    flood = tenant_key("predict", "train")
    light = tenant_key("predict", "train")
    flood.v1 = register(db, flood.tenant_id, "main", *adapters["v1"]).id
    flood.v2 = register(db, flood.tenant_id, "main", *adapters["v2"], activate=False).id
    register(db, flood.tenant_id, "other", *adapters["other"])
    register(db, light.tenant_id, "small", *adapters["light"])
    return {"flood": flood, "light": light}


def yields(app) -> int:
    return app.state.serving.batcher.stats["yields"]


def same(got: list[dict], want: list[dict], tol: float = 1e-5) -> bool:
    if len(got) != len(want):
        return False
    for g, w in zip(got, want, strict=True):
        if g["label"] != w["label"] or abs(g["score"] - w["score"]) > tol:
            return False
        if [s["label"] for s in g["scores"]] != [s["label"] for s in w["scores"]]:
            return False
        if any(abs(a["score"] - b["score"]) > tol for a, b in zip(g["scores"], w["scores"], strict=True)):
            return False
    return True


def lone(url: str, task: str, body: list, headers: dict) -> dict:
    r = httpx.post(f"{url}/v1/tasks/{task}/predict", json={"inputs": body}, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


async def _ask(http, task: str, headers: dict, bodies: list, i: int, got: list) -> int | None:
    """POST bodies[i] to the task's predict; appends (i, status or None, JSON body or error text) to `got`."""
    try:
        r = await http.post(f"/v1/tasks/{task}/predict", json={"inputs": bodies[i]}, headers=headers)
    except httpx.HTTPError as e:
        got.append((i, None, f"{type(e).__name__}: {e}"))
        return None
    got.append((i, r.status_code, r.json() if r.headers.get("content-type", "").endswith("json") else r.text))
    return r.status_code


async def flooder(http, task, headers, until, got: list, bodies=BODIES, stop: asyncio.Event | None = None):
    rnd = random.Random(id(got) ^ int(time.monotonic() * 1e6))
    while time.monotonic() < until and not (stop and stop.is_set()):
        if await _ask(http, task, headers, bodies, rnd.randrange(len(bodies)), got) == 429:
            await asyncio.sleep(0.02)


async def sparse(http, task, headers, until, got: list, gap: float = 0.03):
    i = 0
    while time.monotonic() < until:
        await asyncio.sleep(gap)
        await _ask(http, task, headers, LIGHT, i % len(LIGHT), got)
        i += 1


def client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=64,
                                                                          max_keepalive_connections=64))


# ------------------------------------------------------------------------------------------------- (1)
def test_flood_and_light_tenant_get_exactly_their_lone_answers_while_passes_step_aside(live, tenants):
    url, app = live
    fh, lh = tenants["flood"].headers, tenants["light"].headers
    want_f = [lone(url, "main", b, fh)["predictions"] for b in BODIES]
    want_l = [lone(url, "small", b, lh)["predictions"] for b in LIGHT]
    before = yields(app)

    async def go():
        async with client(url) as http:
            until = time.monotonic() + 5
            f, lt = [], []
            await asyncio.gather(*(flooder(http, "main", fh, until, f) for _ in range(24)),
                                 sparse(http, "small", lh, until, lt))
            return f, lt
    f, lt = asyncio.run(go())
    stepped = yields(app) - before
    assert stepped >= 3, f"no pass stepped aside ({stepped}): the test did not exercise the feature"
    codes_f, codes_l = Counter(c for _, c, _ in f), Counter(c for _, c, _ in lt)
    assert set(codes_l) == {200} and codes_l[200] >= 10, (codes_l, [x for x in lt if x[1] != 200][:3])
    assert set(codes_f) <= {200, 429} and codes_f[200] >= 20, (codes_f, [x for x in f if x[1] not in (200, 429)][:3])
    bad_f = [(i, body) for i, c, body in f if c == 200 and not same(body["predictions"], want_f[i])]
    bad_l = [(k, body) for k, c, body in lt if c == 200 and not same(body["predictions"], want_l[k])]
    assert not bad_l, (len(bad_l), bad_l[:1], want_l[bad_l[0][0]])
    assert not bad_f, (len(bad_f), bad_f[:1], want_f[bad_f[0][0]])


# ------------------------------------------------------------------------------------------------- (2)
def _expected_by_version(url, app, tenants) -> dict[int, list]:
    """{version number: [predictions per BODIES]}: v1 by a lone HTTP request; v2 through the engine directly."""
    engine = app.state.serving.engine
    fh = tenants["flood"].headers
    v1 = [lone(url, "main", b, fh) for b in BODIES]
    assert {r["version"] for r in v1} == {1}
    return {1: [r["predictions"] for r in v1], 2: [engine.predict(str(tenants["flood"].v2), b) for b in BODIES]}


def _check_versions(f: list, want: dict[int, list], allowed: set[int]) -> Counter:
    seen = Counter()
    wrong = []
    for i, c, body in f:
        if c == 200:
            v = body["version"]
            assert v in allowed, (v, allowed)
            seen[v] += 1
            if not same(body["predictions"], want[v][i]):
                other = [u for u in want if u != v and same(body["predictions"], want[u][i])]
                wrong.append((i, v, other, body["predictions"][:2], want[v][i][:2]))
        else:
            seen[c] += 1
    assert not wrong, (len(wrong), wrong[:2])
    return seen


def _flood_then(url: str, tenants, seconds: float, method: str, path: str, status: int) -> tuple[list, list]:
    """24 clients flood task `main` for `seconds` while the light tenant sends its sparse requests; 1.5 s in, the
    flood tenant sends `method path` (it must answer `status`). (the flood's answers, the light tenant's)."""
    fh, lh = tenants["flood"].headers, tenants["light"].headers

    async def go():
        async with client(url) as http:
            until = time.monotonic() + seconds
            f, lt = [], []

            async def change():
                await asyncio.sleep(1.5)
                r = await http.request(method, path, headers=fh)
                assert r.status_code == status, r.text
            await asyncio.gather(*(flooder(http, "main", fh, until, f) for _ in range(24)),
                                 sparse(http, "small", lh, until, lt), change())
            return f, lt
    return asyncio.run(go())


def test_a_version_activated_mid_flood_gives_answers_of_exactly_one_version(live, tenants):
    url, app = live
    want = _expected_by_version(url, app, tenants)
    assert not same(want[1][1], want[2][1])  # the two versions are told apart by their scores
    want_l = [lone(url, "small", b, tenants["light"].headers)["predictions"] for b in LIGHT]
    before = yields(app)
    f, lt = _flood_then(url, tenants, 5, "POST", "/v1/tasks/main/versions/2/activate", 200)
    assert yields(app) - before >= 3
    seen = _check_versions(f, want, {1, 2})
    assert set(seen) <= {1, 2, 429} and seen[1] >= 1 and seen[2] >= 1, seen
    assert {c for _, c, _ in lt} == {200}
    assert all(same(b["predictions"], want_l[k]) for k, _, b in lt)


def test_a_task_deleted_mid_flood_gives_old_answers_or_404_never_a_500(live, tenants):
    url, app = live
    want = _expected_by_version(url, app, tenants)
    want_l = [lone(url, "small", b, tenants["light"].headers)["predictions"] for b in LIGHT]
    before = yields(app)
    f, lt = _flood_then(url, tenants, 4, "DELETE", "/v1/tasks/main", 204)
    assert yields(app) - before >= 1
    seen = _check_versions(f, want, {1})
    assert set(seen) <= {1, 404, 429} and seen[1] >= 1 and seen[404] >= 1, seen
    assert {c for _, c, _ in lt} == {200}
    assert all(same(b["predictions"], want_l[k]) for k, _, b in lt)


# ------------------------------------------------------------------------------------------------- (3)
def test_disconnects_fan_outs_and_readiness_while_passes_step_aside(live, tenants):
    """The flood's clients give up (read timeouts) mid-flight at random; a third client asks /v1/predict fan-outs
    of the flood tenant's two tasks; /readyz is polled throughout. Every answer still equals its lone answer,
    the light tenant gets only 200s, /readyz stays 200, the batcher keeps serving afterwards."""
    url, app = live
    fh, lh = tenants["flood"].headers, tenants["light"].headers
    want_f = [lone(url, "main", b, fh)["predictions"] for b in BODIES]
    want_l = [lone(url, "small", b, lh)["predictions"] for b in LIGHT]
    fan_body = {"tasks": ["main", "other"], "inputs": BODIES[2]}
    r = httpx.post(f"{url}/v1/predict", json=fan_body, headers=fh, timeout=30)
    assert r.status_code == 200, r.text
    want_fan = r.json()["results"]
    batcher = app.state.serving.batcher
    before = (batcher.stats["yields"], batcher.stats["loop_errors"], batcher.stats["restarts"])

    async def quitter(until, out):
        rnd = random.Random(7)
        async with httpx.AsyncClient(base_url=url) as http:
            while time.monotonic() < until:
                try:
                    await http.post("/v1/tasks/main/predict", json={"inputs": BODIES[rnd.randrange(len(BODIES))]},
                                    headers=fh, timeout=rnd.uniform(0.005, 0.08))
                    out.append("done")
                except httpx.TimeoutException:
                    out.append("gone")

    async def fans(http, until, out):
        while time.monotonic() < until:
            r = await http.post("/v1/predict", json=fan_body, headers=fh)
            out.append((r.status_code, r.json()))

    async def ready(http, until, out):
        while time.monotonic() < until:
            r = await http.get("/readyz")
            out.append(r.status_code)
            await asyncio.sleep(0.1)

    async def go():
        async with client(url) as http:
            until = time.monotonic() + 5
            f, lt, q, fo, rd = [], [], [], [], []
            await asyncio.gather(*(flooder(http, "main", fh, until, f) for _ in range(16)),
                                 *(quitter(until, q) for _ in range(8)), sparse(http, "small", lh, until, lt),
                                 fans(http, until, fo), ready(http, until, rd))
            return f, lt, q, fo, rd
    f, lt, q, fo, rd = asyncio.run(go())
    assert batcher.stats["yields"] - before[0] >= 3
    assert q.count("gone") >= 5, Counter(q)
    assert set(rd) == {200}, Counter(rd)
    assert {c for _, c, _ in lt} == {200} and all(same(b["predictions"], want_l[k]) for k, _, b in lt)
    assert set(Counter(c for _, c, _ in f)) <= {200, 429}
    assert all(same(b["predictions"], want_f[i]) for i, c, b in f if c == 200)
    assert fo and {c for c, _ in fo} == {200}, Counter(c for c, _ in fo)
    for _, body in fo:
        for got, w in zip(body["results"], want_fan, strict=True):
            assert got["task"] == w["task"] and same(got["predictions"], w["predictions"])
    assert (batcher.stats["loop_errors"], batcher.stats["restarts"]) == before[1:]
    # nothing left behind: the queue drains and the rows in flight are released
    deadline = time.monotonic() + 10
    while app.state.serving.queue_depth() or batcher.depth or batcher._parked:
        assert time.monotonic() < deadline, (app.state.serving.queue_depth(), batcher.depth, len(batcher._parked))
        time.sleep(0.05)
    assert same(lone(url, "small", LIGHT[0], lh)["predictions"], want_l[0])


def test_a_parked_pass_whose_backbone_is_dropped_meanwhile_resumes_exactly(pg_url, redis_client, redis_url,
                                                                         redis_prefix, tmp_path_factory, base,
                                                                         adapters, tenant_key, db):
    """engine_max_backbones=1, the flood on backbone A, the light tenant on backbone B: a pass of A that steps
    aside is no longer in use, so B's light pass drops A, and the pass goes on on A loaded again (its rows borrow
    slots in the new bank). Every answer is still the lone one; no 500."""
    other = tiny_backbone(tmp_path_factory.mktemp("tiny-yield-b"), seed=1)
    flood, light = tenant_key("predict"), tenant_key("predict")
    register(db, flood.tenant_id, "main", *adapters["v1"])
    register(db, light.tenant_id, "small", *random_adapter(other, LORA, labels=("a", "b", "c"), seed=21))
    with slow_layers(), settings_factory(pg_url, redis_url, redis_prefix, tmp_path_factory.mktemp("yield2")) as make:
        gen = _serve(make(default_base_model=base, engine_device="cpu", preload_base_model=True, batch_max_wait_ms=2,
                          batch_max_size=16, max_predict_inputs=16, batch_max_queue_per_tenant=1024,
                          engine_max_backbones=1, batch_yield_to_light=True))
        url, app = next(gen)
        try:
            want_f = [lone(url, "main", b, flood.headers)["predictions"] for b in BODIES]
            want_l = [lone(url, "small", b, light.headers)["predictions"] for b in LIGHT]
            engine = app.state.serving.engine
            before, evictions = yields(app), engine.backbone_evictions

            async def go():
                async with client(url) as http:
                    until = time.monotonic() + 4
                    f, lt = [], []
                    await asyncio.gather(*(flooder(http, "main", flood.headers, until, f) for _ in range(12)),
                                         sparse(http, "small", light.headers, until, lt, gap=0.1))
                    return f, lt
            f, lt = asyncio.run(go())
            stepped, dropped = yields(app) - before, engine.backbone_evictions - evictions
        finally:
            gen.close()
    assert stepped >= 1 and dropped >= 1, (stepped, dropped)
    assert {c for _, c, _ in lt} == {200}, Counter(c for _, c, _ in lt)
    assert set(Counter(c for _, c, _ in f)) <= {200, 429}, Counter(c for _, c, _ in f)
    assert all(same(b["predictions"], want_l[k]) for k, _, b in lt)
    bad = [(i, b) for i, c, b in f if c == 200 and not same(b["predictions"], want_f[i])]
    assert not bad, (len(bad), bad[:1])



def test_flood_requests_timing_out_while_their_passes_are_parked(live, tenants, monkeypatch):
    """A predict timeout shorter than the flood's queueing: flood requests end in 504 while their passes are
    parked (their rows still run when the pass goes on: the kept layer input holds them). Never a 500, no loop
    error; every 200 is the lone answer; the light tenant gets only 200s; afterwards nothing is left queued."""
    url, app = live
    fh, lh = tenants["flood"].headers, tenants["light"].headers
    want_f = [lone(url, "main", b, fh)["predictions"] for b in BODIES]
    want_l = [lone(url, "small", b, lh)["predictions"] for b in LIGHT]
    serving, batcher = app.state.serving, app.state.serving.batcher
    before = (yields(app), batcher.stats["loop_errors"], batcher.stats["timeouts"])
    monkeypatch.setattr(serving.settings, "predict_timeout_s", 0.25)

    async def go():
        async with client(url) as http:
            until = time.monotonic() + 4
            f, lt = [], []
            await asyncio.gather(*(flooder(http, "main", fh, until, f) for _ in range(40)),
                                 sparse(http, "small", lh, until, lt, gap=0.1))
            return f, lt
    f, lt = asyncio.run(go())
    monkeypatch.undo()
    codes = Counter(c for _, c, _ in f)
    assert yields(app) - before[0] >= 1 and batcher.stats["loop_errors"] == before[1]
    assert set(codes) <= {200, 429, 504} and codes[504] >= 1 and codes[200] >= 1, codes
    assert all(same(b["predictions"], want_f[i]) for i, c, b in f if c == 200)
    assert {c for _, c, _ in lt} == {200}, Counter(c for _, c, _ in lt)
    assert all(same(b["predictions"], want_l[k]) for k, _, b in lt)
    deadline = time.monotonic() + 10
    while serving.queue_depth() or batcher.depth or batcher._parked:
        assert time.monotonic() < deadline, (serving.queue_depth(), batcher.depth, len(batcher._parked))
        time.sleep(0.05)
