"""The shared per-tenant row cap (`app.services.limits.TenantRows`) on the session's Redis: admission and release
cost no Redis call on the request path (one tenant's flood cannot queue another's admissions behind round trips),
the syncer writes a flood's counts in a few coalesced calls, and two replicas see each other's rows within a
refresh interval."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import redis

from app.services.limits import Admission, TenantRows

CAP = 64


def _admit_now(rows: TenantRows, tenant: str, n: int) -> Admission | None:
    """`rows.admit` driven by hand: it must finish in its first step, i.e. without waiting for any I/O."""
    coro = rows.admit(tenant, n, CAP)
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError(f"admitting {tenant} waited for I/O")


def _count_calls(rows: TenantRows) -> list[Any]:
    """Every command `rows` sends to Redis from now on (its client's calls, the syncer's included)."""
    calls: list[Any] = []
    send = rows._redis.execute_command

    async def counted(*args: Any, **kw: Any) -> Any:
        calls.append(args[0])
        return await send(*args, **kw)

    rows._redis.execute_command = counted
    return calls


def test_a_flood_of_one_tenant_costs_no_redis_call_and_leaves_another_tenants_admission_immediate(
        redis_url, redis_prefix):
    a, b = f"flood-{uuid.uuid4()}", f"victim-{uuid.uuid4()}"
    inspect = redis.Redis.from_url(redis_url)

    async def scenario() -> None:
        rows = TenantRows(redis_url, redis_prefix, lease_s=10).start()
        try:
            for tenant in (a, b):  # a tenant new to the replica: its count is read once, then cached
                assert (await rows.admit(tenant, 1, CAP)).admitted
                rows.release(tenant, 1)
            await rows.synced()
            calls = _count_calls(rows)
            # 1,000 admissions of a at once, then b's: each decided in the process, none waits for I/O
            started = time.perf_counter()
            flood = [_admit_now(rows, a, 1) for _ in range(1000)]
            took_b = time.perf_counter()
            victim = _admit_now(rows, b, 2)
            took_b = time.perf_counter() - took_b
            assert calls == []  # no Redis call on the request path, for either tenant
            assert sum(x.admitted for x in flood) == CAP and flood[-1] == Admission(False, CAP)  # exact in-process
            # the old lock: ~0.5 s behind a's calls; 0.1 s leaves room for a process preempted on a loaded CI box
            assert victim == Admission(True, 0) and took_b < 0.1, took_b
            assert time.perf_counter() - started < 1.0
            for _ in range(CAP):
                rows.release(a, 1)  # releases are counted in the process too
            assert calls == [] and rows.total(a) == 0
            await rows.synced()  # one coalesced call: a's count went up and back down, so nothing of a's is written
            assert inspect.hget(rows.key(b), rows.replica) == b"2"
            assert not inspect.exists(rows.key(a))
            assert 1 <= len(calls) <= 3, calls  # the syncer's, not one per admission or release
            rows.release(b, 2)
            await rows.synced()
            assert not inspect.exists(rows.key(b))
        finally:
            await rows.aclose()

    try:
        asyncio.run(scenario())
    finally:
        inspect.close()


def test_two_replicas_see_each_others_rows_within_a_refresh_and_refuse_without_redis(redis_url, redis_prefix):
    tenant = f"shared-{uuid.uuid4()}"

    async def scenario() -> None:
        one, two = (TenantRows(redis_url, redis_prefix, lease_s=10).start() for _ in range(2))
        try:
            assert (await one.admit(tenant, 40, CAP)).admitted
            assert await two.admit(tenant, 1, CAP) is not None  # two now watches the tenant
            two.release(tenant, 1)
            await one.synced()  # one writes its 40...
            await two.synced()  # ...and two reads them back: a refresh interval at most without these waits
            assert two.total(tenant) == 40
            calls = _count_calls(two)
            assert _admit_now(two, tenant, 24) == Admission(True, 40)  # 40 + 24: the whole cap
            assert _admit_now(two, tenant, 1) == Admission(False, CAP)  # past it: refused in the process
            assert calls == []
            await two.synced()
            await one.synced()
            assert one.total(tenant) == CAP  # one sees two's rows too
            assert (await one.admit(tenant, 1, CAP)) == Admission(False, CAP)
        finally:
            await one.aclose()
            await two.aclose()

    asyncio.run(scenario())


def test_a_client_that_goes_away_during_a_first_read_leaves_the_others_under_the_cap(redis_url, redis_prefix):
    """Replica b has never seen the tenant, which holds its whole share on replica a; two requests reach b at once
    and the first one's client goes away while b's first read of the tenant is in flight. The read once ended with
    that caller, handing `False` (Redis unusable) to the other, which was then counted in the process only: past
    the tenant's cap across replicas (found by a stress hunt). The read is a task of its own now: the second
    request is refused as it would be without the cancel."""
    tenant = f"shared-{uuid.uuid4()}"

    async def scenario() -> None:
        a = TenantRows(redis_url, redis_prefix, lease_s=10).start()
        b = TenantRows(redis_url, redis_prefix, lease_s=10).start()
        try:
            assert (await a.admit(tenant, CAP, CAP)).admitted
            await a.synced()
            b._bind()
            script = b._script

            async def slow_round_trip(*args: Any, **kw: Any) -> Any:  # a Redis under load: the cancel lands mid-read
                await asyncio.sleep(0.05)
                return await script(*args, **kw)

            b._script = slow_round_trip
            first = asyncio.create_task(b.admit(tenant, 8, CAP))
            second = asyncio.create_task(b.admit(tenant, 8, CAP))
            await asyncio.sleep(0.01)
            first.cancel()  # the first client went away
            await asyncio.gather(first, return_exceptions=True)
            got = await second
            assert got == Admission(False, CAP), got  # refused at the cap, not counted as if Redis were down
            assert b._others.get(tenant) == CAP and not b._reads
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(scenario())
