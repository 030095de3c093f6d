"""Reading labelled text files: CSV / TSV / JSON Lines into a `Table`, streamed line by line and stopped at
`max_rows`. Everything the reader cannot parse raises a `DataError` that says what and where ("line 7: ...").

CSV follows RFC 4180 (quotes escape commas and newlines). TSV has no quoting at all: one record per line,
fields split on tabs, quote characters kept as text (the convention of the GLUE files). JSON Lines is one
object per line: duplicate keys, NaN / Infinity and lone surrogate escapes are refused.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import ConfigError, DataError

FORMATS = ("csv", "tsv", "jsonl")
MAX_LINE_BYTES = 8 << 20  # one physical line; longer is not text data
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".json": "jsonl"}


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
