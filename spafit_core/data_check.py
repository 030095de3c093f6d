"""Checking labelled text data: pick the text and label fields, validate a `Table` into a `DataReport` whose
problems name the line and column, and turn its rows into model `Examples`.

Problems with the content (empty texts, unknown labels, ...) are not raised but listed in the report, so an
upload can show them all at once; `to_examples` raises on the first row it cannot convert. Multi-label labels
are a JSON list in JSON Lines, or names joined by "|" in a CSV/TSV cell ("sports|politics").
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .adapter_schema import MAX_LABEL_CHARS, MAX_LABELS
from .config import TASK_TYPES
from .data_read import Table, _json_type, shorten
from .errors import ConfigError, DataError

if TYPE_CHECKING:
    from .config import TaskSpec

MAX_PROBLEMS_PER_CODE = 20  # per (code, column): further ones are summed up in one line-less problem
MIN_ROWS = 10  # fewer rows than this is worth a warning
TEXT_FIELD_CANDIDATES = (  # pairs first, so that ("text", "text_pair") wins over ("text",)
    ("sentence1", "sentence2"), ("question", "sentence"), ("text", "text_pair"), ("premise", "hypothesis"),
    ("question1", "question2"), ("text",), ("sentence",),
)
LABEL_FIELD_CANDIDATES = ("label", "labels", "score", "rating", "target", "class")
MULTI_LABEL_SEPARATOR = "|"
_INT = re.compile(r"[+-]?\d+")


@dataclass
class Problem:
    """One finding of `validate`. `line` is the 1-based source line (row, for a Hugging Face dataset)."""

    code: str
    message: str
    line: int | None = None
    column: str | None = None
    severity: str = "error"  # "error" | "warning"


@dataclass
class DataReport:
    """What `validate` found: shape, chosen fields, label counts and every problem."""

    format: str
    rows: int
    columns: list[str]
    text_fields: list[str]
    label_field: str | None
    label_counts: dict[str, int]
    problems: list[Problem]
    truncated_rows: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def raise_for_errors(self) -> None:
        """A DataError listing the first errors (and the whole report in `detail`), if there are any."""
        errors = self.errors
        if errors:
            shown = "; ".join(p.message for p in errors[:5])
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            raise DataError(f"the dataset has {len(errors)} error(s): {shown}{more}",
                            field=errors[0].column, detail=self.to_dict())


@dataclass
class Examples:
    """Model inputs: texts (and second texts for pair tasks) with labels as class ids, floats (regression)
    or multi-hot float lists (multi-label). `labels` is empty when the table has no label field."""

    texts: list[str]
    text_pairs: list[str] | None
    labels: list

    def __len__(self) -> int:
        return len(self.texts)


# ----------------------------------------------------------------------------------------------- fields


def _find(columns: Sequence[str], name: str) -> str | None:
    """The column called `name`, matched exactly or else case-insensitively."""
    if name in columns:
        return name
    lower = {c.lower(): c for c in reversed(columns)}
    return lower.get(name.lower())


def infer_fields(columns: Sequence[str] | Table, text_fields: Sequence[str] | str | None = None,
                 label_field: str | None = None) -> tuple[list[str], str | None]:
    """Text fields and label field: the given ones, else the usual names (see TEXT_FIELD_CANDIDATES and
    LABEL_FIELD_CANDIDATES, case-insensitive), else the first text column (the first column when given only
    names). Returns ([], None) parts when nothing fits; `validate` then says so."""
    table = columns if isinstance(columns, Table) else None
    names = list(table.columns if table is not None else columns)
    if label_field is None:
        label_field = next((c for c in (_find(names, n) for n in LABEL_FIELD_CANDIDATES) if c), None)
    if text_fields is not None:
        return ([text_fields] if isinstance(text_fields, str) else list(text_fields)), label_field
    rest = [c for c in names if c != label_field]
    for candidate in TEXT_FIELD_CANDIDATES:
        found = [_find(rest, c) for c in candidate]
        if all(found):
            return [c for c in found if c], label_field
    for c in rest:
        if table is None or _is_text_column(table, c):
            return [c], label_field
    return [], label_field


def _is_text_column(table: Table, column: str, sample: int = 100) -> bool:
    values = [r.get(column) for r in table.records[:sample]]
    values = [v for v in values if v not in (None, "")]
    return bool(values) and all(isinstance(v, str) and _number(v) is None for v in values)


# ----------------------------------------------------------------------------------------------- labels


def label_str(value: object) -> str | None:
    """The name of a single label value; None when missing. 1, 1.0 and "1" are all "1"."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return str(int(value))
        return repr(value)
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return None  # lists / objects are not a single label


def _multi(value: object) -> list[str] | None:
    """Label names of a multi-label cell: a list, or "a|b|c"; "" or [] is the empty set; None if malformed."""
    if isinstance(value, str):
        return [s for s in (p.strip() for p in value.split(MULTI_LABEL_SEPARATOR)) if s]
    if isinstance(value, list):
        names = [label_str(v) if not isinstance(v, list | dict) else None for v in value]
        return None if any(n is None for n in names) else [n for n in names if n is not None]
    return None


def _sort_key(name: str) -> tuple[int, int, str]:
    return (0, int(name), "") if _INT.fullmatch(name) else (1, 0, name)


def label_names(table: Table, label_field: str, task_type: str) -> list[str]:
    """The label map in index order: integer labels numerically, then other names as strings. Multi-label:
    the union of all label names. Regression: []."""
    if task_type == "regression":
        return []
    seen: set[str] = set()
    for row in table.records:
        value = row.get(label_field)
        if task_type == "multi_label_classification":
            seen.update(_multi(value) or ())
        else:
            name = label_str(value)
            if name is not None:
                seen.add(name)
    return sorted(seen, key=_sort_key)


def _number(value: object) -> float | None:
    """A finite float from a number or numeric string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------------------------- validation


class _Problems:
    """Collects problems, keeping at most MAX_PROBLEMS_PER_CODE per (code, column) and counting the rest."""

    def __init__(self, where: str):
        self.where = where  # "line" or "row"
        self.items: list[Problem] = []
        self.overflow: Counter[tuple[str, str | None, str]] = Counter()
        self.kept: Counter[tuple[str, str | None]] = Counter()

    def add(self, code: str, message: str, line: int | None = None, column: str | None = None,
            severity: str = "error") -> None:
        key = (code, column)
        if line is not None and self.kept[key] >= MAX_PROBLEMS_PER_CODE:
            self.overflow[(code, column, severity)] += 1
            return
        self.kept[key] += 1
        prefix = f"{self.where} {line}: " if line is not None else ""
        self.items.append(Problem(code, prefix + message, line, column, severity))

    def done(self) -> list[Problem]:
        for (code, column, severity), n in self.overflow.items():
            col = f" in column {column!r}" if column else ""
            self.items.append(Problem(code, f"... and {n} more {self.where}s with {code.replace('_', ' ')}{col}",
                                      None, column, severity))
        return self.items


def validate(table: Table, text_fields: Sequence[str], label_field: str | None, task_type: str, *,
             train_labels: Sequence[str] | None = None) -> DataReport:
    """Check that `table` can train or evaluate a `task_type` model; every problem names its line and column.
    `train_labels`: the training label map, when validating evaluation data against it.

    Error codes: no_rows, missing_column, too_many_text_fields, label_in_text_fields, empty_text, invalid_text,
    missing_label, invalid_label, unknown_label, too_many_labels. Warning codes: single_class, constant_label,
    too_few_rows, truncated.
    """
    if task_type not in TASK_TYPES:
        raise ConfigError(f"task_type must be one of {', '.join(TASK_TYPES)}; got {task_type!r}", field="task_type")
    text_fields = [text_fields] if isinstance(text_fields, str) else list(text_fields)
    out = _Problems("row" if table.format == "hf" else "line")
    present = ", ".join(table.columns)
    rows = len(table.records)

    if rows == 0:
        out.add("no_rows", "the dataset has no rows")
    if not text_fields:
        out.add("missing_column", f"no text column found; name one with text_fields (columns present: {present})")
    elif len(text_fields) > 2:
        out.add("too_many_text_fields", f"at most 2 text fields (a text and a text pair); got {text_fields}")
    if len(set(text_fields)) < len(text_fields):
        out.add("too_many_text_fields", f"the text and the text pair must be two columns; got {text_fields}")
    if label_field is not None and label_field in text_fields:  # the model would read its answer in the input
        out.add("label_in_text_fields", f"column {label_field!r} cannot be both a text field and the label field",
                column=label_field)
    text_ok = [f for f in text_fields if f in table.columns]
    for f in text_fields:
        if f not in table.columns:
            out.add("missing_column", f"text column {f!r} not found (columns present: {present})", column=f)
    label_ok = label_field is not None and label_field in table.columns
    if label_field is None:
        out.add("missing_column", f"no label column found; name one with label_field (columns present: {present})")
    elif not label_ok:
        out.add("missing_column", f"label column {label_field!r} not found (columns present: {present})",
                column=label_field)

    for row, line in zip(table.records, table.lines, strict=True):
        for f in text_ok:
            value = row.get(f)
            if value is None or (isinstance(value, str) and not value.strip()):
                out.add("empty_text", f"empty text in column {f!r}", line, f)
            elif not isinstance(value, str):
                out.add("invalid_text", f"column {f!r} must be text, got {_json_type(value)}", line, f)

    counts: dict[str, int] = {}
    if label_ok:
        assert label_field is not None
        counts = _check_labels(table, label_field, task_type, train_labels, out)
        if task_type == "single_label_classification" and len(counts) == 1:
            only = next(iter(counts))
            out.add("single_class", f"every row has the label {only!r}; a classifier needs at least two classes",
                    column=label_field, severity="warning")
    if 0 < rows < MIN_ROWS:
        out.add("too_few_rows", f"only {rows} rows; fine-tuning needs more (at least {MIN_ROWS}, ideally "
                "hundreds)", severity="warning")
    if table.truncated_rows:
        out.add("truncated", f"only the first {rows} rows were read; {table.truncated_rows} more were ignored",
                severity="warning")
    return DataReport(format=table.format, rows=rows, columns=list(table.columns), text_fields=text_fields,
                      label_field=label_field, label_counts=counts, problems=out.done(),
                      truncated_rows=table.truncated_rows)


def _check_labels(table: Table, label_field: str, task_type: str, train_labels: Sequence[str] | None,
                  out: _Problems) -> dict[str, int]:
    known = None if train_labels is None or task_type == "regression" else {str(x) for x in train_labels}
    known_list = ", ".join(str(x) for x in train_labels or ())
    counts: Counter[str] = Counter()
    values: set[float] = set()
    for row, line in zip(table.records, table.lines, strict=True):
        value = row.get(label_field)
        if task_type == "regression":
            if value is None or (isinstance(value, str) and not value.strip()):
                out.add("missing_label", f"no value in label column {label_field!r}", line, label_field)
            elif (x := _number(value)) is None:
                out.add("invalid_label", f"label {shorten(repr(value), 60)} in column {label_field!r} is not a "
                        "finite number (regression)", line, label_field)
            else:
                values.add(x)
            continue
        if task_type == "multi_label_classification":
            if value is None:
                out.add("missing_label", f"no value in label column {label_field!r}", line, label_field)
                continue
            names = _multi(value)
            if names is None:
                out.add("invalid_label", f"column {label_field!r} must be a list of label names or "
                        f"\"a{MULTI_LABEL_SEPARATOR}b\", got {_json_type(value)}", line, label_field)
                continue
        else:
            name = label_str(value)
            if name is None:
                if isinstance(value, list | dict):
                    out.add("invalid_label", f"column {label_field!r} must hold one label, got {_json_type(value)}"
                            " (multi-label data? set task_type=multi_label_classification)", line, label_field)
                else:
                    out.add("missing_label", f"no value in label column {label_field!r}", line, label_field)
                continue
            names = [name]
        for name in names:
            if len(name) > MAX_LABEL_CHARS:  # an adapter's label map refuses it: the job would fail once trained
                out.add("invalid_label", f"label {shorten(repr(name), 60)} in column {label_field!r} is longer "
                        f"than {MAX_LABEL_CHARS} characters (a text column taken for the label?)", line, label_field)
            elif known is not None and name not in known:
                out.add("unknown_label", f"label {name!r} does not occur in the training data (training labels: "
                        f"{known_list})", line, label_field)
            else:
                counts[name] += 1
    if len(counts) > MAX_LABELS:  # an adapter holds at most this many: a classifier's job would fail once trained
        # Numbers are likely scores, which a job may still train as regression (task_type is the job's to choose):
        # a warning; other labels (a text or id column) an error.
        scores = all(_number(n) is not None for n in counts)
        hint = "scores? train with task_type regression" if scores else "a text or id column taken for the label?"
        out.add("too_many_labels", f"{len(counts)} distinct labels in column {label_field!r}; a classifier has at "
                f"most {MAX_LABELS} ({hint})", column=label_field, severity="warning" if scores else "error")
    if task_type == "regression":
        if len(values) == 1:
            out.add("constant_label", f"every row has the same score {next(iter(values))}", column=label_field,
                    severity="warning")
        return {}
    return {name: counts[name] for name in sorted(counts, key=_sort_key)}


# ----------------------------------------------------------------------------------------------- examples


def to_examples(table: Table, text_fields: Sequence[str], label_field: str | None, task: TaskSpec) -> Examples:
    """Texts and label ids (through `task.labels`) ready for a tokenizer. Raises DataError naming the line for
    a row it cannot convert; run `validate` first to see every problem at once."""
    text_fields = [text_fields] if isinstance(text_fields, str) else list(text_fields)
    if not 1 <= len(text_fields) <= 2:
        raise DataError(f"need 1 or 2 text fields; got {text_fields}", field="text_fields")
    for f in [*text_fields, *([label_field] if label_field else [])]:
        if f not in table.columns:
            raise DataError(f"column {f!r} not found (columns present: {', '.join(table.columns)})", field=f)
    where = "row" if table.format == "hf" else "line"
    index = {name: i for i, name in enumerate(task.labels)}
    texts: list[str] = []
    pairs: list[str] | None = [] if len(text_fields) == 2 else None
    labels: list = []
    for row, line in zip(table.records, table.lines, strict=True):
        values = [row.get(f) for f in text_fields]
        for f, value in zip(text_fields, values, strict=True):
            if not isinstance(value, str):
                raise DataError(f"{where} {line}: column {f!r} must be text, got {_json_type(value)}", field=f)
        texts.append(values[0])  # type: ignore[arg-type]
        if pairs is not None:
            pairs.append(values[1])  # type: ignore[arg-type]
        if label_field is None:
            continue
        labels.append(_label_value(row.get(label_field), task, index, f"{where} {line}", label_field))
    return Examples(texts, pairs, labels)


def _label_value(value: object, task: TaskSpec, index: dict[str, int], where: str, column: str) -> object:
    if task.task_type == "regression":
        x = _number(value)
        if x is None:
            raise DataError(f"{where}: label {shorten(repr(value), 60)} is not a finite number", field=column)
        return x
    if task.task_type == "multi_label_classification":
        names = _multi(value)
        if names is None:
            raise DataError(f"{where}: cannot read the labels {shorten(repr(value), 60)}", field=column)
        hot = [0.0] * len(task.labels)
        for name in names:
            if name not in index:
                raise DataError(f"{where}: label {name!r} is not one of the task's labels "
                                f"({', '.join(task.labels)})", field=column)
            hot[index[name]] = 1.0
        return hot
    name = label_str(value)
    if name is None:
        raise DataError(f"{where}: missing label in column {column!r}", field=column)
    if name not in index:
        raise DataError(f"{where}: label {name!r} is not one of the task's labels ({', '.join(task.labels)})",
                        field=column)
    return index[name]
