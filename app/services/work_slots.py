"""Heavy work in the API process taken in turns: `TenantSlots` runs at most one piece of one kind of work per tenant
at a time (a second gets the kind's 429 with Retry-After) and at most `in_flight` in the process (the others wait
their turn, at most `waiting` of them and for at most `wait_s`; past either, 503 with Retry-After). The bound is per
process on purpose: what it protects is the process's memory, cores and route threads, which every tenant's
predictions share. Used by PEFT conversions (`conversions.py`) and dataset uploads (`datasets.py`).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..errors import AppError, ServiceUnavailable

MAX_THREADS = 20  # of the thread pool that runs every sync route (anyio's default: 40): running and waiting together


class TenantSlots:
    def __init__(self, what: str, setting: str, in_flight: int, wait_s: float, busy: Callable[[str], AppError],
                 waiting: int | None = None):
        """`what`: the work in words ("PEFT conversion"); `setting`: the setting that sizes `in_flight`; `busy`: the
        429 for a tenant that already has one, from its message."""
        self.what, self.setting, self.busy = what, setting, busy
        self.in_flight, self.wait_s = in_flight, wait_s
        self.waiting = max(0, min(4 * in_flight, MAX_THREADS - in_flight)) if waiting is None else waiting
        self._cond = threading.Condition()
        self._running = 0
        self._queued = 0
        self._tenants: set[uuid.UUID] = set()  # tenants with one running or waiting here

    @contextmanager
    def slot(self, tenant_id: uuid.UUID) -> Iterator[None]:
        """Run one piece of work of `tenant_id` (see the module's docstring for what is refused)."""
        with self._cond:
            if tenant_id in self._tenants:
                raise self.busy(f"a {self.what} of this tenant is already running (one at a time per tenant): retry "
                                "when it has finished")
            if self._running >= self.in_flight and self._queued >= self.waiting:
                raise ServiceUnavailable(f"{self._running} {self.what}s are running and {self._queued} waiting "
                                         f"({self.setting}); retry shortly", headers={"Retry-After": "5"})
            self._tenants.add(tenant_id)
            deadline = time.monotonic() + self.wait_s
            self._queued += 1
            try:
                while self._running >= self.in_flight:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ServiceUnavailable(f"waited {self.wait_s:g} s for one of the {self.in_flight} "
                                                 f"{self.what} slots; retry shortly", headers={"Retry-After": "5"})
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
