"""Readiness checks. A check is a callable (sync or async) that raises when its dependency is not usable;
`Readiness` runs all of them concurrently, each under a timeout. Parts added later register their own:

    app.state.readiness.add("engine", engine.check_backbone_loaded)
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

Check = Callable[[], None] | Callable[[], Awaitable[None]]
log = logging.getLogger("spafit.health")


@dataclass
class CheckResult:
    ok: bool
    duration_ms: float
    error: str | None = None


class Readiness:
    def __init__(self, timeout: float = 3.0):
        self.timeout = timeout
        self.checks: dict[str, Check] = {}

    def add(self, name: str, check: Check) -> None:
        """Register (or replace) the check called `name`."""
        self.checks[name] = check

    def remove(self, name: str) -> None:
        self.checks.pop(name, None)

    async def _run_one(self, name: str, check: Check) -> CheckResult:
        start = time.perf_counter()
        try:
            if inspect.iscoroutinefunction(check):
                await asyncio.wait_for(check(), self.timeout)
            else:  # blocking I/O: in a thread, abandoned (not killed) on timeout
                await asyncio.wait_for(asyncio.to_thread(check), self.timeout)
        except TimeoutError:
            return CheckResult(False, _ms(start), f"timed out after {self.timeout:g}s")
        except Exception as e:  # a failing dependency, whatever it raises
            log.warning("readiness check %s failed: %s: %s", name, type(e).__name__, e)
            return CheckResult(False, _ms(start), _public_error(e))
        return CheckResult(True, _ms(start))

    async def run(self) -> dict[str, CheckResult]:
        names = list(self.checks)
        results = await asyncio.gather(*(self._run_one(n, self.checks[n]) for n in names))
        return dict(zip(names, results, strict=True))


def _public_error(e: Exception) -> str:
    """What /readyz (unauthenticated) may say about a failure. Our own checks raise RuntimeError with a message
    written for operators ("run `spafit db upgrade`"); a driver's message names internal hosts, ports and
    users, so only its type is shown: the whole error is in the server log."""
    from .migrate import SchemaNotCurrent

    if type(e) in (RuntimeError, SchemaNotCurrent):
        return f"RuntimeError: {str(e)[:200]}".strip()
    return f"{type(e).__name__} (details in the server log)"


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def ping_broker(url: str, *, key_prefix: str = "", timeout: float = 3.0) -> None:
    """Connect to the Celery broker for real (Redis: a PING; the SQLite broker: open its database)."""
    from kombu import Connection  # celery's transport layer; imported here to keep app import light

    options = {"global_keyprefix": key_prefix} if key_prefix else {}
    with Connection(url, connect_timeout=timeout, transport_options=options) as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
