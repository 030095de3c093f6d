"""From data to a trained adapter in one call: read and validate the data, build the model, train,
evaluate. This is what the CLI's `spafit train` and the service's worker run.

    from spafit_core import MethodConfig, TrainConfig, finetune
    result = finetune("train.csv", validation="val.csv", method=MethodConfig(n1=2, n2=4),
                      train_config=TrainConfig(epochs=3))
    result.save("my-adapter/")        # spafit_adapter.json + adapter.safetensors, a few hundred KB
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backbone import DEFAULT_BASE_MODEL
from .config import MethodConfig, TaskSpec, TrainConfig
from .errors import DataError
from .model import SpafitModel
from .train import Encoded, TrainResult, encode, set_seed, train

# Runs share the process's random number generators (seeded per run; the head and LoRA initialisation, dropout and
# the checkpoint's saved RNG state draw on them): two at once would each leave the other irreproducible, the same
# seed giving another adapter. So runs in one process take turns from seeding to the end of training; train in
# parallel with processes (the service runs each job in a worker process of its own).
_RUN_LOCK = threading.Lock()


@dataclass
class FinetuneResult:
    model: SpafitModel
    train_result: TrainResult
    report: dict[str, Any]  # validation reports of the data, with truncated-row counts
    max_seq_length: int
    metrics: dict[str, float] = field(default_factory=dict)

    def save(self, path: str | Path) -> dict:
        from .adapter import save_adapter

        return save_adapter(self.model, path, max_seq_length=self.max_seq_length, metrics=self.metrics,
                            training=self.training_summary())

    def serialize(self) -> tuple[dict, bytes]:
        from .adapter import serialize

        return serialize(self.model, max_seq_length=self.max_seq_length, metrics=self.metrics,
                         training=self.training_summary())

    def training_summary(self) -> dict[str, Any]:
        r = self.train_result
        return {"best_epoch": r.best_epoch, "steps": r.steps, "train_seconds": round(r.train_seconds, 3),
                "stopped_early": r.stopped_early, "truncated_rows": r.truncated_rows,
                "main_metric": r.main_metric, "history": r.history}


def _as_table(data, split: str, fmt: str | None, data_dir: str | None = None):
    from . import data as data_mod

    if isinstance(data, data_mod.Table):
        return data
    return data_mod.load_table(str(data), split=split, format=fmt, data_dir=data_dir)


def glue_task_for(spec):
    """The GLUE preset named by a "glue/<task>" spec, else None."""
    if not isinstance(spec, str) or not spec.lower().startswith("glue/"):
        return None
    from .glue import get_glue_task

    return get_glue_task(spec)


def prepare(
    train_data,
    validation=None,
    *,
    text_fields: list[str] | None = None,
    label_field: str | None = None,
    task_type: str | None = None,
    format: str | None = None,
    data_dir: str | None = None,
):
    """Read + validate both splits; returns (train table, validation table or None, TaskSpec, fields,
    report). Raises DataError listing the problems when the data cannot be trained on. A "glue/<task>"
    spec brings its fields, labels and validation split (from the hub, or GLUE TSVs in `data_dir`)."""
    from . import data as data_mod

    preset = glue_task_for(train_data)
    if preset is not None:
        text_fields = text_fields or list(preset.text_fields)
        label_field = label_field or preset.label_field
        task_type = task_type or preset.task_type
    train_table = _as_table(train_data, "train", format, data_dir)
    if validation is None and preset is not None:
        val_table = _as_table(train_data, preset.validation_splits[0], format, data_dir)
    else:
        val_table = _as_table(validation, "validation", format, data_dir) if validation is not None else None
    text_fields, label_field = data_mod.infer_fields(train_table, text_fields, label_field)
    if label_field is None:
        raise DataError(f"no label column found; columns are {train_table.columns}: pass label_field",
                        field="label_field")
    task_type = task_type or _infer_task_type(train_table, label_field)
    rep = data_mod.validate(train_table, text_fields, label_field, task_type)
    if not rep.ok:
        raise DataError("training data has problems: " + "; ".join(p.message for p in rep.errors[:5]),
                        detail={"report": rep.to_dict()})
    labels = tuple(preset.labels) if preset is not None and preset.labels else \
        tuple(data_mod.label_names(train_table, label_field, task_type))
    task = TaskSpec(task_type=task_type, labels=() if task_type == "regression" else labels)
    report = {"train": rep.to_dict()}
    if val_table is not None:
        vrep = data_mod.validate(val_table, text_fields, label_field, task_type, train_labels=list(task.labels))
        if not vrep.ok:
            raise DataError("validation data has problems: " + "; ".join(p.message for p in vrep.errors[:5]),
                            detail={"report": vrep.to_dict()})
        report["validation"] = vrep.to_dict()
    return train_table, val_table, task, text_fields, label_field, report


def _infer_task_type(table, label_field: str) -> str:
    """Lists (or "a|b" cells) mean multi-label; numbers with a fractional part mean regression."""
    values = [r.get(label_field) for r in table.records[:2000] if r.get(label_field) not in (None, "")]
    if any(isinstance(v, list) or (isinstance(v, str) and "|" in v) for v in values):
        return "multi_label_classification"
    numbers = []
    for v in values:
        try:
            numbers.append(float(v))
        except (TypeError, ValueError):
            return "single_label_classification"
    if numbers and any(not x.is_integer() for x in numbers):
        return "regression"
    return "single_label_classification"


def finetune(
    train_data,
    validation=None,
    *,
    base_model: str = DEFAULT_BASE_MODEL,
    method: MethodConfig | None = None,
    train_config: TrainConfig | None = None,
    text_fields: list[str] | None = None,
    label_field: str | None = None,
    task_type: str | None = None,
    metrics: list[str] | None = None,
    callback: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_path: str | Path | None = None,
    data_dir: str | None = None,
) -> FinetuneResult:
    """Fine-tune `base_model` with `method` on `train_data` (a CSV/TSV/JSONL path, "glue/<task>",
    "hf:<id>", a local HF dataset folder, or a data.Table) and evaluate on `validation` each epoch. Calls from
    several threads take turns (they share the process's random number generators); use processes to train in
    parallel."""
    from . import data as data_mod

    method = method or MethodConfig()
    cfg = train_config or TrainConfig()
    train_table, val_table, task, text_fields, label_field, report = prepare(
        train_data, validation, text_fields=text_fields, label_field=label_field, task_type=task_type,
        data_dir=data_dir)
    preset = glue_task_for(train_data)
    if metrics is None and preset is not None:
        metrics = list(preset.metrics)
    with _RUN_LOCK:  # one run at a time per process: see _RUN_LOCK
        set_seed(cfg.seed)  # the head and LoRA A are initialised from it
        model = SpafitModel.from_pretrained(base_model, method, task)
        max_len = _max_length(model, cfg)
        tr = _encode(data_mod.to_examples(train_table, text_fields, label_field, task), model, max_len, task)
        va = _encode(data_mod.to_examples(val_table, text_fields, label_field, task), model, max_len, task) \
            if val_table is not None else None
        report["train"]["truncated_rows"] = tr.truncated
        if va is not None:
            report["validation"]["truncated_rows"] = va.truncated
        result = train(model, tr, cfg, validation=va, metrics=metrics, callback=callback,
                       should_stop=should_stop, checkpoint_path=checkpoint_path)
    return FinetuneResult(model=model, train_result=result, report=report, max_seq_length=max_len,
                          metrics=result.metrics)


def _max_length(model: SpafitModel, cfg: TrainConfig) -> int:
    """The tokens per input a run trains on: `max_seq_length`, but never more than the backbone's positions, the
    length its adapter records and is served with (a model without absolute positions, DeBERTa-v3, would
    otherwise train on longer inputs than it is ever given)."""
    from .adapter_schema import position_limit

    most = position_limit(model.hf.config)
    return min(cfg.max_seq_length, most) if most else cfg.max_seq_length


def _encode(examples, model: SpafitModel, max_length: int, task: TaskSpec) -> Encoded:
    return encode(examples, model.tokenizer, max_length, task.task_type)
