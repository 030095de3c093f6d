"""A warm shutdown of the worker (SIGTERM: a deploy, a scale-down, `spafit serve` stopping), told to the children
that run jobs. Celery's parent stops taking messages and waits for its children; a supervisor kills them after its
grace period (`docker stop`: 10 s; `spafit serve`: 30 s), and a job killed that way came back as a lost attempt:
three deploys during one long job failed it (`worker-lost`, SPAFIT_JOB_MAX_ATTEMPTS). With this flag set, a run
stops at its next step and hands its job back to the queue (worker/runner.py), the attempt not counted against the
limit, and the worker exits within seconds.

The flag is a byte of shared memory made in the parent before its pool forks (`arm`), set by the parent when the
shutdown begins (`begin`), and read by the children at each training or batch step (`requested`). No lock: a
`multiprocessing.Event` takes one on every read, and a child killed while holding it (SIGKILL, the OOM killer, at
any step) left it held for good: every other child then hung at its next step, and the parent's SIGTERM handler
hung in `set()`, so the worker could no longer stop.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

_flag: Any = None


def arm() -> None:
    """In the worker's parent, before its pool forks the children (Celery's `worker_init`)."""
    global _flag
    if _flag is None:
        _flag = multiprocessing.get_context("fork").RawValue("b", 0)


def begin() -> None:
    """In the worker's parent, when a warm shutdown begins (Celery's `worker_shutting_down`)."""
    if _flag is not None:
        _flag.value = 1


def requested() -> bool:
    return _flag is not None and _flag.value == 1
