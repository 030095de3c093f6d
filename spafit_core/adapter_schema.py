"""The adapter config's schema: every key of `spafit_adapter.json`, its type and range (`CONFIG_SCHEMA`,
`validate_config`, `parse_config`), and the limits of the backbone an adapter must respect
(`backbone_limits`, `check_backbone`). The adapter format itself (save, load, transport, verify) is in
`adapter.py`, which re-exports these names.
"""

from __future__ import annotations

import json
import math
import re
import threading
import zipfile
import zlib
from typing import Any

from .config import MethodConfig, TaskSpec
from .errors import AdapterError, ConfigError

CONFIG_FILE = "spafit_adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT = "spafit-adapter"
FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; anything this large is not ours


# ----------------------------------------------------------------------- the config schema
# One schema for the whole spafit_adapter.json: every key, its type and range. A config is checked against it
# before anything is stored (`parse_config`), and against the backbone's limits (`check_backbone`) before
# a registry accepts it, so a stored config always renders and always serves.
MAX_LAYERS = 1024
MAX_LABELS = 10_000
MAX_LABEL_CHARS = 200
MAX_SEQ_LENGTH = 1 << 16  # above any encoder's position table; the backbone's own limit is checked too
MAX_METRICS = 64
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(path: str, expected: str, value: Any) -> AdapterError:
    return AdapterError(f"{CONFIG_FILE}: {path} must be {expected}; got {_show(value)}", field=path)


def _int(value: Any, path: str, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        raise _bad(path, f"an integer in [{lo}, {hi if hi is not None else 'inf'}]", value)
    return value


def _number(value: Any, path: str, lo: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or (
            lo is not None and value < lo):
        raise _bad(path, "a finite number" + (f" >= {lo:g}" if lo is not None else ""), value)
    return value


def _string(value: Any, path: str, max_len: int, min_len: int = 1) -> str:
    if not isinstance(value, str) or not min_len <= len(value) <= max_len:
        raise _bad(path, f"a string of {min_len} to {max_len} characters", value)
    return value


def _optional(check: Any) -> Any:
    return lambda value, path: None if value is None else check(value, path)


def _const(expected: Any) -> Any:
    def check(value: Any, path: str) -> Any:
        if value != expected or type(value) is not type(expected):
            raise _bad(path, repr(expected), value)
        return value
    return check


def _object(value: Any, path: str, fields: dict[str, tuple[bool, Any]]) -> dict:
    """`value` is a JSON object with exactly these keys (required ones present), each passing its check."""
    if not isinstance(value, dict):
        raise _bad(path or "the config", "an object", value)
    unknown = sorted(set(value) - set(fields))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise AdapterError(f"{CONFIG_FILE}: unknown key {where!r}", field=where)
    for key, (required, check) in fields.items():
        where = f"{path}.{key}" if path else key
        if key not in value:
            if required:
                raise AdapterError(f"{CONFIG_FILE}: {where} is missing", field=where)
            continue
        check(value[key], where)
    return value


def _method(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise _bad(path, "an object", value)
    try:
        MethodConfig.from_dict(value)
    except (ConfigError, TypeError) as e:
        field = getattr(e, "field", None)
        raise AdapterError(f"{CONFIG_FILE}: {path}: {e}", field=f"{path}.{field}" if field else path) from None
    return value


def _labels(value: Any, path: str) -> list:
    if not isinstance(value, list) or len(value) > MAX_LABELS:
        raise _bad(path, f"a list of at most {MAX_LABELS} label names", value)
    for i, label in enumerate(value):
        _string(label, f"{path}[{i}]", MAX_LABEL_CHARS)
    return value


def _task(value: Any, path: str) -> dict:
    _object(value, path, {"task_type": (True, lambda v, p: _string(v, p, 64)), "labels": (True, _labels)})
    try:
        TaskSpec.from_dict(value)
    except ConfigError as e:
        raise AdapterError(f"{CONFIG_FILE}: {path}: {e}", field=f"{path}.{e.field}" if e.field else path) from None
    return value


def _stratification(value: Any, path: str) -> dict:
    _object(value, path, {"num_layers": (True, lambda v, p: _int(v, p, 1, MAX_LAYERS)),
                          "n1": (True, lambda v, p: _int(v, p, 0, MAX_LAYERS)),
                          "n2": (True, lambda v, p: _int(v, p, 0, MAX_LAYERS)),
                          "layer_groups": (True, lambda v, p: v)})
    n, groups = value["num_layers"], value["layer_groups"]
    if not value["n1"] <= value["n2"] <= n:
        raise _bad(f"{path}.n2", f"in [n1, num_layers] = [{value['n1']}, {n}]", value["n2"])
    if not isinstance(groups, list) or len(groups) != n or any(
            isinstance(g, bool) or g not in (1, 2, 3) for g in groups):
        raise _bad(f"{path}.layer_groups", f"a list of {n} groups, each 1, 2 or 3", groups)
    return value


def _metrics(value: Any, path: str) -> dict:
    if not isinstance(value, dict) or len(value) > MAX_METRICS:
        raise _bad(path, f"an object of at most {MAX_METRICS} metric names to numbers", value)
    for name, number in value.items():
        _string(name, f"{path} name", 64)
        if number is not None:
            _number(number, f"{path}.{name}")
    return value


def _param_counts(value: Any, path: str) -> dict:
    count = lambda v, p: _int(v, p, 0)  # noqa: E731

    def per_group(v: Any, p: str) -> dict:
        if not isinstance(v, dict) or len(v) > MAX_LAYERS:
            raise _bad(p, "an object of group names to parameter counts", v)
        for k, n in v.items():
            _string(k, f"{p} name", 16)
            count(n, f"{p}.{k}")
        return v

    return _object(value, path, {"total": (True, count), "without_head": (True, count), "head": (True, count),
                                 "per_group": (False, per_group), "base_model": (False, count),
                                 "trainable_fraction": (False, lambda v, p: _number(v, p, 0))})


def _training(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise _bad(path, "an object", value)
    if "main_metric" in value:
        _optional(lambda v, p: _string(v, p, 64))(value["main_metric"], f"{path}.main_metric")
    return value


def _base_model(value: Any, path: str) -> dict:
    return _object(value, path, {
        "name": (True, lambda v, p: _string(v, p, 300)), "fingerprint": (True, lambda v, p: _string(v, p, 128)),
        "model_type": (False, _optional(lambda v, p: _string(v, p, 64))),
        "architecture": (False, _optional(lambda v, p: _string(v, p, 200))),
        "num_layers": (False, _optional(lambda v, p: _int(v, p, 1, MAX_LAYERS))),
        "hidden_size": (False, _optional(lambda v, p: _int(v, p, 1, 1 << 20))),
    })


def _weights(value: Any, path: str) -> dict:
    def sha(v: Any, p: str) -> str:
        if not isinstance(v, str) or not _SHA256.fullmatch(v):
            raise _bad(p, "64 lowercase hex digits (a sha256)", v)
        return v

    return _object(value, path, {"file": (False, _const(WEIGHTS_FILE)), "sha256": (True, sha),
                                 "size_bytes": (False, lambda v, p: _int(v, p, 0))})


CONFIG_SCHEMA: dict[str, tuple[bool, Any]] = {  # key: (required, check)
    "format": (True, _const(FORMAT)),
    "format_version": (True, _const(FORMAT_VERSION)),
    "library_version": (False, _optional(lambda v, p: _string(v, p, 64))),
    "transformers_version": (False, _optional(lambda v, p: _string(v, p, 64))),
    "method": (True, _method),
    "stratification": (True, _stratification),
    "base_model": (True, _base_model),
    "task": (True, _task),
    "max_seq_length": (True, lambda v, p: _int(v, p, 1, MAX_SEQ_LENGTH)),
    "param_counts": (True, _param_counts),
    "metrics": (False, _metrics),
    "training": (False, _training),
    "weights": (True, _weights),
    "created_at": (False, _optional(lambda v, p: _string(v, p, 64))),
}


def is_unicode(text: str) -> bool:
    """False for a str holding a lone surrogate (JSON lets the escape \\ud800 through): not encodable as UTF-8, so
    neither a tokenizer, Postgres JSON nor a UTF-8 response can take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clean_json(value: Any, path: str = "", depth: int = 0) -> None:
    """No NaN / infinity, no NUL characters and no lone surrogates anywhere: the registry stores the config as
    JSON(B), and errors echo its strings back as UTF-8."""
    if depth > 32:
        raise AdapterError(f"{CONFIG_FILE}: nested deeper than 32 levels at {path or 'the top'}", field=path or None)
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(path, "a finite number", value)
    if isinstance(value, str) and "\x00" in value:
        raise AdapterError(f"{CONFIG_FILE}: {path} holds a NUL character", field=path or None)
    if isinstance(value, str) and not is_unicode(value):
        raise AdapterError(f"{CONFIG_FILE}: {path} holds a lone surrogate (\\ud800-\\udfff): not valid Unicode",
                           field=path or None)
    if isinstance(value, dict):
        for k, v in value.items():
            if "\x00" in str(k) or not is_unicode(str(k)):
                raise AdapterError(f"{CONFIG_FILE}: a key in {path or 'the config'} holds a NUL character or a "
                                   "lone surrogate", field=path or None)
            _clean_json(v, f"{path}.{k}" if path else str(k), depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _clean_json(v, f"{path}[{i}]", depth + 1)


def validate_config(cfg: Any) -> dict[str, Any]:
    """Check an adapter config against CONFIG_SCHEMA, and its parts against each other (the method's split
    of the layers is the recorded stratification; the base model's depth is the stratification's). Raises
    AdapterError naming the offending field; returns the config."""
    if isinstance(cfg, dict) and "peft_type" in cfg:
        raise AdapterError(f"this is a PEFT adapter config (peft_type={_show(cfg.get('peft_type'))}), not a SPAFIT "
                           "adapter config: import it as PEFT (`spafit import --format peft`, or PUT /v1/tasks/{task}/adapter "
                           "with the PEFT folder zipped)", field="peft_type")
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise AdapterError(f"{CONFIG_FILE} is not a SPAFIT adapter config (expected format={FORMAT!r})",
                           field="format")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"unsupported adapter format_version {_show(cfg.get('format_version'))}; "
                           f"this library reads version {FORMAT_VERSION}", field="format_version")
    _clean_json(cfg)
    _object(cfg, "", CONFIG_SCHEMA)
    strat, base = cfg["stratification"], cfg["base_model"]
    if base.get("num_layers") is not None and base["num_layers"] != strat["num_layers"]:
        raise _bad("base_model.num_layers", f"the stratification's num_layers ({strat['num_layers']})",
                   base["num_layers"])
    try:
        plan = MethodConfig.from_dict(cfg["method"]).resolve(strat["num_layers"])
    except ConfigError as e:
        raise AdapterError(f"{CONFIG_FILE}: method does not fit {strat['num_layers']} layers: {e}",
                           field=f"method.{e.field}" if e.field else "method") from None
    if (plan.n1, plan.n2) != (strat["n1"], strat["n2"]) or \
            [plan.group(i) for i in range(plan.num_layers)] != strat["layer_groups"]:
        raise AdapterError(f"{CONFIG_FILE}: stratification does not match the method's split of "
                           f"{strat['num_layers']} layers (n1={plan.n1}, n2={plan.n2})", field="stratification")
    return cfg


def position_limit(config: Any) -> int | None:
    """The most tokens one input may have on a backbone of this (transformers) config: its position table, less
    the offset of models that number positions after the padding index (RoBERTa: 514 - 2). None where it states
    none."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(positions, int) or positions <= 0:
        return None
    offset = (getattr(config, "pad_token_id", 0) or 0) + 1 if getattr(config, "model_type", "") in (
        "roberta", "xlm-roberta", "camembert", "longformer") else 0
    return positions - offset


TRANSFORMERS_IMPORT_LOCK = threading.Lock()  # see auto_config


def auto_config() -> Any:
    """transformers.AutoConfig, imported under a lock: transformers' lazy module is not safe to import from several
    threads at once (the first concurrent job creates or adapter imports of a fresh API process failed with
    `ImportError: cannot import name 'AutoConfig'`, a 500). Every lazy import of it in a request goes here."""
    with TRANSFORMERS_IMPORT_LOCK:
        from transformers import AutoConfig
    return AutoConfig


def backbone_limits(base_model: str) -> dict[str, Any]:
    """What an adapter config must respect of its backbone, read from the backbone's config (transformers
    AutoConfig): max_seq_length (position table, less a RoBERTa-style padding offset), num_layers, model_type."""
    AutoConfig = auto_config()  # noqa: N806  (the class, under its own name)

    from .backbone import resolve_model_path

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(base_model))
    except Exception as e:  # not found, not a model folder, unreadable JSON: never a stack trace to the client
        raise AdapterError(f"cannot read the configuration of base model {base_model!r} "
                           f"({type(e).__name__})", field="base_model.name") from None
    layers = next((getattr(config, k) for k in ("num_hidden_layers", "n_layers", "num_layers")
                   if isinstance(getattr(config, k, None), int)), None)
    return {"max_seq_length": position_limit(config), "num_layers": layers, "model_type": getattr(config, "model_type", None)}


def check_backbone(cfg: dict, limits: dict[str, Any]) -> None:
    """An already validated config against `backbone_limits` of its base model."""
    most = limits.get("max_seq_length")
    if most is not None and cfg["max_seq_length"] > most:
        raise _bad("max_seq_length", f"at most {most}, the base model's position limit", cfg["max_seq_length"])
    layers = limits.get("num_layers")
    if layers is not None and cfg["stratification"]["num_layers"] != layers:
        raise _bad("stratification.num_layers", f"the base model's {layers} layers",
                   cfg["stratification"]["num_layers"])
    model_type = limits.get("model_type")
    if model_type and cfg["base_model"].get("model_type") not in (None, model_type):
        raise _bad("base_model.model_type", repr(model_type), cfg["base_model"]["model_type"])


def parse_config(raw: bytes | str | dict) -> dict[str, Any]:
    """Read an adapter config (JSON text or a dict) and check it against CONFIG_SCHEMA; raise AdapterError
    saying what is wrong and naming the field."""
    if isinstance(raw, bytes | str):
        if len(raw) > MAX_CONFIG_BYTES:
            raise AdapterError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
        try:
            cfg = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {e}") from None
        except (ValueError, RecursionError) as e:  # a 5000-digit number, nesting too deep
            raise AdapterError(f"{CONFIG_FILE} cannot be read: {type(e).__name__}") from None
    else:
        cfg = raw
    return validate_config(cfg)


def read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, archive: str) -> bytes:
    """One member of an uploaded zip, or AdapterError in words: a damaged member (CRC mismatch, truncated
    stream), an encrypted one or an unknown compression is the upload's fault, never a 500."""
    try:
        return z.read(info)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as e:
        raise AdapterError(f"the {archive} is damaged or unreadable ({info.filename}): {e}") from None
