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
import uuid
from collections import OrderedDict
from collections.abc import Callable

from ..errors import TooManyConversions
from ..settings import Settings
from .work_slots import MAX_THREADS, TenantSlots

__all__ = ["MAX_THREADS", "Conversions"]


class Conversions(TenantSlots):
    def __init__(self, in_flight: int, wait_s: float, cache_bytes: int, waiting: int | None = None):
        super().__init__("PEFT conversion", "SPAFIT_PEFT_CONVERSIONS_IN_FLIGHT", in_flight, wait_s,
                         lambda message: TooManyConversions(message + " (each loads the base model)",
                                                            headers={"Retry-After": "1"}), waiting)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached = 0  # bytes in the cache
        self._cache_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Conversions:
        return cls(settings.peft_conversions_in_flight, settings.peft_conversion_wait_s,
                   settings.peft_export_cache_bytes)

    def export(self, tenant_id: uuid.UUID, sha256: str, archive: bytes, convert: Callable[[bytes], bytes]) -> bytes:
        """`convert(archive)`, in a slot of `tenant_id`, unless the export of the adapter `sha256` is cached."""
        with self._cache_lock:
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
        with self._cache_lock:
            if sha256 in self._cache:
                return
            self._cache[sha256] = data
            self._cached += len(data)
            while self._cached > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= len(old)
