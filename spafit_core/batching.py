"""Dynamic micro-batching of concurrent prediction requests onto the engine, fair between tenants and
isolated between requests.

Requests are queued as they come (their adapter resolved by the caller), each input cut to what its first
`max_seq_length` tokens need (`cut_input`: a 20,000-character input costs the tokenizer what a 512-word one does),
and tokenised off the event loop: by the worker thread in batches, or, for a request still over
BATCH_TOKENIZE_CHARS, by the big-request lane, chunk by chunk, the tenants in turn (`tokenize_lane`). Rows then
join one queue per tenant. Admission is bounded twice: a tenant past `max_queue_per_tenant` waiting rows is refused
(TenantOverloadedError: that tenant retries later), and the whole queue past `max_queue` rows is refused
(OverloadedError). One worker thread drains the queues by deficit round robin, light tenants first
(`tenant_queues`), then packs what it took (at most `max_batch_size` rows, sorted by length, within `max_tokens`
padded tokens) into mixed-task forward passes. This module holds the batcher itself: submission, admission, the
worker loop and its supervision; every name it held before the split is still importable from here.

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
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import Any

from .engine import Engine, Input, PassSuspended, Suspended, pass_control
from .errors import (
    OverloadedError,
    PredictionFailedError,
    RequestTimeoutError,
    SpafitError,
    TenantOverloadedError,
)
from .outputs import postprocess
from .tenant_queues import BatchingConfig, TenantQueues, _fail, _Item, _Request
from .textcut import _cut_side, cut_input, cut_text  # noqa: F401  (importable from here too)
from .tokenize_lane import (  # noqa: F401  (importable from here too)
    BATCH_TOKENIZE_CHARS,
    Tokenizing,
    _chars,
    _chunk,
    _is_pair,
    _Pending,
    _tokenize_error,
)

log = logging.getLogger("spafit.batching")

# Most times one forward pass steps aside for light tenants (BatchingConfig.yield_to_light): past it, the pass goes on
# whatever arrives, so a stream of light tenants never holds a backlogged tenant's pass back for long.
MAX_STEPS_ASIDE = 3

# Debug mode: with SPAFIT_BATCH_TRACE set to a file path, each request answered by `predict` appends one JSON line
# there with the monotonic times of its stages (see `_Request.marks`), to find where a request's latency goes.
TRACE_PATH = os.environ.get("SPAFIT_BATCH_TRACE") or None


class MicroBatcher(Tokenizing, TenantQueues):
    """The batcher: `submit` / `predict` queue a request, one worker thread (`_loop`) runs its rows. Tokenising
    is `Tokenizing`'s (tokenize_lane.py), the round robin over the tenants' queues is `TenantQueues`'s
    (tenant_queues.py); all of their state is created here and guarded by `_cond`."""

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
        self._carried: set[str] = set()  # those of `_new` left with rows after the last pass was taken: a backlog
        self._held: set[str] = set()  # tenants whose queue ran dry while rows of theirs were untokenised
        self._deferred: set[str] = set()  # tenants with requests left untokenised by the last tokenising (no room)
        self._alone = False  # the last pass held light tenants' rows alone
        self._light_at = float("-inf")  # when a pass holding all a new tenant had waiting last ended
        self._light_taken = False  # the rows `_take` returned last hold such a tenant's
        self._light_taken_by: list[str] = []  # ...namely these tenants'
        self._light_tenants: OrderedDict[str, float] = OrderedDict()  # tenant -> when it last ran as light
        self._deficit: dict[str, float] = {}
        self._in_turn = False  # the tenant at the head of the ring is in the middle of its turn
        self._saturated = False  # the last batch was full or left rows waiting: worth waiting for company
        self._rows = 0
        # Stepping aside (BatchingConfig.yield_to_light): the tenants of the pass in flight while it may step aside
        # (None otherwise), the event that asks it to, and the passes that stepped aside (with the rest of their
        # `_take`), run right after the light tenant's pass.
        self._flight: frozenset[str] | None = None
        self._yield = threading.Event()
        self._light_arrivals: set[str] = set()  # tenants whose light rows arrived since the last tokenising
        self._parked: list[tuple[list[_Item], Suspended | None, int]] = []  # (rows, state, times stepped aside)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.stats = {"batches": 0, "rows": 0, "timeouts": 0, "overloads": 0, "tenant_overloads": 0,
                      "dropped": 0, "retries": 0, "failed_rows": 0, "loop_errors": 0, "restarts": 0,
                      "turns": 0, "skipped_rounds": 0, "yields": 0}
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
                self._ask_to_yield(tenant)
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
            parked = self._parked  # kept there until run: a batcher restarted after its thread died runs them
            try:
                # After a pass stepped aside, only the light tenants' rows (what it stepped aside for), then it.
                items = self._take(light_only=bool(parked))
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
                batches = self._pack(live)
                may_yield = self.config.yield_to_light and not parked and not self._light_taken
                for i, batch in enumerate(batches):
                    aside = self._run(batch, may_yield=may_yield)
                    if aside is not None:  # it stepped aside: it and the rest of this take run after the light
                        self._parked = [(*aside, 1)] + [(b, None, 0) for b in batches[i + 1:]]
                        break
                if self._light_taken:  # the window counts from the end of the light tenant's pass
                    with self._cond:
                        self._light_at = time.monotonic()
                        for t in self._light_taken_by:  # each light tenant's own window too (`_light_waiting`)
                            self._light_tenants[t] = self._light_at
                            self._light_tenants.move_to_end(t)
                self._go_on(parked)
            except Exception:  # a bug of ours, not of a request: fail what we hold, keep serving
                self.stats["loop_errors"] += 1
                ref = uuid.uuid4().hex
                held = items + [it for batch, _, _ in self._parked for it in batch]  # those not run yet
                self._parked = []
                log.exception("the batcher failed on %d rows (ref %s); serving goes on", len(held), ref)
                for it in held:
                    _fail(it.request, PredictionFailedError(f"the prediction failed (ref {ref})",
                                                            detail={"reference": ref}))
                time.sleep(0.01)  # never spin on a failure that repeats

    def _go_on(self, parked: list) -> None:
        """The passes that stepped aside (`parked`: what `_loop` found parked before this round's light pass) go on,
        in order, each taken out before it runs (never run twice). Until it has stepped aside MAX_STEPS_ASIDE
        times, one steps aside again for light rows that arrived meanwhile (during the light pass: the next round
        takes them first) or that arrive while it goes on."""
        while parked and self._parked:
            batch, state, steps = self._parked[0]
            may_yield = self.config.yield_to_light and steps < MAX_STEPS_ASIDE
            with self._cond:
                waiting = bool(self._light_arrivals)
            if may_yield and waiting:
                self._parked[0] = (batch, state, steps + 1)
                self.stats["yields"] += 1
                return
            self._parked.pop(0)
            again = self._run(batch, resume=state, may_yield=may_yield)
            if again is not None:
                self._parked.insert(0, (*again, steps + 1))
                return

    def _ask_to_yield(self, tenant: str) -> None:
        """`tenant`'s rows just arrived: if they will run as a light tenant's (a new flow, within what `_take`
        lets one have), note it, and if the pass in flight holds only other tenants' rows and may step aside, ask
        it to. Their wait then is one layer of that pass, not the rest of it. Under the lock."""
        if tenant in self._queues or tenant in self._held:
            return
        recent = time.monotonic() - self._light_tenants.get(tenant, -math.inf) < self.config.shared_window_s
        if self._pending_rows[tenant] > (self.config.max_batch_size if recent else self._shared_limit()):
            return
        self._light_arrivals.add(tenant)
        flight = self._flight
        if flight is not None and tenant not in flight:
            self._flight = None  # once
            self._yield.set()

    def _run(self, batch: list[_Item], *, may_yield: bool = False, resume: Suspended | None = None
             ) -> tuple[list[_Item], Suspended] | None:
        """One forward pass; if it fails, the same rows again per adapter, then per row (`_isolate`). With
        `may_yield`, the pass steps aside when a light tenant's rows arrive (`_ask_to_yield`; at once for those
        that arrived since the last tokenising) and (the rows it ran, its state) are returned; with `resume`, a
        pass that stepped aside goes on with exactly those rows (a row whose request ended meanwhile still runs:
        the kept layer input holds it)."""
        if resume is None:
            batch = [it for it in batch if not it.request.future.done()]  # e.g. another row of it failed alone
        if not batch:
            return None
        if TRACE_PATH is not None:
            tenants = len({it.request.tenant for it in batch})
            for it in batch:
                it.request.mark("forward", batch_rows=len(batch), batch_tenants=tenants)
        if may_yield:
            with self._cond:
                self._flight = frozenset(it.request.tenant for it in batch)
                if self._light_arrivals - self._flight:  # came while this pass was made: it steps aside at once
                    self._yield.set()
                    self._flight = None
                else:
                    self._yield.clear()
        t0 = time.perf_counter()
        try:
            with pass_control(self._yield if may_yield else None, resume):
                logits = self.engine.forward([it.row for it in batch])
        except PassSuspended as e:
            e.state.seconds += time.perf_counter() - t0 + (resume.seconds if resume is not None else 0.0)
            self.stats["yields"] += 1
            return batch, e.state
        except Exception as e:
            self._isolate(batch, e)
            return None
        finally:
            if may_yield:
                with self._cond:
                    self._flight = None
        seconds = time.perf_counter() - t0 + (resume.seconds if resume is not None else 0.0)
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
        return None

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
