"""`spafit datasets ...`: a service's datasets (import from the Hugging Face Hub, show, list)."""

from __future__ import annotations

from typing import Any

import click

from .common import SpafitGroup, emit, main, remote, table, take


@main.group(cls=SpafitGroup)
def datasets() -> None:
    """Datasets on a service: import from the Hugging Face Hub, list, show."""


def _dataset_text(d: Any) -> str:
    lines = [f"dataset {d.id}  {d.name}  [{d.state}]"]
    if d.error is not None:
        lines.append(f"error: {d.error.type}: {d.error.message}")
    if d.state == "ready":
        lines.append(f"rows: {d.rows}  columns: {', '.join(d.columns)}  text: {', '.join(d.text_fields)}  "
                     f"label: {d.label_field}")
        if d.label_counts:
            lines.append("labels: " + ", ".join(f"{k}={v}" for k, v in d.label_counts.items()))
    return "\n".join(lines)


@datasets.command("import")
@click.argument("name")
@click.option("--split", default="train", show_default=True)
@click.option("--config", "config_name", default=None, help="The dataset's configuration (e.g. sst2 for glue).")
@click.option("--max-rows", type=click.IntRange(min=1), default=None, help="Import only the first rows.")
@click.option("--name", "dataset_name", default=None, help="Name of the dataset on the service.")
@click.option("--text-fields", default=None, help="Text column(s), comma-separated (default: inferred).")
@click.option("--label-field", default=None, help="Label column (default: inferred).")
@click.option("--task-type", type=click.Choice(["single_label_classification", "multi_label_classification",
                                                "regression"]), default=None)
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the import is ready (or failed); --no-wait prints the importing dataset.")
@click.option("--timeout", "wait_timeout", type=click.FloatRange(min=0), default=600.0, show_default=True,
              help="Give up waiting after this many seconds (exit 7; the import goes on).")
@remote
def datasets_import(client: Any, name: str, split: str, config_name: str | None, max_rows: int | None,
                    dataset_name: str | None, text_fields: str | None, label_field: str | None,
                    task_type: str | None, wait: bool, wait_timeout: float, as_json: bool) -> None:
    """Import a split of the Hugging Face Hub dataset NAME (`name` or `owner/name`). The service's worker
    reads it, within the service's row and byte limits."""
    fields = [f.strip() for f in text_fields.split(",") if f.strip()] if text_fields else None
    d = client.datasets.import_hf(name, split=split, config_name=config_name, max_rows=max_rows,
                                  dataset_name=dataset_name, text_fields=fields, label_field=label_field,
                                  task_type=task_type, wait=wait, timeout=wait_timeout)
    emit(d.model_dump(mode="json"), as_json, _dataset_text(d))


@datasets.command("show")
@click.argument("dataset_id")
@remote
def datasets_show(client: Any, dataset_id: str, as_json: bool) -> None:
    """A dataset: state, shape, fields, label counts (or why its import failed)."""
    d = client.datasets.get(dataset_id)
    emit(d.model_dump(mode="json"), as_json, _dataset_text(d))


@datasets.command("list")
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True, help="At most this many (0: all).")
@remote
def datasets_list(client: Any, limit: int, as_json: bool) -> None:
    """Datasets, newest first."""
    items = take(client.datasets.list(limit=min(limit, 100) or 100), limit)
    rows = [[d.id, d.name, d.state, "" if d.rows is None else str(d.rows), d.created_at.strftime("%Y-%m-%d %H:%M:%S")]
            for d in items]
    emit([d.model_dump(mode="json") for d in items], as_json,
          table(["id", "name", "state", "rows", "created"], rows) if rows else "no datasets")
