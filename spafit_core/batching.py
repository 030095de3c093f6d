"""Dynamic micro-batching of concurrent prediction requests onto the engine, fair between tenants and
isolated between requests.

Requests are queued as they come (their adapter resolved by the caller), each input cut to what its first
`max_seq_length` tokens need (`cut_input`: a 20,000-character input costs the tokenizer what a 512-word one does),
and tokenised by the worker thread in batches: everything that arrived since its last pass in one call of the fast
tokenizer per (backbone, length limit, kind of input), off the event loop. A request still over
BATCH_TOKENIZE_CHARS goes to the big-request lane instead: one thread, chunks of about that size, the tenants in
turn, so a tenant's huge inputs wait for its own turns. Rows then join one queue per tenant. Admission is bounded twice:
a tenant past `max_queue_per_tenant` waiting rows is refused (TenantOverloadedError: that tenant retries later),
and the whole queue past `max_queue` rows is refused (OverloadedError). One worker thread drains the queues by
deficit round robin: each tenant in turn may take rows worth `quantum x weight` tokens (a row costs its
length, so long inputs use up a share faster than short ones), and a tenant's backlog delays only itself. A tenant
whose queue was empty when its rows arrived is served first, for one quantum (fq_codel's sparse flows), so a light
tenant's rows go into the very next pass whatever a flooding tenant has queued; while such a tenant is being served,
passes take at most `shared_batch_size` rows of the backlogged tenants, so what it waits for (the pass in flight,
then its own) stays small on a CPU, where a pass costs about its rows. When its last batch was full or left rows
waiting (saturated), it waits up to `max_wait_ms` for company (otherwise it does not wait: a lone request costs the
one-row forward), then packs what it took (at most `max_batch_size` rows, sorted by length, within `max_tokens`
padded tokens) into mixed-task forward passes.

Invariants a caller may rely on:
- a request's rows are dropped, not run, once its future is done (cancelled: the client went away or timed
  out; failed) or its deadline passed (RequestTimeoutError);
- a failing forward pass is retried per adapter group, then per row: only the requests whose own rows fail
  get an error (PredictionFailedError, or the engine's own SpafitError); the others get their answer;
- the worker loop survives any exception (a cancellation racing `set_result` included); if its thread dies
  anyway, `alive` says so and `ensure_running()` starts a new one on the same queues.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .engine import Engine, Input, Row
from .errors import (
    OverloadedError,
    PredictionFailedError,
    RequestTimeoutError,
    SpafitError,
    TenantOverloadedError,
)
from .outputs import postprocess
from .textcut import _cut_side, cut_input, cut_text  # noqa: F401  (importable from here too)

log = logging.getLogger("spafit.batching")

# Debug mode: with SPAFIT_BATCH_TRACE set to a file path, each request answered by `predict` appends one JSON line
# there with the monotonic times of its stages (see `_Request.marks`), to find where a request's latency goes.
TRACE_PATH = os.environ.get("SPAFIT_BATCH_TRACE") or None

# A request with more characters than this (after `cut_input`) is not tokenised in the worker's batches: it goes
# to the big-request lane, one thread that tokenises such requests in chunks of about this many characters, taking
# the tenants in turn, so that one tenant's huge inputs delay another's (big) requests by at most one chunk, and
# never hold up the worker's batches or the submitter threads every request goes through.
BATCH_TOKENIZE_CHARS = 16_384

@dataclass
class BatchingConfig:
    max_batch_size: int = 32
    max_wait_ms: float = 5.0  # how long the first row of a batch waits for company
    max_tokens: int = 16384  # rows x padded length per forward pass
    max_queue: int = 2048  # rows waiting, all tenants; beyond this requests are refused as overload
    max_queue_per_tenant: int | None = None  # rows waiting of one tenant (None: max_queue)
    quantum: int = 512  # tokens (a row costs its length) a tenant of weight 1 may take per turn of the round robin
    weights: dict[str, float] = field(default_factory=dict)  # tenant -> weight (default 1)
    # Most rows a forward pass takes from backlogged tenants while a light tenant is being served (one whose rows
    # went into a pass within `shared_window_s` and left its queue empty): the rows such a tenant sends next wait
    # for at most one pass this small, then run in the next one. On a CPU a pass costs about its rows, so 32-row
    # passes of a flooding tenant would cost a light one two long passes per request. None: no bound (on a GPU,
    # where a pass costs about the same whatever its rows, set it to max_batch_size or None).
    shared_batch_size: int | None = 4
    shared_window_s: float = 1.0
    timeout_s: float = 30.0  # per request, from submission

    def weight(self, tenant: str) -> float:
        return max(self.weights.get(tenant, 1.0), 1e-3)  # a zero weight would never be served



@dataclass(eq=False)
class _Request:
    adapter_name: str
    top_k: int | None
    deadline: float
    future: Future
    results: list[Any]
    remaining: int
    tenant: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Debug mode only (TRACE_PATH): stage -> time.monotonic() of its first occurrence: "queued" (tokenised, in its
    # tenant's queue), "taken" (by the round robin), "forward" / "forward_end" (its first pass), "resolved".
    marks: dict[str, Any] | None = None

    def mark(self, stage: str, **extra: Any) -> None:
        if self.marks is not None and stage not in self.marks:
            self.marks[stage] = time.monotonic()
            self.marks.update(extra)


@dataclass(eq=False)
class _Pending:
    """A request whose rows are not tokenised yet (they count as waiting rows of its tenant already)."""

    request: _Request
    adapter: Any  # the engine's LoadedAdapter
    inputs: list[Input]  # cut (`cut_input`): what the tokenizer needs of them, no more
    made: list[dict] = field(default_factory=list)  # big-request lane: the rows of the chunks tokenised so far


@dataclass
class _Item:
    request: _Request
    index: int
    row: Row

    @property
    def length(self) -> int:
        return len(self.row.features["input_ids"])


class MicroBatcher:
    def __init__(self, engine: Engine, config: BatchingConfig | None = None,
                 on_batch: Callable[[int, int, float], None] | None = None):
        self.engine = engine
        self.config = config or BatchingConfig()
        self.on_batch = on_batch  # (rows, padded tokens, seconds) after each forward pass
        self._queues: dict[str, deque[_Item]] = {}  # tenant -> its rows, oldest first
        self._pending: list[_Pending] = []  # requests queued and not tokenised yet, oldest first
        self._pending_rows: Counter[str] = Counter()  # their rows, by tenant (part of `_rows`)
        self._ring: deque[str] = deque()  # tenants with a backlog, in serving order (the round robin)
        # Tenants whose queue was empty until their rows arrived, served before the round robin (the sparse-flow
        # rule of fq_codel): each with one quantum; one that uses it up without emptying its queue joins the ring.
        self._new: deque[str] = deque()
        self._fresh: set[str] = set()  # those of `_new` whose rows arrived since the last pass was taken
        self._light_at = float("-inf")  # when a pass holding all a new tenant had waiting last ended
        self._light_taken = False  # the rows `_take` returned last hold such a tenant's
        self._deficit: dict[str, float] = {}
        self._in_turn = False  # the tenant at the head of the ring is in the middle of its turn
        self._saturated = False  # the last batch was full or left rows waiting: worth waiting for company
        self._rows = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.stats = {"batches": 0, "rows": 0, "timeouts": 0, "overloads": 0, "tenant_overloads": 0,
                      "dropped": 0, "retries": 0, "failed_rows": 0, "loop_errors": 0, "restarts": 0,
                      "turns": 0, "skipped_rounds": 0}
        self._served: Counter[str] = Counter()  # rows run, by tenant (under the lock)
        # The big-request lane (see BATCH_TOKENIZE_CHARS): tenant -> its big requests not tokenised yet, oldest
        # first; the tenants with some, in turn (one chunk a turn); the lane's thread, started when work comes.
        self._lane: dict[str, deque[_Pending]] = {}
        self._lane_ring: deque[str] = deque()
        self._lane_thread: threading.Thread | None = None
        # Adapter loads on a miss, for `predict`: threads of their own, so that waiting for them
        # never queues behind other work on the event loop's default executor.
        self._submitter = _submitter()

    # -- lifecycle
    def start(self) -> MicroBatcher:
        with self._cond:
            if self._thread is None:
                self._running = True
                if self._submitter._shutdown:  # stopped before: a new pool
                    self._submitter = _submitter()
                self._spawn()
                if self._lane_ring and (self._lane_thread is None or not self._lane_thread.is_alive()):
                    self._spawn_lane()
        return self

    def _spawn(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="spafit-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=10)
        with self._cond:
            self._thread = None
        self._submitter.shutdown(wait=False, cancel_futures=True)

    @property
    def alive(self) -> bool:
        """The worker thread is running (False once stopped, or if it died)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def ensure_running(self) -> bool:
        """Start a new worker thread if a started batcher's thread died; True if it did."""
        with self._cond:
            if not self._running or self.alive:
                return False
            self.stats["restarts"] += 1
            log.error("the batcher thread had died: restarted (%d rows waiting)", self._rows)
            self._spawn()
            return True

    @property
    def served(self) -> Counter[str]:
        """Rows run so far, by tenant (a copy)."""
        with self._cond:
            return Counter(self._served)

    @property
    def depth(self) -> int:
        with self._cond:
            return self._rows

    def depths(self) -> dict[str, int]:
        """Rows waiting, by tenant (tenants with none are left out)."""
        with self._cond:
            out = Counter({t: len(q) for t, q in self._queues.items() if q})
            out.update(+self._pending_rows)
            return dict(out)

    # -- submission
    def admit(self, tenant: str, rows: int) -> None:
        """Raise if `rows` more rows of `tenant` would not be accepted now (the check `submit` makes)."""
        with self._cond:
            self._admit(tenant, rows)

    def _admit(self, tenant: str, rows: int) -> None:
        cfg = self.config
        waiting = len(self._queues.get(tenant, ())) + self._pending_rows.get(tenant, 0)
        # A request larger than a share (or the whole queue) is charged one share (the queue): it is accepted when its
        # tenant (the queue) has nothing waiting, instead of a refusal that no retry could ever cure. The whole queue
        # full is an overload whoever asks (a share can be the whole queue); past a share with room left, a 429.
        if self._rows + min(rows, cfg.max_queue) > cfg.max_queue:
            self.stats["overloads"] += 1
            raise OverloadedError(f"prediction queue is full ({self._rows} rows waiting); retry shortly",
                                  detail={"queue_depth": self._rows})
        share = cfg.max_queue_per_tenant
        if share is not None and waiting + min(rows, share) > share:
            self.stats["tenant_overloads"] += 1
            raise TenantOverloadedError(f"this tenant has {waiting} rows waiting (at most {share}"
                                        "); retry shortly", detail={"tenant_queue_depth": waiting})

    def submit(self, adapter_name: str, inputs: Sequence[Input], top_k: int | None = None,
               timeout_s: float | None = None, tenant: str = "") -> Future:
        """Queue a request; the future resolves to one prediction per input. Cancelling the future takes its
        rows out of the queue."""
        adapter = self.engine.adapter(adapter_name)  # loads on a miss, in the caller's thread
        n = len(inputs)
        fut: Future = Future()
        req = _Request(adapter_name, top_k, time.monotonic() + (timeout_s or self.config.timeout_s), fut,
                       [None] * n, n, tenant)
        if TRACE_PATH is not None:
            req.marks = {"submit": time.monotonic()}
            fut.spafit_request = req  # type: ignore[attr-defined]  # for `predict`'s trace line
        if not n:
            fut.set_result([])
            return fut
        # Only what can reach the first `max_seq_length` tokens is tokenised: a 20,000-character input costs
        # about what a 512-word one does.
        pending = _Pending(req, adapter, [cut_input(x, adapter.max_seq_length) for x in inputs])
        big = sum(_chars(x) for x in pending.inputs) > BATCH_TOKENIZE_CHARS
        with self._cond:
            self._admit(tenant, n)
            self._pending_rows[tenant] += n
            self._rows += n
            if big:  # the big-request lane tokenises it, in chunks, the tenants in turn
                lane = self._lane.setdefault(tenant, deque())
                if not lane:
                    self._lane_ring.append(tenant)
                lane.append(pending)
                if self._running and (self._lane_thread is None or not self._lane_thread.is_alive()):
                    self._spawn_lane()
            else:
                self._pending.append(pending)  # tokenised by the worker, in a batch with the others
                self._cond.notify()
        fut.add_done_callback(lambda f: self._withdraw(req) if f.cancelled() else None)
        return fut

    def _withdraw(self, req: _Request) -> None:
        """A cancelled request's rows leave the queue at once (they no longer count against any limit)."""
        with self._cond:
            lane = self._lane.get(req.tenant)
            for i, p in enumerate(lane or ()):
                if p.request is req:
                    del lane[i]  # type: ignore[union-attr]
                    if not lane:
                        del self._lane[req.tenant]
                        self._lane_ring.remove(req.tenant)
                    self._unpend(p)
                    self._rows -= len(p.inputs)
                    self.stats["dropped"] += len(p.inputs)
                    return
            for i, p in enumerate(self._pending):
                if p.request is req:
                    del self._pending[i]
                    self._unpend(p)
                    self._rows -= len(p.inputs)
                    self.stats["dropped"] += len(p.inputs)
                    return
            queue = self._queues.get(req.tenant)
            if not queue:
                return
            kept = deque(it for it in queue if it.request is not req)
            dropped = len(queue) - len(kept)
            if dropped:
                self._queues[req.tenant] = kept
                self._rows -= dropped
                self.stats["dropped"] += dropped
                if not kept:
                    self._forget(req.tenant)

    def _unpend(self, p: _Pending) -> None:
        """`p`'s rows no longer wait untokenised. Call under the lock."""
        left = self._pending_rows[p.request.tenant] - len(p.inputs)
        if left > 0:
            self._pending_rows[p.request.tenant] = left
        else:
            del self._pending_rows[p.request.tenant]

    def _tokenize_pending(self) -> None:
        """Tokenise the requests that wait untokenised, in batches, and queue their rows. The lock is not held
        while the tokenizer runs: requests keep arriving meanwhile."""
        with self._cond:
            pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            made = self._tokenize(pending)
        except Exception as e:  # a bug of ours: these requests fail, the counts stay right
            made = [(p, e) for p in pending]
        with self._cond:
            self._enqueue(made)

    def _tokenize(self, pending: list[_Pending]) -> list[tuple[_Pending, list[dict] | Exception]]:
        """The rows of `pending`, one tokenizer call per (base model, length limit, kind of input): the same
        features `engine.encode` gives each request alone. A call that fails is retried per request, so that
        only a request whose own inputs fail gets the error. Runs without the lock."""
        groups: dict[tuple, list[_Pending]] = {}
        for p in pending:
            kinds = {isinstance(x, str) for x in p.inputs}
            key = (p.adapter.config["base_model"]["name"], p.adapter.max_seq_length,
                   kinds.pop() if len(kinds) == 1 else id(p))  # a request mixing kinds is a group of its own
            groups.setdefault(key, []).append(p)
        out: list[tuple[_Pending, list[dict] | Exception]] = []
        for group in groups.values():
            try:
                feats = self.engine.encode(group[0].adapter, [x for p in group for x in p.inputs])
            except Exception:
                if len(group) == 1:
                    feats = None
                else:
                    out += self._tokenize_apart(group)
                    continue
            if feats is None:
                out += self._tokenize_apart(group)
                continue
            at = 0
            for p in group:
                out.append((p, feats[at: at + len(p.inputs)]))
                at += len(p.inputs)
        return out

    def _tokenize_apart(self, group: list[_Pending]) -> list[tuple[_Pending, list[dict] | Exception]]:
        out: list[tuple[_Pending, list[dict] | Exception]] = []
        for p in group:
            try:
                out.append((p, self.engine.encode(p.adapter, p.inputs)))
            except Exception as e:
                out.append((p, e))
        return out

    # -- the big-request lane
    def _spawn_lane(self) -> None:
        """Start the lane's thread. Under the lock."""
        self._lane_thread = threading.Thread(target=self._lane_loop, name="spafit-tokenize", daemon=True)
        self._lane_thread.start()

    def _lane_loop(self) -> None:
        """Tokenise big requests one chunk (about BATCH_TOKENIZE_CHARS characters, at least one input) at a time,
        taking the tenants with some in turn: a tenant's big requests wait for their own turns, and another tenant
        waits for at most one chunk of each. A request joins its tenant's queue once all its chunks are done. The
        thread ends when no work is left (`submit` starts another)."""
        while True:
            with self._cond:
                if not self._running or not self._lane_ring:
                    self._lane_thread = None
                    return
                tenant = self._lane_ring[0]
                p = self._lane[tenant][0]
                chunk = _chunk(p.inputs, len(p.made))
            error: Exception | None = None
            feats: list[dict] = []
            if not p.request.future.done():
                try:
                    feats = self.engine.encode(p.adapter, chunk)
                except Exception as e:  # this request's own inputs (or a bug of ours): it alone fails
                    error = e
            with self._cond:
                lane = self._lane.get(tenant)
                if not lane or lane[0] is not p:  # withdrawn (cancelled) meanwhile: nothing left to do for it
                    continue
                done = error is not None or p.request.future.done() or len(p.made) + len(chunk) >= len(p.inputs)
                if done:
                    lane.popleft()
                    if not lane:
                        del self._lane[tenant]
                    self._enqueue([(p, error if error is not None else p.made + feats)])
                    self._cond.notify()
                else:
                    p.made.extend(feats)
                if self._lane_ring and self._lane_ring[0] == tenant:  # its turn is over
                    self._lane_ring.popleft()
                    if tenant in self._lane:
                        self._lane_ring.append(tenant)

    def _enqueue(self, made: list[tuple[_Pending, list[dict] | Exception]]) -> None:
        """Tokenised requests join their tenants' queues (a request done meanwhile is dropped). Under the lock."""
        for p, feats in made:
            req = p.request
            self._unpend(p)
            if isinstance(feats, Exception) or req.future.done():
                self._rows -= len(p.inputs)
                if isinstance(feats, Exception):
                    _fail(req, _tokenize_error(feats, p))
                else:
                    self.stats["dropped"] += len(p.inputs)
                continue
            queue = self._queues.get(req.tenant)
            if queue is None:  # a new flow: served ahead of the backlogged tenants, for one quantum
                queue = self._queues[req.tenant] = deque()
                self._new.append(req.tenant)
                self._fresh.add(req.tenant)
                self._deficit[req.tenant] = self.config.quantum * self.config.weight(req.tenant)
            queue.extend(_Item(req, i, Row(p.adapter, f)) for i, f in enumerate(feats))
            req.mark("queued")

    def _forget(self, tenant: str) -> None:
        """Take a tenant with no rows left out of the round robin. Call under the lock."""
        self._fresh.discard(tenant)
        if tenant in self._new:
            self._new.remove(tenant)
        else:
            if self._ring and self._ring[0] == tenant:
                self._in_turn = False
            self._ring.remove(tenant)
        del self._queues[tenant]
        del self._deficit[tenant]

    async def predict(self, adapter_name: str, inputs: Sequence[Input], top_k: int | None = None,
                      timeout_s: float | None = None, tenant: str = "") -> list[dict]:
        """`submit` and wait. Cancelling the awaiting task (a client that went away) cancels the request,
        whose rows are then dropped before they run."""
        timeout = timeout_s or self.config.timeout_s
        called = time.monotonic()
        # Loading an adapter on a miss is blocking: keep it off the event loop (tokenising is the worker's).
        queued = self._submitter.submit(self.submit, adapter_name, inputs, top_k, timeout, tenant)
        try:
            fut = await asyncio.wrap_future(queued)
        except asyncio.CancelledError:  # gone while its rows were being made: take them out once queued
            queued.add_done_callback(_cancel_result)
            raise
        try:
            out = await asyncio.wait_for(asyncio.wrap_future(fut), timeout=timeout + 1.0)
            if TRACE_PATH is not None:
                _trace(fut, called, len(inputs))
            return out
        except TimeoutError:
            raise RequestTimeoutError(f"prediction did not finish within {timeout:.1f}s") from None
        finally:
            fut.cancel()  # a no-op once resolved; otherwise (timeout, cancelled) its rows leave the queue

    # -- the worker
    def _limit(self, now: float) -> int:
        """Most rows of backlogged tenants in the next pass: `shared_batch_size` while a light tenant is being
        served (see BatchingConfig), else `max_batch_size`. Call under the lock."""
        if now - self._light_at < self.config.shared_window_s:
            return self._shared_limit()
        return self.config.max_batch_size

    def _shared_limit(self) -> int:
        cfg = self.config
        return cfg.max_batch_size if cfg.shared_batch_size is None else min(cfg.shared_batch_size, cfg.max_batch_size)

    def _take(self) -> list[_Item]:
        """The rows of the next pass, after tokenising (in batches) the requests that arrived since the last call:
        first the light tenants' (new ones all of whose rows fit), then the other new tenants' (one quantum each),
        then the backlogged ones' by deficit round robin; at most `max_batch_size` rows in all and, while a light
        tenant is being served, at most `shared_batch_size` beyond the light tenants' rows."""
        cfg = self.config
        with self._cond:
            while self._running and not self._rows:
                self._cond.wait(timeout=0.5)
            if not self._running:
                return []
            # Wait for company only when saturated (the last batch was full or left rows behind: demand is above
            # what one batch takes, so more rows are on their way); otherwise run what is there at once, so that a
            # lone request costs the one-row forward, not `max_wait_ms` more.
            deadline = time.monotonic() + (cfg.max_wait_ms / 1000 if self._saturated else 0)
            while self._rows < self._limit(time.monotonic()) and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(timeout=left)
        self._tokenize_pending()
        with self._cond:
            items: list[_Item] = []
            now = time.monotonic()
            light = False
            # Light tenants first: those whose queue was empty at the last pass and whose every row now fits their
            # quantum and this pass. They run now whatever the others have queued, and for `shared_window_s` after
            # their pass the others' rows in each pass are bounded (`_limit`), so that their next rows wait for one
            # small pass, not a full one.
            fresh, self._fresh = self._fresh, set()
            for tenant in [t for t in self._new if t in fresh]:
                if len(items) < cfg.max_batch_size and self._fits(tenant, cfg.max_batch_size - len(items)):
                    took = len(items)
                    self._fill(tenant, items, cfg.max_batch_size)
                    light = light or len(items) > took
                    if not self._queues[tenant]:
                        self._forget(tenant)
            self._light_taken = light
            limit = max(len(items), self._shared_limit() if light else self._limit(now))
            while len(items) < limit and self._new:  # then new tenants with more than that, one quantum each
                tenant = self._new[0]
                self._fill(tenant, items, limit)
                queue = self._queues[tenant]
                if not queue:
                    self._forget(tenant)
                elif queue[0].length > self._deficit[tenant]:  # quantum used up: it has a backlog, it joins the ring
                    self._new.popleft()
                    self._ring.append(tenant)
                # else the pass is full mid-quantum: it goes on next time
            while len(items) < limit and self._ring:
                tenant = self._ring[0]
                if not self._in_turn:  # a new turn: the tenant's quantum joins what it did not use
                    self._skip_rounds()
                    self.stats["turns"] += 1
                    self._deficit[tenant] += cfg.quantum * cfg.weight(tenant)
                    self._in_turn = True
                self._fill(tenant, items, limit)
                queue = self._queues[tenant]
                if not queue:
                    self._forget(tenant)
                elif queue[0].length > self._deficit[tenant]:  # turn used up: next tenant
                    self._ring.rotate(-1)
                    self._in_turn = False
                # else the batch is full mid-turn: the tenant goes on next time, with what it has left
            self._saturated = len(items) >= limit or self._rows > 0
            return items

    def _skip_rounds(self) -> None:
        """At the start of a turn of the ring's head: when no tenant of the ring could send its next row within the
        next k rounds (a small quantum x weight against long rows), add those k rounds' quanta to every tenant at
        once, as k rounds that take nothing would. The round robin then loops at most one round before a tenant
        sends, whatever the weights (0.001 x 1 token against 512-token rows would be 512,000 empty turns). Under
        the lock."""
        cfg = self.config
        rounds = None
        for tenant in self._ring:
            head = next((it.length for it in self._queues[tenant] if not it.request.future.done()), None)
            if head is None:  # only dropped rows left: `_fill` takes them out this round
                return
            share = cfg.quantum * cfg.weight(tenant)
            need = max(0, math.ceil((head - self._deficit[tenant]) / share) - 1)  # turns that take nothing
            rounds = need if rounds is None else min(rounds, need)
            if not rounds:
                return
        if rounds:
            for tenant in self._ring:
                self._deficit[tenant] += rounds * cfg.quantum * cfg.weight(tenant)
            self.stats["skipped_rounds"] += rounds

    def _fits(self, tenant: str, room: int) -> bool:
        """All of `tenant`'s waiting rows fit in `room` rows and its deficit. Under the lock."""
        budget, n = self._deficit[tenant], 0
        for it in self._queues[tenant]:
            if it.request.future.done():  # dropped when taken: costs nothing
                continue
            n += 1
            budget -= it.length
            if n > room or budget < 0:
                return False
        return True

    def _fill(self, tenant: str, items: list[_Item], limit: int) -> None:
        """Move `tenant`'s rows into `items` while its deficit pays for them, up to `limit` rows. Under the lock."""
        queue = self._queues[tenant]
        while queue and len(items) < limit:
            it = queue[0]
            if it.request.future.done():  # cancelled or failed meanwhile: costs nothing
                queue.popleft()
                self._rows -= 1
                self.stats["dropped"] += 1
                continue
            if it.length > self._deficit[tenant]:  # a row costs its tokens: this one waits a turn
                break
            queue.popleft()
            self._rows -= 1
            self._deficit[tenant] -= it.length
            items.append(it)
            it.request.mark("taken")

    def _pack(self, items: list[_Item]) -> list[list[_Item]]:
        """Length-sorted batches within max_batch_size rows and max_tokens padded tokens."""
        items = sorted(items, key=lambda it: it.length)
        batches: list[list[_Item]] = []
        current: list[_Item] = []
        for it in items:  # ascending: `it` is the longest row of the batch it joins
            if current and (len(current) >= self.config.max_batch_size
                            or (len(current) + 1) * it.length > self.config.max_tokens):
                batches.append(current)
                current = []
            current.append(it)
        if current:
            batches.append(current)
        return batches

    def _loop(self) -> None:
        while self._running:
            items: list[_Item] = []
            try:
                items = self._take()
                now = time.monotonic()
                live = []
                for it in items:
                    if it.request.future.done():  # an earlier row of its request timed out just now
                        continue
                    if it.request.deadline < now:
                        self.stats["timeouts"] += 1
                        _fail(it.request, RequestTimeoutError("prediction timed out in the queue"))
                    else:
                        live.append(it)
                for batch in self._pack(live):
                    self._run(batch)
                if self._light_taken:  # the window counts from the end of the light tenant's pass
                    with self._cond:
                        self._light_at = time.monotonic()
            except Exception:  # a bug of ours, not of a request: fail what we hold, keep serving
                self.stats["loop_errors"] += 1
                ref = uuid.uuid4().hex
                log.exception("the batcher failed on %d rows (ref %s); serving goes on", len(items), ref)
                for it in items:
                    _fail(it.request, PredictionFailedError(f"the prediction failed (ref {ref})",
                                                            detail={"reference": ref}))
                time.sleep(0.01)  # never spin on a failure that repeats

    def _run(self, batch: list[_Item]) -> None:
        """One forward pass; if it fails, the same rows again per adapter, then per row (`_isolate`)."""
        batch = [it for it in batch if not it.request.future.done()]  # e.g. another row of it failed alone
        if not batch:
            return
        if TRACE_PATH is not None:
            tenants = len({it.request.tenant for it in batch})
            for it in batch:
                it.request.mark("forward", batch_rows=len(batch), batch_tenants=tenants)
        t0 = time.perf_counter()
        try:
            logits = self.engine.forward([it.row for it in batch])
        except Exception as e:
            self._isolate(batch, e)
            return
        seconds = time.perf_counter() - t0
        if TRACE_PATH is not None:
            for it in batch:
                it.request.mark("forward_end")
        self.stats["batches"] += 1
        self.stats["rows"] += len(batch)
        served = Counter(it.request.tenant for it in batch)
        with self._cond:
            self._served.update(served)
        if self.on_batch is not None:
            try:
                self.on_batch(len(batch), len(batch) * max(it.length for it in batch), seconds)
            except Exception:
                log.exception("the batch callback failed")
        for it, lg in zip(batch, logits, strict=True):
            req = it.request
            try:
                pred = postprocess(it.row.adapter.task, lg, req.top_k)
            except Exception as e:
                _fail(req, _row_error(e, [it]))
                continue
            with req.lock:
                req.results[it.index] = pred
                req.remaining -= 1
                done = req.remaining == 0
            if done:
                req.mark("resolved")
                _resolve(req.future, req.results)

    def _isolate(self, batch: list[_Item], error: Exception) -> None:
        """A forward pass failed: run each adapter's rows apart, and a failing adapter's rows one by one, so
        that only the rows that fail on their own fail their requests."""
        groups: dict[str, list[_Item]] = {}
        for it in batch:
            groups.setdefault(it.row.adapter.name, []).append(it)
        if len(groups) > 1:
            parts = list(groups.values())
        elif len(batch) > 1:
            parts = [[it] for it in batch]
        else:
            self.stats["failed_rows"] += 1
            _fail(batch[0].request, _row_error(error, batch))
            return
        self.stats["retries"] += 1
        for part in parts:
            self._run(part)


def _row_error(error: Exception, items: list[_Item]) -> SpafitError:
    """The error a request gets for a row that failed alone: the engine's own SpafitError, or one that names
    a log line with the cause."""
    if isinstance(error, SpafitError):
        return error
    ref = uuid.uuid4().hex
    it = items[0]
    log.error("a prediction row failed alone (ref %s): adapter %s, %d tokens", ref, it.row.adapter.name, it.length,
              exc_info=error)
    return PredictionFailedError(f"the prediction failed on this input (ref {ref}); other requests were served",
                                 detail={"reference": ref})


def _chars(x: Input) -> int:
    if isinstance(x, str):
        return len(x)
    return sum(len(v) for v in (x.values() if isinstance(x, dict) else x) if isinstance(v, str))


def _is_pair(x: Input) -> bool:
    return not isinstance(x, str) and (not isinstance(x, dict) or x.get("text_pair") is not None)


def _chunk(inputs: list[Input], start: int) -> list[Input]:
    """The next chunk of a big request from `start`: inputs up to about BATCH_TOKENIZE_CHARS characters (at least
    one). A request that mixes single texts and pairs is one chunk: the tokenizer refuses it whole, as before."""
    if len({_is_pair(x) for x in inputs}) > 1:
        return inputs[start:]
    end, chars = start, 0
    while end < len(inputs) and (end == start or chars + _chars(inputs[end]) <= BATCH_TOKENIZE_CHARS):
        chars += _chars(inputs[end])
        end += 1
    return inputs[start:end]


def _tokenize_error(error: Exception, p: _Pending) -> SpafitError:
    """The error a request gets when its inputs could not be tokenised (alone)."""
    if isinstance(error, SpafitError):
        return error
    ref = uuid.uuid4().hex
    log.error("tokenising a request failed (ref %s): adapter %s, %d inputs", ref, p.adapter.name, len(p.inputs),
              exc_info=error)
    return PredictionFailedError(f"the prediction failed on these inputs (ref {ref}); other requests were served",
                                 detail={"reference": ref})


def _trace(fut: Future, called: float, rows: int) -> None:
    """Append a request's stage times (ms after `predict` was called) to TRACE_PATH (debug mode)."""
    req = getattr(fut, "spafit_request", None)
    if req is None or req.marks is None:
        return
    now = time.monotonic()
    line = {"tenant": req.tenant, "rows": rows, "t": round(called, 4), "returned": round((now - called) * 1000, 2)}
    for k, v in req.marks.items():
        line[k] = round((v - called) * 1000, 2) if isinstance(v, float) else v
    with open(TRACE_PATH, "a") as f:  # type: ignore[arg-type]
        f.write(json.dumps(line) + "\n")


def _submitter() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="spafit-submit")


def _cancel_result(queued: Future) -> None:
    if not queued.cancelled() and queued.exception() is None:
        queued.result().cancel()


def _resolve(fut: Future, result: Any) -> None:
    try:
        fut.set_result(result)
    except InvalidStateError:  # cancelled (or failed) by another thread since: nobody is waiting for it
        pass


def _fail(req: _Request, exc: Exception) -> None:
    try:
        req.future.set_exception(exc)
    except InvalidStateError:  # already resolved or cancelled by a racing thread
        pass
