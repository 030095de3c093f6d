"""The lease a worker holds on a job it runs: the atomic claim, the fenced writes, the heartbeat.

Claim rules (what makes re-delivery safe):
- a job in a final state is never run again (a duplicate message is a no-op; for a sweep trial it settles
  the sweep, in case the trial's first run died between its result and the settling);
- a job held by a live worker is left to it (`busy`); a holder is live if its heartbeat is fresh and,
  when it ran on this host, its process still exists;
- every claim counts an attempt; a job that has used `max_attempts` fails with a reason instead of
  looping (a poison job that kills its worker every time); so does a job past its wall-clock limit;
- the claim is a compare-and-swap on (claimed_by, attempts), so two workers can never both win.

Fencing (what makes a takeover safe): the claim's (claimed_by, attempts) is a fencing token. Every later
write of the run (heartbeat, progress, events, checkpoint pointer and the deletion of the checkpoint it
replaces, the result, the final status) is one transaction that first updates the job row WHERE the token
still holds and the job is running. A write that matches no row means another worker took the job over
(this one was paused past the heartbeat's staleness, or cut off from the database): the run stops at once
and writes nothing more. So a slow worker that wakes up late cannot fail, repoint or empty its successor's job.

Transient faults: a write that fails on a database error is retried with exponential backoff for up to
`job_db_retry_s`, while training waits; past that the attempt ends without touching the job, whose stale
heartbeat then gets it re-sent and resumed from its last checkpoint like any other lost attempt.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import event, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session

from app.db import Database
from app.models import Job, utcnow
from app.services import blobs, events
from app.settings import Settings

from . import shutdown

log = logging.getLogger("spafit.worker")

T = TypeVar("T")

# Errors that say "the database is away", not "this write is wrong": worth retrying.
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError, PoolTimeoutError)
MAX_BACKOFF_S = 5.0


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _holder_alive(claimed_by: str | None) -> bool:
    """False when the holder ran on this host and its process is gone (SIGKILL, OOM kill)."""
    if not claimed_by:
        return False
    host, _, pid = claimed_by.rpartition(":")
    if host != socket.gethostname() or not (pid.isascii() and pid.isdigit()):
        return True  # another machine: only its heartbeat can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def guard(db: Database, settings: Settings) -> Database:
    """Have Postgres end any session of this worker that sits idle inside a transaction for longer than a
    heartbeat takes to go stale: a process paused mid-transaction (SIGSTOP, a swapped-out VM) would otherwise
    keep its row lock on the job and block the worker taking it over. When it wakes, its connection is gone,
    its transaction rolled back, and its retried write is refused by the fence."""
    if db.engine.dialect.name != "postgresql":
        return db
    ms = max(1000, int(settings.job_heartbeat_stale_s * 1000))

    @event.listens_for(db.engine, "connect")
    def _idle_in_transaction_timeout(dbapi_conn, _record) -> None:
        autocommit = dbapi_conn.autocommit
        dbapi_conn.autocommit = True
        with dbapi_conn.cursor() as cur:
            cur.execute(f"SET idle_in_transaction_session_timeout = {ms}")
        dbapi_conn.autocommit = autocommit

    return db


def _transient(e: BaseException) -> bool:
    if isinstance(e, TRANSIENT_DB_ERRORS):
        return True
    # 25P03: the session was ended for idling in a transaction (see `guard`): a lost connection, not a bad write.
    return isinstance(e, DBAPIError) and (e.connection_invalidated or getattr(e.orig, "sqlstate", None) == "25P03")


class LeaseLost(Exception):
    """A fenced write matched no row: another worker holds the job now. Nothing more may be written."""


class DatabaseOutage(Exception):
    """The database stayed unreachable for longer than `job_db_retry_s`: the attempt ends."""


def time_limit_s(job: Job, settings: Settings) -> int:
    return min(job.time_limit_s or settings.job_time_limit_s, settings.job_time_limit_s)


def _deadline(job: Job, settings: Settings) -> datetime | None:
    return job.started_at + timedelta(seconds=time_limit_s(job, settings)) if job.started_at else None


def _time_limit_reason(job: Job, settings: Settings) -> str:
    step = (job.progress or {}).get("step")
    total = (job.progress or {}).get("total_steps")
    where = f" (at step {step} of {total})" if step is not None and total else ""
    return (f"the job ran past its wall-clock limit of {time_limit_s(job, settings)} s from its first start{where}; "
            "ask for fewer epochs or a smaller dataset, or a longer time_limit_s (up to SPAFIT_JOB_TIME_LIMIT_S)")


def _write(db: Database, fn: Callable[[Session], T], *, retry_s: float, what: str,
           on_retry: Callable[[], None] | None = None) -> T:
    """`fn(session)` in one transaction. Run again (the transaction rolled back, so a rerun is safe) when it
    lost a race for an event's seq to a concurrent writer, or on a transient database error, with backoff
    for up to `retry_s` seconds; then `DatabaseOutage`."""
    deadline = time.monotonic() + retry_s
    delay, races = 0.2, 0
    while True:
        try:
            with db.transaction() as s:
                return fn(s)
        except IntegrityError:
            races += 1
            if races >= 5:
                raise
        except Exception as e:
            if not _transient(e):
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DatabaseOutage(f"{what}: the database stayed unreachable for {retry_s:g} s") from e
            wait = min(delay, remaining)  # the last try lands on the deadline, not a backoff step before it
            log.warning("%s failed on a database error (%s); retrying in %.1f s", what, type(e).__name__, wait)
            if on_retry is not None:
                on_retry()
            time.sleep(wait)
            delay = min(delay * 2, MAX_BACKOFF_S)


@dataclass
class Lease:
    """The claim a run holds: (claimed_by, attempts) is its fencing token."""

    db: Database
    job_id: uuid.UUID
    me: str
    attempt: int
    retry_s: float
    lost: threading.Event = field(default_factory=threading.Event)
    ending: threading.Event = field(default_factory=threading.Event)  # `end()` began: the run writes its last
    refused: int = 0  # fenced writes that matched nothing (at most 1: the run stops at the first)
    retries: int = 0  # writes retried on a transient database error

    def fence(self) -> tuple:
        return (Job.id == self.job_id, Job.claimed_by == self.me, Job.attempts == self.attempt,
                Job.status == "running")

    def hold(self, s: Session, **values) -> None:
        """In the caller's transaction: update the job row only while this claim holds (which also locks the row
        to the end of the transaction); `LeaseLost` if it no longer does. A write that sets a status other than
        running is the run's last (`end()`, and the success writes that store an adapter or an evaluation): the
        heartbeat stands down from here, so a beat waiting on the row meanwhile is not counted as a takeover."""
        if values.get("status", "running") != "running":
            self.ending.set()
        values.setdefault("heartbeat_at", utcnow())
        if s.execute(update(Job).where(*self.fence()).values(**values)).rowcount != 1:
            self.refused += 1
            self.lost.set()
            log.warning("job %s: write refused, attempt %d of %s no longer holds the job (taken over); "
                        "this run stops and writes nothing more (fenced writes: %d)", self.job_id, self.attempt,
                        self.me, self.refused)
            raise LeaseLost(str(self.job_id))

    def write(self, fn: Callable[[Session], T], what: str) -> T:
        if self.lost.is_set():
            raise LeaseLost(str(self.job_id))
        return _write(self.db, fn, retry_s=self.retry_s, what=f"job {self.job_id}: {what}", on_retry=self._count)

    def _count(self) -> None:
        self.retries += 1

    def end(self, status: str, *, error: tuple[str, str] | None = None, error_id: str | None = None,
            event: dict | None = None, **values) -> None:
        """Set a final status and write its event in one fenced transaction: a reader (the live event stream
        ends at a final status) never sees the status without its event. From here on the heartbeat stands down:
        a beat that meets the final status this write sets is not a takeover."""
        self.ending.set()

        def write(s: Session) -> None:
            checkpoint = s.scalar(select(Job.checkpoint_sha256).where(Job.id == self.job_id))
            values.setdefault("checkpoint_sha256", None)  # a finished job resumes nothing: its checkpoint goes
            self.hold(s, status=status, finished_at=utcnow(), error_type=error[0] if error else None,
                      error_message=error[1] if error else None, error_id=error_id, **values)
            if event is not None:
                events.append_in(s, self.job_id, "status", event)
            _drop_blob(s, checkpoint)

        self.write(write, f"mark {status}")


def _drop_blob(s: Session, sha: str | None) -> None:
    """Delete a blob that a job just stopped pointing at, in a savepoint: if a concurrent writer took a new
    reference to the same bytes, only the delete rolls back (the garbage collector retries it later), never
    the job's final write."""
    if sha is None:
        return
    try:
        with s.begin_nested():
            blobs.delete_if_unreferenced(s, sha)
    except SQLAlchemyError as e:
        log.info("checkpoint blob %s kept for the collector (%s)", sha[:12], type(e).__name__)


@dataclass
class Claim:
    outcome: str  # claimed | final | busy | gave_up | cancelled | timed_out
    job: Job | None = None
    lease: Lease | None = None


def claim(db: Database, job_id: uuid.UUID, me: str, settings: Settings) -> Claim:
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            return Claim("final")
        if job.status in ("succeeded", "failed", "cancelled"):
            return Claim("final", job)
        if job.kind == "sweep":  # a sweep's parent is never run: its trials are
            return Claim("final", job)
        stale_before = utcnow() - timedelta(seconds=settings.job_heartbeat_stale_s)
        fresh = job.heartbeat_at is not None and job.heartbeat_at > stale_before
        if job.status == "running" and job.claimed_by != me and fresh and _holder_alive(job.claimed_by):
            return Claim("busy", job)
    # The job as seen here is the token of the writes below: each matches nothing if the job moved on meanwhile.
    seen = (Job.id == job_id, Job.status == job.status, Job.attempts == job.attempts,
            Job.claimed_by.is_(None) if job.claimed_by is None else Job.claimed_by == job.claimed_by)
    deadline = _deadline(job, settings)
    if job.cancel_requested:
        reason = "cancelled before it ran" if job.attempts == 0 else "cancelled while its worker was lost"
        ended = _end_unclaimed(db, job_id, seen, "cancelled", event={"status": "cancelled", "reason": reason})
        return Claim("cancelled" if ended else "busy", job)
    if deadline is not None and utcnow() > deadline:
        reason = _time_limit_reason(job, settings)
        ended = _end_unclaimed(db, job_id, seen, "failed", error=("time-limit", reason),
                               event={"status": "failed", "error": {"type": "time-limit", "message": reason}})
        return Claim("timed_out" if ended else "busy", job)
    if job.attempts >= job.max_attempts:
        step = (job.progress or {}).get("step")
        reason = (f"the job stopped its worker {job.attempts} time(s)"
                  + (f", the last time at step {step}" if step is not None else "")
                  + f"; giving up after {job.max_attempts} attempts (SPAFIT_JOB_MAX_ATTEMPTS)")
        ended = _end_unclaimed(db, job_id, seen, "failed", error=("worker-lost", reason),
                               event={"status": "failed", "error": {"type": "worker-lost", "message": reason}})
        return Claim("gave_up" if ended else "busy", job)
    now = utcnow()
    with db.transaction() as s:
        res = s.execute(
            update(Job).where(*seen)
            .values(status="running", claimed_by=me, claimed_at=now, heartbeat_at=now,
                    attempts=Job.attempts + 1, started_at=now if job.started_at is None else Job.started_at)
        )
        if res.rowcount != 1:
            return Claim("busy")
    lease = Lease(db, job_id, me, job.attempts + 1, settings.job_db_retry_s)
    with db.session() as s:
        job = s.get(Job, job_id)

    def announce(s: Session) -> None:
        lease.hold(s)
        events.append_in(s, job_id, "status", {"status": "running", "attempt": lease.attempt, "worker": me,
                                               "resume": job.checkpoint_sha256 is not None})

    lease.write(announce, "announce the attempt")
    return Claim("claimed", job, lease)


def _end_unclaimed(db: Database, job_id: uuid.UUID, seen: tuple, status: str, *, error: tuple[str, str] | None = None,
                   event: dict | None = None) -> bool:
    """End a job this worker did not claim (give up, cancel, time limit), only if it is still as it was seen.
    False: someone else changed it first (a worker claimed it), and this one leaves it alone."""

    def write(s: Session) -> bool:
        checkpoint = s.scalar(select(Job.checkpoint_sha256).where(Job.id == job_id))
        res = s.execute(update(Job).where(*seen).values(
            status=status, finished_at=utcnow(), error_type=error[0] if error else None,
            error_message=error[1] if error else None, checkpoint_sha256=None))
        if res.rowcount != 1:
            return False
        if event is not None:
            events.append_in(s, job_id, "status", event)
        _drop_blob(s, checkpoint)
        return True

    return _write(db, write, retry_s=0, what="end an unclaimed job")


class _Heartbeat(threading.Thread):
    """Proves liveness every few seconds (a fenced write: it notices a takeover), watches the job's cancel
    flag and its wall-clock deadline."""

    def __init__(self, lease: Lease, interval: float, deadline: datetime | None):
        super().__init__(name=f"heartbeat-{lease.job_id}", daemon=True)
        self.lease, self.interval, self.deadline = lease, interval, deadline
        self.cancelled = threading.Event()
        self.timed_out = threading.Event()
        self.shutting_down = threading.Event()  # the worker is shutting down: the run hands its job back
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.wait(self.interval):
            self.beat()

    def beat(self) -> None:
        if self.deadline is not None and utcnow() > self.deadline:
            self.timed_out.set()
        if self.lease.lost.is_set() or self.lease.ending.is_set():
            return
        try:
            with self.lease.db.transaction() as s:
                res = s.execute(update(Job).where(*self.lease.fence()).values(heartbeat_at=utcnow()))
                if res.rowcount == 0:
                    if self.lease.ending.is_set():  # this run ended the job while the beat waited (a slow database)
                        return
                    self.lease.refused += 1
                    self.lease.lost.set()
                    log.warning("job %s: heartbeat refused, attempt %d no longer holds the job (taken over)",
                                self.lease.job_id, self.lease.attempt)
                    return
                if s.scalar(select(Job.cancel_requested).where(Job.id == self.lease.job_id)):
                    self.cancelled.set()
        except Exception:  # the database may be briefly away; training goes on, the next beat retries
            log.warning("heartbeat for job %s failed", self.lease.job_id, exc_info=True)

    def should_stop(self) -> bool:
        if shutdown.requested():
            self.shutting_down.set()
        return (self.cancelled.is_set() or self.lease.lost.is_set() or self.timed_out.is_set()
                or self.shutting_down.is_set())

    def stop(self, timeout: float = 5.0) -> None:
        """No more beats; waits (up to `timeout`) for one in flight, so the run's counts are final."""
        self._stop_evt.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout)
