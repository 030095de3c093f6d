"""No request can hurt another's, over a real uvicorn server (in a thread of this process, so that faults can
be injected into its engine): an exception that escapes every handler is a problem+json 500 on a connection
that stays open; a poisoned row fails only its own request; a dead batcher fails /readyz once and is
restarted (with or without a preloaded backbone); a client that goes away has its rows dropped before they run;
per-tenant metrics. A second replica on the same database and Redis shows the per-tenant share held across
replicas (and freed by a replica that died, after its lease); with Redis unreachable it holds per process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.live import ROOT, free_port, uvicorn_in_thread, wait_ready, wait_until

from .adapters import BITFIT, LORA, SPAFIT, TEXTS, random_adapter, register, settings_factory, tiny_backbone
from .helpers import assert_problem

SHARE = 64  # batch_max_queue_per_tenant of the replicas here


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("tiny-iso"))


@pytest.fixture(scope="module")
def zoo(base):
    return {"sentiment": random_adapter(base, SPAFIT, seed=1),
            "topic": random_adapter(base, LORA, labels=("sport", "art", "food"), seed=2),
            "spam": random_adapter(base, BITFIT, labels=("ham", "spam"), seed=3),
            "head-a": random_adapter(base, dict(name="spafit", n1=4, n2=4, rank=2), seed=4),
            "head-b": random_adapter(base, dict(name="spafit", n1=4, n2=4, rank=2), labels=("x", "y", "z"), seed=5)}


@pytest.fixture(scope="module")
def live(pg_url, redis_client, redis_url, redis_prefix, tmp_path_factory, base):
    """The app served by uvicorn, with a route that raises what no handler maps; (url, app)."""
    from app.main import create_app

    with settings_factory(pg_url, redis_url, redis_prefix, tmp_path_factory.mktemp("iso-data")) as make:
        app = create_app(make(default_base_model=base, engine_device="cpu", preload_base_model=True,
                              batch_max_wait_ms=20, batch_max_queue_per_tenant=SHARE))

        @app.get("/test/boom")
        def boom() -> None:
            raise RuntimeError("secret internals")

        with uvicorn_in_thread(app) as url:
            wait_ready(url)
            yield url, app


@pytest.fixture(scope="module")
def replica2(pg_url, redis_client, redis_url, redis_prefix, tmp_path_factory, base, live):
    """A second API replica of `live`: the same database and Redis prefix, its own engine and batcher, and no
    preloaded backbone (its engine starts on first use); (url, app)."""
    from app.main import create_app

    with settings_factory(pg_url, redis_url, redis_prefix, tmp_path_factory.mktemp("iso-data-2")) as make:
        app = create_app(make(default_base_model=base, engine_device="cpu", batch_max_wait_ms=20,
                              batch_max_queue_per_tenant=SHARE))
        with uvicorn_in_thread(app) as url:
            yield url, app


def hold_forward(monkeypatch: pytest.MonkeyPatch, engine: Any, gate: threading.Event) -> threading.Event:
    """Make `engine`'s forward passes wait for `gate`; returns the event set when the first one starts."""
    entered = threading.Event()
    forward = engine.forward

    def held(rows):
        entered.set()
        assert gate.wait(30)
        return forward(rows)

    monkeypatch.setattr(engine, "forward", held)
    return entered


@pytest.fixture
def tenant(tenant_key, db, zoo):
    key = tenant_key("predict")
    key.versions = {name: register(db, key.tenant_id, name, *adapter).id for name, adapter in zoo.items()}
    return key


def _http_exchange(sock: socket.socket, path: str, body: dict | None = None, headers: dict | None = None) -> bytes:
    """One HTTP/1.1 request on an open socket (keep-alive); the raw response."""
    data = json.dumps(body).encode() if body is not None else b""
    head = [f"{'POST' if body is not None else 'GET'} {path} HTTP/1.1", "Host: 127.0.0.1",
            "Connection: keep-alive", f"Content-Length: {len(data)}", "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection; got {raw!r}"
        raw += chunk
    header, _, rest = raw.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in header.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        rest += chunk
    return header + b"\r\n\r\n" + rest


def test_an_escaping_exception_is_a_500_problem_on_a_connection_that_stays_open(live, caplog):
    url, _ = live
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for _ in range(3):  # the same connection answers again and again: never reset
            raw = _http_exchange(sock, "/test/boom", headers={"X-Request-ID": "boom-1"})
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 500") and b"application/problem+json" in head
            problem = json.loads(body)
            assert problem["type"].endswith("/internal-error") and problem["reference"] == "boom-1"
            assert b"secret internals" not in raw
        assert _http_exchange(sock, "/healthz").startswith(b"HTTP/1.1 200")
    assert any("boom-1" in r.getMessage() and r.exc_info for r in caplog.records)  # the reference is in the log
    assert not any("Exception in ASGI application" in r.getMessage() for r in caplog.records)


def test_a_poisoned_row_fails_only_its_own_request(live, tenant, monkeypatch):
    url, app = live
    engine = app.state.serving.engine
    bad = "awful actor"
    bad_ids = engine.encode(engine.adapter(str(tenant.versions["sentiment"])), [bad])[0]["input_ids"]
    forward = engine.forward

    def poisoned(rows):
        if any(r.features["input_ids"] == bad_ids for r in rows):
            raise RuntimeError("The size of tensor a (1024) must match the size of tensor b (512)")
        return forward(rows)

    monkeypatch.setattr(engine, "forward", poisoned)
    jobs = [("sentiment", TEXTS[:3]), ("topic", TEXTS[2:5]), ("spam", TEXTS[:2]), ("sentiment", ["good", bad]),
            ("topic", TEXTS[:1]), ("spam", TEXTS[3:])] * 3
    barrier = threading.Barrier(len(jobs))

    def call(job):
        barrier.wait()
        return httpx.post(f"{url}/v1/tasks/{job[0]}/predict", json={"inputs": job[1]}, headers=tenant.headers,
                          timeout=30)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(call, jobs))
    for (_, inputs), r in zip(jobs, results, strict=True):
        if bad in inputs:  # whatever the task: the row breaks the (patched) model
            problem = assert_problem(r, 500, "prediction-failed")
            assert len(problem["reference"]) == 32 and problem["reference"] in problem["detail"]
        else:
            assert r.status_code == 200, r.text
            assert len(r.json()["predictions"]) == len(inputs)
    assert app.state.serving.batcher.stats["failed_rows"] >= 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread dies on purpose
def test_a_dead_batcher_fails_readiness_once_and_is_restarted(live, tenant, monkeypatch):
    _kill_the_batcher_then_check_readiness(*live, tenant, monkeypatch)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread dies on purpose
def test_a_dead_batcher_fails_readiness_without_a_preloaded_backbone(replica2, tenant, monkeypatch):
    url, app = replica2
    assert not app.state.settings.preload_base_model
    assert httpx.get(url + "/readyz").json()["checks"]["engine"]["ok"]  # nothing started yet: nothing to fail
    _kill_the_batcher_then_check_readiness(url, app, tenant, monkeypatch)


def _kill_the_batcher_then_check_readiness(url: str, app: Any, tenant: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    serving = app.state.serving
    batcher = serving.batcher
    monkeypatch.setattr(batcher, "_take", lambda **_: (_ for _ in ()).throw(SystemExit("killed")))
    # The loop is inside the real _take, waiting for rows: one request gets it out, and the next call dies.
    r = httpx.post(f"{url}/v1/tasks/spam/predict", json={"inputs": ["x"]}, headers=tenant.headers, timeout=30)
    assert r.status_code == 200, r.text
    batcher._thread.join(10)
    monkeypatch.undo()
    assert not batcher.alive
    r = httpx.get(url + "/readyz")
    problem = assert_problem(r, 503, "not-ready")
    assert "batcher" in problem["checks"]["engine"]["error"]
    assert httpx.get(url + "/readyz").status_code == 200 and batcher.alive  # restarted by the check
    r = httpx.post(f"{url}/v1/tasks/spam/predict", json={"inputs": TEXTS[:2]}, headers=tenant.headers, timeout=30)
    assert r.status_code == 200, r.text
    assert "spafit_batcher_restarts_total 1.0" in app.state.metrics.exposition()[0].decode()


def test_a_client_that_goes_away_has_its_rows_dropped_before_they_run(live, tenant, monkeypatch):
    url, app = live
    engine = app.state.serving.engine
    batcher = app.state.serving.batcher
    gate, entered = threading.Event(), threading.Event()
    seen: list[int] = []
    forward = engine.forward

    def held(rows):
        seen.append(len(rows))
        entered.set()
        assert gate.wait(30)
        return forward(rows)

    monkeypatch.setattr(engine, "forward", held)
    port = int(url.rsplit(":", 1)[1])
    blocker = threading.Thread(target=httpx.post, args=(f"{url}/v1/tasks/spam/predict",),
                               kwargs={"json": {"inputs": ["first"]}, "headers": tenant.headers, "timeout": 30})
    blocker.start()
    assert entered.wait(30)  # the engine is busy with one row; what comes next waits in the queue
    dropped = batcher.stats["dropped"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        data = json.dumps({"inputs": TEXTS[:5]}).encode()
        head = ["POST /v1/tasks/topic/predict HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(data)}",
                "Content-Type: application/json", f"Authorization: Bearer {tenant.key}"]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        deadline = time.monotonic() + 10
        while batcher.depth < 5:
            assert time.monotonic() < deadline, "the request never reached the queue"
            time.sleep(0.02)
    deadline = time.monotonic() + 10  # the socket is closed: the server sees http.disconnect
    while batcher.depth:
        assert time.monotonic() < deadline, "the rows of the client that went away stayed queued"
        time.sleep(0.02)
    gate.set()
    blocker.join(30)
    assert batcher.stats["dropped"] - dropped == 5
    assert seen == [1]  # the forward pass of the first request only: the 5 rows never ran


def test_head_only_tasks_fan_out(live, tenant):
    url, _ = live
    r = httpx.post(f"{url}/v1/predict", json={"tasks": ["head-a", "head-b", "sentiment"], "inputs": TEXTS[:3]},
                   headers=tenant.headers, timeout=30)
    assert r.status_code == 200, r.text
    for result in r.json()["results"]:
        single = httpx.post(f"{url}/v1/tasks/{result['task']}/predict", json={"inputs": TEXTS[:3]},
                            headers=tenant.headers, timeout=30).json()["predictions"]
        assert [p["label"] for p in result["predictions"]] == [p["label"] for p in single]
        assert all(abs(a["score"] - b["score"]) <= 1e-5
                   for a, b in zip(result["predictions"], single, strict=True))


def test_a_tenant_past_its_share_is_429_and_metrics_count_it_per_tenant(live, tenant, tenant_key, db, zoo, monkeypatch):
    url, app = live
    engine = app.state.serving.engine
    gate, entered = threading.Event(), threading.Event()
    forward = engine.forward

    def held(rows):
        entered.set()
        assert gate.wait(30)
        return forward(rows)

    other = tenant_key("predict")
    register(db, other.tenant_id, "spam", *zoo["spam"])
    monkeypatch.setattr(engine, "forward", held)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(httpx.post, f"{url}/v1/tasks/spam/predict", json={"inputs": ["x"]},
                            headers=tenant.headers, timeout=30)
        assert entered.wait(30)
        waiting = [pool.submit(httpx.post, f"{url}/v1/tasks/spam/predict", json={"inputs": (TEXTS * 3)[:n]},
                               headers=tenant.headers, timeout=30) for n in (16, 16, 16, 15)]  # 1 + 63: the share
        deadline = time.monotonic() + 10
        while app.state.serving.tenant_depths().get(str(tenant.tenant_id), 0) < 64:
            assert time.monotonic() < deadline, app.state.serving.tenant_depths()
            time.sleep(0.02)
        refused = httpx.post(f"{url}/v1/tasks/spam/predict", json={"inputs": ["one more"]}, headers=tenant.headers,
                             timeout=30)
        # Refused at the gate, from the headers alone (the key was seen with this tenant before): the body is
        # never read, the connection still serves the next request.
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as sock:
            raw = _http_exchange(sock, "/v1/tasks/spam/predict", {"inputs": ["x" * 5000] * 8},
                                 headers={"Authorization": f"Bearer {tenant.key}"})
            assert raw.startswith(b"HTTP/1.1 429") and b"retry-after: 1" in raw.lower()
            assert _http_exchange(sock, "/healthz").startswith(b"HTTP/1.1 200")
        unknown = httpx.post(f"{url}/v1/tasks/spam/predict", json={"inputs": ["x"]}, timeout=30,
                             headers={"Authorization": "Bearer spafit_nope_nope"})
        assert_problem(unknown, 401, "unauthorized")  # a key the gate has not seen takes the normal path
        metrics = app.state.metrics.exposition()[0].decode()
        elsewhere = pool.submit(httpx.post, f"{url}/v1/tasks/spam/predict", json={"inputs": TEXTS[:2]},
                                headers=other.headers, timeout=30)  # another tenant still gets in
        time.sleep(0.2)
        gate.set()
        assert first.result().status_code == 200 and all(w.result().status_code == 200 for w in waiting)
        assert elsewhere.result().status_code == 200
    problem = assert_problem(refused, 429, "tenant-queue-full")
    assert refused.headers["Retry-After"] == "1" and problem["tenant_queue_depth"] == 64
    t = str(tenant.tenant_id)
    assert f'spafit_predict_tenant_queued_rows{{tenant="{t}"}} 64.0' in metrics
    assert f'spafit_predict_tenant_rejected_total{{tenant="{t}"}} 2.0' in metrics  # the 429 and the gate's
    after = app.state.metrics.exposition()[0].decode()
    assert f'spafit_predict_tenant_served_rows_total{{tenant="{t}"}} 64.0' in after
    assert f'spafit_predict_tenant_served_rows_total{{tenant="{other.tenant_id}"}} 2.0' in after
    assert 'spafit_predict_requests_total{outcome="tenant-queue-full"}' in after


def test_a_fan_out_larger_than_the_share_runs_when_the_tenant_has_nothing_else_in_flight(live, tenant):
    url, _ = live
    tasks = ["sentiment", "topic", "spam", "head-a", "head-b"]
    r = httpx.post(f"{url}/v1/predict", json={"tasks": tasks, "inputs": (TEXTS * 3)[:16]},  # 80 rows > 64
                   headers=tenant.headers, timeout=60)
    assert r.status_code == 200, r.text
    assert [len(x["predictions"]) for x in r.json()["results"]] == [16] * 5


def test_a_fan_out_the_engine_fails_on_is_a_prediction_failed_problem(live, tenant, monkeypatch, caplog):
    url, app = live
    engine = app.state.serving.engine

    def broken(names, inputs, top_k=None):
        raise RuntimeError("index out of range in self")

    monkeypatch.setattr(engine, "fan_out_many", broken)
    r = httpx.post(f"{url}/v1/predict", json={"tasks": ["sentiment", "topic"], "inputs": ["good", "bad"]},
                   headers=tenant.headers, timeout=30)
    problem = assert_problem(r, 500, "prediction-failed")
    assert "input 0" in problem["detail"] and "index out of range" not in r.text
    assert any(problem["reference"] in rec.getMessage() and rec.exc_info for rec in caplog.records)
    assert app.state.serving.tenant_depths().get(str(tenant.tenant_id), 0) == 0  # its rows were given back


def _shared_rows(redis_client: Any, redis_prefix: str, tenant: Any) -> dict[str, int]:
    """The tenant's rows in flight as Redis holds them, by replica."""
    return {k.decode(): int(v) for k, v in redis_client.hgetall(f"{redis_prefix}spafit:rows:{tenant.tenant_id}").items()}


def test_a_tenant_share_holds_across_replicas_while_another_tenant_is_served(
        live, replica2, tenant, tenant_key, db, zoo, redis_client, redis_prefix, monkeypatch):
    (url1, app1), (url2, app2) = live, replica2
    other = tenant_key("predict")
    register(db, other.tenant_id, "spam", *zoo["spam"])
    gate = threading.Event()
    entered = [hold_forward(monkeypatch, app.state.serving.engine, gate) for app in (app1, app2)]
    t = str(tenant.tenant_id)
    with ThreadPoolExecutor(12) as pool:
        def post(url: str, inputs: list[str], key: Any = tenant) -> Any:
            return pool.submit(httpx.post, f"{url}/v1/tasks/spam/predict", json={"inputs": inputs},
                               headers=key.headers, timeout=30)

        try:
            first = [post(url1, ["x"]), post(url2, ["y"])]
            assert entered[0].wait(30) and entered[1].wait(30)  # each engine busy with one row; the rest waits
            waiting = [post(url, (TEXTS * 3)[:n]) for url in (url1, url2) for n in (16, 15)]  # 2 + 62: the share
            wait_until(lambda: sum(app.state.serving.tenant_depths().get(t, 0) for app in (app1, app2)) == SHARE, 10,
                       "the tenant's rows admitted")
            assert [app.state.serving.tenant_depths().get(t, 0) for app in (app1, app2)] == [32, 32]  # half each
            wait_until(lambda: sorted(_shared_rows(redis_client, redis_prefix, tenant).values()) == [32, 32], 10,
                       "a field each in Redis")  # written by each replica's syncer, within a refresh interval
            wait_until(lambda: all(app.state.serving.tenant_rows.total(t) == SHARE for app in (app1, app2)), 10,
                       "each replica's cache of the other's rows")  # read back within a refresh interval
            # Each replica alone holds half the share; together they hold all of it: one more row is refused by
            # both, while another tenant still gets in.
            refused = [httpx.post(f"{url}/v1/tasks/spam/predict", json={"inputs": ["one more"]},
                                  headers=tenant.headers, timeout=30) for url in (url1, url2)]
            elsewhere = [post(url, TEXTS[:2], other) for url in (url1, url2)]
            time.sleep(0.2)
        finally:
            gate.set()
        assert all(f.result().status_code == 200 for f in first + waiting)
        assert [f.result().status_code for f in elsewhere] == [200, 200]
    for r in refused:
        problem = assert_problem(r, 429, "tenant-queue-full")
        assert r.headers["Retry-After"] == "1" and problem["tenant_queue_depth"] == SHARE
    wait_until(lambda: not _shared_rows(redis_client, redis_prefix, tenant), 10, "the rows given back in Redis")


def test_a_replica_that_dies_holding_rows_frees_them_after_its_lease(live, tenant, redis_client, redis_url,
                                                                      redis_prefix):
    url, _ = live
    # A replica in a process of its own (the counter alone, lease 1 s, heartbeat on) takes the tenant's whole share.
    script = (f"import asyncio\nfrom app.services.limits import TenantRows\n\n"
              "async def main():\n"
              f"    rows = TenantRows({redis_url!r}, {redis_prefix!r}, lease_s=1.0).start()\n"
              f"    print((await rows.admit({str(tenant.tenant_id)!r}, {SHARE}, {SHARE})).admitted, flush=True)\n"
              "    await asyncio.sleep(600)\n\n"
              "asyncio.run(main())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"True"
        time.sleep(2.5)  # more than two leases: the heartbeat keeps them while the process lives
        r = httpx.post(f"{url}/v1/tasks/spam/predict", json={"inputs": ["x"]}, headers=tenant.headers, timeout=30)
        assert assert_problem(r, 429, "tenant-queue-full")["tenant_queue_depth"] == SHARE
    finally:
        proc.kill()  # SIGKILL: nothing given back, no lease renewed
        proc.wait()
    died = time.monotonic()
    wait_until(lambda: httpx.post(f"{url}/v1/tasks/spam/predict", json={"inputs": ["x"]}, headers=tenant.headers,
                                  timeout=30).status_code == 200, 10, "the dead replica's rows to be freed", 0.05)
    freed_after = time.monotonic() - died
    assert freed_after < 2.5, freed_after  # its lease (1 s) and the gate's Retry-After (1 s), not forever
    # its field went with it (and the live replica's own row is given back by its syncer, within a refresh interval)
    wait_until(lambda: not _shared_rows(redis_client, redis_prefix, tenant), 5, "no rows left in Redis")


def test_with_redis_unreachable_predict_holds_the_share_per_process_and_never_fails(
        pg_url, redis_url, redis_prefix, tmp_path, base, tenant, monkeypatch, caplog):
    from app.main import create_app

    with settings_factory(pg_url, redis_url, redis_prefix, tmp_path) as make:
        app = create_app(make(default_base_model=base, engine_device="cpu", batch_max_wait_ms=20,
                              batch_max_queue_per_tenant=4, max_predict_inputs=4,
                              redis_url=f"redis://127.0.0.1:{free_port()}/0"))  # nothing listens there
        with uvicorn_in_thread(app) as url:
            def post(inputs: list[str]) -> httpx.Response:
                return httpx.post(f"{url}/v1/tasks/spam/predict", json={"inputs": inputs}, headers=tenant.headers,
                                  timeout=30)

            assert post(TEXTS[:2]).status_code == 200  # fails open: counted in this process
            gate = threading.Event()
            entered = hold_forward(monkeypatch, app.state.serving.engine, gate)
            with ThreadPoolExecutor(4) as pool:
                try:
                    first = pool.submit(post, ["x"])
                    assert entered.wait(30)
                    rest = pool.submit(post, TEXTS[:3])  # 1 + 3: the share, in this process
                    wait_until(lambda: app.state.serving.tenant_depths().get(str(tenant.tenant_id)) == 4, 10,
                               "4 rows admitted")
                    refused = post(["one more"])
                finally:
                    gate.set()
                assert first.result().status_code == 200 and rest.result().status_code == 200
            assert assert_problem(refused, 429, "tenant-queue-full")["tenant_queue_depth"] == 4
            assert post(TEXTS[:1]).status_code == 200
    down = [r for r in caplog.records if "tenant row limits: Redis unreachable" in r.getMessage()]
    assert len(down) == 1 and down[0].levelname == "WARNING"  # once per outage, not once per request
