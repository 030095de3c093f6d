"""Dynamic micro-batching of concurrent prediction requests onto the engine.

Requests are tokenised by the caller, queued row by row in a bounded queue (a full queue raises
OverloadedError at once: backpressure, never unbounded memory), and one worker thread drains it: it
waits up to `max_wait_ms` for more rows, sorts what it has by length and packs batches of at most
`max_batch_size` rows and `max_tokens` padded tokens, each batch one mixed-task forward pass.
Rows whose deadline passed are failed with RequestTimeoutError instead of being run.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .engine import Engine, Input, Row
from .errors import OverloadedError, RequestTimeoutError
from .outputs import postprocess


@dataclass
class BatchingConfig:
    max_batch_size: int = 32
    max_wait_ms: float = 5.0  # how long the first row of a batch waits for company
    max_tokens: int = 16384  # rows x padded length per forward pass
    max_queue: int = 2048  # rows waiting; beyond this requests are refused as overload
    timeout_s: float = 30.0  # per request, from submission


@dataclass
class _Request:
    adapter_name: str
    top_k: int | None
    deadline: float
    future: Future
    results: list[Any]
    remaining: int
    lock: threading.Lock = field(default_factory=threading.Lock)


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
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.stats = {"batches": 0, "rows": 0, "timeouts": 0, "overloads": 0}

    # -- lifecycle
    def start(self) -> MicroBatcher:
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="spafit-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    # -- submission
    def submit(self, adapter_name: str, inputs: Sequence[Input], top_k: int | None = None,
               timeout_s: float | None = None) -> Future:
        """Queue a request; the future resolves to one prediction per input."""
        adapter = self.engine.adapter(adapter_name)  # loads on a miss, in the caller's thread
        features = self.engine.encode(adapter, inputs)
        fut: Future = Future()
        req = _Request(adapter_name, top_k, time.monotonic() + (timeout_s or self.config.timeout_s), fut,
                       [None] * len(features), len(features))
        if not features:
            fut.set_result([])
            return fut
        with self._cond:
            if len(self._queue) + len(features) > self.config.max_queue:
                self.stats["overloads"] += 1
                raise OverloadedError(f"prediction queue is full ({len(self._queue)} rows waiting); retry shortly",
                                      detail={"queue_depth": len(self._queue)})
            self._queue.extend(_Item(req, i, Row(adapter, f)) for i, f in enumerate(features))
            self._cond.notify()
        return fut

    async def predict(self, adapter_name: str, inputs: Sequence[Input], top_k: int | None = None,
                      timeout_s: float | None = None) -> list[dict]:
        timeout = timeout_s or self.config.timeout_s
        loop = asyncio.get_running_loop()
        # Loading an adapter on a miss and tokenising are blocking: keep them off the event loop.
        fut = await loop.run_in_executor(None, self.submit, adapter_name, inputs, top_k, timeout)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout=timeout + 1.0)
        except TimeoutError:
            raise RequestTimeoutError(f"prediction did not finish within {timeout:.1f}s") from None

    # -- the worker
    def _take(self) -> list[_Item]:
        cfg = self.config
        window = 4 * cfg.max_batch_size  # gather a little more than one batch, to group by length
        with self._cond:
            while self._running and not self._queue:
                self._cond.wait(timeout=0.5)
            if not self._running:
                return []
            deadline = time.monotonic() + cfg.max_wait_ms / 1000
            while len(self._queue) < cfg.max_batch_size and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(timeout=left)
            n = min(len(self._queue), window)
            return [self._queue.popleft() for _ in range(n)]

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
            items = self._take()
            now = time.monotonic()
            live = []
            for it in items:
                if it.request.future.done():
                    continue
                if it.request.deadline < now:
                    self.stats["timeouts"] += 1
                    _fail(it.request, RequestTimeoutError("prediction timed out in the queue"))
                else:
                    live.append(it)
            for batch in self._pack(live):
                self._run(batch)

    def _run(self, batch: list[_Item]) -> None:
        t0 = time.perf_counter()
        try:
            logits = self.engine.forward([it.row for it in batch])
        except Exception as e:  # fail this batch's requests, keep serving
            for it in batch:
                _fail(it.request, e)
            return
        seconds = time.perf_counter() - t0
        self.stats["batches"] += 1
        self.stats["rows"] += len(batch)
        if self.on_batch is not None:
            self.on_batch(len(batch), len(batch) * max(it.length for it in batch), seconds)
        for it, lg in zip(batch, logits, strict=True):
            req = it.request
            pred = postprocess(it.row.adapter.task, lg, req.top_k)
            with req.lock:
                req.results[it.index] = pred
                req.remaining -= 1
                done = req.remaining == 0
            if done and not req.future.done():
                req.future.set_result(req.results)


def _fail(req: _Request, exc: Exception) -> None:
    if not req.future.done():
        try:
            req.future.set_exception(exc)
        except Exception:  # already resolved by a racing thread
            pass
