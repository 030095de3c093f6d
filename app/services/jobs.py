"""Fine-tuning jobs: create (validated, idempotent), read, list, cancel, and hand them to the broker.

The job row is the truth; the broker message only says "look at job X". Sending is therefore safe to
repeat: `requeue_orphans` re-sends jobs whose message may have been lost (a broker restart loses queued
messages when it keeps nothing on disk; a worker that died after taking a message but before claiming its
job leaves the message unacknowledged until the broker's visibility timeout), running jobs whose worker
stopped sending heartbeats, and settles sweeps whose trials all ended.

Every numeric knob of a job is bounded (schemas_jobs.py, plus what needs the base model or the dataset:
max_seq_length against the model's positions, epochs x steps against `job_max_steps`), and one tenant may
have at most `max_active_jobs_per_tenant` jobs queued or running, counted under a lock on the tenant's row
so that the limit holds across API replicas.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import false, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from spafit_core.errors import ConfigError, DataError

from ..db import Database
from ..errors import Conflict, NotFound, TooManyJobs, TooManyLookups, WebhookUrlRefused
from ..models import AdapterVersion, Dataset, Job, Tenant, utcnow
from ..queues import IMPORT_DATASET, LIGHT_QUEUE, TRAIN_ADAPTER, TRAINING_QUEUE, make_celery
from ..schemas_jobs import JobCreate, JobOut
from ..settings import Settings
from . import events, quota, registry
from .pagination import paginate

log = logging.getLogger("spafit.jobs")

Sender = Callable[[uuid.UUID], None]
TOO_MANY_JOBS_RETRY_AFTER_S = 30
# Models whose position ids start after the padding index (RoBERTa's family): pad_token_id + 1 positions are
# never usable by a token.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet", "data2vec-text", "longformer")


def _model_depth(base_model: str) -> int | None:
    """The layer count of a base model whose config is on this machine (None for a hub id not cached:
    the worker checks it then)."""
    from spafit_core.backbone import resolve_model_path

    path = Path(resolve_model_path(base_model)) / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for key in ("num_hidden_layers", "n_layers", "num_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


def check_base_model(name: str, settings: Settings) -> str:
    """In server mode only the default backbone and those listed in SPAFIT_ALLOWED_BASE_MODELS (a deployment
    decides what its workers download and hold; clients must not make the server read arbitrary paths).
    Embedded mode takes any hub id or folder."""
    from spafit_core.backbone import canonical_model_name

    if name in settings.allowed_base_models or name == settings.default_base_model \
            or canonical_model_name(name) == canonical_model_name(settings.default_base_model):
        return name
    if settings.mode == "embedded":
        return name
    allowed = [settings.default_base_model, *settings.allowed_base_models]
    raise ConfigError(f"base_model {name!r} is not offered by this service; allowed: {', '.join(allowed)} "
                      "(SPAFIT_ALLOWED_BASE_MODELS)", field="base_model")


def max_positions(base_model: str) -> int | None:
    """The longest input (in tokens) the base model's position embeddings allow, from its config read with
    transformers' AutoConfig (only from this machine: None for a hub model not downloaded yet, asked again
    next time)."""
    n = _POSITIONS.get(base_model)
    if n is None:
        n = _read_max_positions(base_model)
        if n is not None and len(_POSITIONS) < 256:
            _POSITIONS[base_model] = n
    return n


_POSITIONS: dict[str, int] = {}


def _read_max_positions(base_model: str) -> int | None:
    from spafit_core.adapter_schema import auto_config

    AutoConfig = auto_config()  # noqa: N806  (one lock for every lazy import of it: a fresh process's first creates)

    from spafit_core.backbone import resolve_model_path

    try:
        cfg = AutoConfig.from_pretrained(resolve_model_path(base_model), local_files_only=True)
    except Exception:  # not cached here, or not a transformers model: the worker finds out
        return None
    n = getattr(cfg, "max_position_embeddings", None)
    if not isinstance(n, int) or n <= 0:
        return None
    if getattr(cfg, "model_type", "") in _OFFSET_POSITIONS:
        n -= (getattr(cfg, "pad_token_id", None) or 0) + 1
    return n


def _check_method(method: dict, base_model: str) -> dict:
    from spafit_core.config import MethodConfig

    body = {k: v for k, v in method.items() if k != "sweep" and v is not None}
    try:
        cfg = MethodConfig.from_dict(body)
        depth = _model_depth(base_model)
        if depth is not None:
            cfg.resolve(depth)
    except ConfigError as e:
        raise ConfigError(e.message, field=f"method.{e.field}" if e.field else "method") from None
    return cfg.to_dict()


def _check_dataset(session: Session, tenant_id: uuid.UUID, dataset_id: uuid.UUID, field: str) -> Dataset:
    ds = session.get(Dataset, dataset_id)
    if ds is None or ds.tenant_id != tenant_id:
        raise NotFound(f"{field} {dataset_id} not found", field=field)
    if ds.state != "ready":
        from ..errors import DatasetNotReady

        why = f": {ds.error_message}" if ds.state == "failed" and ds.error_message else ""
        raise DatasetNotReady(f"{field} {dataset_id} is {ds.state}, not ready{why}", field=field, state=ds.state)
    return ds


def _check_classes(task_type: str, label_field: str, train: Dataset, val: Dataset | None) -> None:
    """A classifier's classes, from the datasets' label counts where they were counted for this task type and label
    column: at most an adapter's MAX_LABELS, and none in validation that training lacks. The worker would otherwise
    fail the job after loading (or, past MAX_LABELS, after training: the registry refuses the adapter)."""
    from spafit_core.adapter_schema import MAX_LABELS

    def counted(ds: Dataset | None) -> dict | None:
        if ds is None or task_type == "regression" or ds.task_type != task_type or ds.label_field != label_field:
            return None
        return ds.label_counts

    classes = counted(train)
    if classes is None:
        return
    if len(classes) > MAX_LABELS:
        raise DataError(f"train_dataset has {len(classes)} distinct labels in {label_field!r}; a classifier has at "
                        f"most {MAX_LABELS} (scores? use task_type 'regression')", field="train_dataset")
    unseen = sorted(set(counted(val) or ()) - set(classes))
    if unseen:
        shown = ", ".join(repr(x) for x in unseen[:5]) + (f" and {len(unseen) - 5} more" if len(unseen) > 5 else "")
        raise DataError(f"validation_dataset has labels the training data lacks: {shown}", field="validation_dataset")


def _check_limits(body: JobCreate, hp: dict, train: Dataset, base_model: str, settings: Settings) -> None:
    """What the schema alone cannot bound: the input length against the model, the number of steps, the
    job's own time limit against the deployment's."""
    limit = max_positions(base_model)
    if limit is not None and hp.get("max_seq_length", 128) > limit:
        if "max_seq_length" in body.hyperparameters.model_fields_set:
            raise ConfigError(f"max_seq_length {hp['max_seq_length']} is longer than base model {base_model!r} "
                              f"allows ({limit} positions)", field="hyperparameters.max_seq_length")
        hp["max_seq_length"] = limit  # the default, shortened to what the model takes
    per_epoch = math.ceil(math.ceil((train.rows or 0) / hp["batch_size"]) / hp.get("gradient_accumulation_steps", 1))
    steps = per_epoch * hp["epochs"]
    if steps > settings.job_max_steps:
        raise ConfigError(f"{hp['epochs']} epochs x {per_epoch} steps = {steps} optimizer steps, more than the "
                          f"{settings.job_max_steps} a job may take (SPAFIT_JOB_MAX_STEPS): fewer epochs or a "
                          "larger batch_size", field="hyperparameters.epochs")
    if body.time_limit_s is not None and body.time_limit_s > settings.job_time_limit_s:
        raise ConfigError(f"time_limit_s {body.time_limit_s} is above this service's limit of "
                          f"{settings.job_time_limit_s} s (SPAFIT_JOB_TIME_LIMIT_S)", field="time_limit_s")


def _check_active_jobs(session: Session, tenant_id: uuid.UUID, settings: Settings, adding: int) -> None:
    """At most `max_active_jobs_per_tenant` training runs queued or running, counting each sweep trial as a run
    (a sweep's parent runs nothing). The tenant's row is locked to the end of the creating transaction, so
    concurrent creates on any API replica count in turn."""
    limit = settings.max_active_jobs_per_tenant
    if adding > limit:
        raise ConfigError(f"the sweep has {adding} trials, more than the {limit} training jobs a tenant may have "
                          "queued or running (SPAFIT_MAX_ACTIVE_JOBS_PER_TENANT): list fewer values",
                          field="method.sweep")
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
    active = session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.kind != "sweep", Job.status.in_(("queued", "running"))))
    if active + adding > limit:
        what = f"{adding} more" if adding > 1 else "one more"
        raise TooManyJobs(f"this tenant has {active} training jobs queued or running and may have {limit} "
                          f"(SPAFIT_MAX_ACTIVE_JOBS_PER_TENANT), so not {what}; retry when one has finished",
                          headers={"Retry-After": str(TOO_MANY_JOBS_RETRY_AFTER_S)}, limit=limit, active=active)


def replayed_under_lock(session: Session, tenant_id: uuid.UUID, idempotency_key: str) -> Job | None:
    """The job a concurrent request with this Idempotency-Key created, looked up with the tenant's row locked (as
    `_check_active_jobs` locks it): without this, a retry racing its first try waited for that lock, then counted
    the first try's job against the tenant's limit and answered 429 instead of the job."""
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key))


def request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def create(session: Session, tenant_id: uuid.UUID, body: JobCreate, settings: Settings, *,
           idempotency_key: str | None = None) -> tuple[Job, bool]:
    """Validate and store a queued job. Returns (job, created); with an Idempotency-Key already used for
    the same body, the existing job and False; for another body, 409."""
    digest = request_hash(body)
    refused: WebhookUrlRefused | TooManyLookups | None = None
    if body.webhook_url is not None:
        # First: the name lookup (up to webhooks.RESOLVE_TIMEOUT_S) then holds no pooled connection (a session holds
        # one from its first query on). A refusal waits for the replay below: a retry with a used Idempotency-Key
        # answers with its job even while the host does not resolve (a retry after a timeout, DNS failing).
        from . import webhooks

        try:
            webhooks.check_url(body.webhook_url, settings, tenant_id=tenant_id)
        except (WebhookUrlRefused, TooManyLookups) as e:
            refused = e
    if idempotency_key is not None:
        existing = session.scalar(select(Job).where(Job.tenant_id == tenant_id,
                                                    Job.idempotency_key == idempotency_key))
        if existing is not None:
            return _replay(existing, digest), False
    if refused is not None:
        raise refused
    registry.check_task_name(body.task)
    base_model = check_base_model(body.base_model or settings.default_base_model, settings)
    train = _check_dataset(session, tenant_id, body.train_dataset, "train_dataset")
    val = _check_dataset(session, tenant_id, body.validation_dataset, "validation_dataset") \
        if body.validation_dataset else None
    text_fields = body.text_fields or list(train.text_fields)
    label_field = body.label_field or train.label_field
    for ds, name in ((train, "train_dataset"), (val, "validation_dataset")):
        if ds is None:
            continue
        missing = [c for c in [*text_fields, label_field] if c is not None and c not in ds.columns]
        if missing:
            raise DataError(f"{name} has no column(s) {missing}; its columns are {ds.columns}",
                            field="text_fields" if label_field not in missing else "label_field")
    if label_field is None:
        raise DataError(f"no label column: pass label_field (columns: {train.columns})", field="label_field")
    _check_classes(body.task_type or train.task_type or "single_label_classification", label_field, train, val)
    if body.webhook_url is None and body.webhook_on_eval:
        raise ConfigError("webhook_on_eval needs a webhook_url", field="webhook_on_eval")
    method = _check_method(body.method.model_dump(), base_model)
    hp = body.hyperparameters.model_dump(exclude_none=True)
    from spafit_core.config import TrainConfig

    try:
        TrainConfig.from_dict(hp)
    except ConfigError as e:
        raise ConfigError(e.message, field=f"hyperparameters.{e.field}") from None
    _check_limits(body, hp, train, base_model, settings)
    sweep = body.method.sweep is not None
    if sweep:
        if method["name"] != "spafit":
            raise ConfigError("a sweep searches SPAFIT's n1/n2/rank: use method.name 'spafit'", field="method.sweep")
        method["sweep"] = body.method.sweep.model_dump()
        from . import sweeps

        adding = len(sweeps.grid(method, method["sweep"], _model_depth(base_model)))  # 422 if there is no trial
        if val is None:
            raise ConfigError("a sweep keeps the trial with the best validation metric: pass validation_dataset",
                              field="validation_dataset")
    else:
        adding = 1
    if idempotency_key is not None:  # again under the tenant's lock: a concurrent try of this request committed first
        existing = replayed_under_lock(session, tenant_id, idempotency_key)
        if existing is not None:
            return _replay(existing, digest), False
    _check_active_jobs(session, tenant_id, settings, adding)
    quota.reserve(session, settings.tenant_max_stored_bytes, tenant_id, 0, "a training job (its adapter)")
    job = Job(tenant_id=tenant_id, kind="sweep" if sweep else "train", task_name=body.task, task_type=body.task_type or train.task_type
              or "single_label_classification", base_model=base_model, train_dataset_id=train.id,
              validation_dataset_id=val.id if val else None, text_fields=text_fields, label_field=label_field,
              method=method, hyperparameters=hp, status="running" if sweep else "queued",
              idempotency_key=idempotency_key, request_hash=digest, max_attempts=settings.job_max_attempts,
              started_at=utcnow() if sweep else None, time_limit_s=body.time_limit_s,
              webhook_url=body.webhook_url, webhook_on_eval=body.webhook_on_eval)
    session.add(job)
    try:
        session.flush()
    except IntegrityError:  # the same Idempotency-Key, created concurrently; or a dataset deleted meanwhile
        session.rollback()
        existing = None if idempotency_key is None else session.scalar(
            select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key))
        if existing is None:
            raise deleted_meanwhile() from None
        return _replay(existing, digest), False
    if sweep:
        from . import sweeps

        trials = sweeps.create_trials(session, job, _model_depth(base_model))
        session.flush()
        events.append_in(session, job.id, "status", {"status": "running", "trials": len(trials)})
    else:
        events.append_in(session, job.id, "status", {"status": "queued"})
    session.commit()
    return job, True


def to_dispatch(session: Session, job: Job) -> list[uuid.UUID]:
    """The jobs to hand to the broker for a new job: itself, or a sweep's trials (a group: they run in
    parallel on as many workers as there are)."""
    if job.kind != "sweep":
        return [job.id]
    return list(session.scalars(select(Job.id).where(Job.parent_job_id == job.id)))


def deleted_meanwhile() -> NotFound:
    """A job's insert that failed on a foreign key: what it names (a dataset, a version) was deleted between the
    checks and the insert (once a 500)."""
    return NotFound("a dataset or adapter version this job names was deleted while the job was being created")


def _replay(job: Job, digest: str) -> Job:
    if job.request_hash != digest:
        raise Conflict("this Idempotency-Key was already used for a different job request",
                       field="Idempotency-Key", job_id=str(job.id))
    return job


def get(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"job {job_id} not found")
    return job


def list_page(session: Session, tenant_id: uuid.UUID, *, status: str | None, task: str | None, limit: int,
              cursor: str | None) -> tuple[list[Job], str | None]:
    stmt = select(Job).where(Job.tenant_id == tenant_id, Job.parent_job_id.is_(None))
    if status:
        stmt = stmt.where(Job.status == status)
    if task:
        stmt = stmt.where(Job.task_name == task)
    return paginate(session, stmt, Job, limit=limit, cursor=cursor)


def cancel(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """A queued job is cancelled at once; a running one is flagged and stops at its next step, leaving
    no adapter. A finished job cannot be cancelled (409)."""
    job = get(session, tenant_id, job_id)
    # A job moves between queued and running under the cancel (a worker claims it; a worker shutting down hands it
    # back, worker/runner.py `_release`): each update below re-reads the row, and a miss of both is tried again.
    for _ in range(3):
        # A queued job may hold a checkpoint of a lost attempt: the pointer goes now, the blob to the collector.
        res = session.execute(update(Job).where(Job.id == job.id, Job.status == "queued")
                              .values(status="cancelled", cancel_requested=True, finished_at=utcnow(),
                                      checkpoint_sha256=None))
        if res.rowcount == 1:
            events.append_in(session, job.id, "status", {"status": "cancelled", "reason": "cancelled while queued"})
            break
        res = session.execute(update(Job).where(Job.id == job.id, Job.status == "running")
                              .values(cancel_requested=True))
        if res.rowcount == 1:
            events.append_in(session, job.id, "cancel_requested", {})
            break
        status = session.scalar(select(Job.status).where(Job.id == job.id))
        if status not in ("queued", "running"):
            session.rollback()
            raise Conflict(f"job {job.id} already {status}; only queued or running jobs can be cancelled")
    else:
        session.rollback()
        raise Conflict(f"job {job.id} kept changing state while it was being cancelled; try again",
                       headers={"Retry-After": "1"})
    # Sweep trials follow their parent.
    session.execute(update(Job).where(Job.parent_job_id == job.id, Job.status == "queued")
                    .values(status="cancelled", cancel_requested=True, finished_at=utcnow()))
    session.execute(update(Job).where(Job.parent_job_id == job.id, Job.status == "running")
                    .values(cancel_requested=True))
    session.commit()
    if job.kind == "sweep":  # trials cancelled while queued never run: settle the sweep here
        from ..db import Database
        from . import sweeps

        sweeps.settle(Database(session.get_bind()), job.id)
    session.refresh(job)
    return job


def to_out(session: Session, job: Job) -> JobOut:
    version = session.scalar(select(AdapterVersion.version).where(AdapterVersion.id == job.adapter_version_id)) \
        if job.adapter_version_id else None
    return JobOut(
        id=job.id, kind=job.kind, task=job.task_name, task_type=job.task_type, base_model=job.base_model, status=job.status,
        progress=job.progress, metrics=job.metrics,
        error={"type": job.error_type, "message": job.error_message or "", "error_id": job.error_id}
        if job.error_type else None,
        adapter_version=version, attempts=job.attempts, cancel_requested=job.cancel_requested,
        method=job.method, hyperparameters=job.hyperparameters, train_dataset=job.train_dataset_id,
        validation_dataset=job.validation_dataset_id, text_fields=job.text_fields, label_field=job.label_field,
        parent_job=job.parent_job_id, time_limit_s=job.time_limit_s, webhook_url=job.webhook_url, webhook_on_eval=job.webhook_on_eval,
        created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at)


# ------------------------------------------------------------------------------------------ broker
class Broker:
    """Sends `spafit.train_adapter(job_id)` to the training queue by name (app/queues.py: the API never imports
    the worker) and tells the broker's incarnation (`epoch`): Redis' run_id changes when it restarts, and a
    Redis that keeps nothing on disk has then lost every queued message. Brokers that persist messages have one
    fixed epoch."""

    def __init__(self, settings: Settings):
        self._app = make_celery(settings)
        self._queue = TRAINING_QUEUE
        self._url = settings.broker_url
        self._prefix = settings.broker_key_prefix
        self._timeout = settings.readiness_timeout
        self._import_timeout = settings.import_timeout_s

    def send(self, job_id: uuid.UUID) -> None:
        self._app.send_task(TRAIN_ADAPTER, args=[str(job_id)], queue=self._queue)

    def send_import(self, dataset_id: uuid.UUID) -> None:
        """`spafit.import_dataset(dataset_id)` to the light queue, bounded in time by `import_timeout_s`."""
        self._app.send_task(IMPORT_DATASET, args=[str(dataset_id)], queue=LIGHT_QUEUE,
                            soft_time_limit=self._import_timeout, time_limit=self._import_timeout + 30)

    __call__ = send

    def epoch(self) -> str:
        if not self._url.startswith(("redis://", "rediss://")):
            return "persistent"
        import redis

        client = redis.Redis.from_url(self._url, socket_connect_timeout=self._timeout, socket_timeout=self._timeout)
        try:
            return str(client.info("server")["run_id"])
        finally:
            client.close()


    def waiting(self) -> int | None:
        """Messages waiting in the training queue (Redis: the queue's list; None where it cannot be told)."""
        if not self._url.startswith(("redis://", "rediss://")):
            return None
        import redis

        client = redis.Redis.from_url(self._url, socket_connect_timeout=self._timeout, socket_timeout=self._timeout)
        try:
            return int(client.llen(f"{self._prefix}{self._queue}"))
        finally:
            client.close()


def _waiting(send: Sender) -> int | None:
    waiting = getattr(send, "waiting", None)
    try:
        return waiting() if waiting is not None else None
    except Exception:
        return None


def _epoch(send: Sender) -> str | None:
    epoch = getattr(send, "epoch", None)
    try:
        return epoch() if epoch is not None else None
    except Exception:
        return None


def dispatch(send: Sender, job_id: uuid.UUID, db: Database | None = None) -> bool:
    """Send, but never fail the request over it: a job whose message did not go out (or went to a broker
    that has since lost it) is found and re-sent by `requeue_orphans`."""
    sent_at = utcnow()  # before sending: a worker may claim (and beat) before the write below, and a dead running
    # job is re-sent when its last send is older than its last beat (`requeue_orphans`)
    try:
        send(job_id)
    except Exception as e:  # broker down: the job row is safe
        log.warning("could not send job %s to the broker (%s); it will be re-sent", job_id, e)
        return False
    if db is not None:
        with db.transaction() as s:
            s.execute(update(Job).where(Job.id == job_id).values(enqueued_at=sent_at, broker_epoch=_epoch(send)))
    return True


def requeue_orphans(db: Database, send: Sender, settings: Settings) -> list[uuid.UUID]:
    """Re-send (1) queued jobs never handed to the broker, or handed to a broker incarnation that no longer
    exists, or handed over more than `job_claim_timeout_s` ago and still not claimed (a worker took the message
    and died before claiming), and (2) running jobs whose heartbeat went stale (their worker died where no
    re-delivery happens, e.g. its whole machine). Sending twice is harmless: the worker's claim is atomic.
    Then settle sweeps whose trials all ended (idempotent).

    An unclaimed job is re-sent only while the training queue holds no message (where the broker can tell):
    a job waiting behind others is not lost, and re-sending it every timeout would pile up duplicates."""
    now = utcnow()
    stale = now - timedelta(seconds=settings.job_heartbeat_stale_s)
    unclaimed_since = now - timedelta(seconds=settings.job_claim_timeout_s)
    epoch = _epoch(send)
    backlog = _waiting(send)
    with db.session() as s:
        unclaimed = (Job.enqueued_at < unclaimed_since) if not backlog else false()
        lost_queued = (Job.status == "queued") & (Job.kind != "sweep") & (Job.cancel_requested.is_(False)) & (
            Job.enqueued_at.is_(None) | unclaimed
            | ((Job.broker_epoch != epoch) if epoch is not None else False))
        # A dead running job is re-sent once per silence of its worker (not since it went silent), then again only
        # as a queued one would be (the message unclaimed with nothing waiting, or sent to a broker that lost it):
        # re-sent every staleness period, its copies piled up while workers were down (22 for one job in a minute
        # and a half), each costing a worker a fresh child before any new job could start.
        dead_running = (Job.status == "running") & (Job.kind != "sweep") & (
            Job.heartbeat_at.is_(None) | (Job.heartbeat_at < stale)) & (
            Job.enqueued_at.is_(None) | (Job.enqueued_at < Job.heartbeat_at) | unclaimed
            | ((Job.broker_epoch != epoch) if epoch is not None else False))
        ids = list(s.scalars(select(Job.id).where(or_(lost_queued, dead_running)).limit(500)))
    sent = [i for i in ids if dispatch(send, i, db)]
    if sent:
        log.info("re-sent %d orphaned job(s) to the broker", len(sent))
    settle_sweeps(db)
    return sent


def settle_sweeps(db: Database) -> list[uuid.UUID]:
    """Settle running sweeps whose trials are all final (their last trial's worker died before settling)."""
    from . import sweeps

    settled = []
    for sweep_id in sweeps.unsettled(db):
        try:
            sweeps.settle(db, sweep_id)
            settled.append(sweep_id)
        except Exception:
            log.warning("could not settle sweep %s", sweep_id, exc_info=True)
    if settled:
        log.info("settled %d sweep(s) whose trials had all ended", len(settled))
    return settled


def count_by_status(db: Database) -> dict[str, int]:
    from sqlalchemy import func

    from ..models import JOB_STATUSES

    with db.session() as s:
        counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    return {status: counts.get(status, 0) for status in JOB_STATUSES}
