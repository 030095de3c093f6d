"""Celery tasks: a few lines each over library code. They take ids, never payloads."""

from __future__ import annotations

from celery import Task

from app.db import Database
from app.settings import get_settings

from .celery_app import celery_app


class DatabaseTask(Task):
    """Holds one database engine per worker process."""

    _db: Database | None = None

    @property
    def db(self) -> Database:
        if DatabaseTask._db is None:
            DatabaseTask._db = Database.from_settings(get_settings())
        return DatabaseTask._db


@celery_app.task(name="spafit.train_adapter", base=DatabaseTask, bind=True, acks_late=True,
                 reject_on_worker_lost=True)
def train_adapter(self: DatabaseTask, job_id: str) -> str:
    """Run (or resume) job `job_id`; see worker.runner for the claim rules."""
    from .runner import run_job

    return run_job(self.db, job_id, get_settings())
