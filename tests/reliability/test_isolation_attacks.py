"""Attacks on issue 12's isolation, fairness and bounds, against real API processes (`spafit serve`, server mode)
sharing a private Redis (that the tests kill and restart) and the session's Postgres: two replicas, one key
prefix of their own. Every answer must be HTTP (a 500 or a reset connection fails a test), and after each flood
the rows counted in flight go back to zero, in Redis and in each process's gauge."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.live import uvicorn_in_thread

from .conftest import ApiProcess, RedisServer, free_port, own_database_fixtures, service_env, wait_until

pytestmark = pytest.mark.slow

SHARE = 24  # batch_max_queue_per_tenant of the replicas here
QUEUE = 64  # batch_max_queue: rows in flight in one replica, every tenant
FAN_TASKS = tuple(f"fan-{i}" for i in range(32))  # tenant a's tasks for a fan-out of 8 inputs x 32 tasks
METRICS_TOKEN = "attack-metrics-token-0123456789"
TEXTS = ["good movie", "the plot was very boring and bad", "ok", "i love this film it is great fun"]


# This module's deployment runs on a database of its own (see `own_database`): its jobs stay queued on purpose.
pg_url, db = own_database_fixtures("spafit_attacks")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Any:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("attack-redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tenants(db, tiny_base) -> dict[str, Any]:
    """Tenants `a` (the flood) and `b` (the victim), each with the task `spam`; their headers and ids."""
    from app.services import keys, registry
    from tests.api.adapters import random_adapter

    cfg, weights = random_adapter(tiny_base, dict(name="spafit", n1=1, n2=2, rank=2), seed=7)
    out: dict[str, Any] = {}
    with db.session() as s:
        for name in ("a", "b"):
            tenant = keys.create_tenant(s, f"attack-{name}-{secrets.token_hex(4)}")
            _, plaintext = keys.create_key(s, tenant.id, "attack", ["predict", "train"])
            for task in ("spam", *(FAN_TASKS if name == "a" else ())):
                registry.register_version(s, tenant.id, task, cfg, weights, activate=True)
            out[name] = {"id": str(tenant.id), "headers": {"Authorization": f"Bearer {plaintext}"}}
        s.commit()
    return out


def _env(pg_url: str, redis: RedisServer, prefix: str, base: str, data: Any, **extra: Any) -> dict[str, str]:
    return service_env(pg_url, redis.url, prefix, base, data, preload_base_model=True, engine_device="cpu",
                       log_level="WARNING", batch_max_size=8, batch_max_wait_ms=5, max_predict_inputs=8,
                       batch_max_queue_per_tenant=SHARE, batch_max_queue=QUEUE, tenant_rows_lease_s=2, metrics_token=METRICS_TOKEN,
                       sse_max_streams_per_tenant=3, sse_slot_ttl_s=3, **extra)


@pytest.fixture(scope="module")
def replicas(pg_url, redis_server, redis_prefix, tiny_base, tmp_path_factory) -> Any:
    tmp = tmp_path_factory.mktemp("attack")
    prefix = f"{redis_prefix}attack:"
    apis = [ApiProcess(_env(pg_url, redis_server, prefix, tiny_base, tmp / f"data{i}"), tmp / f"api{i}.log").launch()
            for i in range(2)]
    try:
        for api in apis:
            api.wait_ready(90)
        yield apis, prefix
    finally:
        for api in apis:
            api.stop()


def _queued(api: ApiProcess, tenant: str) -> float:
    text = httpx.get(f"{api.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10).text
    series = f'spafit_predict_tenant_queued_rows{{tenant="{tenant}"}} '
    return sum(float(line[len(series):]) for line in text.splitlines() if line.startswith(series))


def _shared(redis: RedisServer, prefix: str, tenant: str) -> dict[str, int]:
    import redis as redis_lib

    try:
        raw = redis_lib.Redis(port=redis.port, socket_timeout=2).hgetall(f"{prefix}spafit:rows:{tenant}")
    except redis_lib.RedisError:
        return {}
    return {k.decode(): int(v) for k, v in raw.items()}


async def _client(http: httpx.AsyncClient, url: str, inputs: list[str], headers: dict, until: float,
                  seen: Counter, failures: list[str], timeout: float | None = None) -> None:
    while time.monotonic() < until:
        try:
            r = await http.post(f"{url}/v1/tasks/spam/predict", json={"inputs": inputs}, headers=headers,
                                timeout=timeout or 30)
        except httpx.TimeoutException:
            seen["client-timeout"] += 1
            continue
        except httpx.HTTPError as e:  # a reset or dropped connection
            failures.append(f"{type(e).__name__}: {e}")
            await asyncio.sleep(0.05)
            continue
        seen[r.status_code] += 1
        if r.status_code == 429:
            await asyncio.sleep(0.02)
        elif r.status_code != 200:
            failures.append(f"{r.status_code}: {r.text[:300]}")


async def _flood(apis: list[ApiProcess], tenants: dict, seconds: float, during: Any = None,
                 flood_timeout: float | None = None) -> tuple[Counter, list[str], Counter, list[str]]:
    limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
    async with httpx.AsyncClient(limits=limits) as http:
        until = time.monotonic() + seconds
        f_seen, f_fail, v_seen, v_fail = Counter(), [], Counter(), []
        jobs = [_client(http, apis[i % 2].url, TEXTS * 2, tenants["a"]["headers"], until, f_seen, f_fail,
                        flood_timeout) for i in range(16)]
        jobs += [_client(http, api.url, TEXTS[:2], tenants["b"]["headers"], until, v_seen, v_fail) for api in apis]
        if during is not None:
            jobs.append(asyncio.to_thread(during))
        await asyncio.gather(*jobs)
    return f_seen, f_fail, v_seen, v_fail


def _drained(apis: list[ApiProcess], redis: RedisServer, prefix: str, tenant: str) -> None:
    wait_until(lambda: not _shared(redis, prefix, tenant) and all(_queued(a, tenant) == 0 for a in apis), 15,
               "the flooding tenant's rows given back (Redis and every process)")


def _peak_watcher(redis: RedisServer, prefix: str, tenant: str, seconds: float, peak: list[Any]) -> Any:
    def watch() -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            peak.append((time.monotonic(), sum(_shared(redis, prefix, tenant).values())))
            time.sleep(0.01)

    return watch


def _within_the_share(peak: list[Any]) -> None:
    """The tenant's rows across both replicas (as Redis holds them) past the share only for the shared cap's lag
    (app/services/limits.py: a replica sees the other's admissions within about a refresh interval, 0.1 s, two at
    worst): never past twice the share (each replica alone holds at most the share), never for 0.5 s at a stretch."""
    rows = [n for _, n in peak]
    assert 0 < max(rows) <= 2 * SHARE, max(rows)
    longest, since = 0.0, None
    for at, n in peak:
        since = (since if since is not None else at) if n > SHARE else None
        longest = max(longest, at - since) if since is not None else longest
    assert longest < 0.5, (longest, [n for n in rows if n > SHARE])


def _served_fairly(f_seen: Counter, f_fail: list[str], v_seen: Counter, v_fail: list[str]) -> None:
    assert f_fail == [] and f_seen[429] >= 1 and f_seen[200] >= 1, (f_seen, f_fail[:3])
    assert set(f_seen) <= {200, 429, "client-timeout"}, f_seen
    assert v_fail == [] and set(v_seen) == {200} and v_seen[200] >= 4, (v_seen, v_fail[:3])


def test_a_flood_over_two_replicas_never_holds_more_than_its_share_and_leaves_nothing_counted(
        replicas, tenants, redis_server):
    apis, prefix = replicas
    peak: list[Any] = []
    watch = _peak_watcher(redis_server, prefix, tenants["a"]["id"], 5, peak)
    _served_fairly(*asyncio.run(_flood(apis, tenants, 5, watch)))
    _within_the_share(peak)  # across both replicas
    _drained(apis, redis_server, prefix, tenants["a"]["id"])


def test_redis_killed_and_restarted_mid_flood_never_fails_a_request_and_the_shared_share_comes_back(
        replicas, tenants, redis_server):
    apis, prefix = replicas

    def outage() -> None:
        time.sleep(1.5)
        redis_server.kill9()  # everything it held is lost
        time.sleep(3)
        redis_server.start()

    _served_fairly(*asyncio.run(_flood(apis, tenants, 9, outage)))
    _drained(apis, redis_server, prefix, tenants["a"]["id"])
    peak: list[Any] = []
    _served_fairly(*asyncio.run(_flood(apis, tenants, 4, _peak_watcher(redis_server, prefix, tenants["a"]["id"], 4,
                                                                       peak))))
    _within_the_share(peak)  # counted in Redis again, across both replicas
    _drained(apis, redis_server, prefix, tenants["a"]["id"])


def test_clients_that_go_away_mid_request_leave_no_rows_counted(replicas, tenants, redis_server):
    apis, prefix = replicas
    f_seen, f_fail, v_seen, v_fail = asyncio.run(_flood(apis, tenants, 5, flood_timeout=0.03))
    assert f_seen["client-timeout"] >= 10 and f_fail == [], (f_seen, f_fail[:3])
    assert v_fail == [] and set(v_seen) == {200}, (v_seen, v_fail[:3])
    _drained(apis, redis_server, prefix, tenants["a"]["id"])
    for api in apis:
        log = api.tail(500_000)
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


def test_a_fan_out_larger_than_the_share_runs_alone_without_filling_the_service_for_other_tenants(replicas, tenants):
    """A lone request larger than the share runs (a big fan-out), charged one share: it neither gets a 503 that no
    retry can cure (its rows past the whole queue) nor makes every other tenant's predicts 503 while it runs."""
    apis, _ = replicas
    api = apis[0]
    body = {"tasks": list(FAN_TASKS), "inputs": (TEXTS * 2)[:8]}  # 256 rows: more than the share and the queue
    # The tenant's rows were just drained; each replica's view of the other's lags by up to two reads of the shared
    # counts (app/services/limits.py, 0.1 s each) and the gate's Retry-After (1 s): retry a 429 for that long.
    deadline = time.monotonic() + 3
    while (r := httpx.post(f"{api.url}/v1/predict", json=body, headers=tenants["a"]["headers"],
                           timeout=60)).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 32

    async def both() -> tuple[Counter, Counter]:
        big, small = Counter(), Counter()
        small_body = {"tasks": list(FAN_TASKS[:8]), "inputs": (TEXTS * 2)[:8]}  # 64 rows: the whole queue
        async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
            until = time.monotonic() + 4

            async def flood() -> None:
                while time.monotonic() < until:
                    r = await http.post("/v1/predict", json=small_body, headers=tenants["a"]["headers"])
                    big[r.status_code] += 1

            async def victim() -> None:
                while time.monotonic() < until:
                    r = await http.post("/v1/tasks/spam/predict", json={"inputs": TEXTS[:2]},
                                        headers=tenants["b"]["headers"])
                    small[r.status_code] += 1
                    await asyncio.sleep(0.01)

            await asyncio.gather(flood(), victim())
        return big, small

    big, small = asyncio.run(both())
    assert big[200] >= 1 and set(big) <= {200, 429}, big
    assert set(small) == {200} and small[200] >= 5, small


def test_a_replica_sigkilled_mid_flood_frees_its_rows_after_its_lease(replicas, tenants, redis_server, pg_url,
                                                                      tiny_base, tmp_path):
    apis, prefix = replicas
    doomed = ApiProcess(_env(pg_url, redis_server, prefix, tiny_base, tmp_path / "data"), tmp_path / "doomed.log")
    doomed.launch().wait_ready(90)
    a = tenants["a"]["id"]

    held: list[int] = []

    def kill_while_holding() -> None:
        deadline = time.monotonic() + 10
        while not held and time.monotonic() < deadline:
            if sum(_shared(redis_server, prefix, a).values()) > 0:
                os.kill(doomed.proc.pid, signal.SIGSTOP)  # frozen: what Redis holds now is what it dies with
                if sum(_shared(redis_server, prefix, a).values()) > 0:
                    held.append(sum(_shared(redis_server, prefix, a).values()))
                    doomed.kill9()  # nothing given back, no lease renewed
                    return
                os.kill(doomed.proc.pid, signal.SIGCONT)
            time.sleep(0.005)

    asyncio.run(_flood([doomed, doomed], tenants, 3, kill_while_holding))  # its clients see resets after the kill
    killed = time.monotonic()
    assert held and held[0] > 0, "the doomed replica never held rows"
    # They stop counting within a lease (2 s): a full share is admitted again on the live replicas, and the
    # admission drops the dead replica's field.
    share = {"inputs": TEXTS * 2}  # 8 rows; three of them are the share

    async def full_share() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as http:
            rs = await asyncio.gather(*(http.post(f"{api.url}/v1/tasks/spam/predict", json=share,
                                                  headers=tenants["a"]["headers"]) for api in (*apis, apis[0])))
            return [r.status_code for r in rs]

    wait_until(lambda: asyncio.run(full_share()) == [200] * 3, 10, "a full share admitted again", interval=0.1)
    assert time.monotonic() - killed < 4.5, held
    _drained(apis, redis_server, prefix, a)


def _stream_slots(redis: RedisServer, prefix: str, tenant: str) -> int:
    import redis as redis_lib

    return int(redis_lib.Redis(port=redis.port, socket_timeout=2).zcard(f"{prefix}spafit:sse:{tenant}"))


def _open_gauge(api: ApiProcess) -> float:
    text = httpx.get(f"{api.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("spafit_event_streams_open "))


def test_event_streams_through_a_redis_outage_never_fail_and_leave_no_slot_held(replicas, tenants, redis_server):
    from tests.api.helpers import unique_csv

    apis, prefix = replicas
    a = tenants["a"]
    with httpx.Client(base_url=apis[0].url, headers=a["headers"], timeout=30) as c:
        ds = c.post("/v1/datasets", files={"file": ("train.csv", unique_csv())})
        assert ds.status_code == 201, ds.text
        job = c.post("/v1/jobs", json={"task": "sse-attack", "train_dataset": ds.json()["id"]})
        assert job.status_code == 202, job.text  # no worker reads this prefix: it stays queued
    path = f"/v1/jobs/{job.json()['id']}/events"
    sse = {**a["headers"], "Accept": "text/event-stream"}
    with httpx.Client(timeout=httpx.Timeout(10, read=30)) as c:
        def open_(api: ApiProcess, **headers: str) -> httpx.Response:
            return c.send(c.build_request("GET", api.url + path, headers={**sse, **headers}), stream=True)

        held = [open_(apis[0]), open_(apis[1]), open_(apis[0], **{"Last-Event-ID": "0"})]
        try:
            assert [r.status_code for r in held] == [200] * 3
            refused = open_(apis[1])
            refused.read()
            assert refused.status_code == 429, refused.text  # the cap (3), across replicas
            junk = open_(apis[0], **{"Last-Event-ID": "9" * 5000})
            junk.read()
            assert junk.status_code == 422, junk.text
            redis_server.kill9()
            during = [open_(api) for api in apis]  # counted in each process meanwhile: served, never a 500
            for r in during:
                assert r.status_code in (200, 429), r.read()
            held += during
            redis_server.start()
            time.sleep(1.5)  # a renewal (every second here) puts the open streams' slots back
        finally:
            for r in held:
                r.close()
    wait_until(lambda: _stream_slots(redis_server, prefix, a["id"]) == 0 and all(_open_gauge(x) == 0 for x in apis),
               8, "every stream's slot given back")
    with httpx.Client(timeout=httpx.Timeout(10, read=30)) as c:
        again = [c.send(c.build_request("GET", api.url + path, headers=sse), stream=True) for api in (*apis, apis[0])]
        try:
            assert [r.status_code for r in again] == [200] * 3  # the whole cap is the tenant's again
        finally:
            for r in again:
                r.close()
    for api in apis:  # the outage is logged (a warning per stream it touched), never a 500
        log = api.tail(500_000)
        assert "Exception in ASGI application" not in log and " 500 Internal" not in log, log[-3000:]


ODD_INPUTS = ["\u200b" * 50, "a\x00b\x00c", "x" * 20000, "\u0301" * 5000, "\U0001f600" * 3000, "\ufeff",
              {"text": "fine", "text_pair": "y" * 20000}, {"text": "\u200b", "text_pair": "\u200b"}, "\u202e" * 9,
              "[CLS] [SEP] [PAD] [MASK] [UNK]" * 100]


def test_odd_inputs_in_mixed_batches_are_answered_and_never_fail_another_request(replicas, tenants):
    apis, _ = replicas

    async def run() -> tuple[list[tuple[Any, int, str]], Counter]:
        odd, normal = [], Counter()
        async with httpx.AsyncClient(timeout=60) as http:
            async def one(x: Any, api: ApiProcess) -> None:
                r = await http.post(f"{api.url}/v1/tasks/spam/predict", json={"inputs": [x]},
                                    headers=tenants["a"]["headers"])
                odd.append((x if len(str(x)) < 40 else str(x)[:40], r.status_code, r.text[:200]))

            async def victim(api: ApiProcess) -> None:
                for _ in range(10):
                    r = await http.post(f"{api.url}/v1/tasks/spam/predict", json={"inputs": TEXTS[:2]},
                                        headers=tenants["b"]["headers"])
                    normal[r.status_code] += 1

            await asyncio.gather(*(one(x, api) for x in ODD_INPUTS for api in apis), *(victim(a) for a in apis))
        return odd, normal

    odd, normal = asyncio.run(run())
    assert set(normal) == {200}, normal
    assert all(code in (200, 422, 429) for _, code, _ in odd), [o for o in odd if o[1] not in (200, 422, 429)]
    fan = httpx.post(f"{apis[0].url}/v1/predict", json={"tasks": ["spam", "fan-0"], "inputs": ODD_INPUTS[:8]},
                     headers=tenants["a"]["headers"], timeout=60)
    assert fan.status_code in (200, 422), fan.text


# ------------------------------------------------------------------------------ a backbone loading meanwhile
def test_predicts_on_a_loaded_backbone_go_on_while_many_requests_wait_for_another_to_load(
        pg_url, redis_url, redis_prefix, db, tiny_base, tmp_path, monkeypatch):
    """Eight requests for a task on a base model that takes 4 s to load must not hold up a task on the
    backbone already loaded: its requests answer in their usual time, not after the load."""
    import spafit_core.engine.forward as forward
    from app.main import create_app
    from app.services import keys, registry
    from tests.api.adapters import random_adapter, settings_factory, tiny_backbone

    other_base = tiny_backbone(tmp_path / "other-base", seed=3)
    with db.session() as s:
        tenant = keys.create_tenant(s, f"attack-load-{secrets.token_hex(4)}")
        _, plaintext = keys.create_key(s, tenant.id, "attack", ["predict"])
        for task, base in (("here", tiny_base), ("there", other_base)):
            registry.register_version(s, tenant.id, task, *random_adapter(base, seed=1), activate=True)
        s.commit()
    headers = {"Authorization": f"Bearer {plaintext}"}
    real = forward.Backbone

    def slow_backbone(name: str, *args: Any, **kw: Any) -> Any:
        if "other-base" in name:
            time.sleep(4)
        return real(name, *args, **kw)

    monkeypatch.setattr(forward, "Backbone", slow_backbone)
    with settings_factory(pg_url, redis_url, redis_prefix, tmp_path / "data") as make:
        app = create_app(make(default_base_model=tiny_base, allowed_base_models=[other_base], engine_device="cpu",
                              preload_base_model=True))
        with uvicorn_in_thread(app) as url:
            wait_until(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, 60, "the backbone")
            assert httpx.post(f"{url}/v1/tasks/here/predict", json={"inputs": TEXTS}, headers=headers,
                              timeout=30).status_code == 200  # warm

            async def scenario() -> tuple[list[int], list[float]]:
                async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http:
                    far = [asyncio.ensure_future(http.post("/v1/tasks/there/predict", json={"inputs": TEXTS}))
                           for _ in range(8)]
                    await asyncio.sleep(0.5)  # the load has begun
                    took = []
                    for _ in range(3):
                        t = time.monotonic()
                        r = await http.post("/v1/tasks/here/predict", json={"inputs": TEXTS})
                        assert r.status_code == 200, r.text
                        took.append(time.monotonic() - t)
                    return [r.status_code for r in await asyncio.gather(*far)], took

            far, took = asyncio.run(scenario())
    assert far == [200] * 8
    assert max(took) < 1.5, took  # not the 3.5 s left of the other backbone's load
