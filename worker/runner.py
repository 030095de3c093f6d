"""Runs one fine-tuning job: claim it atomically, train with `spafit_core`, forward progress as job
events, save resumable checkpoints as blobs, register the adapter. Every state change is in the database.

The claim, the fencing of every write by the claim's token, the retries on transient database errors and
the heartbeat are in `worker/lease.py` (their rules are its docstring; the names are re-exported here).
"""

from __future__ import annotations

import logging
import math
import tempfile
import uuid
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import Database
from app.errors import AppError
from app.models import Job, utcnow
from app.services import blobs, events, registry, sweeps
from app.settings import Settings

from .lease import (  # noqa: F401  (re-exported: the lease was runner.py's)
    MAX_BACKOFF_S,
    TRANSIENT_DB_ERRORS,
    Claim,
    DatabaseOutage,
    Lease,
    LeaseLost,
    _deadline,
    _drop_blob,
    _end_unclaimed,
    _Heartbeat,
    _holder_alive,
    _time_limit_reason,
    _transient,
    _write,
    claim,
    guard,
    time_limit_s,
    worker_id,
)

log = logging.getLogger("spafit.worker")


def run_job(db: Database, job_id: uuid.UUID | str, settings: Settings) -> str:
    """Run (or resume) a job to a final state. Returns the claim outcome, the final status, `taken-over`
    (another worker holds the job now) or `interrupted` (the database stayed away: the job will be resumed)."""
    job_id = uuid.UUID(str(job_id))
    me = worker_id()
    try:
        c = claim(db, job_id, me, settings)
    except LeaseLost:
        return "taken-over"
    except Exception as e:
        if not (_transient(e) or isinstance(e, DatabaseOutage)):
            raise
        log.warning("job %s: the database is unreachable (%s); the job will be sent again", job_id, type(e).__name__)
        return "interrupted"
    if c.outcome != "claimed":
        log.info("job %s: %s", job_id, c.outcome)
        if c.job is not None and c.job.kind == "trial" and c.outcome in ("final", "cancelled", "gave_up", "timed_out"):
            _settle_sweep(db, c.job.id)  # idempotent: a redelivered trial's message settles its sweep
        return c.outcome
    assert c.lease is not None and c.job is not None
    job, lease = c.job, c.lease
    hb = _Heartbeat(lease, settings.job_heartbeat_interval_s, _deadline(job, settings))
    hb.start()
    tmp = tempfile.TemporaryDirectory(prefix="spafit-job-")  # lives until the job ends
    try:
        return _train(db, job, lease, hb, settings, Path(tmp.name))
    finally:
        hb.stop()
        tmp.cleanup()
        if lease.refused or lease.retries:
            log.warning("job %s attempt %d: %d fenced write(s) refused, %d write(s) retried", job_id, lease.attempt,
                        lease.refused, lease.retries)


def _train(db: Database, job: Job, lease: Lease, hb: _Heartbeat, settings: Settings, tmp: Path) -> str:
    # Only now import torch and the trainer (seconds in a fresh child): a duplicate delivery of a job that
    # is final or held by another worker is answered in milliseconds, not after a torch import.
    from spafit_core import MethodConfig, TrainConfig
    from spafit_core import data as core_data
    from spafit_core.errors import BaseModelUnavailable, SpafitError, TrainingCancelled
    from spafit_core.pipeline import finetune

    job_id = job.id
    try:
        if job.kind in ("predict", "evaluate"):  # batch prediction, evaluation: worker/batch.py, same lease
            from .batch import run as run_batch

            return run_batch(db, job, lease, hb, settings)

        def load(s: Session) -> tuple[dict, bytes | None]:  # bytes only: parsing happens outside the transaction
            train_ds, train_bytes = _dataset(s, job.tenant_id, job.train_dataset_id)
            raw = {"train": (train_bytes, train_ds.format)}
            if job.validation_dataset_id is not None:
                val_ds, val_bytes = _dataset(s, job.tenant_id, job.validation_dataset_id)
                raw["validation"] = (val_bytes, val_ds.format)
            return raw, blobs.get(s, job.checkpoint_sha256) if job.checkpoint_sha256 else None

        raw, ckpt_bytes = lease.write(load, "read the datasets")
        tables = {name: core_data.read_table(data, fmt) for name, (data, fmt) in raw.items()}
        ckpt = tmp / "checkpoint.safetensors"
        if ckpt_bytes is not None:
            ckpt.write_bytes(ckpt_bytes)
        hp = dict(job.hyperparameters or {})
        hp.setdefault("checkpoint_every_steps", settings.checkpoint_every_steps)
        hp.setdefault("log_every_steps", settings.job_log_every_steps)
        train_cfg = TrainConfig.from_dict(hp)
        method = MethodConfig.from_dict({k: v for k, v in job.method.items() if k != "sweep"})
        sink = _EventSink(lease)
        result = finetune(
            tables["train"], tables.get("validation"), base_model=job.base_model, method=method,
            train_config=train_cfg, text_fields=job.text_fields or None, label_field=job.label_field,
            task_type=job.task_type, callback=sink, should_stop=hb.should_stop, checkpoint_path=ckpt,
        )
        cfg, weights = result.serialize()
        from spafit_core.train import check_finite

        check_finite(weights)  # a NaN adapter is never stored, let alone activated
        if job.kind == "trial":
            _finish_trial(lease, cfg, weights, result)
            _settle_sweep(db, job_id)
            return "succeeded"

        def register(s: Session) -> None:
            old_ckpt = s.scalar(select(Job.checkpoint_sha256).where(Job.id == job_id))
            lease.hold(s)  # checked (and the row locked) before anything is registered
            # A cancel accepted after the last step (during the final evaluation or the serialising) wins: nothing
            # is registered or activated. The API's cancel locks this row too, so one of the two comes first.
            if s.scalar(select(Job.cancel_requested).where(Job.id == job_id)):
                raise TrainingCancelled("cancelled before its adapter was registered")
            version = registry.register_version(s, job.tenant_id, job.task_name, cfg, weights, job_id=job_id)
            lease.hold(s, status="succeeded", finished_at=utcnow(), adapter_version_id=version.id,
                       metrics=result.metrics, checkpoint_sha256=None, error_type=None, error_message=None)
            if old_ckpt:
                s.flush()
                blobs.delete_if_unreferenced(s, old_ckpt)
            events.append_in(s, job_id, "status", {"status": "succeeded", "adapter_version": version.version,
                                                   "metrics": result.metrics, "steps": result.train_result.steps,
                                                   "resumed_from_step": result.train_result.resumed_from_step})

        lease.write(register, "register the adapter")
        return "succeeded"
    except LeaseLost:
        return "taken-over"
    except DatabaseOutage as e:
        log.error("job %s attempt %d ends: %s; it will be re-sent and resume from its last checkpoint",
                  job_id, lease.attempt, e)
        return "interrupted"
    except TrainingCancelled as e:
        if lease.lost.is_set():  # another worker owns it now; leave its state alone
            return "taken-over"
        if hb.shutting_down.is_set() and not hb.cancelled.is_set() and not hb.timed_out.is_set():
            return _release(lease, job, settings)
        if hb.timed_out.is_set():
            with db.session() as s:
                now = s.get(Job, job_id)
            reason = _time_limit_reason(now, settings)
            return _fail(db, lease, job, "time-limit", reason)
        return _end(db, lease, job, "cancelled", event={"status": "cancelled", "reason": e.message})
    except BaseModelUnavailable as e:  # the deployment's model store (its paths stay in the log), not the job's input
        return _internal(db, lease, job, e)
    except (SpafitError, AppError) as e:
        return _fail(db, lease, job, e.type, e.message)
    except Exception as e:
        if _transient(e):  # a database error outside the retried writes: the attempt ends, the job resumes
            log.error("job %s attempt %d ends on a database error; it will be resumed", job_id, lease.attempt,
                      exc_info=True)
            return "interrupted"
        return _internal(db, lease, job, e)


def _internal(db: Database, lease: Lease, job: Job, e: BaseException) -> str:
    """Fail the job on an internal error: in words and an error id for the client, the details in the log."""
    error_id = uuid.uuid4().hex[:16]
    log.error("job %s failed on an internal error (error id %s)", job.id, error_id, exc_info=e)
    message = (f"the job failed on an internal error ({type(e).__name__}); the service's log has the "
               f"details under error id {error_id}")
    return _fail(db, lease, job, "internal-error", message, error_id=error_id)


# Hand-backs a job may have that do not count against its attempts: past them each counts as one, so a job whose
# workers keep being stopped (a pod evicted again and again) ends `worker-lost` instead of looping for ever.
MAX_HANDBACKS = 20


def _release(lease: Lease, job: Job, settings: Settings) -> str:
    """The worker is shutting down (worker/shutdown.py): the job goes back to the queue now, in one fenced write,
    and resumes from its last checkpoint on the next worker. Its attempt is not counted against its limit (the limit
    is raised by one: attempts, part of the fencing token, only grows), for up to MAX_HANDBACKS hand-backs.

    A cancel accepted before this write (its heartbeat had not read it yet) wins: the job ends `cancelled` here.
    Handed back, it sat `queued` with its cancel pending, which the requeuer never re-sends: queued for ever."""

    def write(s: Session) -> bool:
        lease.hold(s)  # the row locked first: the API's cancel of a running job locks it too, one comes first
        cancel, limit = s.execute(select(Job.cancel_requested, Job.max_attempts).where(Job.id == job.id)).one()
        if cancel:
            return False
        lease.hold(s, status="queued", claimed_by=None, enqueued_at=utcnow(),
                   max_attempts=max(limit, min(limit + 1, settings.job_max_attempts + MAX_HANDBACKS)))
        events.append_in(s, job.id, "status", {
            "status": "queued", "attempt": lease.attempt,
            "reason": "its worker shut down; it resumes from its last checkpoint on the next worker"})
        return True

    try:
        if not lease.write(write, "hand the job back at shutdown"):
            return _end(lease.db, lease, job, "cancelled", event={
                "status": "cancelled", "reason": "cancelled as its worker shut down"})
    except LeaseLost:
        return "taken-over"
    except DatabaseOutage as e:  # left running: its heartbeat goes stale and it is re-sent like a lost attempt
        log.error("job %s: could not hand it back at shutdown (%s)", job.id, e)
        return "interrupted"
    log.info("job %s attempt %d handed back to the queue: the worker is shutting down", job.id, lease.attempt)
    return "released"


def _fail(db: Database, lease: Lease, job: Job, type_: str, message: str, *, error_id: str | None = None) -> str:
    error = {"type": type_, "message": message, **({"error_id": error_id} if error_id else {})}
    return _end(db, lease, job, "failed", error=(type_, message), error_id=error_id,
                event={"status": "failed", "error": error})


def _end(db: Database, lease: Lease, job: Job, status: str, **kw) -> str:
    try:
        lease.end(status, **kw)
    except LeaseLost:
        return "taken-over"
    except DatabaseOutage as e:
        log.error("job %s: could not record %s (%s); it will be re-sent", job.id, status, e)
        return "interrupted"
    if job.kind == "trial":
        _settle_sweep(db, job.id)
    return status


def _finish_trial(lease: Lease, cfg: dict, weights: bytes, result) -> None:
    """A sweep trial keeps its adapter as a blob for the sweep to pick from; it registers nothing."""
    from spafit_core.adapter import pack

    archive = pack(cfg, weights)

    def keep(s: Session) -> None:
        old_ckpt = s.scalar(select(Job.checkpoint_sha256).where(Job.id == lease.job_id))
        sha = blobs.put(s, archive)
        lease.hold(s, status="succeeded", finished_at=utcnow(), result_sha256=sha, metrics=result.metrics,
                   checkpoint_sha256=None)
        if old_ckpt:
            s.flush()
            blobs.delete_if_unreferenced(s, old_ckpt)
        events.append_in(s, lease.job_id, "status", {"status": "succeeded", "metrics": result.metrics,
                                                     "trainable_params": cfg["param_counts"]["total"]})

    lease.write(keep, "keep the trial's adapter")


def _settle_sweep(db: Database, trial_id: uuid.UUID) -> None:
    """Tell the trial's sweep; if that fails, the requeuer settles the sweep later (settling is idempotent)."""
    try:
        sweeps.trial_finished(db, trial_id)
    except Exception:
        log.warning("could not settle the sweep of trial %s now; the requeuer will", trial_id, exc_info=True)


def _dataset(session, tenant_id, dataset_id):
    from app.services import datasets

    return datasets.content(session, tenant_id, dataset_id)


class _EventSink:
    """The trainer's callback: progress, evaluations and checkpoints become job events and job columns, each
    in one fenced transaction (retried on a transient database error)."""

    def __init__(self, lease: Lease):
        self.lease = lease

    def __call__(self, event: dict) -> None:
        lease, job_id = self.lease, self.lease.job_id
        kind = event.get("type")
        data = {k: v for k, v in event.items() if k not in ("type", "path")}
        if kind == "progress":
            progress = {k: event[k] for k in ("step", "total_steps", "epoch", "eta_seconds")}
            values = {"progress": progress}
        elif kind == "eval":
            values = {"metrics": {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                                  for k, v in event["metrics"].items()}}
        else:
            values = {}
        if kind == "checkpoint":
            data_bytes = Path(event["path"]).read_bytes()
            data = {"step": event["step"], "epoch": event["epoch"], "bytes": len(data_bytes)}

            def write(s: Session) -> None:
                old = s.scalar(select(Job.checkpoint_sha256).where(Job.id == job_id))
                sha = blobs.put(s, data_bytes)
                lease.hold(s, checkpoint_sha256=sha)  # the pointer moves only while this claim holds ...
                if old and old != sha:
                    s.flush()
                    blobs.delete_if_unreferenced(s, old)  # ... and so only the holder deletes the one it replaces
                events.append_in(s, job_id, kind, data)
        else:
            def write(s: Session) -> None:
                lease.hold(s, **values)
                events.append_in(s, job_id, kind, data)

        lease.write(write, f"record {kind}")
