"""Tokenising for the micro-batcher (`batching.MicroBatcher`): requests are tokenised by its worker in batches,
and huge ones in the big-request lane, before their rows join their tenants' queues (`tenant_queues`).

Before each pass the worker tokenises, in one call of the fast tokenizer per (backbone, length limit, kind of input),
off the event loop, what arrived since its last pass, up to a pass's worth per tenant beyond what its queue holds
(a flooding tenant's backlog waits untokenised, so it never delays a light tenant's rows by more than a pass's worth). A request still over BATCH_TOKENIZE_CHARS (after `cut_input`)
goes to the big-request lane instead: one thread, chunks of about that size, the tenants in turn, so a tenant's
huge inputs wait for its own turns.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from .engine import Engine, Input, Row
from .errors import PredictionFailedError, SpafitError
from .tenant_queues import BatchingConfig, _fail, _Item, _Request

log = logging.getLogger("spafit.batching")

# A request with more characters than this (after `cut_input`) is not tokenised in the worker's batches: it goes
# to the big-request lane, one thread that tokenises such requests in chunks of about this many characters, taking
# the tenants in turn, so that one tenant's huge inputs delay another's (big) requests by at most one chunk, and
# never hold up the worker's batches or the submitter threads every request goes through.
BATCH_TOKENIZE_CHARS = 16_384


@dataclass(eq=False)
class _Pending:
    """A request whose rows are not tokenised yet (they count as waiting rows of its tenant already)."""

    request: _Request
    adapter: Any  # the engine's LoadedAdapter
    inputs: list[Input]  # cut (`cut_input`): what the tokenizer needs of them, no more
    made: list[dict] = field(default_factory=list)  # big-request lane: the rows of the chunks tokenised so far


class Tokenizing:
    """The tokenizing side of `MicroBatcher`: the requests waiting untokenised (`_pending`, for the worker's
    batches, and the lane's), counted in `_rows` and `_pending_rows` from `submit` on. The batcher creates this
    state in its `__init__` and guards it with `_cond`; `_queue_of` (`tenant_queues.TenantQueues`) is where the
    rows go."""

    engine: Engine
    config: BatchingConfig
    stats: dict[str, int]
    _queues: dict[str, deque[_Item]]
    _cond: threading.Condition
    _running: bool
    _rows: int
    _pending: list[_Pending]
    _light_arrivals: set[str]  # the batcher's (batching.MicroBatcher._ask_to_yield)
    _pending_rows: Counter[str]
    _held: set[str]
    _deferred: set[str]
    _lane: dict[str, deque[_Pending]]
    _lane_ring: deque[str]
    _lane_thread: threading.Thread | None

    def _unpend(self, p: _Pending) -> None:
        """`p`'s rows no longer wait untokenised. Call under the lock."""
        tenant = p.request.tenant
        left = self._pending_rows[tenant] - len(p.inputs)
        if left > 0:
            self._pending_rows[tenant] = left
        else:
            del self._pending_rows[tenant]
            if tenant not in self._queues:  # nothing of it waits any more: new again next time
                self._held.discard(tenant)

    def _tokenize_pending(self) -> None:
        """Tokenise the requests that wait untokenised, in batches, and queue their rows. The lock is not held
        while the tokenizer runs: requests keep arriving meanwhile."""
        with self._cond:
            pending = self._pending_for_pass()
            self._light_arrivals.clear()  # what arrives from here on is tokenised at the next pass's take
        if not pending:
            return
        try:
            made = self._tokenize(pending)
        except Exception as e:  # a bug of ours: these requests fail, the counts stay right
            made = [(p, e) for p in pending]
        with self._cond:
            self._enqueue(made)

    def _pending_for_pass(self) -> list[_Pending]:
        """The waiting requests to tokenise before the next pass, taken out of `_pending`: of each tenant, oldest
        first, what tops its queue up to a full pass (`max_batch_size` rows; at least one request when it holds
        less). The others wait: a flooding tenant's backlog is tokenised a pass's worth at a time as it is served,
        not all at once in front of a light tenant's rows. Under the lock."""
        room: dict[str, int] = {}
        take: list[_Pending] = []
        keep: list[_Pending] = []
        for p in self._pending:
            tenant = p.request.tenant
            if tenant not in room:
                room[tenant] = self.config.max_batch_size - len(self._queues.get(tenant, ()))
            if room[tenant] > 0:
                take.append(p)
                room[tenant] -= len(p.inputs)
            else:
                keep.append(p)
        self._pending = keep
        # The tenants with a backlog left untokenised: never light, and a backlog still when their queue runs dry
        # (`tenant_queues`). A request that arrives while this pass's are tokenised is not a backlog.
        self._deferred = {p.request.tenant for p in keep}
        return take

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
            if isinstance(feats, Exception) or req.future.done():
                self._unpend(p)
                self._rows -= len(p.inputs)
                if isinstance(feats, Exception):
                    _fail(req, _tokenize_error(feats, p))
                else:
                    self.stats["dropped"] += len(p.inputs)
                continue
            self._queue_of(req.tenant).extend(_Item(req, i, Row(p.adapter, f)) for i, f in enumerate(feats))
            self._unpend(p)  # after `_queue_of`: a held tenant (see `_forget`) rejoins the round robin
            req.mark("queued")


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
