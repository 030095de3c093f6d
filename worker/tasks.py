"""Celery tasks: a few lines each over library code. They take ids, never payloads; their names are the
contract with the API, which sends them by name (app/queues.py)."""

from __future__ import annotations

from celery import Task

from app.db import Database
from app.queues import DELIVER_WEBHOOK, IMPORT_DATASET, TRAIN_ADAPTER
from app.settings import get_settings

from . import shutdown
from . import webhooks as webhook_delivery  # imported here, in the parent: each attempt runs in a fresh child
from .celery_app import celery_app


class DatabaseTask(Task):
    """Holds one database engine per worker process."""

    _db: Database | None = None

    @property
    def db(self) -> Database:
        if DatabaseTask._db is None:
            from .lease import guard

            DatabaseTask._db = guard(Database.from_settings(get_settings()), get_settings())
            from app.services import webhooks

            # the webhook deliveries a job's end adds go to the broker once their transaction commits
            webhooks.install_outbox(DatabaseTask._db, webhooks.broker_sender(get_settings()))
        return DatabaseTask._db


# A hung run (stuck where it never polls its stop flag) is killed this long after the longest job may run; its
# job, left running with a stale heartbeat, is re-sent and the claim fails it for its time limit.
HARD_TIME_LIMIT_GRACE_S = 600


@celery_app.task(name=TRAIN_ADAPTER, base=DatabaseTask, bind=True, acks_late=True,
                 reject_on_worker_lost=True, time_limit=get_settings().job_time_limit_s + HARD_TIME_LIMIT_GRACE_S)
def train_adapter(self: DatabaseTask, job_id: str) -> str:
    """Run (or resume) job `job_id`; see worker.lease for the claim and fencing rules. An attempt the
    database's absence ended is sent again once the job's heartbeat is stale (the requeuer would too)."""
    from .runner import run_job

    settings = get_settings()
    # A message taken while this worker shuts down is not claimed (a claim counts an attempt) but sent back: with
    # the embedded broker (sqla+sqlite) the parent goes on taking messages during a warm shutdown, and took each
    # job its children handed back, claimed it again and handed it back again, an attempt counted each time, until
    # `spafit serve` killed it mid-claim after its 30 s: the job was left running with every attempt used, and
    # failed `worker-lost` at the next start.
    outcome = "released" if shutdown.requested() else run_job(self.db, job_id, settings)
    if outcome in ("interrupted", "released"):  # released: handed back at a warm shutdown, for the next worker
        try:
            self.apply_async(args=[job_id], countdown=settings.job_heartbeat_stale_s + 1 if outcome == "interrupted"
                             else None)
        except Exception:  # the broker is away too: the API's requeuer re-sends the job
            pass
    return outcome


@celery_app.task(name=DELIVER_WEBHOOK, base=DatabaseTask, bind=True, acks_late=True)
def deliver_webhook(self: DatabaseTask, delivery_id: str) -> str:
    """One attempt at webhook delivery `delivery_id`; a failed one sends this task again after its backoff
    (see worker.webhooks). The delivery row, not this message, is the truth."""
    return webhook_delivery.deliver(self.db, delivery_id, get_settings())


@celery_app.task(name=IMPORT_DATASET, base=DatabaseTask, bind=True, acks_late=True,
                 reject_on_worker_lost=True)
def import_dataset(self: DatabaseTask, dataset_id: str) -> str:
    """Import dataset `dataset_id` (state `importing`) from the Hub; see worker.imports."""
    from .imports import import_dataset as run

    return run(self.db, dataset_id, get_settings())
