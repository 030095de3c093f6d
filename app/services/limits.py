"""The per-tenant cap on prediction rows in flight, shared by every API replica through Redis (server mode), decided
without any Redis round trip on the request path.

- `TenantRows`: each replica owns one field per tenant in the hash `spafit:rows:<tenant>` (field = the replica's
  id, value = the rows it holds for that tenant) and a lease in the sorted set `spafit:rows-replicas` (member =
  replica id, score = lease expiry by the Redis clock). Admission is decided in the process: this replica's own
  rows of the tenant (exact) plus a cached sum of the OTHER live replicas' rows of it; the tenant gets the rows
  only if it stays within its cap (alone, a request larger than the cap still runs: a big fan-out, as in one
  process). A saturated tenant is refused without any I/O, and a release only changes the count in the process.
- One background task per replica (the syncer) does all the Redis work, one Lua script per call: it writes this
  replica's changed counts (coalesced: a count that went up and back down between two calls is not written; at
  most one call per fifth of `refresh_s` while counts change), renews the lease, drops the fields of replicas whose
  lease lapsed (a crashed replica's rows are freed within one lease), and reads back the other replicas' sums for
  every tenant seen here in the last `watch_s`. It calls every `refresh_s` (100 ms) while such tenants exist, at
  least every third of the lease otherwise. Every write states the replica's own count (an absolute value, never
  an increment), and every third of the lease it states all of them again, so a failed write or a Redis restarted
  empty is repaired by a later call, never carried forward as drift.
- The bound: the shared cap lags by the sync. A replica's admission sees another replica's rows once that replica
  has written them (within a fifth of `refresh_s` of the change, up to `refresh_s` on a loop that is busy) and this
  one has read them back (within `refresh_s`). So a tenant can exceed its cap across replicas by at most what the
  OTHER replicas admitted for it within about one refresh interval (two in the worst case: the flush and the read;
  ~0.2 s by default); within one replica the cap is exact. Rows freed on another replica are taken here only once
  two reads in a row show them free (the replica that freed them gets them back first), which makes that overshoot
  rare under a steady flood; a replica's own rows it gives back it can reuse at once.
- A tenant this replica has not seen for `watch_s` (or ever) is not in the cache: its first admission waits for one
  read of its count (shared by the requests that arrive meanwhile), then the tenant is watched again. A flood of
  one tenant never delays another's admissions: there is no lock and no queue of round trips on the request path.
- Redis unusable (down, slow past `REDIS_TIMEOUT_S`): the syncer (or that first read) notices, `admit` answers None
  and the caller counts the rows in its own process (the cap then holds per replica: fail open, logged once per
  outage, never a 500). The syncer keeps trying every second; its first success writes every count again and
  reads the others, and the shared cap is back.

Without Redis (embedded: one process) the caller counts in memory and this module is not used.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from ..settings import Settings

log = logging.getLogger("spafit.limits")

REDIS_TIMEOUT_S = 0.5  # a healthy Redis answers in well under a millisecond; past this, count in the process
REFRESH_S = 0.1  # how often the other replicas' counts are read back (the bound on the shared cap's lag)
WATCH_S = 60.0  # a tenant not admitted here for this long (and holding nothing here) leaves the cache

# KEYS[1] = the replicas' leases, KEYS[2..] = tenant hashes; ARGV[1] = replica, ARGV[2] = lease_ms, ARGV[3..] = the
# rows this replica holds for each tenant (-1: read only, 0: none, its field goes). Lapsed leases and their fields go
# first. Returns, per tenant, the rows the OTHER live replicas hold.
_SYNC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease * 3)
local out = {}
for i = 2, #KEYS do
  local rows = tonumber(ARGV[i + 1])
  if rows > 0 then
    redis.call('HSET', KEYS[i], ARGV[1], rows)
    redis.call('PEXPIRE', KEYS[i], lease * 3)
  elseif rows == 0 then
    redis.call('HDEL', KEYS[i], ARGV[1])
  end
  local others = 0
  local held = redis.call('HGETALL', KEYS[i])
  for j = 1, #held, 2 do
    if held[j] ~= ARGV[1] then
      if redis.call('ZSCORE', KEYS[1], held[j]) then
        others = others + tonumber(held[j + 1])
      else
        redis.call('HDEL', KEYS[i], held[j])
      end
    end
  end
  out[i - 1] = others
end
return out
"""


@dataclass(frozen=True)
class Admission:
    admitted: bool
    total: int  # the tenant's rows in flight across live replicas (as this replica knows them), before these


class TenantRows:
    """Rows in flight per tenant across API replicas (see the module docstring). Lives on one event loop (the
    server's): `start` the syncer and `admit` there; `release` from that loop or any thread; `close` once."""

    def __init__(self, redis_url: str, key_prefix: str = "", *, lease_s: float = 10.0,
                 timeout: float = REDIS_TIMEOUT_S, refresh_s: float = REFRESH_S, watch_s: float = WATCH_S):
        self.replica = uuid.uuid4().hex
        self.redis_url, self.key_prefix, self.lease_s, self.timeout = redis_url, key_prefix, lease_s, timeout
        self.refresh_s, self.watch_s = refresh_s, watch_s
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the client and the syncer live on
        self._redis: Any = None
        self._script: Any = None
        self._started = False
        # Changed under `_mutex` (admissions on the loop, releases from any thread); read by the syncer:
        self._mutex = threading.Lock()
        self._held: dict[str, int] = {}  # rows this replica holds, by tenant (exact)
        # The syncer's own state (on the loop):
        self._written: dict[str, int] = {}  # what Redis holds for this replica, as last written, by tenant
        self._unsure: set[str] = set()  # tenants whose last write may have failed: written again next call
        self._others: dict[str, int] = {}  # the other replicas' rows of each watched tenant, as admission uses them
        self._last_read: dict[str, int] = {}  # ...and as the last call read them
        self._seen: dict[str, float] = {}  # watched tenants -> when last admitted here (monotonic)
        self._reads: dict[str, asyncio.Task[bool]] = {}  # first reads of tenants not in the cache, shared while pending
        self._stated_at = 0.0  # when every count was last written again (monotonic)
        self._wake: asyncio.Event | None = None
        self._wake_pending = False
        self._waiters: list[asyncio.Future] = []  # `synced` callers: resolved after the next call
        self._down = False  # Redis failed: count in the process until the syncer reaches it again
        self._closed = False
        self._tasks: set[asyncio.Task] = set()  # the syncer and background leaves, kept until done

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

    def _bind(self) -> None:
        """The client of the running loop (made on first use; again if the loop changed, as in tests)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            import redis.asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # one retry at once (a pooled connection Redis closed); beyond that, fail open now, no backing off
            self._redis = redis.asyncio.Redis.from_url(self.redis_url, socket_connect_timeout=self.timeout,
                                                       socket_timeout=self.timeout, retry=Retry(NoBackoff(), 1))
            self._script = self._redis.register_script(_SYNC)
            self._loop, self._wake, self._wake_pending = loop, asyncio.Event(), False
            self._reads.clear()
            if self._started and not self._closed:
                self._spawn(self._sync_loop())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _nudge(self) -> None:
        """Wake the syncer (from the loop or any thread): this replica's counts changed."""
        loop, wake = self._loop, self._wake
        if self._wake_pending or loop is None or wake is None or loop.is_closed():
            return
        self._wake_pending = True
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            wake.set()
        else:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop closed meanwhile
                pass

    # ------------------------------------------------------------------------------------- admission
    async def admit(self, tenant: str, rows: int, cap: int) -> Admission | None:
        """Take `rows` for `tenant` if its rows across replicas stay within `cap` (or it has none); None when
        Redis cannot be used now (count them in the process instead; nothing was taken here). No I/O unless the
        tenant is new to this replica (see the module docstring)."""
        if self._closed or self._down:
            return None
        self._bind()
        if tenant not in self._others and not await self._first_read(tenant):
            return None
        with self._mutex:
            mine = self._held.get(tenant, 0)
            total = mine + self._others.get(tenant, 0)
            admitted = total == 0 or total + rows <= cap
            if admitted:
                self._held[tenant] = mine + rows
        self._seen[tenant] = time.monotonic()
        if not admitted:
            return Admission(False, total)
        self._nudge()
        return Admission(True, total)

    async def _first_read(self, tenant: str) -> bool:
        """Read the other replicas' rows of a tenant this replica does not watch (one read, shared by the requests
        that arrive meanwhile); False when Redis is unusable. The read is a task of its own: a caller whose client
        goes away stops waiting for it, and the others still get its answer (it once ended the read for all of
        them, who then counted their rows in the process as if Redis were down, past the tenant's cap)."""
        read = self._reads.get(tenant)
        if read is None:
            read = self._reads[tenant] = asyncio.get_running_loop().create_task(self._read_others(tenant))
            read.add_done_callback(lambda t, tenant=tenant: self._reads.pop(tenant, None)
                                   if self._reads.get(tenant) is t else None)
        return await asyncio.shield(read) and not self._down

    async def _read_others(self, tenant: str) -> bool:
        try:
            (others,) = await self._script(keys=[self.replicas_key, self.key(tenant)],
                                           args=[self.replica, int(self.lease_s * 1000), -1])
        except Exception as e:
            self._went_down(e)
            return False
        self._others[tenant] = self._last_read[tenant] = int(others)
        self._seen[tenant] = time.monotonic()
        return True

    def release(self, tenant: str, rows: int) -> None:
        """Give back rows an `Admission` took: counted at once here, written to Redis by the syncer. From the loop
        `admit` ran on, or any thread."""
        if self._closed:
            return
        with self._mutex:
            left = self._held.get(tenant, 0) - rows
            if left > 0:
                self._held[tenant] = left
            else:
                self._held.pop(tenant, None)
        self._nudge()

    def total(self, tenant: str) -> int:
        """The tenant's rows in flight across live replicas as this replica's admissions see them now."""
        with self._mutex:
            return self._held.get(tenant, 0) + self._others.get(tenant, 0)

    def _went_down(self, e: BaseException) -> None:
        if not self._down:
            log.warning("tenant row limits: Redis unreachable (%s: %s); each API process counts its own rows "
                        "until it is back", type(e).__name__, e)
        self._down = True  # until the syncer reaches Redis and has stated every count again

    # ------------------------------------------------------------------------------------- the syncer
    def start(self) -> TenantRows:
        """On the serving loop: start the syncer (writes, lease, reads; see the module docstring)."""
        self._started = True
        loop = self._loop
        self._bind()
        if loop is asyncio.get_running_loop():  # `_bind` started it when it bound a new loop
            self._spawn(self._sync_loop())
        return self

    async def synced(self) -> None:
        """Wait for one sync call that starts after now (tests: "one refresh interval later")."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._wake is not None:
            self._wake.set()
        await waiter

    async def _sync_loop(self) -> None:
        wake = self._wake
        assert wake is not None
        while not self._closed:
            if self._down:  # retry every second at most, whatever changes meanwhile
                await asyncio.sleep(min(1.0, self.lease_s / 3))
            else:
                idle = self.refresh_s if self._seen or self._held else self.lease_s / 3
                try:
                    await asyncio.wait_for(wake.wait(), idle)
                except TimeoutError:
                    pass
            wake.clear()
            self._wake_pending = False
            if self._closed:
                return
            await self._sync()
            if not self._down:
                await asyncio.sleep(self.refresh_s / 5)  # changes that land meanwhile go in the next call together

    async def _sync(self) -> None:
        waiters, self._waiters = self._waiters, []
        now = time.monotonic()
        with self._mutex:
            held = dict(self._held)
        for tenant, at in list(self._seen.items()):  # tenants idle here for `watch_s` leave the cache
            if now - at > self.watch_s and tenant not in held:
                del self._seen[tenant]
                self._others.pop(tenant, None)
                self._last_read.pop(tenant, None)
        restate = self._down or now - self._stated_at >= self.lease_s / 3  # every count again
        writes = {}  # tenant -> the rows to state (0: the field goes)
        for tenant in held.keys() | self._written.keys() | self._unsure:
            rows = held.get(tenant, 0)
            if restate or tenant in self._unsure or rows != self._written.get(tenant, 0):
                writes[tenant] = rows
        tenants = sorted(writes.keys() | self._seen.keys())
        try:
            others = await self._script(keys=[self.replicas_key, *map(self.key, tenants)],
                                        args=[self.replica, int(self.lease_s * 1000),
                                              *(writes.get(t, -1) for t in tenants)])
        except BaseException as e:
            self._unsure |= writes.keys()  # written or not: stated again by the next call that succeeds
            if not isinstance(e, asyncio.CancelledError):
                self._went_down(e)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        for tenant, rows in writes.items():
            if rows > 0:
                self._written[tenant] = rows
            else:
                self._written.pop(tenant, None)
        self._unsure.clear()
        if restate:
            self._stated_at = now
        for tenant, count in zip(tenants, others, strict=True):
            count = int(count)
            if tenant in self._seen:
                # A drop is used once two reads in a row show it (the replica that freed the rows reuses them
                # first); a rise at once.
                self._others[tenant] = max(count, self._last_read.get(tenant, count))
                self._last_read[tenant] = count
        if self._down:
            log.info("tenant row limits: Redis reachable again; the per-tenant cap holds across replicas again")
            self._down = False
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def aclose(self) -> None:
        """Leave: this replica's lease and fields go now (rows still in flight here are not counted any more)."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        if self._redis is None:
            return
        try:
            pipe = self._redis.pipeline()
            for tenant in self._held.keys() | self._written.keys() | self._unsure:
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
