"""One backbone shared, no fate shared, shown on a live API process (`spafit serve`, server mode) on the tiny
backbone (64 positions):

- a flood of overlong inputs on a task whose adapter claims `max_seq_length: 1024` (a row written before the
  job and import checks existed) while a second task's requests all get 200: rows are truncated to the
  backbone's positions, so the flood itself is answered too;
- a tenant that floods gets 429 `tenant-queue-full` with Retry-After while a second tenant's requests all get
  200 (per-tenant queues, deficit round robin, a per-tenant share of the queue).

Every answer is HTTP: a reset connection or a 500 anywhere fails the test, and so does "Exception in ASGI
application" in the server's log."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from .conftest import ApiProcess, service_env, wait_until

pytestmark = pytest.mark.slow

LONG = " ".join(["the plot was very boring and bad but the actor was fine"] * 30)  # ~330 tokens
SHORT = ["good movie", "awful actor", "fine plot"]
PER_TENANT_ROWS = 32


def _adapter(base: str, seed: int) -> tuple[dict, bytes]:
    import torch

    from spafit_core import MethodConfig, TaskSpec
    from spafit_core.adapter import serialize
    from spafit_core.model import SpafitModel
    from spafit_core.train import set_seed

    set_seed(seed)
    model = SpafitModel.from_pretrained(base, MethodConfig(name="spafit", n1=1, n2=2, rank=2),
                                        TaskSpec(labels=("neg", "pos")))
    with torch.no_grad():
        for t in model.adapter_state_dict().values():
            t.copy_(torch.randn_like(t) * 0.1)
    return serialize(model, max_seq_length=32)


@pytest.fixture(scope="module")
def tenants(db, tiny_base) -> dict[str, dict[str, str]]:
    """Two tenants: `a` with the tasks `long` and `short`, `b` with `short`. `long`'s stored config claims
    `max_seq_length: 1024` on a backbone with 64 positions: a row written before the job and import checks
    existed (they refuse such a config now, so the test writes it past them). Their headers."""
    from sqlalchemy import update

    from app.models import AdapterVersion
    from app.services import keys, registry

    out = {}
    with db.session() as s:
        for name, tasks in (("a", ("long", "short")), ("b", ("short",))):
            tenant = keys.create_tenant(s, f"iso-{name}-{secrets.token_hex(4)}")
            _, plaintext = keys.create_key(s, tenant.id, "iso", ["predict"])
            for i, task in enumerate(tasks):
                cfg, weights = _adapter(tiny_base, seed=i)
                version = registry.register_version(s, tenant.id, task, cfg, weights)
                if task == "long":
                    s.execute(update(AdapterVersion).where(AdapterVersion.id == version.id)
                              .values(config={**version.config, "max_seq_length": 1024}))
            out[name] = {"Authorization": f"Bearer {plaintext}"}
        s.commit()
    return out


@pytest.fixture(scope="module")
def api(pg_url, redis_url, redis_client, redis_prefix, tiny_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isolation")
    env = service_env(pg_url, redis_url, f"{redis_prefix}iso:", tiny_base, tmp / "data", preload_base_model=True,
                      engine_device="cpu", log_level="WARNING", batch_max_size=8, batch_max_wait_ms=5,
                      max_predict_inputs=16, batch_max_queue_per_tenant=PER_TENANT_ROWS)
    server = ApiProcess(env, tmp / "api.log").start()
    try:
        wait_until(lambda: httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200, 60, "the backbone")
        yield server
    finally:
        server.stop()


async def _client(http: httpx.AsyncClient, task: str, inputs: list[str], headers: dict, until: float,
                  seen: Counter, failures: list[str]) -> None:
    while time.monotonic() < until:
        try:
            r = await http.post(f"/v1/tasks/{task}/predict", json={"inputs": inputs}, headers=headers)
        except httpx.HTTPError as e:  # a reset or dropped connection
            failures.append(f"{type(e).__name__}: {e}")
            continue
        seen[r.status_code] += 1
        if r.status_code == 200 and len(r.json()["predictions"]) != len(inputs):
            failures.append(f"wrong body: {r.text[:200]}")
        elif r.status_code == 429:
            if r.headers.get("retry-after") != "1" or not r.json()["type"].endswith("/tenant-queue-full"):
                failures.append(f"429 without Retry-After or its type: {r.text[:200]}")
            await asyncio.sleep(0.05)  # what a client does with Retry-After, shortened
        elif r.status_code != 200:
            failures.append(f"{r.status_code}: {r.text[:300]}")


async def _flood_and_victim(url: str, flood: list[tuple[str, list[str], dict]], victim: tuple[str, list[str], dict],
                            seconds: float) -> tuple[Counter, list[str], Counter, list[str]]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        until = time.monotonic() + seconds
        f_seen, f_fail, v_seen, v_fail = Counter(), [], Counter(), []
        await asyncio.gather(*(_client(http, t, i, h, until, f_seen, f_fail) for t, i, h in flood),
                             *(_client(http, *victim, until, v_seen, v_fail) for _ in range(2)))
    return f_seen, f_fail, v_seen, v_fail


def _log_is_clean(api: Any) -> None:
    log = api.tail(200_000)
    assert "Exception in ASGI application" not in log and "Traceback" not in log, log[-3000:]


def test_a_flood_of_overlong_inputs_on_one_task_never_fails_another(api, tenants, measure):
    flood = [("long", [LONG] * 8, tenants["a"])] * 6  # 6 clients, 8 rows of ~330 tokens each
    f_seen, f_fail, v_seen, v_fail = asyncio.run(_flood_and_victim(api.url, flood, ("short", SHORT, tenants["b"]),
                                                                   seconds=4))
    measure(flood=dict(f_seen), victim=dict(v_seen))
    assert v_fail == [] and set(v_seen) == {200} and v_seen[200] >= 2, (v_seen, v_fail[:3])
    assert f_fail == [] and f_seen[200] >= 1 and set(f_seen) <= {200, 429}, (f_seen, f_fail[:3])
    _log_is_clean(api)


def test_a_tenant_that_floods_gets_429_while_another_is_served(api, tenants, measure):
    flood = [("short", SHORT * 5, tenants["a"])] * 16  # 16 clients x 15 rows against a 32-row share
    f_seen, f_fail, v_seen, v_fail = asyncio.run(_flood_and_victim(api.url, flood, ("short", SHORT, tenants["b"]),
                                                                   seconds=4))
    measure(flood=dict(f_seen), victim=dict(v_seen))
    assert f_fail == [] and f_seen[429] >= 1 and f_seen[200] >= 1 and set(f_seen) <= {200, 429}, (f_seen, f_fail)
    assert v_fail == [] and set(v_seen) == {200} and v_seen[200] >= 2, (v_seen, v_fail[:3])
    _log_is_clean(api)
