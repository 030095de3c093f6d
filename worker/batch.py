"""Runs a claimed job of kind `predict` (batch prediction) or `evaluate` (a version's metrics on a labelled dataset)
under the lease worker/runner.py claimed: every write carries the claim's fencing token, cancel, the wall-clock
limit and a takeover stop the run between chunks.

The dataset is streamed: its blob is read from the database in pieces (`substring`), parsed row by row, and fed
through the engine (the task's adapter on its backbone, in this process, no HTTP) `batch_forward_rows` at a time;
a job of several tasks sends each batch through the engine's fan-out path (`Engine.fan_out_many`).
A batch prediction stores each `chunk_rows` rows of output as one `batch_chunks` row, in the same fenced
transaction as its progress, keyed by (job, chunk): a resumed attempt starts after the last stored chunk, so the
result has every row once. An evaluation keeps only its predictions and labels (numbers), and restarts from the
first row when resumed (its writes are its final ones).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db import Database
from app.models import AdapterVersion, BatchChunk, Blob, Dataset, Job, VersionEvaluation, utcnow
from app.services import batch as batch_service
from app.services import events, quota, registry
from app.settings import Settings

log = logging.getLogger("spafit.worker.batch")

PIECE_BYTES = 1 << 20  # what one read of the dataset blob fetches


class _BlobReader(io.RawIOBase):
    """A blob's bytes read from the database a piece at a time (a short session per piece), hashed as they go."""

    def __init__(self, db: Database, sha: str, size: int):
        self.db, self.sha, self.size, self.pos = db, sha, size, 0
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.pos >= self.size:
            return 0
        n = min(len(buf), PIECE_BYTES, self.size - self.pos)
        with self.db.session() as s:
            part = s.scalar(select(func.substring(Blob.data, self.pos + 1, n)).where(Blob.sha256 == self.sha))
        if not part:
            return 0
        part = bytes(part)
        buf[: len(part)] = part
        self.pos += len(part)
        self.digest.update(part)
        return len(part)

    def verified(self) -> bool:
        return self.pos == self.size and self.digest.hexdigest() == self.sha


def stream_rows(reader: _BlobReader, fmt: str) -> Iterator[dict[str, object]]:
    """The dataset's records in order, parsed the way spafit_core.data reads them (blank lines and records
    skipped alike, so row i here is row i of the dataset)."""
    from spafit_core import data as core_data

    lines = core_data.NumberedLines(io.BufferedReader(reader, buffer_size=PIECE_BYTES))
    if fmt in ("csv", "tsv"):
        rdr = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE, strict=True) if fmt == "tsv" \
            else csv.reader(lines, strict=True)
        header = None
        for _start, _end, row in core_data._numbered_rows(rdr, lines):
            if header is None:
                header = [c.strip() for c in row]  # the names as the upload read them (`data_read._header`)
                continue
            yield dict(zip(header, row, strict=False))
        return
    first = True
    for text in lines:
        if not text.strip():
            continue
        yield core_data._parse_json_line(text.rstrip("\r\n"), lines.number, first=first)
        first = False


def _input(row: dict[str, object], fields: list[str]) -> Any:
    def text(v: object) -> str:
        return "" if v is None else v if isinstance(v, str) else str(v)

    if len(fields) == 1:
        return text(row.get(fields[0]))
    return (text(row.get(fields[0])), text(row.get(fields[1])))


def _batches(rows: Iterator[dict], n: int) -> Iterator[list[dict]]:
    out: list[dict] = []
    for r in rows:
        out.append(r)
        if len(out) >= n:
            yield out
            out = []
    if out:
        yield out


class _Stop(Exception):
    pass


def _engine(db: Database, job: Job, settings: Settings):
    """An engine with the job's adapter(s) loaded, each under its version id; (engine, names, first config)."""
    from spafit_core.engine import Engine
    from spafit_core.errors import DataError

    tasks = (job.hyperparameters or {}).get("tasks") or [{"version_id": str(job.adapter_version_id),
                                                          "task": job.task_name}]
    engine = Engine(device=settings.engine_device, device_bytes=settings.engine_cache_bytes,
                    cpu_bytes=settings.engine_cpu_cache_bytes, default_base_model=settings.default_base_model,
                    slot_kernel=settings.engine_slot_kernel)
    names, first = [], None
    for t in tasks:
        version_id = uuid.UUID(t["version_id"])
        with db.session() as s:
            if s.get(AdapterVersion, version_id) is None:
                which = f"version {t['version']}" if t.get("version") else "the version"
                raise DataError(f"{which} of task {t.get('task')!r}, which this job runs, was deleted", field="tasks")
            cfg, weights = registry.version_payload(s, version_id)
        engine.load(t["version_id"], cfg, weights)
        names.append(t["version_id"])
        first = first or cfg
    return engine, names, first


def run(db: Database, job: Job, lease, hb, settings: Settings) -> str:
    """Run a claimed predict/evaluate job to its end (the runner's error handling wraps this)."""
    from spafit_core.errors import DataError, TrainingCancelled

    if job.adapter_version_id is None:
        raise DataError("the adapter version this job runs was deleted")
    with db.session() as s:
        ds = s.get(Dataset, job.train_dataset_id)
        if ds is None or ds.sha256 is None:
            raise DataError("the dataset of this job was deleted")
        fmt, sha, size, total = ds.format, ds.sha256, ds.size_bytes or 0, ds.rows or 0
    engine, names, cfg = _engine(db, job, settings)
    reader = _BlobReader(db, sha, size)
    rows = stream_rows(reader, fmt)

    def verify() -> None:
        """Before the final write: the bytes streamed were the dataset's, all of them (the sha256 it is stored
        under; a resumed attempt re-reads, and so hashes, the rows it skips)."""
        if not reader.verified():
            from app.errors import BlobIntegrityError

            raise BlobIntegrityError("the dataset's stored bytes do not match their sha256 (corrupted storage)")

    try:
        if job.kind == "predict":
            _predict(job, lease, hb, engine, names, rows, total, settings, verify)
        else:
            _evaluate(job, lease, hb, engine, names[0], cfg, rows, total, settings, verify)
    except _Stop:
        raise TrainingCancelled("the job was cancelled") from None
    return "succeeded"


def _check_stop(hb) -> None:
    if hb.should_stop():
        raise _Stop()


def _predict(job: Job, lease, hb, engine, names: list[str], rows: Iterator[dict], total: int, settings: Settings,
             verify: Callable[[], None]) -> None:
    """One task: `engine.predict`. Several (`tasks`): `engine.fan_out_many` over each forward batch of rows (the
    shared frozen prefix once per row, one branch per task); each stored row carries every task's prediction."""
    opts = job.hyperparameters or {}
    tasks = batch_service.task_names(job)
    chunk_rows = int(opts.get("chunk_rows") or settings.batch_chunk_rows)
    fmt, all_scores, top_k, id_field = opts.get("format", "jsonl"), bool(opts.get("all_scores")), opts.get("top_k"), \
        opts.get("id_field")
    fields = list(job.text_fields)

    def done(s: Session) -> tuple[int, int, int]:
        lease.hold(s)
        n, last, size = s.execute(select(func.coalesce(func.sum(BatchChunk.rows), 0), func.max(BatchChunk.chunk),
                                         func.coalesce(func.sum(batch_service.byte_length(BatchChunk.data)), 0))
                                  .where(BatchChunk.job_id == job.id)).one()
        return int(n), (-1 if last is None else int(last)), int(size)

    rows_done, last, stored = lease.write(done, "find the stored chunks")
    budget = batch_service.result_budget(settings)  # checked at creation from the labels; held here on the bytes
    chunk = last + 1
    skip = chunk * chunk_rows
    if skip:
        log.info("job %s resumes after chunk %d (%d rows stored)", job.id, last, rows_done)
    started, predicted = time.monotonic(), 0
    index = 0
    for block in _batches(rows, chunk_rows):
        if index + len(block) <= skip:  # a chunk a previous attempt stored
            index += len(block)
            continue
        _check_stop(hb)
        out: list[dict] = []
        k = top_k if all_scores else None
        # a fan-out forward holds rows x tasks rows: the same number of rows per pass as one task's
        step = max(1, settings.batch_forward_rows // len(names)) if tasks else settings.batch_forward_rows
        for part in _batches(iter(block), step):
            inputs = [_input(r, fields) for r in part]
            if tasks:
                preds = [{"results": {t: p[n] for t, n in zip(tasks, names, strict=True)}}
                         for p in engine.fan_out_many(names, inputs, k)]
            else:
                preds = engine.predict(names[0], inputs, k)
            base = index + len(out)
            for i, (r, p) in enumerate(zip(part, preds, strict=True)):
                out.append({**p, "id": r.get(id_field) if id_field else base + i})
            _check_stop(hb)
        payload = batch_service.encode_task_rows(out, tasks, fmt, all_scores) if tasks \
            else batch_service.encode_rows(out, fmt, all_scores)
        stored += len(payload)
        if stored > budget:  # the chunks stored so far go with the collector (a failed job's are never read)
            from app.errors import ResultTooLarge

            raise ResultTooLarge(f"the result grew past the {budget} bytes a batch prediction may store "
                                 f"(SPAFIT_BATCH_MAX_ROWS_PER_JOB x {batch_service.RESULT_BYTES_PER_PREDICTION}); "
                                 "ask for fewer scores (top_k) or split the dataset")
        index += len(block)
        predicted += len(block)
        rows_done += len(block)
        n, c = len(block), chunk
        progress = {"step": rows_done, "total_steps": total, "eta_seconds": _eta(started, predicted, total - rows_done)}

        def store(s: Session, n=n, c=c, payload=payload, rows_done=rows_done, progress=progress) -> None:
            lease.hold(s, progress=progress)
            quota.reserve(s, settings.tenant_max_stored_bytes, job.tenant_id, len(payload),
                          f"result chunk {c} of batch prediction {job.id}")
            s.add(BatchChunk(job_id=job.id, chunk=c, rows=n, data=payload))
            events.append_in(s, job.id, "progress", {**progress, "chunk": c})  # step: rows done (progress bars)

        lease.write(store, f"store chunk {c}")
        chunk += 1
    verify()
    elapsed = time.monotonic() - started
    metrics = {"rows": rows_done, "rows_per_s": round(predicted / elapsed, 2) if elapsed > 0 and predicted else None}
    lease.end("succeeded", metrics=metrics, progress={"step": rows_done, "total_steps": total, "eta_seconds": 0},
              event={"status": "succeeded", "rows": rows_done, "chunks": chunk})


def _eta(started: float, done: int, left: int) -> float | None:
    elapsed = time.monotonic() - started
    return round(left * elapsed / done, 1) if done and elapsed > 0 else None


def _evaluate(job: Job, lease, hb, engine, name: str, cfg: dict, rows: Iterator[dict], total: int,
              settings: Settings, verify: Callable[[], None]) -> None:
    from spafit_core import data as core_data
    from spafit_core.errors import DataError

    task = cfg.get("task") or {}
    task_type = task.get("task_type", "single_label_classification")
    labels: list[str] = list(task.get("labels") or [])
    index = {lab: i for i, lab in enumerate(labels)}
    fields, label_field = list(job.text_fields), job.label_field
    preds: list[Any] = []
    gold: list[Any] = []
    started, seen = time.monotonic(), 0
    for part in _batches(rows, settings.batch_forward_rows):
        _check_stop(hb)
        out = engine.predict(name, [_input(r, fields) for r in part], None)
        for r, p in zip(part, out, strict=True):
            seen += 1
            value = r.get(label_field)
            if task_type == "regression":
                try:
                    y = float(value)  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    y = math.nan
                if not math.isfinite(y):  # "nan" and "inf" parse, and would leave every metric null
                    raise DataError(f"row {seen - 1}: label {value!r} is not a finite number", field="label_field")
                preds.append(p["value"])
                gold.append(y)
            elif task_type == "single_label_classification":
                lab = core_data.label_str(value)
                if lab not in index:
                    raise DataError(f"row {seen - 1}: label {lab!r} is not one of the version's labels {labels}",
                                    field="label_field")
                preds.append(index[p["label"]])
                gold.append(index[lab])
            else:
                raise DataError("evaluating multi-label versions is not supported yet", field="task")
        if seen % (settings.batch_forward_rows * 16) < settings.batch_forward_rows:
            now = {"step": seen, "total_steps": total, "eta_seconds": _eta(started, seen, total - seen)}

            def progress(s: Session, now=now) -> None:
                lease.hold(s, progress=now)
                events.append_in(s, job.id, "progress", now)

            lease.write(progress, "record progress")
    if not gold:
        raise DataError("the dataset has no rows", field="dataset")
    verify()
    metrics = evaluation_metrics(task_type, preds, gold, labels, (job.hyperparameters or {}).get("glue_preset"))

    def finish(s: Session) -> None:
        # the version's row held (KEY SHARE) to the commit: its task deleted meanwhile is an error that says so,
        # not the evaluation row's foreign key failing (an internal error)
        if s.scalar(select(AdapterVersion.id).where(AdapterVersion.id == job.adapter_version_id)
                    .with_for_update(key_share=True)) is None:
            raise DataError(f"the version of task {job.task_name!r} this evaluation ran was deleted while it ran",
                            field="version")
        lease.hold(s, status="succeeded", finished_at=utcnow(), metrics=metrics,
                   progress={"step": seen, "total_steps": total, "eta_seconds": 0})
        s.add(VersionEvaluation(tenant_id=job.tenant_id, version_id=job.adapter_version_id,
                                dataset_id=job.train_dataset_id, job_id=job.id, rows=seen, metrics=metrics))
        events.append_in(s, job.id, "status", {"status": "succeeded", "rows": seen, "metrics": metrics})

    lease.write(finish, "store the evaluation")


CONFUSION_MAX_LABELS = 100  # an evaluation stores its confusion matrix up to this many labels (10,000 cells)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def evaluation_metrics(task_type: str, preds: list, gold: list, labels: list[str],
                       glue_preset: str | None = None) -> dict[str, Any]:
    """Regression: pearson, spearman, mse. Single-label: accuracy, macro-F1 (and F1 of label 1 for two labels),
    per-class precision and recall, the confusion matrix (rows: true label, columns: predicted). With a GLUE
    preset (`glue_preset`: cola, mrpc, stsb, ...) also that preset's metrics (`glue_metrics`, each a top-level
    number too: MCC for CoLA, F1 and accuracy for MRPC/QQP, Pearson/Spearman for STS-B), and `main_metric` is the
    preset's."""
    import numpy as np

    from spafit_core import metrics as m

    if task_type == "regression":
        out = {"pearson": _finite(m.pearson(preds, gold)), "spearman": _finite(m.spearman(preds, gold)),
               "mse": _finite(m.mse(preds, gold)), "main_metric": "pearson"}
        return _with_glue(out, glue_preset, preds, gold, labels)
    k = len(labels)
    p, y = np.asarray(preds, dtype=np.int64), np.asarray(gold, dtype=np.int64)
    hits = np.bincount(y[p == y], minlength=k)
    predicted_n, actual_n = np.bincount(p, minlength=k), np.bincount(y, minlength=k)
    per_class = {}
    for i, lab in enumerate(labels):
        tp, predicted, actual = int(hits[i]), int(predicted_n[i]), int(actual_n[i])
        per_class[lab] = {"precision": tp / predicted if predicted else 0.0, "recall": tp / actual if actual else 0.0,
                          "support": actual}
    out: dict[str, Any] = {"accuracy": m.accuracy(p, y), "macro_f1": m.macro_f1(p, y, num_labels=k)}
    if k == 2:
        out["f1"] = m.f1(p, y)
    out.update(main_metric="f1" if k == 2 else "macro_f1", per_class=per_class, labels=labels)
    if k <= CONFUSION_MAX_LABELS:
        confusion = np.zeros((k, k), dtype=np.int64)
        np.add.at(confusion, (y, p), 1)
        out["confusion_matrix"] = confusion.tolist()
    else:  # k x k cells, stored three times (job, evaluation, event): 10,000 labels made gigabytes
        out["confusion_matrix_omitted"] = f"{k} labels: a confusion matrix is kept for {CONFUSION_MAX_LABELS} at most"
    return _with_glue(out, glue_preset, p, y, labels)


def _with_glue(out: dict[str, Any], name: str | None, preds: Any, gold: Any, labels: list[str]) -> dict[str, Any]:
    """`out` plus the GLUE preset's metrics, computed as the benchmark defines them: F1 of the preset's positive
    class (its second label: `equivalent`, `duplicate`), wherever that label sits among the version's."""
    if not name:
        return out
    from spafit_core import metrics as m
    from spafit_core.glue import get_glue_task

    preset = get_glue_task(name)
    values: dict[str, float | None] = {}
    for metric in preset.metrics:
        if metric == "f1":
            positive = next((labels.index(c) for c in (preset.labels[1], "1", "True", "true") if c in labels), 1)
            values[metric] = _finite(m.f1(preds, gold, positive=positive))
        else:
            values[metric] = _finite(m.compute_metrics(preset.task_type, preds, gold, [metric])[metric])
    out.update(values)
    out.update(glue_preset=preset.name, glue_metrics=list(preset.metrics), main_metric=preset.main_metric)
    return out

