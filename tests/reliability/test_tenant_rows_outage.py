"""The per-tenant share of prediction rows while the Redis that holds it across replicas dies and comes back
empty (a private redis-server, SIGKILLed and restarted): two replicas' admissions fail open to each process's own
cap (logged once per replica, never an error), and once Redis is back the syncers state every replica's count
again, so the share holds across replicas without a restart. Admission reads the other replica's rows from a cache
the syncer refreshes (`TenantRows.refresh_s`), so the scenario waits for a sync where a step needs what the other
replica did just before."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import pytest
import redis

from app.errors import TenantQueueFull
from app.metrics import Metrics
from app.services.serving import Serving


async def _until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # polled on the loop, so the replicas' heartbeats (tasks on it) keep running meanwhile
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.05)


def test_the_share_fails_open_per_process_while_redis_is_down_and_holds_across_replicas_once_it_is_back(
        make_settings, db, private_redis, caplog):
    caplog.set_level(logging.INFO, "spafit.limits")
    settings = make_settings(redis_url=private_redis.url, batch_max_queue_per_tenant=8, max_predict_inputs=8,
                             tenant_rows_lease_s=1.0)
    a, b = Serving(settings, db, Metrics()), Serving(settings, db, Metrics())
    counters = [s.tenant_rows for s in (a, b)]
    assert all(c is not None for c in counters)
    tenant = str(uuid.uuid4())
    key = counters[0].key(tenant)
    inspect = redis.Redis.from_url(private_redis.url)

    def shared() -> int:
        return sum(int(v) for v in inspect.hvals(key))

    async def refused(serving: Serving, rows: int) -> int:
        with pytest.raises(TenantQueueFull) as e:
            await serving._admit(tenant, rows)
        return e.value.extra["tenant_queue_depth"]

    async def synced() -> None:
        """One refresh interval: each replica writes its counts, then each reads the other's (twice: a drop in
        another replica's rows is used once two reads show it)."""
        for _ in range(2):
            for c in counters:
                await c.synced()

    async def scenario() -> None:
        for c in counters:
            c.start()
        try:
            releases = [await a._admit(tenant, 5)]
            await synced()
            releases.append(await b._admit(tenant, 3))
            await synced()
            assert shared() == 8
            assert await refused(b, 1) == 8  # b holds 3 itself: the share is counted across both

            private_redis.kill9()
            await _until(lambda: all(c._down for c in counters), 10, "the replicas' syncers to find Redis gone")
            releases.append(await a._admit(tenant, 1))  # fails open: a counts its own rows (5 + 1 of 8)
            assert await refused(a, 3) == 6  # ...and holds the share in its process
            releases.append(await b._admit(tenant, 3))  # b, alone, holds 3 + 3 of 8
            down = [r for r in caplog.records if "tenant row limits: Redis unreachable" in r.getMessage()]
            assert len(down) == 2 and {r.levelname for r in down} == {"WARNING"}  # once per replica

            private_redis.start()  # a new, empty Redis on the same port
            # 5 + 3: the rows admitted during the outage were counted in their process only
            await _until(lambda: shared() == 8 and not any(c._down for c in counters), 10,
                         "the replicas' counts stated again")
            await synced()
            assert await refused(a, 1) == 8  # across replicas again
            assert any("Redis reachable again" in r.getMessage() for r in caplog.records)

            for release in releases:
                release()
            await _until(lambda: not inspect.exists(key), 10, "every row given back")
            await synced()
            (await b._admit(tenant, 8))()  # the whole share again, now that it is free
        finally:
            for c in counters:
                await c.aclose()

    try:
        asyncio.run(scenario())
        assert not inspect.exists(counters[0].replicas_key)  # both replicas left
    finally:
        inspect.close()
