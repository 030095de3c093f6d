"""`spafit batch ...` (batch prediction jobs) and `spafit evaluate` (a version's metrics on a labelled dataset),
added to the main group by app/cli.py (`register`). Both talk to a service through the SDK, with progress bars."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click


def register(main: click.Group, *, remote: Callable[..., Any], emit: Callable[..., None],
             job_text: Callable[[Any], str], group_cls: type[click.Group]) -> None:
    """Add the commands to `main`, with app/cli.py's helpers (passed in: this module never imports app.cli, which
    also runs as `python -m app.cli`)."""
    SpafitGroup, _emit, _job_text = group_cls, emit, job_text  # noqa: N806

    @click.group(cls=SpafitGroup)
    def batch() -> None:
        """Batch prediction: predict every row of an uploaded dataset on the service's workers, download the results."""


    def _wait(client: Any, job_id: str, timeout: float | None, progress: bool) -> Any:
        from spafit_client import JobCancelled, JobFailed

        try:
            return client.batch.wait(job_id, progress=progress, timeout=timeout)
        except (JobFailed, JobCancelled) as e:
            click.echo(_job_text(e.job), err=True)
            raise


    def _task_ref(spec: str) -> Any:
        name, at, version = spec.partition("@")
        if not at:
            return name
        if not (version.isascii() and version.isdigit()) or int(version) < 1:
            raise click.BadParameter(f"{spec!r}: give NAME or NAME@VERSION (a version number from 1)",
                                     param_hint="--task")
        return {"task": name, "version": int(version)}


    @batch.command("create")
    @click.argument("targets", nargs=-1, required=True, metavar="[TASK] DATASET")
    @click.option("--task", "tasks", multiple=True, metavar="NAME[@VERSION]",
                  help="Instead of TASK: a task to run, repeated for several over the same dataset in one job (the "
                       "fan-out path; each result row has every task's prediction).")
    @click.option("--version", "version", type=click.IntRange(1), default=None, help="Default: the active version.")
    @click.option("--text-field", "text_fields", multiple=True, help="Input column (twice: text and text pair).")
    @click.option("--id-field", default=None, help="The column giving each result row's id (default: `id` or the index).")
    @click.option("--top-k", type=click.IntRange(1, 1000), default=None, help="The best K labels' scores per row (implies --all-scores).")
    @click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
    @click.option("--all-scores", is_flag=True, help="Every label's score too.")
    @click.option("--wait/--no-wait", default=True, help="Follow the job with a progress bar until it ends.")
    @click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), default=None,
                  help="With --wait: write the result file here.")
    @click.option("--timeout", "wait_timeout", type=click.FloatRange(min=0), default=None,
                  help="With --wait: give up after this many seconds (exit 7; the job goes on).")
    @remote
    def batch_create(client: Any, targets: tuple[str, ...], tasks: tuple[str, ...], version: int | None,
                     text_fields: tuple[str, ...], id_field: str | None, top_k: int | None, fmt: str, all_scores: bool,
                     wait: bool, output: str | None, wait_timeout: float | None, as_json: bool) -> None:
        """Predict every row of DATASET (an uploaded dataset's id) with TASK's adapter, or with each --task's in one
        job (`spafit batch create DATASET --task a --task b@2`)."""
        if len(targets) != (1 if tasks else 2):
            raise click.UsageError("give TASK DATASET, or DATASET with one or more --task")
        if tasks and version is not None:
            raise click.UsageError("--version goes with TASK; with --task, write NAME@VERSION")
        dataset = targets[-1]
        one = None if tasks else targets[0]
        many = [_task_ref(t) for t in tasks] if tasks else None
        job = client.batch.create(task=one, tasks=many, dataset=dataset, version=version,
                                  text_fields=list(text_fields) or None, id_field=id_field, top_k=top_k, format=fmt,
                                  all_scores=all_scores)
        if wait:
            job = _wait(client, job.id, wait_timeout, not as_json)
            if output:
                client.batch.download(job.id, output)
        _emit(job.model_dump(mode="json"), as_json, _job_text(job) + (f"\n  results: {output}" if wait and output else ""))


    @batch.command("list")
    @click.option("--limit", type=click.IntRange(1, 200), default=20, show_default=True)
    @remote
    def batch_list(client: Any, limit: int, as_json: bool) -> None:
        """Batch prediction jobs, newest first."""
        import itertools

        items = list(itertools.islice(client.batch.list(limit=limit), limit))
        _emit([j.model_dump(mode="json") for j in items], as_json,
              "\n".join(f"{j.id}  {','.join(t['task'] for t in (j.hyperparameters or {}).get('tasks') or []) or j.task}"
                        f"  {j.status}  {(j.progress.step if j.progress else 0) or 0}/"
                        f"{(j.progress.total_steps if j.progress else '?')}" for j in items) or "no batch predictions")


    @batch.command("show")
    @click.argument("job_id")
    @remote
    def batch_show(client: Any, job_id: str, as_json: bool) -> None:
        """A batch prediction job: status, rows done, error."""
        job = client.batch.get(job_id)
        _emit(job.model_dump(mode="json"), as_json, _job_text(job))


    @batch.command("wait")
    @click.argument("job_id")
    @click.option("--timeout", "wait_timeout", type=click.FloatRange(min=0), default=None,
                  help="Give up after this many seconds (exit 7; the job goes on).")
    @click.option("--progress/--no-progress", default=True, help="A progress bar on stderr.")
    @remote
    def batch_wait(client: Any, job_id: str, wait_timeout: float | None, progress: bool, as_json: bool) -> None:
        """Follow a batch prediction until it ends (exit 1 if it failed or was cancelled, 7 on --timeout)."""
        job = _wait(client, job_id, wait_timeout, progress and not as_json)
        _emit(job.model_dump(mode="json"), as_json, _job_text(job))


    @batch.command("results")
    @click.argument("job_id")
    @click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), default=None,
                  help="Write the file here (default: stdout).")
    @remote
    def batch_results(client: Any, job_id: str, output: str | None, as_json: bool) -> None:
        """Download a succeeded batch prediction's result file (JSON Lines or CSV), streamed."""
        if output:
            client.batch.download(job_id, output)
            _emit({"job": job_id, "output": output}, as_json, f"results of {job_id}: {output}")
            return
        from spafit_client import _endpoints as E

        with client._stream(E.batch_results(job_id)) as response:
            for part in response.iter_bytes():
                sys.stdout.buffer.write(part)
        sys.stdout.buffer.flush()


    @batch.command("cancel")
    @click.argument("job_id")
    @remote
    def batch_cancel(client: Any, job_id: str, as_json: bool) -> None:
        """Cancel a batch prediction (a running one stops after its current chunk)."""
        job = client.batch.cancel(job_id)
        _emit(job.model_dump(mode="json"), as_json, f"job {job.id}: {job.status}")


    @click.command("evaluate")
    @click.argument("task")
    @click.argument("version", type=click.IntRange(1))
    @click.argument("dataset")
    @click.option("--label-field", default=None, help="Default: the dataset's label column.")
    @click.option("--text-field", "text_fields", multiple=True, help="Input column (twice: text and text pair).")
    @click.option("--compare-with", type=click.IntRange(1), default=None,
                  help="Then compare with this version's evaluation on the same dataset.")
    @click.option("--timeout", "wait_timeout", type=click.FloatRange(min=0), default=None,
                  help="Give up waiting after this many seconds (exit 7; the job goes on).")
    @remote
    def evaluate(client: Any, task: str, version: int, dataset: str, label_field: str | None,
                 text_fields: tuple[str, ...], compare_with: int | None, wait_timeout: float | None, as_json: bool) -> None:
        """Compute VERSION's metrics on a labelled DATASET (a job on the workers, followed with a progress bar); the
        metrics are stored with the version (`spafit tasks versions`)."""
        job = client.tasks.evaluate(task, version, dataset, label_field=label_field, text_fields=list(text_fields) or None)
        job = _wait(client, job.id, wait_timeout, not as_json)
        out: dict[str, Any] = {"job": job.id, "metrics": job.metrics}
        text = [f"{task} v{version} on {dataset}:"]
        for k, v in (job.metrics or {}).items():
            if k == "confusion_matrix":
                labels = (job.metrics or {}).get("labels") or []
                text.append("  confusion (rows: true, columns: predicted) " + " ".join(map(str, labels)))
                text.extend(f"    {lab:>12} " + " ".join(f"{n:>6}" for n in row) for lab, row in zip(labels, v, strict=False))
            elif not isinstance(v, dict | list):
                text.append(f"  {k} {v:.4f}" if isinstance(v, float) else f"  {k} {v}")
        if compare_with is not None:
            cmp = client.tasks.compare(task, compare_with, version)
            out["compare"] = cmp
            for row in cmp["datasets"]:
                if row["dataset"] == job.train_dataset:
                    text.append(f"  vs v{compare_with}: " + "  ".join(
                        f"{k} {d:+.4f}" for k, d in row["delta"].items()))
        _emit(out, as_json, "\n".join(text))

    main.add_command(batch)
    main.add_command(evaluate)
