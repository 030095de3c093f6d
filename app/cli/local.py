"""Adapters on this machine, no service: `spafit train` (fine-tune), `spafit export` (PEFT or a merged model),
`spafit import` (a PEFT LoRA into a SPAFIT adapter folder)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .common import emit, json_option, main, num, table


class _LayerIndex(click.ParamType):
    """An int (a layer index) or a float (a fraction of the depth L), as in the method config."""

    name = "INDEX|FRACTION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | float:
        if isinstance(value, int | float):
            return value
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                self.fail(f"{value!r} is neither a layer index (int) nor a fraction of L (float)", param, ctx)


@main.command()
@click.argument("data")
@click.option("--validation", "validation", default=None, metavar="FILE", help="Validation data, evaluated each epoch.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Adapter folder to write [default: <data name>-adapter].")
@click.option("--base-model", default=None, help="Backbone: hub id, local folder [default: the packaged MiniLM].")
@click.option("--method", "method_name", type=click.Choice(["spafit", "lora", "bitfit"]), default="spafit",
              show_default=True)
@click.option("--n1", type=_LayerIndex(), default=None, help="First bias-only layer: index or fraction of L [default: L/3].")
@click.option("--n2", type=_LayerIndex(), default=None, help="First LoRA layer: index or fraction of L [default: 2L/3].")
@click.option("--rank", type=click.IntRange(min=1), default=8, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=16.0, show_default=True,
              help="LoRA alpha (the update is scaled by alpha / rank).")
@click.option("--epochs", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", "learning_rate", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Learning rate [default: 1e-3 for adapters].")
@click.option("--head-lr", "head_learning_rate", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=None, help="Learning rate of the task head [default: --lr].")
@click.option("--bias-lr", "bias_learning_rate", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=None, help="Learning rate of the bias deltas [default: --lr].")
@click.option("--lora-lr", "lora_learning_rate", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=None, help="Learning rate of the LoRA factors [default: --lr].")
@click.option("--validation-fraction", type=click.FloatRange(0, 0.5), default=0.1, show_default=True,
              help="Without --validation, this stratified share of DATA is held out for it (0: none).")
@click.option("--max-seq-length", type=click.IntRange(8, 8192), default=128, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--text-field", "text_fields", multiple=True, help="Text column (twice for sentence pairs) [default: inferred].")
@click.option("--label-field", default=None, help="Label column [default: inferred].")
@click.option("--task-type", type=click.Choice(["single_label_classification", "multi_label_classification",
                                                 "regression"]), default=None, help="[default: inferred]")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--progress/--no-progress", default=True, help="A progress bar on stderr.")
@json_option
def train(data: str, validation: str | None, out: Path | None, base_model: str | None, method_name: str,
          n1: int | float | None, n2: int | float | None, rank: int, alpha: float, epochs: int, batch_size: int,
          learning_rate: float | None, head_learning_rate: float | None, bias_learning_rate: float | None,
          lora_learning_rate: float | None, validation_fraction: float, max_seq_length: int, seed: int,
          text_fields: tuple[str, ...],
          label_field: str | None, task_type: str | None, device: str, progress: bool, as_json: bool) -> None:
    """Fine-tune an adapter here, without a service: DATA (CSV, TSV, JSONL, glue/<task>, hf:<id>) in, an
    adapter folder (spafit_adapter.json + adapter.safetensors) out. Import it into a service with
    `spafit tasks import TASK FOLDER`."""
    for spec, name in ((data, "DATA"), (validation, "--validation")):
        if spec is not None and not spec.lower().startswith(("glue/", "hf:")) and not Path(spec).exists():
            raise click.BadParameter(f"{spec!r} does not exist", param_hint=name)
    from spafit_core import DEFAULT_BASE_MODEL, MethodConfig, TrainConfig, finetune

    out = out or Path(f"{Path(data.replace(':', '-')).stem.replace('/', '-')}-adapter")
    method = MethodConfig(name=method_name, n1=n1, n2=n2, rank=rank, alpha=alpha)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                      head_learning_rate=head_learning_rate, bias_learning_rate=bias_learning_rate,
                      lora_learning_rate=lora_learning_rate, validation_fraction=validation_fraction,
                      max_seq_length=max_seq_length, seed=seed, device=device, log_every_steps=1)
    base_model = base_model or DEFAULT_BASE_MODEL
    view = _TrainProgress() if progress else None
    try:
        result = finetune(data, validation, base_model=base_model, method=method, train_config=cfg,
                          text_fields=list(text_fields) or None, label_field=label_field, task_type=task_type,
                          callback=view)
    finally:
        if view is not None:
            view.close()
    result.save(out)
    r = result.train_result
    summary = {
        "out": str(out.resolve()), "base_model": base_model, "method": method.to_dict(),
        "learning_rates": {k: cfg.lr_for(method.name, k) for k in ("head", "bias", "lora")},
        "task": result.model.task.to_dict(), "metrics": result.metrics, "main_metric": r.main_metric,
        "best_epoch": r.best_epoch, "history": r.history, "steps": r.steps,
        "train_seconds": round(r.train_seconds, 3), "param_counts": result.model.param_counts(),
        "files": sorted(p.name for p in out.iterdir()),
    }
    emit(summary, as_json, _train_text(summary))


@main.command("export")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["peft", "merged"]), default="peft", show_default=True,
              help="peft: a PEFT LoRA folder for PeftModel.from_pretrained on the stock classifier; merged: a "
                   "standalone transformers model folder with every delta folded in.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="The folder to write.")
@click.option("--base-model", default=None, help="Where the base weights are [default: the adapter's base model].")
@json_option
def export(adapter: Path, fmt: str, out: Path, base_model: str | None, as_json: bool) -> None:
    """Write ADAPTER (a folder from `spafit train`, or an unzipped download) in another format."""
    from spafit_core.adapter import load_adapter
    from spafit_core.peft_interop import to_peft

    model = load_adapter(adapter, base_model=base_model)
    if fmt == "merged":
        model.save_merged(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in to_peft(model).items():
            (out / name).write_bytes(data)
    summary = {"out": str(out.resolve()), "format": fmt, "files": sorted(p.name for p in out.iterdir())}
    hint = ("load it with peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained("
            f"{model.base_model_name!r}, num_labels={model.task.num_labels}), {str(out)!r})" if fmt == "peft" else
            f"load it with AutoModelForSequenceClassification.from_pretrained({str(out)!r})")
    emit(summary, as_json, f"wrote {out} ({fmt}); {hint}")


@main.command("import")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["peft"]), default="peft", show_default=True,
              help="peft: a PEFT LoRA folder (or its zip) trained on the stock sequence classifier.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The SPAFIT adapter folder to write.")
@click.option("--base-model", default=None,
              help="Base model [default: the PEFT config's base_model_name_or_path].")
@click.option("--label", "labels", multiple=True,
              help="Label names in head order (repeat) [default: from a SPAFIT export, else LABEL_0..].")
@json_option
def import_(source: Path, fmt: str, out: Path, base_model: str | None, labels: tuple[str, ...],
            as_json: bool) -> None:
    """Turn SOURCE, an adapter trained elsewhere, into a SPAFIT adapter folder; `spafit tasks import TASK OUT`
    then serves it."""
    from spafit_core.adapter import CONFIG_FILE, WEIGHTS_FILE
    from spafit_core.errors import AdapterError
    from spafit_core.peft_interop import (
        from_peft,
        read_peft_files,
        read_peft_folder,
        serialize_imported,
        unpack_peft,
    )

    files = read_peft_folder(source) if source.is_dir() else unpack_peft(source.read_bytes())
    if base_model is None:
        base_model = read_peft_files(files)[0].get("base_model_name_or_path")
        if not base_model or not isinstance(base_model, str):
            raise AdapterError("the PEFT config names no base model: give --base-model", field="base_model")
    model = from_peft(files, base_model, labels=list(labels) or None)
    cfg, weights = serialize_imported(model)
    out.mkdir(parents=True, exist_ok=True)
    (out / WEIGHTS_FILE).write_bytes(weights)
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    summary = {"out": str(out.resolve()), "base_model": cfg["base_model"]["name"], "method": cfg["method"],
               "task": cfg["task"], "param_counts": cfg["param_counts"],
               "files": sorted(p.name for p in out.iterdir())}
    emit(summary, as_json, f"wrote {out}: {cfg['method']['name']} n1={cfg['stratification']['n1']} "
                            f"n2={cfg['stratification']['n2']} rank={cfg['method']['rank']}, labels "
                            f"{cfg['task']['labels']}; serve it with `spafit tasks import TASK {out}`")


class _TrainProgress:
    """The training loop's events as a progress bar (the SDK's, so local and remote runs look alike)."""

    def __init__(self) -> None:
        from spafit_client.models import JobEvent
        from spafit_client.progress import JobProgress

        self._event, self._view, self._seq = JobEvent, JobProgress(desc="training"), 0

    def __call__(self, event: dict[str, Any]) -> None:
        self._seq += 1
        data = {k: v for k, v in event.items() if k != "type"}
        self._view(self._event(seq=self._seq, type=str(event.get("type")), data=data))

    def close(self) -> None:
        self._view.close()


def _train_text(s: dict[str, Any]) -> str:
    names = sorted({k for h in s["history"] for k in (h.get("metrics") or {})})
    rows = [[str(h["epoch"]), f"{h['loss']:.4f}", *(num((h.get("metrics") or {}).get(n)) for n in names),
             "*" if h["epoch"] == s["best_epoch"] else ""] for h in s["history"]]
    counts = s["param_counts"]
    return "\n".join([
        table(["epoch", "loss", *names, "best"], rows),
        "",
        f"trainable parameters: {counts.get('total')} ({counts.get('without_head')} without the head, "
        f"{100 * (counts.get('trainable_fraction') or 0):.3f}% of the model)" if "trainable_fraction" in counts
        else f"trainable parameters: {counts.get('total')} ({counts.get('without_head')} without the head)",
        f"steps: {s['steps']} in {s['train_seconds']:.1f}s",
        f"adapter: {s['out']} ({', '.join(s['files'])})",
    ])
