"""Runs one fine-tuning job: claim it atomically, train with `spafit_core`, forward progress as job
events, save resumable checkpoints as blobs, register the adapter. Every state change is in the database.

Claim rules (what makes re-delivery safe):
- a job in a final state is never run again (a duplicate message is a no-op);
- a job held by a live worker is left to it (`busy`); a holder is live if its heartbeat is fresh and,
  when it ran on this host, its process still exists;
- every claim counts an attempt; a job that has used `max_attempts` fails with a reason instead of
  looping (a poison job that kills its worker every time);
- the claim is a compare-and-swap on (claimed_by, attempts), so two workers can never both win.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import Database
from app.models import Job, utcnow
from app.services import blobs, events, registry, sweeps
from app.settings import Settings

log = logging.getLogger("spafit.worker")
T = TypeVar("T")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _holder_alive(claimed_by: str | None) -> bool:
    """False when the holder ran on this host and its process is gone (SIGKILL, OOM kill)."""
    if not claimed_by:
        return False
    host, _, pid = claimed_by.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine: only its heartbeat can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Claim:
    outcome: str  # claimed | final | busy | gave_up | cancelled
    job: Job | None = None


def claim(db: Database, job_id: uuid.UUID, me: str, settings: Settings) -> Claim:
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            return Claim("final")
        if job.status in ("succeeded", "failed", "cancelled"):
            return Claim("final", job)
        if job.kind == "sweep":  # a sweep's parent is never run: its trials are
            return Claim("final", job)
        if job.cancel_requested:
            _finish(db, job_id, "cancelled", event={"status": "cancelled", "reason": "cancelled before it ran"})
            return Claim("cancelled", job)
        stale_before = utcnow() - timedelta(seconds=settings.job_heartbeat_stale_s)
        fresh = job.heartbeat_at is not None and job.heartbeat_at > stale_before
        if job.status == "running" and job.claimed_by != me and fresh and _holder_alive(job.claimed_by):
            return Claim("busy", job)
        if job.attempts >= job.max_attempts:
            step = (job.progress or {}).get("step")
            reason = (f"the job stopped its worker {job.attempts} time(s)"
                      + (f", the last time at step {step}" if step is not None else "")
                      + f"; giving up after {job.max_attempts} attempts (SPAFIT_JOB_MAX_ATTEMPTS)")
            _finish(db, job_id, "failed", error=("worker-lost", reason),
                    event={"status": "failed", "error": {"type": "worker-lost", "message": reason}})
            return Claim("gave_up", job)
        prev_holder, prev_attempts = job.claimed_by, job.attempts
    now = utcnow()
    with db.transaction() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(("queued", "running")),
                   Job.attempts == prev_attempts,
                   Job.claimed_by.is_(None) if prev_holder is None else Job.claimed_by == prev_holder)
            .values(status="running", claimed_by=me, claimed_at=now, heartbeat_at=now,
                    attempts=Job.attempts + 1, started_at=now if prev_attempts == 0 else Job.started_at)
        )
        if res.rowcount != 1:
            return Claim("busy")
    with db.session() as s:
        job = s.get(Job, job_id)
        events.append(db, job_id, "status", {"status": "running", "attempt": job.attempts, "worker": me,
                                             "resume": job.checkpoint_sha256 is not None})
        return Claim("claimed", job)


def _finish(db: Database, job_id: uuid.UUID, status: str, *, error: tuple[str, str] | None = None,
            event: dict | None = None, **values) -> None:
    """Set a final status and write its event in one transaction: a reader (the live event stream ends at a
    final status) never sees the status without its event."""

    def write(s) -> None:
        s.execute(update(Job).where(Job.id == job_id).values(
            status=status, finished_at=utcnow(), error_type=error[0] if error else None,
            error_message=error[1] if error else None, **values))
        if event is not None:
            events.append_in(s, job_id, "status", event)

    _transaction(db, write)


def _transaction(db: Database, write: Callable[[Session], T], attempts: int = 5) -> T:
    """`write(session)` in one transaction, run again if it lost a race for an event's seq to a concurrent
    writer (the API appends events too): the whole transaction rolled back, so a retry is safe."""
    for i in range(attempts):
        try:
            with db.transaction() as s:
                return write(s)
        except IntegrityError:
            if i == attempts - 1:
                raise
    raise AssertionError("unreachable")


class _Heartbeat(threading.Thread):
    """Proves liveness every few seconds and watches the job's cancel flag."""

    def __init__(self, db: Database, job_id: uuid.UUID, me: str, interval: float):
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.db, self.job_id, self.me, self.interval = db, job_id, me, interval
        self.cancelled = threading.Event()
        self._stop_evt = threading.Event()
        self.lost = threading.Event()  # another worker took the job over

    def run(self) -> None:
        while not self._stop_evt.wait(self.interval):
            self.beat()

    def beat(self) -> None:
        try:
            with self.db.transaction() as s:
                res = s.execute(update(Job).where(Job.id == self.job_id, Job.claimed_by == self.me)
                                .values(heartbeat_at=utcnow()))
                if res.rowcount == 0:
                    self.lost.set()
                flag = s.scalar(select(Job.cancel_requested).where(Job.id == self.job_id))
                if flag:
                    self.cancelled.set()
        except Exception:  # the database may be briefly away; training goes on, the next beat retries
            log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)

    def stop(self) -> None:
        self._stop_evt.set()


def run_job(db: Database, job_id: uuid.UUID | str, settings: Settings) -> str:
    """Run (or resume) a job to a final state. Returns the claim outcome or the final status."""
    job_id = uuid.UUID(str(job_id))
    me = worker_id()
    c = claim(db, job_id, me, settings)
    if c.outcome != "claimed":
        log.info("job %s: %s", job_id, c.outcome)
        if c.outcome in ("cancelled", "gave_up") and c.job is not None:
            _after_trial(db, c.job)
        return c.outcome
    # Only now import torch and the trainer (seconds in a fresh child): a duplicate delivery of a job that
    # is final or held by another worker is answered in milliseconds, not after a torch import.
    from spafit_core import MethodConfig, TrainConfig
    from spafit_core import data as core_data
    from spafit_core.errors import SpafitError, TrainingCancelled
    from spafit_core.pipeline import finetune

    job = c.job
    hb = _Heartbeat(db, job_id, me, settings.job_heartbeat_interval_s)
    hb.start()
    tmp = tempfile.TemporaryDirectory(prefix="spafit-job-")  # lives until the job ends
    try:
        with db.session() as s:
            train_ds, train_bytes = _dataset(s, job.tenant_id, job.train_dataset_id)
            tables = {"train": core_data.read_table(train_bytes, train_ds.format)}
            if job.validation_dataset_id is not None:
                val_ds, val_bytes = _dataset(s, job.tenant_id, job.validation_dataset_id)
                tables["validation"] = core_data.read_table(val_bytes, val_ds.format)
            ckpt = Path(tmp.name) / "checkpoint.safetensors"
            if job.checkpoint_sha256:
                ckpt.write_bytes(blobs.get(s, job.checkpoint_sha256))
        hp = dict(job.hyperparameters or {})
        hp.setdefault("checkpoint_every_steps", settings.checkpoint_every_steps)
        hp.setdefault("log_every_steps", settings.job_log_every_steps)
        train_cfg = TrainConfig.from_dict(hp)
        method = MethodConfig.from_dict({k: v for k, v in job.method.items() if k != "sweep"})
        sink = _EventSink(db, job_id, hb)
        result = finetune(
            tables["train"], tables.get("validation"), base_model=job.base_model, method=method,
            train_config=train_cfg, text_fields=job.text_fields or None, label_field=job.label_field,
            task_type=job.task_type, callback=sink, should_stop=lambda: hb.cancelled.is_set() or hb.lost.is_set(),
            checkpoint_path=ckpt,
        )
        cfg, weights = result.serialize()
        if job.kind == "trial":
            _finish_trial(db, job_id, cfg, weights, result)
            return "succeeded"
        def register(s: Session) -> None:
            version = registry.register_version(s, job.tenant_id, job.task_name, cfg, weights, job_id=job_id)
            old_ckpt = s.scalar(select(Job.checkpoint_sha256).where(Job.id == job_id))
            s.execute(update(Job).where(Job.id == job_id).values(
                status="succeeded", finished_at=utcnow(), adapter_version_id=version.id, metrics=result.metrics,
                checkpoint_sha256=None, error_type=None, error_message=None))
            if old_ckpt:
                s.flush()
                blobs.delete_if_unreferenced(s, old_ckpt)
            events.append_in(s, job_id, "status", {"status": "succeeded", "adapter_version": version.version,
                                                   "metrics": result.metrics, "steps": result.train_result.steps,
                                                   "resumed_from_step": result.train_result.resumed_from_step})

        _transaction(db, register)
        return "succeeded"
    except TrainingCancelled as e:
        if hb.lost.is_set():  # another worker owns it now; leave its state alone
            return "busy"
        _finish(db, job_id, "cancelled", event={"status": "cancelled", "reason": e.message})
        _after_trial(db, job)
        return "cancelled"
    except SpafitError as e:
        _finish(db, job_id, "failed", error=(e.type, e.message),
                event={"status": "failed", "error": {"type": e.type, "message": e.message}})
        _after_trial(db, job)
        return "failed"
    except Exception as e:
        log.exception("job %s failed", job_id)
        message = f"{type(e).__name__}: {str(e)[:500]}"
        _finish(db, job_id, "failed", error=("internal-error", message),
                event={"status": "failed", "error": {"type": "internal-error", "message": message}})
        _after_trial(db, job)
        return "failed"
    finally:
        hb.stop()
        tmp.cleanup()


def _finish_trial(db: Database, job_id: uuid.UUID, cfg: dict, weights: bytes, result) -> None:
    """A sweep trial keeps its adapter as a blob for the sweep to pick from; it registers nothing."""
    from spafit_core.adapter import pack

    archive = pack(cfg, weights)

    def keep(s: Session) -> None:
        sha = blobs.put(s, archive)
        s.execute(update(Job).where(Job.id == job_id).values(
            status="succeeded", finished_at=utcnow(), result_sha256=sha, metrics=result.metrics,
            checkpoint_sha256=None))
        events.append_in(s, job_id, "status", {"status": "succeeded", "metrics": result.metrics,
                                               "trainable_params": cfg["param_counts"]["total"]})

    _transaction(db, keep)
    sweeps.trial_finished(db, job_id)


def _after_trial(db: Database, job: Job) -> None:
    if job.kind == "trial":
        sweeps.trial_finished(db, job.id)


def _dataset(session, tenant_id, dataset_id):
    from app.services import datasets

    return datasets.content(session, tenant_id, dataset_id)


class _EventSink:
    """The trainer's callback: progress, evaluations and checkpoints become job events and job columns."""

    def __init__(self, db: Database, job_id: uuid.UUID, hb: _Heartbeat):
        self.db, self.job_id, self.hb = db, job_id, hb
        self._last_progress = 0.0

    def __call__(self, event: dict) -> None:
        kind = event.get("type")
        data = {k: v for k, v in event.items() if k not in ("type", "path")}
        if kind == "progress":
            progress = {k: event[k] for k in ("step", "total_steps", "epoch", "eta_seconds")}
            with self.db.transaction() as s:
                s.execute(update(Job).where(Job.id == self.job_id).values(progress=progress, heartbeat_at=utcnow()))
        elif kind == "eval":
            with self.db.transaction() as s:
                s.execute(update(Job).where(Job.id == self.job_id).values(metrics=event["metrics"]))
        elif kind == "checkpoint":
            data_bytes = Path(event["path"]).read_bytes()
            with self.db.transaction() as s:
                sha = blobs.put(s, data_bytes)
                old = s.scalar(select(Job.checkpoint_sha256).where(Job.id == self.job_id))
                s.execute(update(Job).where(Job.id == self.job_id).values(checkpoint_sha256=sha))
                if old and old != sha:
                    s.flush()
                    blobs.delete_if_unreferenced(s, old)
            data = {"step": event["step"], "epoch": event["epoch"], "bytes": len(data_bytes)}
        events.append(self.db, self.job_id, kind, data)
