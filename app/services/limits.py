"""The per-tenant cap on prediction rows in flight, shared by every API replica through Redis (server mode).

- `TenantRows`: each replica owns one field per tenant in the hash `spafit:rows:<tenant>` (field = the replica's
  id, value = the rows it holds for that tenant) and a lease in the sorted set `spafit:rows-replicas` (member =
  replica id, score = lease expiry by the Redis clock, renewed every third of `tenant_rows_lease_s` by a
  heartbeat thread). Admission is one Lua script: it drops the fields of replicas whose lease lapsed (a crashed
  replica's rows are freed within one lease), sums the rest and takes the rows only if the tenant stays within
  its cap; alone, a request larger than the cap still runs (a big fan-out), as in one process.
- Every write states the replica's own count (HSET of an absolute value, never an increment): a replica's
  Redis calls run one at a time (an asyncio lock, on the event loop: no thread hop on the predict path), next
  to the count they state, so a write that failed or a lease that lapsed is repaired by the next write or
  heartbeat, never carried forward as drift.
- Redis unusable (down, slow past `REDIS_TIMEOUT_S`): `admit` answers None and the caller counts the rows in
  its own process (the cap then holds per replica: fail open, logged once per outage, never a 500). The
  heartbeat keeps trying; its first success writes every count again and the shared cap is back.

Without Redis (embedded: one process) the caller counts in memory and this module is not used.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from ..settings import Settings

log = logging.getLogger("spafit.limits")

REDIS_TIMEOUT_S = 0.5  # a healthy Redis answers in well under a millisecond; past this, count in the process

# KEYS[1] = the tenant's hash, KEYS[2] = the replicas' leases; ARGV = replica, rows, cap, lease_ms, rows this
# replica holds for the tenant already. Returns {1 admitted / 0 refused, the tenant's rows across live replicas
# before these}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[4])
redis.call('ZADD', KEYS[2], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[2], lease * 3)
local total = tonumber(ARGV[5])
local held = redis.call('HGETALL', KEYS[1])
for i = 1, #held, 2 do
  if held[i] ~= ARGV[1] then
    local expiry = redis.call('ZSCORE', KEYS[2], held[i])
    if expiry and tonumber(expiry) > now then
      total = total + tonumber(held[i + 1])
    else
      redis.call('HDEL', KEYS[1], held[i])
    end
  end
end
local rows = tonumber(ARGV[2])
if total > 0 and total + rows > tonumber(ARGV[3]) then
  return {0, total}
end
redis.call('HSET', KEYS[1], ARGV[1], tonumber(ARGV[5]) + rows)
redis.call('PEXPIRE', KEYS[1], lease * 3)
return {1, total}
"""
# KEYS[1] = the replicas' leases, KEYS[2..] = tenant hashes; ARGV[1] = replica, ARGV[2] = lease_ms, ARGV[3..] =
# the rows this replica holds for each tenant (0: none, its field goes). Lapsed leases go first.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease * 3)
for i = 2, #KEYS do
  local rows = tonumber(ARGV[i + 1])
  if rows > 0 then
    redis.call('HSET', KEYS[i], ARGV[1], rows)
    redis.call('PEXPIRE', KEYS[i], lease * 3)
  else
    redis.call('HDEL', KEYS[i], ARGV[1])
  end
end
return 1
"""


@dataclass(frozen=True)
class Admission:
    admitted: bool
    total: int  # the tenant's rows in flight across live replicas, before these


class TenantRows:
    """Rows in flight per tenant across API replicas (see the module docstring). Lives on one event loop (the
    server's): `start` the heartbeat and `admit` there; `release` from that loop or any thread; `close` once."""

    def __init__(self, redis_url: str, key_prefix: str = "", *, lease_s: float = 10.0,
                 timeout: float = REDIS_TIMEOUT_S):
        self.replica = uuid.uuid4().hex
        self.redis_url, self.key_prefix, self.lease_s, self.timeout = redis_url, key_prefix, lease_s, timeout
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the client, lock and heartbeat live on
        self._redis: Any = None
        self._lock: asyncio.Lock | None = None
        # Only changed under the lock, next to the Redis write that states them:
        self._held: dict[str, int] = {}  # rows this replica holds in Redis, by tenant
        self._stale: set[str] = set()  # tenants whose last write may have failed: the next heartbeat rewrites them
        self._down = False  # Redis failed: count in the process until a heartbeat reaches it again
        self._closed = False
        self._tasks: set[asyncio.Task] = set()  # releases and the heartbeat, kept until done

    @classmethod
    def from_settings(cls, settings: Settings) -> TenantRows | None:
        """The shared counter in server mode with Redis; None otherwise (the caller counts in its process)."""
        if settings.mode != "server" or not settings.redis_url:
            if settings.mode == "server":
                log.warning("no Redis (SPAFIT_REDIS_URL): the per-tenant cap on prediction rows holds per API "
                            "process, not across replicas")
            return None
        return cls(settings.redis_url, settings.broker_key_prefix, lease_s=settings.tenant_rows_lease_s)

    def key(self, tenant: str) -> str:
        return f"{self.key_prefix}spafit:rows:{tenant}"

    @property
    def replicas_key(self) -> str:
        return f"{self.key_prefix}spafit:rows-replicas"

    def _bind(self) -> asyncio.Lock:
        """The client and lock of the running loop (made on first use; again if the loop changed, as in tests)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._lock is None:
            import redis.asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # one retry at once (a pooled connection Redis closed); beyond that, fail open now, no backing off
            self._redis = redis.asyncio.Redis.from_url(self.redis_url, socket_connect_timeout=self.timeout,
                                                       socket_timeout=self.timeout, retry=Retry(NoBackoff(), 1))
            self._admit_script = self._redis.register_script(_ADMIT)
            self._beat_script = self._redis.register_script(_BEAT)
            self._loop, self._lock = loop, asyncio.Lock()
        return self._lock

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------------------- admission
    async def admit(self, tenant: str, rows: int, cap: int) -> Admission | None:
        """Take `rows` for `tenant` if its rows across replicas stay within `cap` (or it has none); None when
        Redis cannot be used now (count them in the process instead; nothing was taken here)."""
        if self._closed or self._down:
            return None
        async with self._bind():
            if self._down:  # found down while this call waited its turn
                return None
            mine = self._held.get(tenant, 0)
            try:
                ok, total = await self._admit_script(keys=[self.key(tenant), self.replicas_key],
                                                     args=[self.replica, rows, cap, int(self.lease_s * 1000), mine])
            except asyncio.CancelledError:  # the request went away mid-call: the heartbeat states the count again
                self._stale.add(tenant)
                raise
            except Exception as e:  # the rows may or may not be written: the heartbeat states them again
                self._stale.add(tenant)
                self._went_down(e)
                return None
            if ok:
                self._held[tenant] = mine + rows
            return Admission(bool(ok), int(total))

    def release(self, tenant: str, rows: int) -> None:
        """Give back rows an `Admission` took: written in the background, in turn with the other calls. From the
        loop `admit` ran on, or any thread while that loop runs."""
        loop = self._loop
        if self._closed or loop is None or loop.is_closed():
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._spawn(self._release(tenant, rows))
        else:
            loop.call_soon_threadsafe(lambda: self._spawn(self._release(tenant, rows)))

    async def _release(self, tenant: str, rows: int) -> None:
        async with self._bind():
            left = self._held.get(tenant, 0) - rows
            if left > 0:
                self._held[tenant] = left
            else:
                self._held.pop(tenant, None)
            if self._down or self._closed:
                self._stale.add(tenant)
                return
            try:
                if left > 0:
                    await self._redis.hset(self.key(tenant), self.replica, left)
                else:
                    await self._redis.hdel(self.key(tenant), self.replica)
                self._stale.discard(tenant)
            except Exception as e:
                self._stale.add(tenant)
                self._went_down(e)

    def _went_down(self, e: Exception) -> None:
        if not self._down:
            log.warning("tenant row limits: Redis unreachable (%s: %s); each API process counts its own rows "
                        "until it is back", type(e).__name__, e)
        self._down = True  # until a heartbeat reaches Redis and has stated every count again

    # ------------------------------------------------------------------------------------- heartbeat
    def start(self) -> TenantRows:
        """On the serving loop: renew this replica's lease every third of the lease (and repair what a failed
        write left); while Redis is down, try it every second at most."""
        self._bind()
        self._spawn(self._beat_loop())
        return self

    async def _beat_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(min(1.0, self.lease_s / 3) if self._down else self.lease_s / 3)
            if not self._closed:
                await self._beat()

    async def _beat(self) -> None:
        async with self._bind():
            tenants = sorted(self._held.keys() | self._stale)
            try:
                await self._beat_script(keys=[self.replicas_key, *map(self.key, tenants)],
                                        args=[self.replica, int(self.lease_s * 1000),
                                              *(self._held.get(t, 0) for t in tenants)])
            except Exception as e:
                self._went_down(e)
                return
            self._stale.clear()
            if self._down:
                log.info("tenant row limits: Redis reachable again; the per-tenant cap holds across replicas again")
                self._down = False

    async def aclose(self) -> None:
        """Leave: this replica's lease and fields go now (rows still in flight here are not counted any more)."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._redis is None:
            return
        try:
            async with self._bind():
                pipe = self._redis.pipeline()
                for tenant in self._held.keys() | self._stale:
                    pipe.hdel(self.key(tenant), self.replica)
                pipe.zrem(self.replicas_key, self.replica)
                await pipe.execute()
        except Exception:  # they lapse with the lease
            log.warning("tenant row limits: could not leave cleanly", exc_info=True)
        finally:
            await self._redis.aclose()

    def close(self) -> None:
        """`aclose` from a thread other than the loop's (as `Serving.stop` runs), while the loop still runs."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            self._closed = True
            return
        try:
            if asyncio.get_running_loop() is loop:  # on the loop itself: leave in the background
                self._spawn(self.aclose())
                return
        except RuntimeError:  # no loop in this thread: the usual case
            pass
        try:
            asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(timeout=5)
        except Exception:
            log.warning("tenant row limits: could not leave cleanly", exc_info=True)
