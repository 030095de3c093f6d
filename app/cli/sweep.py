"""`spafit sweep`: a stratification search on a service (trial jobs, the best registered)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import click

from .common import EVENTS_PAGE, emit, main, metric_text, remote, table


def _int_list(value: str | None) -> list[Any] | None:
    if not value:
        return None
    try:
        return [float(v) if "." in v else int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give numbers separated by commas") from None


@main.command()
@click.argument("train")
@click.option("--task", required=True, help="The task the best adapter is registered under.")
@click.option("--validation", default=None, metavar="FILE_OR_ID",
              help="Validation data the trials are compared on (a file to upload, or a dataset id).")
@click.option("--n1", "n1s", default=None, metavar="A,B,...", help="Values of n1 (index, or fraction of L).")
@click.option("--n2", "n2s", default=None, metavar="A,B,...", help="Values of n2 (index, or fraction of L).")
@click.option("--rank", "ranks", default=None, metavar="A,B,...", help="Values of the LoRA rank.")
@click.option("--max-trials", type=click.IntRange(1, 64), default=16, show_default=True)
@click.option("--max-trainable-params", type=click.IntRange(min=1), default=None,
              help="Only trials under this trainable-parameter budget can win.")
@click.option("--epochs", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--wait/--no-wait", default=True, help="Follow the sweep and print its leaderboard.")
@remote
def sweep(client: Any, train: str, task: str, validation: str | None, n1s: str | None, n2s: str | None,
          ranks: str | None, max_trials: int, max_trainable_params: int | None, epochs: int, batch_size: int,
          wait: bool, as_json: bool) -> None:
    """Search SPAFIT's stratification: train every combination of the given n1 / n2 / rank values as a trial
    job (in parallel across workers) and register the best by validation metric.

    TRAIN is a CSV/TSV/JSONL file to upload, or the id of a dataset already on the service.
    Example: spafit sweep train.csv --validation val.csv --task sentiment --n1 0,1,2 --n2 3,4 --rank 4,8
    """
    from spafit_client import JobCancelled, JobFailed

    for ref, hint in ((train, "TRAIN"), (validation, "--validation")):  # before anything is uploaded
        if ref is not None and not Path(ref).is_file():
            try:
                uuid.UUID(ref)
            except ValueError:  # a mistyped file name was sent as a dataset id: "not a valid UUID"
                raise click.BadParameter(f"{ref!r} is neither a file nor a dataset id", param_hint=hint) from None

    def dataset(ref: str) -> str:
        return client.datasets.upload(ref).id if Path(ref).is_file() else ref

    spec = {"n1": _int_list(n1s), "n2": _int_list(n2s), "rank": _int_list(ranks), "max_trials": max_trials,
            "max_trainable_params": max_trainable_params}
    job = client.jobs.create(task=task, train_dataset=dataset(train),
                             validation_dataset=dataset(validation) if validation else None,
                             method={"name": "spafit", "sweep": {k: v for k, v in spec.items() if v is not None}},
                             hyperparameters={"epochs": epochs, "batch_size": batch_size})
    if not wait:
        emit(job.model_dump(mode="json"), as_json, f"sweep job {job.id}: {job.progress.total_steps} trials queued"
              if job.progress else f"sweep job {job.id}")
        return
    failed: Exception | None = None
    try:
        job = client.jobs.wait(job.id, progress=not as_json)
    except (JobFailed, JobCancelled) as e:
        job, failed = e.job, e
    events = client.jobs.events(job.id, limit=EVENTS_PAGE)
    trials = [e.data for e in events if e.type == "trial"]
    final = next((e.data for e in reversed(events) if e.type == "status"), {})
    rows = [[str(t.get("n1")), str(t.get("n2")), str(t.get("rank")), t.get("status", ""),
             metric_text(t.get("metrics")), str(t.get("trainable_params", "-"))] for t in trials]
    text = table(["n1", "n2", "rank", "status", "metric", "trainable"], rows) if rows else "no trials"
    if final.get("best"):
        b = final["best"]
        text += (f"\nbest: n1={b.get('n1')} n2={b.get('n2')} rank={b.get('rank')} "
                 f"({final.get('metric')}={final.get('value')}), registered as {task} v{final.get('adapter_version')}")
    emit({"job": job.model_dump(mode="json"), "trials": trials, "result": final}, as_json, text)
    if failed is not None:
        raise failed
