"""`spafit tasks ...`: a service's tasks and adapter versions (list, show, versions, activate, export, import)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .common import SpafitGroup, emit, main, metric_text, remote, table, take


@main.group(cls=SpafitGroup)
def tasks() -> None:
    """Tasks and their adapter versions on a service: list, show, versions, activate, export, import."""


@tasks.command("list")
@click.option("--limit", type=click.IntRange(min=0), default=50, show_default=True, help="At most this many (0: all).")
@remote
def tasks_list(client: Any, limit: int, as_json: bool) -> None:
    """Tasks, newest first, with the version each serves."""
    items = take(client.tasks.list(limit=min(limit, 100) or 100), limit)
    rows = [[t.name, str(t.active_version.version) if t.active_version else "-", str(t.version_count),
             metric_text(t.active_version.metrics if t.active_version else None), t.updated_at.strftime("%Y-%m-%d %H:%M:%S")]
            for t in items]
    emit([t.model_dump(mode="json") for t in items], as_json,
          table(["task", "active", "versions", "metric", "updated"], rows) if rows else "no tasks")


@tasks.command("show")
@click.argument("task")
@remote
def tasks_show(client: Any, task: str, as_json: bool) -> None:
    """A task and its active version."""
    t = client.tasks.get(task)
    v = t.active_version
    text = f"task {t.name}: {t.version_count} version(s), active: " + (
        f"v{v.version} ({v.method.get('name')}, {v.task_type}, labels {', '.join(v.labels) or '-'}, "
        f"{v.trainable_params} trainable params, base {v.base_model}, {metric_text(v.metrics)})" if v else "none")
    emit(t.model_dump(mode="json"), as_json, text)


@tasks.command("versions")
@click.argument("task")
@remote
def tasks_versions(client: Any, task: str, as_json: bool) -> None:
    """A task's versions, newest first."""
    items = list(client.tasks.versions(task, limit=100))
    rows = [["*" if v.active else "", str(v.version), v.method.get("name", ""), metric_text(v.metrics),
             str(v.size_bytes), v.job_id or "(imported)", v.created_at.strftime("%Y-%m-%d %H:%M:%S")] for v in items]
    emit([v.model_dump(mode="json") for v in items], as_json,
          table(["active", "version", "method", "metric", "bytes", "job", "created"], rows))


@tasks.command("activate")
@click.argument("task")
@click.argument("version", type=click.IntRange(min=1))
@remote
def tasks_activate(client: Any, task: str, version: int, as_json: bool) -> None:
    """Serve VERSION of TASK from now on (roll back or forward)."""
    t = client.tasks.activate(task, version)
    emit(t.model_dump(mode="json"), as_json, f"task {t.name} now serves v{t.active_version.version}")


@tasks.command("export")
@click.argument("task")
@click.option("--version", type=click.IntRange(min=1), default=None, help="[default: the active version]")
# A str, not a Path: Path("new-folder/") drops the slash that says "a folder" (the zip went to a file of that name).
@click.option("--out", type=click.Path(), default=None,
              help="A .zip path or a folder (an existing one, or any path ending in /) [default: <task>-v<N>.zip "
              "here].")
@click.option("--format", "fmt", type=click.Choice(["spafit", "peft"]), default="spafit", show_default=True,
              help="peft: a zipped PEFT LoRA folder for peft.PeftModel.from_pretrained.")
@remote
def tasks_export(client: Any, task: str, version: int | None, out: str | None, fmt: str, as_json: bool) -> None:
    """Download a version as a zip (spafit_adapter.json + adapter.safetensors, or a PEFT folder)."""
    path = client.tasks.download(task, out, version=version, format=None if fmt == "spafit" else fmt)
    emit({"task": task, "path": str(path.resolve()), "size_bytes": path.stat().st_size}, as_json, f"wrote {path}")


@tasks.command("import")
@click.argument("task")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@remote
def tasks_import(client: Any, task: str, source: Path, as_json: bool) -> None:
    """Register SOURCE (a zip, or an adapter folder from `spafit train`) as TASK's new, active version."""
    v = client.tasks.import_adapter(task, source)
    emit(v.model_dump(mode="json"), as_json, f"task {task}: imported v{v.version} (active)")
