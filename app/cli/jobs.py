"""`spafit jobs ...`: a service's fine-tuning jobs (list, show, wait, cancel, delete, events)."""

from __future__ import annotations

import json
from typing import Any

import click

from .common import (
    EVENTS_PAGE,
    SpafitGroup,
    emit,
    event_text,
    job_text,
    main,
    progress_text,
    remote,
    table,
    take,
)


@main.group(cls=SpafitGroup)
def jobs() -> None:
    """Fine-tuning jobs on a service: list, show, wait, cancel, delete, events."""


@jobs.command("list")
@click.option("--status", type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]), default=None)
@click.option("--task", default=None, help="Only this task's jobs.")
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True, help="At most this many (0: all).")
@remote
def jobs_list(client: Any, status: str | None, task: str | None, limit: int, as_json: bool) -> None:
    """Jobs, newest first."""
    items = take(client.jobs.list(status=status, task=task, limit=min(limit, 100) or 100), limit)
    rows = [[j.id, j.task, j.status, progress_text(j), j.created_at.strftime("%Y-%m-%d %H:%M:%S")] for j in items]
    emit([j.model_dump(mode="json") for j in items], as_json,
          table(["id", "task", "status", "progress", "created"], rows) if rows else "no jobs")


@jobs.command("show")
@click.argument("job_id")
@remote
def jobs_show(client: Any, job_id: str, as_json: bool) -> None:
    """A job: status, progress, metrics, error, adapter version."""
    job = client.jobs.get(job_id)
    emit(job.model_dump(mode="json"), as_json, job_text(job))


@jobs.command("wait")
@click.argument("job_id")
@click.option("--timeout", "wait_timeout", type=click.FloatRange(min=0), default=None,
              help="Give up after this many seconds (exit 7; the job goes on).")
@click.option("--progress/--no-progress", default=True, help="A progress bar on stderr.")
@remote
def jobs_wait(client: Any, job_id: str, wait_timeout: float | None, progress: bool, as_json: bool) -> None:
    """Follow a job's live events until it ends. Exit 0 if it succeeded, 1 if it failed or was cancelled,
    7 on --timeout."""
    from spafit_client import JobCancelled, JobFailed

    try:
        job = client.jobs.wait(job_id, progress=progress, timeout=wait_timeout)
    except (JobFailed, JobCancelled) as e:
        emit(e.job.model_dump(mode="json"), as_json, job_text(e.job))
        raise
    emit(job.model_dump(mode="json"), as_json, job_text(job))


@jobs.command("cancel")
@click.argument("job_id")
@remote
def jobs_cancel(client: Any, job_id: str, as_json: bool) -> None:
    """Cancel a queued job now, or a running one at its next step."""
    job = client.jobs.cancel(job_id)
    emit(job.model_dump(mode="json"), as_json,
          f"job {job.id}: {job.status}{' (cancel requested)' if job.cancel_requested and not job.done else ''}")


@jobs.command("delete")
@click.argument("job_id")
@remote
def jobs_delete(client: Any, job_id: str, as_json: bool) -> None:
    """Delete a finished job and its events (its adapter version stays); then its datasets can be deleted."""
    client.jobs.delete(job_id)
    emit({"deleted": job_id}, as_json, f"job {job_id}: deleted")


@jobs.command("events")
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Stream live until the job ends (JSON Lines with --json).")
@click.option("--after", type=click.IntRange(min=0), default=0, show_default=True, help="Only events after this seq.")
@remote
def jobs_events(client: Any, job_id: str, follow: bool, after: int, as_json: bool) -> None:
    """A job's events in order: status, progress, eval, checkpoint, ..."""
    if not follow:
        events: list[Any] = []
        while True:  # the service answers at most EVENTS_PAGE events at a time
            batch = client.jobs.events(job_id, after=events[-1].seq if events else after, limit=EVENTS_PAGE)
            events += batch
            if len(batch) < EVENTS_PAGE:
                break
        emit([e.model_dump(mode="json") for e in events], as_json,
              "\n".join(event_text(e) for e in events) or "no events")
        return
    for event in client.jobs.stream_events(job_id, after=after):
        click.echo(json.dumps(event.model_dump(mode="json")) if as_json else event_text(event))
