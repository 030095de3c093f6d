"""PEFT conversions in the API process. Each one loads the version's base model from disk, in full (bias deltas
travel as whole biases in PEFT's format, so the base's own biases are needed both ways): on BERT-large that is
seconds of CPU and over a gigabyte per conversion, and the routes run in a shared thread pool. Unbounded, one
tenant sending a few dozen `?format=peft` downloads at once would take the process's memory (and every other
tenant's predictions with it).

So: one conversion per tenant at a time in a process (a second gets 429 `too-many-conversions` with
Retry-After), at most `in_flight` in the process (the others wait their turn, at most `waiting` of them and for
at most `wait_s`; past either, 503 with Retry-After; running and waiting together never hold more than
`MAX_THREADS` of the routes' shared thread pool, 40 by default), and finished exports cached by content (an adapter's
sha256: the PEFT zip is a function of it and of the base model it names), so the same version downloaded again
costs nothing. The bound is per process on purpose: what it protects is the process's memory and cores.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..errors import ServiceUnavailable, TooManyConversions
from ..settings import Settings

MAX_THREADS = 20  # of the thread pool that runs every sync route (anyio's default: 40)


class Conversions:
    def __init__(self, in_flight: int, wait_s: float, cache_bytes: int, waiting: int | None = None):
        self.in_flight, self.wait_s, self.cache_bytes = in_flight, wait_s, cache_bytes
        self.waiting = max(0, min(4 * in_flight, MAX_THREADS - in_flight)) if waiting is None else waiting
        self._cond = threading.Condition()
        self._running = 0
        self._queued = 0
        self._tenants: set[uuid.UUID] = set()  # tenants with a conversion running or waiting here
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached = 0  # bytes in the cache

    @classmethod
    def from_settings(cls, settings: Settings) -> Conversions:
        return cls(settings.peft_conversions_in_flight, settings.peft_conversion_wait_s,
                   settings.peft_export_cache_bytes)

    @contextmanager
    def slot(self, tenant_id: uuid.UUID) -> Iterator[None]:
        """Run one conversion of `tenant_id` (see the module's docstring for what is refused)."""
        with self._cond:
            if tenant_id in self._tenants:
                raise TooManyConversions(
                    "a PEFT conversion of this tenant is already running (each loads the base model; one at a "
                    "time per tenant): retry when it has finished", headers={"Retry-After": "1"})
            if self._running >= self.in_flight and self._queued >= self.waiting:
                raise ServiceUnavailable(f"{self._running} PEFT conversions are running and {self._queued} "
                                         "waiting (SPAFIT_PEFT_CONVERSIONS_IN_FLIGHT); retry shortly",
                                         headers={"Retry-After": "5"})
            self._tenants.add(tenant_id)
            deadline = time.monotonic() + self.wait_s
            self._queued += 1
            try:
                while self._running >= self.in_flight:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ServiceUnavailable(f"waited {self.wait_s:g} s for one of the "
                                                 f"{self.in_flight} PEFT conversion slots; retry shortly",
                                                 headers={"Retry-After": "5"})
                    self._cond.wait(left)
            except BaseException:
                self._tenants.discard(tenant_id)
                raise
            finally:
                self._queued -= 1
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._tenants.discard(tenant_id)
                self._cond.notify()

    def export(self, tenant_id: uuid.UUID, sha256: str, archive: bytes, convert: Callable[[bytes], bytes]) -> bytes:
        """`convert(archive)`, in a slot of `tenant_id`, unless the export of the adapter `sha256` is cached."""
        with self._cond:
            hit = self._cache.get(sha256)
            if hit is not None:
                self._cache.move_to_end(sha256)
                return hit
        with self.slot(tenant_id):
            out = convert(archive)
        self._keep(sha256, out)
        return out

    def _keep(self, sha256: str, data: bytes) -> None:
        if len(data) > self.cache_bytes:
            return
        with self._cond:
            if sha256 in self._cache:
                return
            self._cache[sha256] = data
            self._cached += len(data)
            while self._cached > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= len(old)
