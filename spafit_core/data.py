"""Labelled text data: read CSV / TSV / JSON Lines (or a Hugging Face dataset), pick the text and label
fields, validate them into a report whose problems name the line and column, and turn rows into examples.

Reading is streamed line by line and stops at `max_rows`; everything the reader cannot parse raises a
`DataError` that says what and where ("line 7: ..."). Problems with the content (empty texts, unknown
labels, ...) are not raised but listed in a `DataReport`, so an upload can show them all at once.

This module is the entry point (`load_table`) and keeps every name callers use; the work is in three files:
- `data_read.py`: files into a `Table` (CSV, TSV, JSON Lines), the line-numbered reader;
- `data_check.py`: fields, labels, `validate` into a `DataReport`, `to_examples`;
- `data_hub.py`: Hugging Face datasets (Hub or local), with the dataset-card and size checks.
GLUE presets (`glue.py`) read through `data_read` / `data_hub` and are loaded from here on demand.
"""

from __future__ import annotations

from pathlib import Path

from .data_check import (
    LABEL_FIELD_CANDIDATES,
    MAX_PROBLEMS_PER_CODE,
    MIN_ROWS,
    MULTI_LABEL_SEPARATOR,
    TEXT_FIELD_CANDIDATES,
    DataReport,
    Examples,
    Problem,
    infer_fields,
    label_names,
    label_str,
    to_examples,
    validate,
)
from .data_hub import (
    HUB_ID,
    MAX_CARD_CHARS,
    _read_card,
    _table_from_rows,
    check_dataset_card,
    check_hub_id,
    check_source,
    load_hf_dataset,
)
from .data_read import (
    FORMATS,
    MAX_LINE_BYTES,
    NumberedLines,
    Table,
    _numbered_rows,
    _parse_json_line,
    detect_format,
    read_table,
    shorten,
)
from .errors import ConfigError, DataError, ImportTooLarge, UnsafeDataSource

__all__ = [
    "ConfigError", "DataError", "ImportTooLarge", "UnsafeDataSource",
    "FORMATS", "HUB_ID", "LABEL_FIELD_CANDIDATES", "MAX_CARD_CHARS", "MAX_LINE_BYTES", "MAX_PROBLEMS_PER_CODE",
    "MIN_ROWS", "MULTI_LABEL_SEPARATOR", "TEXT_FIELD_CANDIDATES", "DataReport", "Examples", "NumberedLines",
    "Problem", "Table", "_numbered_rows", "_parse_json_line", "_read_card", "_table_from_rows",
    "check_dataset_card", "check_hub_id", "check_source", "detect_format", "infer_fields", "label_names",
    "label_str", "load_hf_dataset", "load_table", "read_table", "shorten", "to_examples", "validate",
]


def load_table(spec: str, split: str = "train", *, format: str | None = None, data_dir: str | Path | None = None,
               max_rows: int | None = None) -> Table:
    """One entry point: a CSV/TSV/JSONL file path, "glue/<task>" (local GLUE TSVs with `data_dir`, else the
    hub), "hf:<id>[:<config>]", or a local Hugging Face dataset folder. `split` is ignored for a file."""
    spec = str(spec)
    if spec.lower().startswith("glue/"):
        from .glue import load_glue

        table = load_glue(spec, split, data_dir=data_dir)
        if max_rows is not None and len(table.records) > max_rows:
            table = Table(table.format, table.columns, table.records[:max_rows], table.lines[:max_rows],
                          truncated_rows=len(table.records) - max_rows)
        return table
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise DataError("hf: needs a dataset id, e.g. hf:imdb", field="dataset")
        return load_hf_dataset(name, split, config or None, max_rows=max_rows)
    path = Path(data_dir, spec) if data_dir is not None and not Path(spec).is_absolute() else Path(spec)
    if path.is_dir():
        return load_hf_dataset(str(path), split, max_rows=max_rows)
    return read_table(path, format, max_rows=max_rows)
