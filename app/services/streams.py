"""Live job event streams (server-sent events) that cost nothing while they wait.

- `EventHub`: one poller per API process. Every `sse_poll_interval_s` it asks the database, in one short
  query, for the newest seq and the status of every job some stream is watching, and wakes the streams whose
  job moved. A stream reads its new events in a short session of its own; between reads it holds no session,
  no pooled connection and no thread.
- `StreamSlots`: the per-tenant cap on open streams. In server mode the slots live in Redis (one sorted set
  per tenant, member = stream, score = lease expiry by the Redis clock), so the cap holds across API replicas;
  each stream renews its lease while it is open, and the lease of a process that died expires by itself.
  Without Redis (embedded: one process) the slots are counted in memory.
- `event_stream()`: the text/event-stream body. It sends `id: <seq>` with every event, a `: ping` comment
  when quiet, `event: end` once the job is final and every event was sent, and `event: reconnect` when it
  has been open `sse_max_duration_s` or the server is shutting down (the client then resumes with
  `Last-Event-ID`; nothing is lost or repeated because the client asks for the events after the last id it saw).

A client that goes away is noticed by Starlette (ASGI 2.3: it listens for `http.disconnect` and cancels the
body) or, at the latest, by the next ping's failed write; either way the stream's slot is released.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from ..db import Database
from ..errors import InvalidInput, TooManyStreams
from ..models import JOB_FINAL_STATUSES, Job, JobEvent
from ..schemas import DB_INT_MAX
from ..settings import Settings
from . import events

log = logging.getLogger("spafit.streams")

READ_BATCH = 500  # events read (and sent) per round trip
GONE = "gone"  # the status of a job that was deleted while a stream watched it


def parse_last_event_id(value: str | None) -> int | None:
    """The `Last-Event-ID` header as a seq: absent or empty -> None; anything but a decimal integer in
    0..DB_INT_MAX -> 422 (a very long one included: checked by length before it is converted)."""
    if value is None or value == "":
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > len(str(DB_INT_MAX)) or int(text) > DB_INT_MAX:
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise InvalidInput(f"Last-Event-ID must be the integer id (seq) of an event, 0 to {DB_INT_MAX}; "
                           f"got {shown!r}", field="Last-Event-ID")
    return int(text)


# ------------------------------------------------------------------------------------------------ hub
@dataclass
class _Watch:
    refs: int = 0
    max_seq: int = -1  # unknown until the first poll
    status: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def news_after(self, seq: int) -> bool:
        return self.max_seq > seq or self.status in JOB_FINAL_STATUSES or self.status == GONE


class EventHub:
    """Wakes streams when their job has new events or ends (see the module docstring)."""

    def __init__(self, db: Database, interval: float):
        self.db, self.interval = db, interval
        self._watches: dict[uuid.UUID, _Watch] = {}
        self._task: asyncio.Task | None = None
        self.closing = False  # the server is shutting down: every stream ends now

    def close(self) -> None:
        """End every open stream (with `reconnect`, reason `shutdown`) and every stream opened from now on.
        Runs on the event loop."""
        self.closing = True
        for w in self._watches.values():
            w.changed.set()
            w.changed = asyncio.Event()

    @contextmanager
    def watch(self, job_id: uuid.UUID) -> Iterator[_Watch]:
        w = self._watches.setdefault(job_id, _Watch())
        w.refs += 1
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._run(), name="spafit-event-hub")
        try:
            yield w
        finally:
            w.refs -= 1
            if w.refs <= 0 and self._watches.get(job_id) is w:
                del self._watches[job_id]

    async def wait(self, w: _Watch, seq: int, timeout: float) -> bool:
        """True as soon as the job has an event after `seq` or ended (as far as the last poll saw);
        False after `timeout` seconds without news."""
        deadline = time.monotonic() + timeout
        while not w.news_after(seq) and not self.closing:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(w.changed.wait(), left)
            except TimeoutError:
                return False
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self._watches:
                self._task = None  # the next watch() starts a new poller
                return
            ids = list(self._watches)
            try:
                states = await run_in_threadpool(self._poll, ids)
            except Exception:  # the database may be away: streams keep pinging, the next poll retries
                log.warning("event hub poll failed", exc_info=True)
                continue
            for job_id in ids:
                w = self._watches.get(job_id)
                if w is None:
                    continue
                max_seq, status = states.get(job_id, (w.max_seq, GONE))
                if (max_seq, status) != (w.max_seq, w.status):
                    w.max_seq, w.status = max_seq, status
                    w.changed.set()
                    w.changed = asyncio.Event()

    def _poll(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[int, str]]:
        newest = select(func.coalesce(func.max(JobEvent.seq), 0)).where(JobEvent.job_id == Job.id) \
            .correlate(Job).scalar_subquery()
        out: dict[uuid.UUID, tuple[int, str]] = {}
        with self.db.session() as s:
            for i in range(0, len(ids), 500):
                rows = s.execute(select(Job.id, newest, Job.status).where(Job.id.in_(ids[i:i + 500]))).all()
                out.update({job_id: (max_seq, status) for job_id, max_seq, status in rows})
        return out


# ---------------------------------------------------------------------------------------------- slots
class Lease:
    """One open stream's slot; `renew()` while open, `release()` once (idempotent)."""

    def __init__(self, slots: StreamSlots, tenant_id: uuid.UUID):
        self.slots, self.tenant_id, self.id = slots, tenant_id, uuid.uuid4().hex
        self.renew_at = time.monotonic() + slots.ttl / 3
        self.released = False
        self.local = slots._redis is None  # counted in this process (embedded, or Redis unreachable)

    async def renew(self) -> None:
        self.renew_at = time.monotonic() + self.slots.ttl / 3
        try:
            await self.slots.renew(self)
        except Exception:  # Redis away: the slot may lapse, the stream itself goes on
            log.warning("could not renew event stream slot", exc_info=True)

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        try:
            await self.slots.release(self)
        except Exception:  # it lapses by itself within the slots' ttl
            log.warning("could not release event stream slot", exc_info=True)


# KEYS[1] = the tenant's sorted set; ARGV = member, cap, ttl_ms. Expired members (their process died) go first;
# scores are expiry times by the Redis server's clock, the same for every replica. Returns {1, 0} when the slot
# was taken, else {0, ms until the oldest lease would lapse}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(first[2]) - now}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
return {1, 0}
"""
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return 1
"""


class StreamSlots:
    """At most `cap` open streams per tenant: in Redis (all replicas) when `redis_url` is set, else in memory.
    If Redis cannot be reached when a stream opens, that stream is counted in memory instead (the cap then
    holds per process): streams cost the database nothing, so refusing them all would buy nothing."""

    def __init__(self, cap: int, redis_url: str | None = None, key_prefix: str = "", *, ttl: float = 30.0,
                 timeout: float = 3.0):
        self.cap, self.ttl = cap, ttl
        self.key_prefix = key_prefix
        self._local: dict[uuid.UUID, set[str]] = {}
        self._redis: Any = None
        if redis_url:
            import redis

            self._redis = redis.Redis.from_url(redis_url, socket_connect_timeout=timeout, socket_timeout=timeout)
            self._acquire = self._redis.register_script(_ACQUIRE)
            self._renew = self._redis.register_script(_RENEW)

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamSlots:
        if settings.mode == "server" and not settings.redis_url:
            log.warning("no Redis (SPAFIT_REDIS_URL): the cap on open event streams holds per API process, "
                        "not across replicas")
        return cls(settings.sse_max_streams_per_tenant, settings.redis_url, settings.broker_key_prefix,
                   ttl=settings.sse_slot_ttl_s, timeout=settings.readiness_timeout)

    def key(self, tenant_id: uuid.UUID) -> str:
        return f"{self.key_prefix}spafit:sse:{tenant_id}"

    async def acquire(self, tenant_id: uuid.UUID) -> Lease:
        """A slot for a new stream of `tenant_id`, or `TooManyStreams` (429 with Retry-After)."""
        lease = Lease(self, tenant_id)
        ok, wait_ms = False, self.ttl * 1000
        if not lease.local:
            try:
                ok, wait_ms = await run_in_threadpool(lambda: self._acquire(
                    keys=[self.key(tenant_id)], args=[lease.id, self.cap, int(self.ttl * 1000)]))
            except Exception:
                log.warning("stream slots: Redis unreachable; counting this stream in this process", exc_info=True)
                lease.local = True
        if lease.local:
            held = self._local.setdefault(tenant_id, set())
            ok = len(held) < self.cap
            if ok:
                held.add(lease.id)
        if not ok:
            retry_after = max(1, min(int(self.ttl), round(int(wait_ms) / 1000)))
            raise TooManyStreams(f"this tenant already has {self.cap} live event streams open "
                                 "(SPAFIT_SSE_MAX_STREAMS_PER_TENANT); close one, or read events with plain "
                                 "GET /v1/jobs/{id}/events?after=N", limit=self.cap,
                                 headers={"Retry-After": str(retry_after)})
        return lease

    async def renew(self, lease: Lease) -> None:
        if not lease.local and not lease.released:
            await run_in_threadpool(
                lambda: self._renew(keys=[self.key(lease.tenant_id)], args=[lease.id, int(self.ttl * 1000)]))

    async def release(self, lease: Lease) -> None:
        if lease.local:
            held = self._local.get(lease.tenant_id)
            if held is not None:
                held.discard(lease.id)
                if not held:
                    del self._local[lease.tenant_id]
        else:
            await run_in_threadpool(self._redis.zrem, self.key(lease.tenant_id), lease.id)

    def open_count(self, tenant_id: uuid.UUID) -> int:
        """Live slots of `tenant_id` (expired leases not counted; in Redis plus any counted here)."""
        local = len(self._local.get(tenant_id, ()))
        if self._redis is None:
            return local
        t = self._redis.time()
        return local + int(self._redis.zcount(self.key(tenant_id), t[0] * 1000 + t[1] // 1000, "+inf"))

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()


# --------------------------------------------------------------------------------------------- stream
def _read(db: Database, job_id: uuid.UUID, after: int) -> tuple[str, list[tuple[int, str, Any, str]]]:
    """The job's status, then its events after `after`, in one short session. The status is read FIRST: a
    final status and its event are committed together, so a final status seen here means every event up to
    it is visible to the second query (reading them the other way round could end a stream one event short)."""
    with db.session() as s:
        status = s.scalar(select(Job.status).where(Job.id == job_id))
        if status is None:
            return GONE, []
        rows = events.after(s, job_id, after, READ_BATCH)
        return status, [(e.seq, e.type, e.data, e.created_at.isoformat()) for e in rows]


def _sse(event: str, data: Any, id: int | None = None) -> str:
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def event_stream(db: Database, hub: EventHub, lease: Lease, job_id: uuid.UUID, after: int,
                       settings: Settings, allowed: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[str]:
    """The body of a live stream: events with seq > `after` until the job ends or the stream's time is up.
    `allowed`: checked before each batch of events is sent; once False (the key was revoked), the stream ends
    with `reconnect` (reason `unauthorized`: the client's next request gets the 401)."""
    opened = time.monotonic()
    deadline = opened + settings.sse_max_duration_s
    last_write = opened
    seq = after
    with hub.watch(job_id) as watch:
        while True:
            try:
                status, rows = await run_in_threadpool(_read, db, job_id, seq)
            except SQLAlchemyError:  # the database is away: let the client come back (it resumes from seq)
                log.warning("event stream of job %s: read failed; asking the client to reconnect", job_id,
                            exc_info=True)
                await lease.release()
                yield _sse("reconnect", {"last_event_id": seq, "reason": "database-unavailable"})
                return
            if allowed is not None and not await allowed():
                await lease.release()
                yield _sse("reconnect", {"last_event_id": seq, "reason": "unauthorized"})
                return
            for e_seq, e_type, data, created in rows:
                seq = e_seq
                yield _sse(e_type, {"seq": e_seq, "type": e_type, "data": data, "created_at": created}, id=e_seq)
            if rows:
                last_write = time.monotonic()
            if not rows and (status in JOB_FINAL_STATUSES or status == GONE):
                await lease.release()  # before the client can hear the end and open its next stream
                yield _sse("end", {"status": None if status == GONE else status, "last_event_id": seq})
                return
            now = time.monotonic()
            if now >= deadline or hub.closing:
                await lease.release()  # the client reconnects as soon as it reads this: free the slot first
                yield _sse("reconnect", {"last_event_id": seq, "reason": "shutdown" if hub.closing else "max-duration"})
                return
            if now >= lease.renew_at:  # also while sending batch after batch: the slot must not lapse
                await lease.renew()
            if len(rows) == READ_BATCH:
                continue  # more waiting: read on at once
            wake = min(deadline, last_write + settings.sse_ping_interval_s, lease.renew_at)
            if not await hub.wait(watch, seq, max(0.0, wake - time.monotonic())):
                now = time.monotonic()
                if now >= last_write + settings.sse_ping_interval_s and now < deadline:
                    yield ": ping\n\n"
                    last_write = now


def end_streams_on_shutdown(hub: EventHub) -> Callable[[], None]:
    """Chain a SIGTERM/SIGINT handler in front of the server's own: the open streams end at once with `reconnect`
    (reason `shutdown`; the clients resume on another replica) instead of holding the server's graceful shutdown
    for up to `sse_max_duration_s`. Only in the main thread (where uvicorn runs its loop); returns a function that
    puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(hub.close)  # signal handlers must not touch the loop's objects directly
        prev = previous.get(signum)
        if callable(prev):
            prev(signum, frame)
        elif prev in (signal.SIG_DFL, None):  # the default action (terminate), as if we were not here
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, prev in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)

    return restore


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response that gives its stream slot back however it ends (finished, the client
    gone, an error, or never started). A client that stops reading is dropped once one write has waited
    longer than a slot lease (`sse_slot_ttl_s`): its slot would have lapsed by then, and an unread stream
    must not stay open uncounted."""

    def __init__(self, content: AsyncIterator[str], lease: Lease, open_gauge: Any = None):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.lease = lease
        self.open_gauge = open_gauge  # spafit_event_streams_open, if given

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_in_time(message: Message) -> None:
            with anyio.fail_after(self.lease.slots.ttl):
                await send(message)

        if self.open_gauge is not None:
            self.open_gauge.inc()
        try:
            await super().__call__(scope, receive, send_in_time)
        except* TimeoutError:
            log.info("event stream dropped: its client read nothing for %.0fs", self.lease.slots.ttl)
        finally:
            if self.open_gauge is not None:
                self.open_gauge.dec()
            with anyio.CancelScope(shield=True):
                await self.lease.release()
                await self.body_iterator.aclose()  # its job leaves the hub now, not when it is collected
