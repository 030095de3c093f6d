"""The contract between the API and the worker: task names, queue names and the Celery app both ends configure
from the settings. The API sends tasks by name (`send_task`) and never imports `worker`; the worker defines the
tasks under these names (worker/tasks.py) on `make_celery(include=["worker.tasks"])` (worker/celery_app.py).

Reliability settings, and the trap each one designs out:
- `task_acks_late` + `task_reject_on_worker_lost`: a worker killed mid-job leaves its message unacked,
  so the job is re-delivered and resumes from its last checkpoint. Re-delivery has no built-in cap, so
  the job row counts attempts and fails the job after `job_max_attempts` (poison jobs do not loop).
- `worker_prefetch_multiplier=1`: a worker reserves one training job at a time.
- `worker_cancel_long_running_tasks_on_connection_loss=False` (stated, as Celery 6 flips the default): a
  broker restart does not kill the training in progress; the job ends in the database as usual and the
  re-delivered message finds it final (tests/reliability: test_redis_restart_loses_no_job).
- `visibility_timeout` above the longest job: Redis otherwise re-delivers an unacked message after 1 h
  and a long run trains twice. The worker's atomic claim on the job row is the second line of defence.
- Queues: `training` (one process per GPU, a fresh child per job: CUDA never initialised in a parent
  that forks) apart from `light` work.
- `broker_key_prefix` (the settings'): every key of this deployment's broker under one prefix, on both ends.

Celery is imported inside `make_celery`, so the names here cost nothing to import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery

    from .settings import Settings

TRAINING_QUEUE = "training"
LIGHT_QUEUE = "light"

TRAIN_ADAPTER = "spafit.train_adapter"  # (job_id): run or resume a job (training, sweep, batch prediction)
DELIVER_WEBHOOK = "spafit.deliver_webhook"  # (delivery_id): one delivery attempt
IMPORT_DATASET = "spafit.import_dataset"  # (dataset_id): a Hub import, bounded in rows, bytes and time
TASK_NAMES = (TRAIN_ADAPTER, DELIVER_WEBHOOK, IMPORT_DATASET)

WORKER_APP = "worker.celery_app:celery_app"  # what `celery -A` loads (`spafit worker`, the compose health check)


def make_celery(settings: Settings | None = None, include: Sequence[str] = ()) -> Celery:
    """A Celery app on the settings' broker. The API's needs no `include`: it only sends tasks by name."""
    from celery import Celery

    from .settings import get_settings

    s = settings or get_settings()
    app = Celery("spafit", broker=s.broker_url, include=list(include))
    if s.broker_url.startswith("sqla+"):
        # The embedded SQLite broker hands its transport options to create_engine(): none of the Redis
        # ones apply, and its messages persist, so there is no visibility timeout to outlast.
        transport_options: dict = {}
        path = s.broker_url.removeprefix("sqla+sqlite:///")
        if path and path != s.broker_url:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    else:
        transport_options = {"visibility_timeout": s.job_visibility_timeout}
        if s.broker_key_prefix:
            transport_options["global_keyprefix"] = s.broker_key_prefix
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_default_queue=LIGHT_QUEUE,
        task_routes={TRAIN_ADAPTER: {"queue": TRAINING_QUEUE}},
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,  # results live in the jobs table
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app
