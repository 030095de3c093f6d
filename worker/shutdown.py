"""A warm shutdown of the worker (SIGTERM: a deploy, a scale-down, `spafit serve` stopping), told to the children
that run jobs. Celery's parent stops taking messages and waits for its children; a supervisor kills them after its
grace period (`docker stop`: 10 s; `spafit serve`: 30 s), and a job killed that way came back as a lost attempt:
three deploys during one long job failed it (`worker-lost`, SPAFIT_JOB_MAX_ATTEMPTS). With this flag set, a run
stops at its next step and hands its job back to the queue (worker/runner.py), the attempt not counted against the
limit, and the worker exits within seconds.

The flag is a process-shared event made in the parent before its pool forks (`arm`), set by the parent when the
shutdown begins (`begin`), and read by the children at each training or batch step (`requested`).
"""

from __future__ import annotations

import multiprocessing
from typing import Any

_flag: Any = None


def arm() -> None:
    """In the worker's parent, before its pool forks the children (Celery's `worker_init`)."""
    global _flag
    if _flag is None:
        _flag = multiprocessing.get_context("fork").Event()


def begin() -> None:
    """In the worker's parent, when a warm shutdown begins (Celery's `worker_shutting_down`)."""
    if _flag is not None:
        _flag.set()


def requested() -> bool:
    return _flag is not None and _flag.is_set()
