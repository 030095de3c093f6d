"""The worker's Celery application: the tasks of worker/tasks.py on the app that app/queues.py configures from the
settings (broker, queues, routes and the reliability settings, explained there). The API shares that module and
sends tasks by name, so it never imports this package. Tasks take job ids, never payloads; job state lives in
the database.

Each job runs in a fresh child process forked from the worker's parent (`spafit worker`: prefork pool, one task per
child). The parent imports torch and the job code once when it starts (`preload`), so a child starts with them
loaded instead of spending seconds importing them for every job.
"""

from __future__ import annotations

import os

from celery.signals import worker_init, worker_shutting_down

from app.queues import LIGHT_QUEUE, TRAINING_QUEUE, make_celery

from . import shutdown

__all__ = ["LIGHT_QUEUE", "TRAINING_QUEUE", "celery_app", "make_celery", "preload"]

celery_app = make_celery(include=["worker.tasks"])


@worker_init.connect
def preload(**_: object) -> None:
    """Import what the jobs import (torch, transformers' auto classes and BERT's, `datasets`, the trainer, the batch
    and import runners) in the worker's parent, before its pool forks the children that run the jobs: 5-10 s less
    per job on a 2-core CPU. Imports only: nothing here runs a torch op (a parent with a running OpenMP pool forks
    children that can hang) or touches CUDA (a parent that initialised it forks children that cannot use it);
    tests/worker/test_preload.py checks both. SPAFIT_WORKER_PRELOAD=0 (or false, no, off, as the SPAFIT_ settings
    read booleans) turns it off."""
    if os.environ.get("SPAFIT_WORKER_PRELOAD", "1").strip().lower() in ("0", "false", "no", "off", "f", "n"):
        return
    import datasets  # noqa: F401  (dataset imports from the Hub)
    import torch  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401  (the default backbone's classes)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401

    import spafit_core.pipeline  # noqa: F401
    import worker.batch  # noqa: F401
    import worker.imports  # noqa: F401
    import worker.runner  # noqa: F401


@worker_init.connect
def arm_shutdown(**_: object) -> None:
    shutdown.arm()  # before the pool forks: its children share the flag


@worker_shutting_down.connect
def begin_shutdown(how: str = "", **_: object) -> None:
    """A warm shutdown: the children running jobs hand them back at their next step (worker/shutdown.py)."""
    shutdown.begin()
