"""Labelled text data: read CSV / TSV / JSON Lines (or a Hugging Face dataset), pick the text and label
fields, validate them into a report whose problems name the line and column, and turn rows into examples.

Reading is streamed line by line and stops at `max_rows`; everything the reader cannot parse raises a
`DataError` that says what and where ("line 7: ..."). Problems with the content (empty texts, unknown
labels, ...) are not raised but listed in a `DataReport`, so an upload can show them all at once.

CSV follows RFC 4180 (quotes escape commas and newlines). TSV has no quoting at all: one record per line,
fields split on tabs, quote characters kept as text (the convention of the GLUE files). Multi-label labels
are a JSON list in JSON Lines, or names joined by "|" in a CSV/TSV cell ("sports|politics").
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .config import TASK_TYPES
from .errors import ConfigError, DataError, ImportTooLarge, UnsafeDataSource

if TYPE_CHECKING:
    from .config import TaskSpec

FORMATS = ("csv", "tsv", "jsonl")
MAX_LINE_BYTES = 8 << 20  # one physical line; longer is not text data
MAX_PROBLEMS_PER_CODE = 20  # per (code, column): further ones are summed up in one line-less problem
MIN_ROWS = 10  # fewer rows than this is worth a warning
TEXT_FIELD_CANDIDATES = (  # pairs first, so that ("text", "text_pair") wins over ("text",)
    ("sentence1", "sentence2"), ("question", "sentence"), ("text", "text_pair"), ("premise", "hypothesis"),
    ("question1", "question2"), ("text",), ("sentence",),
)
LABEL_FIELD_CANDIDATES = ("label", "labels", "score", "rating", "target", "class")
MULTI_LABEL_SEPARATOR = "|"
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".json": "jsonl"}
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
class Table:
    """Rows as dicts over `columns`; `lines[i]` is the 1-based source line where record i starts.
    `truncated_rows` counts records past `max_rows` that were not kept."""

    format: str
    columns: list[str]
    records: list[dict[str, object]]
    lines: list[int]
    truncated_rows: int = 0

    def __len__(self) -> int:
        return len(self.records)


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


# ----------------------------------------------------------------------------------------------- reading


def detect_format(name: str | None, head: bytes) -> str:
    """csv, tsv or jsonl: from the file extension if it has a known one, else sniffed from the first line."""
    if name:
        ext = os.path.splitext(name.lower())[1]
        if ext in _EXTENSIONS:
            return _EXTENSIONS[ext]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError("the file is UTF-16 encoded; save it as UTF-8")
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if not text:
        raise DataError("the file is empty")
    if text[:1] in (b"{", b"["):
        return "jsonl"
    first = text.split(b"\n", 1)[0]
    return "tsv" if b"\t" in first and first.count(b"\t") >= first.count(b",") else "csv"


def read_table(source: str | Path | bytes, format: str | None = None, *, max_rows: int | None = None) -> Table:
    """Read a CSV, TSV or JSON Lines file (a path, or its bytes) into a Table, keeping at most `max_rows`
    records. Raises DataError naming the line for anything that is not well-formed UTF-8 data."""
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}", field="format")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ConfigError(f"max_rows must be an integer >= 1 or None; got {max_rows!r}", field="max_rows")
    name: str | None = None
    if isinstance(source, bytes | bytearray | memoryview):
        stream: IO[bytes] = io.BytesIO(bytes(source))
    else:
        name = str(source)
        path = Path(source)
        if not path.is_file():
            raise DataError(f"no such file: {shorten(name)}")
        stream = open(path, "rb")  # closed below
    try:
        if format is None:
            format = detect_format(name, stream.read(64 * 1024))
            stream.seek(0)
        lines = NumberedLines(stream)
        return _read_jsonl(lines, max_rows) if format == "jsonl" else _read_delimited(lines, format, max_rows)
    finally:
        stream.close()


class NumberedLines:
    """Decoded physical lines (line endings kept) of a binary stream; `number` is the current 1-based line."""

    def __init__(self, stream: IO[bytes]):
        self.stream = stream
        self.number = 0

    def __iter__(self) -> Iterator[str]:
        while True:
            raw = self.stream.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            self.number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"line {self.number}: longer than {MAX_LINE_BYTES >> 20} MiB; "
                                "this does not look like text data")
            if self.number == 1:
                if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                    raise DataError("the file is UTF-16 encoded; save it as UTF-8")
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"line {self.number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at position "
                                f"{e.start + 1}); save the file as UTF-8") from None


def _csv_error(e: csv.Error, start: int, end: int) -> DataError:
    msg = str(e)
    if "unexpected end of data" in msg:
        return DataError(f"line {start}: a quoted field starts here but its closing quote is never found "
                         "(unbalanced quote)")
    if "expected after" in msg:
        origin = f"; the record starts on line {start}: check for an unbalanced quote there" if start < end else ""
        return DataError(f"line {end}: a closing quote must be followed by the delimiter or the end of the line "
                         f'(write a quote inside a quoted field as two quotes ""){origin}')
    if "field larger than field limit" in msg:
        return DataError(f"line {start}: a field is longer than {csv.field_size_limit()} characters "
                         "(often an unbalanced quote)")
    if "new-line character" in msg:
        return DataError(f"line {end}: a bare carriage return (\\r) outside quotes; save the file with \\n or "
                         "\\r\\n line endings")
    return DataError(f"line {end}: malformed {'' if start == end else f'record (from line {start}) '}({msg})")


def _read_delimited(lines: NumberedLines, format: str, max_rows: int | None) -> Table:
    if format == "tsv":
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE, strict=True)
    else:
        reader = csv.reader(lines, strict=True)
    rows = _numbered_rows(reader, lines)
    header: list[str] | None = None
    records: list[dict[str, object]] = []
    numbers: list[int] = []
    for start, end, row in rows:
        if header is None:
            header = _header(row, start)
            continue
        if max_rows is not None and len(records) >= max_rows:
            return Table(format, header, records, numbers, truncated_rows=1 + _count_rest(rows))
        if len(row) != len(header):
            span = f" (the record runs to line {end}: check for an unbalanced quote)" if end > start else ""
            raise DataError(f"line {start}: expected {len(header)} fields ({', '.join(header)}), "
                            f"found {len(row)}{span}")
        records.append(dict(zip(header, row, strict=True)))
        numbers.append(start)
    if header is None:
        raise DataError("the file is empty")
    if not records:
        raise DataError("the file has a header but no data rows")
    return Table(format, header, records, numbers)


def _numbered_rows(reader: Any, lines: NumberedLines) -> Iterator[tuple[int, int, list[str]]]:
    """(first line, last line, fields) of each non-blank record; csv errors become DataErrors."""
    end = 0
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise _csv_error(e, start, max(lines.number, start)) from None
        end = lines.number
        if row:
            yield start, end, row


def _header(row: list[str], line: int) -> list[str]:
    header = [c.strip() for c in row]
    for i, name in enumerate(header):
        if not name:
            raise DataError(f"line {line}: header column {i + 1} has no name; every column needs one")
    dupes = [c for c, n in Counter(header).items() if n > 1]
    if dupes:
        raise DataError(f"line {line}: duplicate column name(s) {', '.join(map(repr, dupes))}", field=dupes[0])
    return header


def _count_rest(rows: Iterator[Any]) -> int:
    """How many more records follow (best effort: stops at the first unreadable one)."""
    n = 0
    try:
        for _ in rows:
            n += 1
    except DataError:
        pass
    return n


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(Exception):
    pass


def _read_jsonl(lines: NumberedLines, max_rows: int | None) -> Table:
    columns: dict[str, None] = {}  # ordered set: order of first appearance
    records: list[dict[str, object]] = []
    numbers: list[int] = []
    truncated = 0
    it = iter(lines)
    for text in it:
        stripped = text.strip()
        if not stripped:
            continue
        if max_rows is not None and len(records) >= max_rows:
            truncated = 1 + _count_rest(t for t in it if t.strip())
            break
        row = _parse_json_line(text.rstrip("\r\n"), lines.number, first=not records)
        records.append(row)
        numbers.append(lines.number)
        columns.update(dict.fromkeys(row))
    if not records:
        raise DataError("the file is empty")
    names = list(columns)
    for row in records:
        if len(row) != len(names):
            for c in names:
                row.setdefault(c, None)
    return Table("jsonl", names, records, numbers, truncated_rows=truncated)


def _parse_json_line(text: str, line: int, first: bool) -> dict[str, object]:
    array = first and text.lstrip()[:1] == "["
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except _NonStandard as e:
        raise DataError(f"line {line}: {e.args[0]} is not JSON (write a number, or null for a missing value)") \
            from None
    except _DuplicateKey as e:
        raise DataError(f"line {line}: duplicate key {e.args[0]!r} in one object", field=str(e.args[0])) from None
    except json.JSONDecodeError as e:
        hint = " (a JSON array file? JSON Lines needs one object per line)" if array else ""
        raise DataError(f"line {line}: invalid JSON at column {e.colno}: {e.msg}{hint}") from None
    except (ValueError, RecursionError) as e:  # e.g. a 5000-digit integer, or nesting too deep
        raise DataError(f"line {line}: invalid JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(value, dict):
        hint = " (a JSON array file? JSON Lines needs one object per line)" if array else ""
        raise DataError(f"line {line}: expected a JSON object {{...}}, got {_json_type(value)}{hint}")
    if "\\u" in text:  # only an escape can carry a lone surrogate (\\ud800), which no tokenizer or database takes
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"line {line}: a text holds a lone surrogate escape (\\ud800-\\udfff without its "
                            "pair): not valid Unicode") from None
    return value


class _NonStandard(ValueError):
    pass


def _no_constant(name: str) -> object:
    """NaN and Infinity: Python's json reads them, JSON does not have them."""
    raise _NonStandard(name)


def _json_type(value: object) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null", dict: "an object"}.get(type(value), type(value).__name__)


def shorten(text: str, n: int = 120) -> str:
    """`text` cut to `n` characters for an error message."""
    return text if len(text) <= n else text[: n - 3] + "..."


# A Hub dataset id: "name" or "owner/name".
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
MAX_CARD_CHARS = 1 << 20  # a dataset card is a few KB of YAML and prose


def check_hub_id(name: str) -> str:
    """`name` if it can only mean a Hub dataset: "name" or "owner/name", no path, no builder of `datasets`
    itself (csv, json, ... read local files). Else `UnsafeDataSource`."""
    packaged: set[str] = set()
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

        packaged = set(_PACKAGED_DATASETS_MODULES)
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    if (not isinstance(name, str) or not HUB_ID.fullmatch(name) or ".." in name or name.lower() in packaged
            or Path(name).exists()):
        raise UnsafeDataSource(f"{shorten(repr(name))} is not a Hugging Face Hub dataset id (e.g. 'imdb' or "
                               "'owner/name'); this service imports Hub datasets only", field="hf.name")
    return name


def _unsafe_pattern(pattern: object) -> str | None:
    """Why a `data_files` / `data_dir` entry of a dataset card may leave its repository (None when it cannot)."""
    if not isinstance(pattern, str):
        return f"{shorten(repr(pattern), 60)} is not a relative path"
    p = pattern.strip().replace("\\", "/")
    if not p:
        return "an empty path"
    if p.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", p):
        return f"{shorten(p, 80)!r} is an absolute path"
    if "://" in p or "::" in p or _URL_SCHEME.match(p):
        return f"{shorten(p, 80)!r} names another location (a URL or scheme)"
    if ".." in p.split("/"):
        return f"{shorten(p, 80)!r} climbs out of the dataset ('..')"
    return None


def _card_paths(card: dict[str, Any]) -> Iterator[tuple[str, object]]:
    """(where, path) of every data file pattern and data_dir in a dataset card's YAML."""
    configs = card.get("configs") or []
    if not isinstance(configs, list):
        configs = [configs]
    for i, config in enumerate(configs):
        if not isinstance(config, dict):
            continue
        where = f"configs[{i}]" + (f" ({config.get('config_name')})" if config.get("config_name") else "")
        if "data_dir" in config:
            yield f"{where}.data_dir", config["data_dir"]
        files = config.get("data_files")
        entries = files if isinstance(files, list) else [files] if files is not None else []
        if isinstance(files, dict):  # {split: pattern(s)}
            entries = [{"split": k, "path": v} for k, v in files.items()]
        for entry in entries:
            paths = entry.get("path") if isinstance(entry, dict) else entry
            for path in paths if isinstance(paths, list) else [paths]:
                yield f"{where}.data_files", path


def check_dataset_card(readme: str) -> None:
    """Refuse (`UnsafeDataSource`) a dataset card (README.md) whose `configs` name data files or folders
    outside the dataset's own repository: absolute paths, `..`, URLs or other schemes."""
    if len(readme) > MAX_CARD_CHARS:
        raise DataError(f"the dataset card is longer than {MAX_CARD_CHARS} characters")
    if not readme.startswith("---"):
        return
    end = readme.find("\n---", 3)
    if end < 0:
        return
    import yaml

    try:
        card = yaml.safe_load(readme[3:end])
    except yaml.YAMLError as e:
        raise DataError(f"the dataset card's YAML header cannot be read: {shorten(str(e), 200)}") from None
    if not isinstance(card, dict):
        return
    for where, path in _card_paths(card):
        why = _unsafe_pattern(path)
        if why:
            raise UnsafeDataSource(f"the dataset card's {where} points outside the dataset: {why}; only files "
                                   "of the dataset itself are read", field="data_files")


def _check_resolved_files(builder: Any) -> None:
    """Every data file the builder resolved lies inside its base path (the hub repo, or the local folder)."""
    base = str(getattr(builder, "base_path", "") or "")
    files = getattr(builder.config, "data_files", None) or {}
    for split_files in files.values():
        for f in split_files:
            f = str(f)
            if "://" in base:
                inside = f.startswith(base.rstrip("/") + "/") and ".." not in f.split("/")
            else:
                try:
                    Path(f).resolve().relative_to(Path(base).resolve())
                    inside = "://" not in f
                except ValueError:
                    inside = False
            if not inside:
                raise UnsafeDataSource(f"the dataset resolves a data file outside itself "
                                       f"({shorten(Path(f).name, 60)!r}); only files of the dataset are read",
                                       field="data_files")


def check_source(name_or_path: str, *, hub_only: bool) -> None:
    """The checks that need no network, for a caller to refuse early what `load_hf_dataset` would refuse:
    a Hub id only when `hub_only`; else a local dataset folder's card."""
    if hub_only:
        check_hub_id(name_or_path)
        return
    path = Path(name_or_path)
    if path.is_dir() and not (path / "dataset_dict.json").is_file() and not (path / "state.json").is_file():
        card = _read_card(name_or_path, path)
        if card is not None:
            check_dataset_card(card)


def _read_card(name_or_path: str, local_dir: Path | None, token: bool | None = None) -> str | None:
    if local_dir is not None:
        card = local_dir / "README.md"
        return card.read_text(encoding="utf-8", errors="replace") if card.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(name_or_path, "README.md", repo_type="dataset", token=token)).read_text(
            encoding="utf-8", errors="replace")
    except EntryNotFoundError:
        return None


def load_hf_dataset(name_or_path: str, split: str, config_name: str | None = None, *,
                    max_rows: int | None = None, limit_rows: int | None = None, limit_bytes: int | None = None,
                    hub_only: bool = False) -> Table:
    """A split of a Hugging Face dataset as a Table, read as a stream. ClassLabel values become their names;
    -1 (no label, e.g. a test split) becomes None. `lines` are 1-based row numbers.

    `name_or_path`: a hub id, or (unless `hub_only`) a local `save_to_disk` folder, dataset folder or data
    file. A dataset card whose `data_files` point outside the dataset is refused (`UnsafeDataSource`).
    `max_rows` keeps the first rows only; `limit_rows` / `limit_bytes` (bytes as JSON Lines) are hard
    bounds: reading stops as soon as one is passed and raises `ImportTooLarge`. With `hub_only` the Hub is
    asked anonymously: a token this machine holds never opens a private or gated dataset to the caller."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError("reading Hugging Face datasets needs the `datasets` package") from e
    if hub_only:
        check_hub_id(name_or_path)
    path = Path(name_or_path)
    local = not hub_only and path.exists()
    try:
        if local and path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{shorten(name_or_path)} has no split {split!r}; it has {', '.join(ds)}",
                                    field="split")
                ds = ds[split]
        elif local and path.is_file():
            builder_name = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json",
                            ".jsonl": "json"}.get(path.suffix.lower())
            if builder_name is None:
                raise DataError(f"cannot tell the format of {shorten(name_or_path)}")
            ds = datasets.load_dataset(builder_name, data_files={split: str(path)}, split=split, streaming=True)
        else:
            token = False if hub_only else None
            card = _read_card(name_or_path, path if local and path.is_dir() else None, token)
            if card is not None:
                check_dataset_card(card)
            builder = datasets.load_dataset_builder(name_or_path, config_name, token=token)
            _check_resolved_files(builder)
            ds = builder.as_streaming_dataset(split=split)
        return _table_from_rows(ds, max_rows, limit_rows, limit_bytes)
    except DataError:
        raise
    except Exception as e:
        if type(e).__name__ == "SoftTimeLimitExceeded":  # the worker's time limit (Celery): not a data problem
            raise
        raise _load_error(e, name_or_path, split, config_name, hub_only) from None


def _load_error(e: Exception, name_or_path: str, split: str, config_name: str | None, hub_only: bool) -> DataError:
    """What went wrong, in words: the reason `datasets` gave (the machine's paths left out)."""
    if isinstance(e, ConnectionError):
        return DataError(f"cannot reach the Hugging Face Hub to load {shorten(repr(name_or_path))} "
                         f"({shorten(str(e), 200)})" + ("" if hub_only else "; without network access, load a "
                                                        "local file or folder instead"))
    # datasets raises many types (FileNotFoundError, ValueError, DatasetNotFoundError...)
    return DataError(f"cannot load {shorten(repr(name_or_path))}{f' ({config_name})' if config_name else ''} "
                     f"split {split!r}: {type(e).__name__}: {shorten(_without_paths(str(e)), 300)}")


def _without_paths(text: str) -> str:
    """An error message of `datasets` with absolute paths of this machine replaced by their file names."""
    return re.sub(r"(?<![\w:/])/(?:[\w.@+-]+/)+([\w.@+-]+)", r"\1", text)


def _table_from_rows(ds: Any, max_rows: int | None, limit_rows: int | None, limit_bytes: int | None) -> Table:
    """Rows of a (streaming or in-memory) Hugging Face dataset, stopping at `max_rows`, or raising
    `ImportTooLarge` as soon as `limit_rows` / `limit_bytes` is passed: nothing past a bound is read."""
    features = getattr(ds, "features", None) or {}
    decoders = {name: _class_label_decoder(feature) for name, feature in features.items()}
    columns: dict[str, None] = dict.fromkeys(getattr(ds, "column_names", None) or features)
    records: list[dict[str, object]] = []
    size = 0
    for row in ds:
        if max_rows is not None and len(records) >= max_rows:
            break
        if limit_rows is not None and len(records) >= limit_rows:
            raise ImportTooLarge(f"the dataset has more than {limit_rows} rows, the import limit; import fewer "
                                 "rows with max_rows", field="max_rows", detail={"limit_rows": limit_rows})
        record = {c: decoders[c](v) if decoders.get(c) else v for c, v in row.items()}
        if limit_bytes is not None:
            size += len(json.dumps(record, ensure_ascii=False, default=str).encode()) + 1
            if size > limit_bytes:
                raise ImportTooLarge(f"the dataset is larger than {limit_bytes} bytes (as JSON Lines), the import "
                                     f"limit, after {len(records)} rows; import fewer rows with max_rows",
                                     field="max_rows", detail={"limit_bytes": limit_bytes})
        records.append(record)
        columns.update(dict.fromkeys(record))
    names = list(columns)
    for record in records:
        for c in names:
            record.setdefault(c, None)
    # An in-memory dataset knows its length; a stream is never read past what was kept.
    truncated = len(ds) - len(records) if max_rows is not None and hasattr(ds, "__len__") else 0
    return Table("hf", names, records, list(range(1, len(records) + 1)), truncated_rows=truncated)


def _class_label_decoder(feature: Any) -> Any:
    """A function turning ClassLabel ids (or lists of them) into names; None for other features."""
    names = getattr(feature, "names", None)
    if names is not None and hasattr(feature, "int2str"):
        return lambda v: names[v] if isinstance(v, int) and 0 <= v < len(names) else None
    inner = getattr(feature, "feature", None)  # Sequence / List of ClassLabel
    if inner is not None and getattr(inner, "names", None) is not None:
        inner_names = inner.names
        return lambda v: None if v is None else [inner_names[i] for i in v if 0 <= i < len(inner_names)]
    return None


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

    Error codes: no_rows, missing_column, too_many_text_fields, empty_text, invalid_text, missing_label,
    invalid_label, unknown_label. Warning codes: single_class, constant_label, too_few_rows, truncated.
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
            if known is not None and name not in known:
                out.add("unknown_label", f"label {name!r} does not occur in the training data (training labels: "
                        f"{known_list})", line, label_field)
            else:
                counts[name] += 1
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

