"""The worker's Celery application: the tasks of worker/tasks.py on the app that app/queues.py configures from the
settings (broker, queues, routes and the reliability settings, explained there). The API shares that module and
sends tasks by name, so it never imports this package. Tasks take job ids, never payloads; job state lives in
the database.
"""

from __future__ import annotations

from app.queues import LIGHT_QUEUE, TRAINING_QUEUE, make_celery

__all__ = ["LIGHT_QUEUE", "TRAINING_QUEUE", "celery_app", "make_celery"]

celery_app = make_celery(include=["worker.tasks"])
