"""Importing a Hugging Face dataset (a Hub id, or a local dataset folder / file) into a `Table`, safely: a
dataset card whose `data_files` leave the dataset is refused (`UnsafeDataSource`), a Hub-only import asks the
Hub anonymously, and reading stops as soon as a row or byte bound is passed (`ImportTooLarge`).

`check_source` is the part that needs no network, for a caller to refuse early what `load_hf_dataset` would.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .data_read import Table, shorten
from .errors import DataError, ImportTooLarge, UnsafeDataSource

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
        record = {c: _finite(decoders[c](v) if decoders.get(c) else v) for c, v in row.items()}
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


def _finite(value: Any) -> Any:
    """NaN / infinity (a parquet float column's missing value) as None: JSON has no such numbers, and the JSON Lines
    the import is stored as must read back (stored as `NaN`, every job on the `ready` dataset failed to read it)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


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
