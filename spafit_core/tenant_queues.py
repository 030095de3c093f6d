"""The tenants' queues of the micro-batcher (`batching.MicroBatcher`): one queue of tokenised rows per tenant,
drained by deficit round robin into the rows of each forward pass.

Each tenant in turn may take rows worth `quantum x weight` tokens (a row costs its length, so long inputs use up a
share faster than short ones), and a tenant's backlog delays only itself. A tenant whose queue was empty when its
rows arrived is served first, for one quantum (fq_codel's sparse flows), so a light tenant's rows go into the very
next pass whatever a flooding tenant has queued, in a pass of its own; while such a tenant is being served, passes
take at most `shared_batch_size` rows of the backlogged tenants, so what it waits for (the pass in flight, then its
own) stays small on a CPU, where a pass costs about its rows. When its last batch was full or left rows waiting (saturated),
the worker waits up to `max_wait_ms` for company (otherwise it does not wait: a lone request costs the one-row
forward).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from .engine import Row


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
    # for at most one pass this small, then run in the next one, alone. On a CPU a pass costs about its rows, so
    # 32-row passes of a flooding tenant would cost a light one two long passes per request. None: no bound, and the
    # light tenants' rows share their pass with the others' (on a GPU, where a pass costs about the same whatever
    # its rows, set it to None).
    shared_batch_size: int | None = 2
    shared_window_s: float = 1.0
    # A pass of backlogged tenants' rows steps aside at its next layer boundary when a light tenant's rows arrive
    # (`MicroBatcher._ask_to_yield`): the light rows run first, then the pass goes on where it stopped (nothing is
    # computed twice; a pass steps aside at most `batching.MAX_STEPS_ASIDE` times). The light tenant waits for one
    # layer, not a pass.
    yield_to_light: bool = True
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
    # Debug mode only (batching.TRACE_PATH): stage -> time.monotonic() of its first occurrence: "queued" (tokenised,
    # in its tenant's queue), "taken" (by the round robin), "forward" / "forward_end" (its first pass), "resolved".
    marks: dict[str, Any] | None = None

    def mark(self, stage: str, **extra: Any) -> None:
        if self.marks is not None and stage not in self.marks:
            self.marks[stage] = time.monotonic()
            self.marks.update(extra)


@dataclass
class _Item:
    request: _Request
    index: int
    row: Row

    @property
    def length(self) -> int:
        return len(self.row.features["input_ids"])


class TenantQueues:
    """The round robin over the tenants' queues, a part of `MicroBatcher`: it creates this state in its
    `__init__` and guards it with `_cond`; `_take` first has the tokenizing side (`tokenize_lane.Tokenizing`)
    queue the rows that arrived since the last pass."""

    config: BatchingConfig
    stats: dict[str, int]
    _cond: threading.Condition
    _running: bool
    _rows: int  # rows waiting, all tenants (queued or not tokenised yet)
    _pending_rows: Counter[str]  # of those, the rows not tokenised yet, by tenant
    _queues: dict[str, deque[_Item]]
    _ring: deque[str]
    _new: deque[str]
    _fresh: set[str]
    _carried: set[str]
    _held: set[str]
    _deferred: set[str]  # tenants whose requests the last tokenising left untokenised (no room in a pass)
    _alone: bool
    _light_at: float
    _light_tenants: OrderedDict[str, float]  # tenant -> when its rows last ran as a light tenant's (oldest first)
    _light_taken: bool
    _light_taken_by: list[str]
    _deficit: dict[str, float]
    _in_turn: bool
    _saturated: bool

    def _queue_of(self, tenant: str) -> deque[_Item]:
        """`tenant`'s queue, for its rows just tokenised. Under the lock."""
        queue = self._queues.get(tenant)
        if queue is None and tenant in self._held:  # its queue ran dry while it had rows untokenised: a backlog,
            self._held.discard(tenant)               # not a new flow (it would jump the round robin every pass)
            queue = self._queues[tenant] = deque()
            self._ring.append(tenant)
            self._deficit[tenant] = 0.0
        elif queue is None:  # a new flow: served ahead of the backlogged tenants, for one quantum
            queue = self._queues[tenant] = deque()
            self._new.append(tenant)
            self._fresh.add(tenant)
            self._deficit[tenant] = self.config.quantum * self.config.weight(tenant)
        return queue

    def _forget(self, tenant: str) -> None:
        """Take a tenant with no rows left out of the round robin. Call under the lock."""
        self._fresh.discard(tenant)
        self._carried.discard(tenant)
        if tenant in self._new:
            self._new.remove(tenant)
        else:
            if self._ring and self._ring[0] == tenant:
                self._in_turn = False
            self._ring.remove(tenant)
        del self._queues[tenant]
        del self._deficit[tenant]
        if tenant in self._deferred and self._pending_rows.get(tenant):  # a backlog still untokenised: it stays
            self._held.add(tenant)                                         # a backlogged tenant

    def _limit(self, now: float) -> int:
        """Most rows of backlogged tenants in the next pass: `shared_batch_size` while a light tenant is being
        served (see BatchingConfig), else `max_batch_size`. Call under the lock."""
        if now - self._light_at < self.config.shared_window_s and self._light_waiting(now):
            return self._shared_limit()
        return self.config.max_batch_size

    def _light_waiting(self, now: float) -> bool:
        """Some tenant served as a light one within the window has no backlog (it is not in the round robin) and
        another tenant has rows waiting: the light tenant's next rows are those a small pass keeps from waiting
        behind the other's. A light tenant is never kept from waiting behind its own rows: one tenant's steady
        stream (light whenever its queue ran dry) would otherwise cap its own passes, and its wait for company, at
        `shared_batch_size` rows (measured: a single tenant's 64 clients got 10- to 22-row passes on average,
        0.39-0.65x the engine's throughput). Call under the lock."""
        window = self.config.shared_window_s
        light = {t for t, at in self._light_tenants.items()  # a tenant left with rows by a pass has a backlog
                 if now - at < window and t not in self._ring and t not in self._held and t not in self._carried}
        if not light:
            return False
        waiting = set(self._queues)
        waiting.update(t for t, n in self._pending_rows.items() if n)
        return len(light) > 1 and bool(waiting) or any(t not in light for t in waiting)

    def _shared_limit(self) -> int:
        cfg = self.config
        return cfg.max_batch_size if cfg.shared_batch_size is None else min(cfg.shared_batch_size, cfg.max_batch_size)

    def _take(self, light_only: bool = False) -> list[_Item]:
        """The rows of the next pass, after tokenising (in batches) the requests that arrived since the last call:
        first the light tenants' (new ones all of whose rows fit), then the other new tenants' (one quantum each),
        then the backlogged ones' by deficit round robin; at most `max_batch_size` rows in all. A pass that holds
        light tenants' rows holds nothing else (unless `shared_batch_size` is None), and while a light tenant is
        being served the other passes hold at most `shared_batch_size` rows. `light_only` (a pass stepped aside
        for a light tenant and runs next): the light tenants' rows alone, maybe none, without waiting."""
        cfg = self.config
        with self._cond:
            # Rows still in the big-request lane count in `_rows` but cannot be taken: wait for the lane (it
            # notifies when it queues a request), do not loop.
            while not light_only and self._running and not (self._pending or any(self._queues.values())):
                self._cond.wait(timeout=0.5)
            if not self._running:
                return []
            # Wait for company only when saturated (the last batch was full or left rows behind: demand is above
            # what one batch takes, so more rows are on their way); otherwise run what is there at once, so that a
            # lone request costs the one-row forward, not `max_wait_ms` more.
            deadline = time.monotonic() + (cfg.max_wait_ms / 1000 if self._saturated and not light_only else 0)
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
            # While a light tenant is being served, a tenant that was not light itself within the window is light
            # only with at most a small pass's worth of rows: a flood's first burst (a new tenant whose rows fit a
            # pass) would otherwise share the light tenant's pass, or take a long one of its own, and every light
            # tenant would wait for it. A tenant light within the window keeps the whole pass for its rows.
            window = self._limit(now) < cfg.max_batch_size
            lit: list[str] = []  # the tenants taken as light ones (their window starts again when this pass ends)
            for tenant in [t for t in self._new if t in fresh]:
                room = cfg.max_batch_size - len(items)
                if window and now - self._light_tenants.get(tenant, -math.inf) >= cfg.shared_window_s:
                    room = min(room, self._shared_limit())
                if (len(items) < cfg.max_batch_size and tenant not in self._deferred  # no backlog untokenised
                        and self._fits(tenant, room)):
                    took = len(items)
                    self._fill(tenant, items, cfg.max_batch_size)
                    if len(items) > took:
                        light = True
                        self._light_tenants[tenant] = now
                        self._light_tenants.move_to_end(tenant)
                        lit.append(tenant)
                    if not self._queues[tenant]:
                        self._forget(tenant)
            while self._light_tenants and now - next(iter(self._light_tenants.values())) >= cfg.shared_window_s:
                self._light_tenants.popitem(last=False)  # out of the window: forgotten (so bounded by the window)
            self._light_taken, self._light_taken_by = light, lit
            if light_only:  # the pass that stepped aside runs next: the others are not shut out
                self._alone = False
                self._carried = {t for t in self._new if self._queues.get(t)}
                return items
            if light and cfg.shared_batch_size is not None and not self._alone:
                # A light tenant's rows run in a pass of their own: on a CPU a pass costs about its rows, so the
                # backlogged tenants' rows would only add to what the light tenant waits for (they run next).
                # Not two such passes in a row: light tenants that keep coming back would shut the others out.
                self._alone = True
                self._saturated = self._rows > 0
                self._carried = {t for t in self._new if self._queues.get(t)}
                return items
            self._alone = False
            # After a light pass of its own, light rows share this one with up to `shared_batch_size` of the others.
            limit = min(cfg.max_batch_size, len(items) + self._shared_limit()) if light else self._limit(now)
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
            self._carried = {t for t in self._new if self._queues.get(t)}
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


def _fail(req: _Request, exc: Exception) -> None:
    try:
        req.future.set_exception(exc)
    except InvalidStateError:  # already resolved or cancelled by a racing thread
        pass
