"""GLUE presets: fields, labels, metrics and splits of the nine tasks, and loading them either from the
original GLUE TSV files in a local folder or from the Hugging Face Hub (`nyu-mll/glue`).

Both sources give the same Table: the hub's column names (`sentence1`, `premise`, ...), `label` as the
label's name in the hub's order (MNLI: entailment, neutral, contradiction) or a float for STS-B, and `idx`.
Test splits have no labels, so their tables have no `label` column.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import TaskSpec
from .data_hub import load_hf_dataset
from .data_read import NumberedLines, Table, shorten
from .errors import ConfigError, DataError
from .metrics import check_metric_names

HUB_ID = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task. `source_columns` maps our field names to the TSV header's column names;
    `headerless_columns` is the column layout of files without a header (CoLA train/dev)."""

    name: str
    folder: str  # the folder in the GLUE download, e.g. "SST-2"
    text_fields: tuple[str, ...]
    labels: tuple[str, ...]  # index order = the hub's ClassLabel order; () for regression
    metrics: tuple[str, ...]  # the first is the main metric
    source_columns: tuple[tuple[str, str], ...]  # (our field, TSV column); the label field last
    splits: tuple[str, ...] = ("train", "validation", "test")
    task_type: str = "single_label_classification"
    label_field: str = "label"
    label_coding: str = "index"  # how the TSV writes labels: "index" (0/1), "name" or "float"
    headerless_columns: tuple[str, ...] = ()
    hub_id: str = HUB_ID

    def __post_init__(self) -> None:
        check_metric_names(self.task_type, self.metrics)
        TaskSpec(self.task_type, self.labels)

    @property
    def hub_config(self) -> str:
        return self.name

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    @property
    def validation_splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.splits if s.startswith("validation"))

    @property
    def task_spec(self) -> TaskSpec:
        return TaskSpec(self.task_type, self.labels)

    def file_name(self, split: str) -> str:
        """The TSV file of `split` in the GLUE download: train.tsv, dev.tsv, dev_matched.tsv, test.tsv, ..."""
        return split.replace("validation", "dev") + ".tsv"


_PAIR = (("sentence1", "sentence1"), ("sentence2", "sentence2"), ("label", "label"))
_MNLI_SPLITS = ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")

GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("matthews_corrcoef",),
             (("sentence", "sentence"), ("label", "label")),
             headerless_columns=("source", "label", "original_label", "sentence")),
    GlueTask("sst2", "SST-2", ("sentence",), ("negative", "positive"), ("accuracy",),
             (("sentence", "sentence"), ("label", "label"))),
    GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy"),
             (("sentence1", "#1 String"), ("sentence2", "#2 String"), ("label", "Quality"))),
    GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), (), ("pearson", "spearman"),
             (("sentence1", "sentence1"), ("sentence2", "sentence2"), ("label", "score")),
             task_type="regression", label_coding="float"),
    GlueTask("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"),
             (("question1", "question1"), ("question2", "question2"), ("label", "is_duplicate"))),
    GlueTask("mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
             ("accuracy",), (("premise", "sentence1"), ("hypothesis", "sentence2"), ("label", "gold_label")),
             splits=_MNLI_SPLITS, label_coding="name"),
    GlueTask("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",),
             (("question", "question"), ("sentence", "sentence"), ("label", "label")), label_coding="name"),
    GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), _PAIR,
             label_coding="name"),
    GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), _PAIR),
)}
_SPLIT_ALIASES = {"dev": "validation", "val": "validation", "eval": "validation"}


def get_glue_task(name: str) -> GlueTask:
    """The preset for "mrpc", "glue/mrpc", "MRPC", "SST-2" or "sst-2"; ConfigError listing the nine otherwise."""
    key = str(name).strip().lower().removeprefix("glue/").replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ConfigError(f"unknown GLUE task {name!r}; expected one of {', '.join(GLUE_TASKS)}", field="task")
    return GLUE_TASKS[key]


def _split(task: GlueTask, split: str) -> str:
    s = split.strip().lower()
    s = _SPLIT_ALIASES.get(s, s)
    if s.startswith("dev_"):
        s = "validation_" + s[4:]
    if s not in task.splits:
        hint = " (MNLI has validation_matched and validation_mismatched)" if s == "validation" else ""
        raise DataError(f"GLUE {task.name} has no split {split!r}{hint}; splits: {', '.join(task.splits)}",
                        field="split")
    return s


def load_glue(name: str, split: str, data_dir: str | Path | None = None) -> Table:
    """A GLUE split as a Table: from the GLUE TSV files under `data_dir` (either `<data_dir>/MRPC/train.tsv`
    or `<data_dir>/train.tsv`), or from the Hugging Face Hub when `data_dir` is None (needs network)."""
    task = get_glue_task(name)
    split = _split(task, split)
    if data_dir is not None:
        return read_glue_tsv(task, split, find_glue_file(task, split, data_dir))
    try:
        table = load_hf_dataset(task.hub_id, split, task.hub_config)
    except DataError as e:
        raise DataError(f"{e.message}. To load GLUE {task.name} offline, download the GLUE data (the TSV files "
                        f"from gluebenchmark.com) and pass data_dir=<folder holding {task.folder}/"
                        f"{task.file_name(split)}>", field="data_dir") from None
    columns = [*task.text_fields, *([task.label_field] if not split.startswith("test") else []), "idx"]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"the hub's GLUE {task.name} has no column(s) {missing}; it has {table.columns}")
    records = [{c: r[c] for c in columns} for r in table.records]
    return Table("hf", columns, records, table.lines, table.truncated_rows)


def find_glue_file(task: GlueTask, split: str, data_dir: str | Path) -> Path:
    """`<data_dir>/<task folder>/<file>` (folder name matched loosely: "SST-2", "sst2") or `<data_dir>/<file>`."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"GLUE data_dir {shorten(str(root))} is not a folder", field="data_dir")
    file = task.file_name(split)
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and _loose(p.name) in {task.name, _loose(task.folder)}]
    candidates = [f / file for f in folders] + [root / file]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"no {file} for GLUE {task.name} under {shorten(str(root))}: expected "
                    f"{root / task.folder / file} or {root / file}", field="data_dir")


def _loose(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def read_glue_tsv(task: GlueTask, split: str, path: str | Path) -> Table:
    """Read one GLUE TSV file: tab-separated, quoting disabled (GLUE's quotes are text), labels decoded to
    names. Raises DataError naming the file and line for a short row or an unknown label."""
    labelled = not split.startswith("test")
    with open(path, "rb") as stream:
        lines = NumberedLines(stream)
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
        name = f"{Path(path).parent.name}/{Path(path).name}"
        rows = _rows(reader, lines, name)
        if labelled and task.headerless_columns:
            header = list(task.headerless_columns)
        else:
            first = next(rows, None)
            if first is None:
                raise DataError(f"{name}: the file is empty")
            header = [c.strip() for c in first[1]]
        wanted = [(ours, theirs) for ours, theirs in task.source_columns if labelled or ours != task.label_field]
        absent = [theirs for _, theirs in wanted if theirs not in header]
        if absent:
            raise DataError(f"{name}: not a GLUE {task.name} file: no column(s) {', '.join(absent)} in the header "
                            f"({', '.join(header)})")
        index = [(ours, header.index(theirs)) for ours, theirs in wanted]
        need = max(i for _, i in index) + 1
        columns = [ours for ours, _ in wanted] + ["idx"]
        records: list[dict[str, object]] = []
        numbers: list[int] = []
        for line, row in rows:
            where = f"{name} line {line}"
            if len(row) < need:
                raise DataError(f"{where}: expected at least {need} tab-separated fields, found {len(row)}")
            record: dict[str, object] = {ours: row[i] for ours, i in index}
            if labelled:
                record[task.label_field] = _decode_label(task, str(record[task.label_field]), where)
            record["idx"] = len(records)
            records.append(record)
            numbers.append(line)
    if not records:
        raise DataError(f"{name}: no data rows")
    return Table("tsv", columns, records, numbers)


def _rows(reader: Iterator[list[str]], lines: NumberedLines, name: str) -> Iterator[tuple[int, list[str]]]:
    """(line, fields) of each non-blank row."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{name} line {lines.number}: {e}") from None
        if row:
            yield lines.number, row


def _decode_label(task: GlueTask, raw: str, where: str) -> object:
    raw = raw.strip()
    if task.label_coding == "float":
        try:
            return float(raw)
        except ValueError:
            raise DataError(f"{where}: score {raw!r} is not a number") from None
    if task.label_coding == "index" and raw.isascii() and raw.isdigit() and int(raw) < len(task.labels):
        return task.labels[int(raw)]
    if task.label_coding == "name" and raw in task.labels:
        return raw
    expected = (f"0..{len(task.labels) - 1}" if task.label_coding == "index" else ", ".join(task.labels))
    raise DataError(f"{where}: label {raw!r} is not a GLUE {task.name} label (expected {expected})")
