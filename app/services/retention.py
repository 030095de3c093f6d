"""Retention: deleting finished jobs, and the collector that frees what nothing needs any more.

`delete_job` removes a finished job (a sweep with its trials) and its events (the foreign key cascades);
the adapter version it produced stays registered and servable, its `job_id` set to null by the foreign key:
a version is the product of a job, not part of its log. Once no job names a dataset, the dataset can be
deleted too.

`collect` (the periodic task in the API, `spafit db gc` by hand) does, in short transactions:
1. drops the checkpoint pointer of every finished job (a final job never resumes), and the trial results of
   finished sweeps;
2. prunes the events of jobs that finished more than `event_retention_days` ago (the job row stays);
3. deletes blobs that no row references and that were last stored more than `gc_blob_grace_s` ago.
Every step is safe to run concurrently with itself (several API replicas) and with writers: a blob is
deleted only by a statement that re-checks every reference, and a writer that takes a reference at the
same moment makes one of the two transactions fail (foreign keys; `blobs.put` locks an existing row), in
which case the blob is simply kept until the next run.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, delete, exists, not_, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from ..db import Database
from ..errors import Conflict, NotFound
from ..models import JOB_FINAL_STATUSES, BatchChunk, Blob, Job, JobEvent, utcnow
from ..settings import Settings
from . import blobs, jobs

log = logging.getLogger("spafit.retention")

EVENT_BATCH = 5000  # events deleted per statement
BLOB_BATCH = 200  # blobs examined per transaction


# ------------------------------------------------------------------------------------------- delete job
def delete_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> None:
    """Delete finished job `job_id` of `tenant_id` (404 for another tenant's); 409 while it is queued or
    running, or for a sweep trial (delete its sweep)."""
    job = jobs.get(session, tenant_id, job_id)
    if job.parent_job_id is not None:
        raise Conflict(f"job {job.id} is a trial of sweep {job.parent_job_id}; delete the sweep instead",
                       sweep=str(job.parent_job_id))
    # The row lock orders us after any event writer of this job (they lock it first too) and stops a
    # status change between the check and the delete.
    job = session.execute(select(Job).where(Job.id == job.id).with_for_update()
                          .execution_options(populate_existing=True)).scalar_one_or_none()
    if job is None:  # deleted by a concurrent request while we waited for its lock
        session.rollback()
        raise NotFound(f"job {job_id} not found")
    status = job.status
    if status not in JOB_FINAL_STATUSES:
        session.rollback()
        raise Conflict(f"job {job.id} is {status}; only a finished job can be deleted: cancel it first "
                       f"(POST /v1/jobs/{job.id}/cancel) and delete it once it has ended", status=status)
    trials = list(session.execute(select(Job.id, Job.status, Job.checkpoint_sha256, Job.result_sha256)
                                  .where(Job.parent_job_id == job.id).with_for_update()).all())
    running = [t.id for t in trials if t.status not in JOB_FINAL_STATUSES]
    if running:
        session.rollback()
        raise Conflict(f"sweep {job.id} still has {len(running)} trial(s) queued or running; wait for them to end",
                       status=status)
    shas = {sha for sha in (job.checkpoint_sha256, job.result_sha256) if sha}
    shas |= {sha for t in trials for sha in (t.checkpoint_sha256, t.result_sha256) if sha}
    if trials:
        session.execute(delete(Job).where(Job.parent_job_id == job.id))
    session.execute(delete(Job).where(Job.id == job.id))  # its events (and webhook deliveries) cascade
    session.commit()
    log.info("deleted job %s (%d trial(s))", job.id, len(trials))
    for sha in shas:  # best effort: what is left goes with the next collection
        _delete_blob(session, sha)
    session.commit()


# ----------------------------------------------------------------------------------------------- collect
@dataclass
class GcReport:
    checkpoints_dropped: int = 0  # pointers of finished jobs cleared
    trial_results_dropped: int = 0  # result pointers of trials of finished sweeps cleared
    events_pruned: int = 0
    chunks_dropped: int = 0  # output chunks of batch predictions that ended failed or cancelled (never readable)
    blobs_deleted: int = 0
    bytes_freed: int = 0
    blobs_kept_busy: int = 0  # unreferenced when looked at, referenced again when deleted: kept
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def record(self, metrics) -> None:
        """Add what was freed to `spafit_gc_freed`."""
        for what, n in (("blobs", self.blobs_deleted), ("bytes", self.bytes_freed), ("events", self.events_pruned),
                        ("batch_chunks", self.chunks_dropped),
                        ("checkpoints", self.checkpoints_dropped), ("trial_results", self.trial_results_dropped)):
            metrics.gc_freed.labels(what=what).inc(n)

    def __str__(self) -> str:
        return (f"dropped {self.checkpoints_dropped} checkpoint(s) of finished jobs and "
                f"{self.trial_results_dropped} trial result(s) of finished sweeps and the output of "
                f"{self.chunks_dropped} chunk(s) of ended batch predictions; pruned {self.events_pruned} "
                f"event(s); deleted {self.blobs_deleted} blob(s), {_size(self.bytes_freed)} freed "
                f"({self.seconds:.2f}s)")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def collect(db: Database, settings: Settings, *, now: datetime | None = None) -> GcReport:
    """One collection (see the module docstring); returns what it freed."""
    started = time.monotonic()
    now = now or utcnow()
    report = GcReport()
    report.checkpoints_dropped, report.trial_results_dropped = drop_finished_pointers(db)
    report.chunks_dropped = drop_unreadable_chunks(db)
    report.events_pruned = prune_events(db, now - timedelta(days=settings.event_retention_days))
    report.blobs_deleted, report.bytes_freed, report.blobs_kept_busy = collect_blobs(
        db, now - timedelta(seconds=settings.gc_blob_grace_s))
    report.seconds = time.monotonic() - started
    log.info("gc: %s", report)
    return report


def drop_finished_pointers(db: Database) -> tuple[int, int]:
    """Clear checkpoint pointers of finished jobs and result pointers of trials whose sweep finished; the
    blobs are then unreferenced and go in the same collection."""
    parent = aliased(Job)
    with db.transaction() as s:
        checkpoints = s.execute(update(Job).where(Job.checkpoint_sha256.is_not(None),
                                                  Job.status.in_(JOB_FINAL_STATUSES))
                                .values(checkpoint_sha256=None)).rowcount
        finished_sweep = exists().where(parent.id == Job.parent_job_id, parent.status.in_(JOB_FINAL_STATUSES))
        results = s.execute(update(Job).where(Job.result_sha256.is_not(None), Job.status.in_(JOB_FINAL_STATUSES),
                                              Job.parent_job_id.is_not(None), finished_sweep)
                            .values(result_sha256=None)).rowcount
    return checkpoints, results


def drop_unreadable_chunks(db: Database) -> int:
    """Delete the stored output chunks of batch predictions that ended failed or cancelled: results are served only
    for a succeeded job and a final job never resumes, so nothing can read them again (a cancelled million-row
    prediction kept its partial output for good)."""
    ended = select(Job.id).where(Job.kind == "predict", Job.status.in_(("failed", "cancelled")))
    with db.transaction() as s:
        return s.execute(delete(BatchChunk).where(BatchChunk.job_id.in_(ended))).rowcount


def prune_events(db: Database, cutoff: datetime) -> int:
    """Delete events older than `cutoff` of jobs that finished before it, a batch per transaction."""
    old = select(JobEvent.job_id, JobEvent.seq).join(Job, Job.id == JobEvent.job_id).where(
        JobEvent.created_at < cutoff, Job.status.in_(JOB_FINAL_STATUSES), Job.finished_at < cutoff) \
        .limit(EVENT_BATCH)
    total = 0
    while True:
        with db.transaction() as s:
            keys = s.execute(old).all()
            if not keys:
                return total
            total += s.execute(delete(JobEvent).where(tuple_(JobEvent.job_id, JobEvent.seq).in_(keys))).rowcount
        if len(keys) < EVENT_BATCH:
            return total


def _unreferenced():
    """A condition on `Blob`: no column with a foreign key to blobs.sha256 names it (found from the schema, so
    a reference added later is honoured without a change here)."""
    return and_(*(not_(exists().where(col == Blob.sha256)) for col in blobs.references()))


def collect_blobs(db: Database, stored_before: datetime) -> tuple[int, int, int]:
    """Delete unreferenced blobs last stored before `stored_before`: (count, bytes, kept because referenced
    again meanwhile)."""
    deleted = freed = busy = 0
    after = ""  # walk by sha256, so each run looks at each candidate once
    while True:
        with db.session() as s:
            batch = s.execute(select(Blob.sha256, Blob.size).where(
                Blob.sha256 > after, Blob.created_at < stored_before, _unreferenced())
                .order_by(Blob.sha256).limit(BLOB_BATCH)).all()
            for sha, size in batch:
                if _delete_blob(s, sha):
                    deleted, freed = deleted + 1, freed + size
                else:
                    busy += 1
            s.commit()
        if len(batch) < BLOB_BATCH:
            return deleted, freed, busy
        after = batch[-1].sha256


def _delete_blob(session: Session, sha: str) -> bool:
    """Delete blob `sha` if nothing references it, in a savepoint: a reference taken concurrently makes the
    delete fail (foreign key) and the blob stays."""
    try:
        with session.begin_nested():
            return session.execute(delete(Blob).where(Blob.sha256 == sha, _unreferenced())).rowcount > 0
    except IntegrityError:
        return False
