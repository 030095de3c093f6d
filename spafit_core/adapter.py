"""The adapter format: `spafit_adapter.json` + `adapter.safetensors` (only the trained tensors).

Older versions called the config file `adapter_config.json`; that name is PEFT's, with PEFT's schema,
so a PEFT user loading one of our folders got a confusing failure. Folders and archives with the old
name still read (the registry holds such adapters); a PEFT config under that name is refused with a
pointer to the PEFT import (`spafit_core.peft_interop`).

The config names the method and its parameters, the base model and a fingerprint of its weights, the
task and its label map, and the sha256 of the weights file. Loading verifies the sha256, the fingerprint
and every shape, and refuses a mismatch with a clear error. Nothing is ever unpickled.
The config's schema and the backbone's limits are in `adapter_schema.py` (re-exported here).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import __version__
from .adapter_schema import (  # noqa: F401  (the config schema's names are re-exported)
    CONFIG_FILE,
    CONFIG_SCHEMA,
    FORMAT,
    FORMAT_VERSION,
    MAX_CONFIG_BYTES,
    MAX_LABELS,
    MAX_LAYERS,
    MAX_SEQ_LENGTH,
    WEIGHTS_FILE,
    backbone_limits,
    check_backbone,
    parse_config,
    position_limit,
    read_member,
    validate_config,
)
from .config import MethodConfig, TaskSpec
from .errors import AdapterError, AdapterMismatchError
from .model import SpafitModel, check_shapes

LEGACY_CONFIG_FILE = "adapter_config.json"  # older versions' name (PEFT's): read, never written
MAX_ABS_VALUE = 1e4  # no trained delta, LoRA factor or head weight comes near this; past it a forward overflows


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def adapter_config(model: SpafitModel, weights: bytes, *, max_seq_length: int = 128,
                   metrics: dict | None = None, training: dict | None = None) -> dict[str, Any]:
    import transformers

    base_cfg = model.hf.config
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "transformers_version": transformers.__version__,
        "method": model.method_config.to_dict(),
        "stratification": {"num_layers": model.plan.num_layers, "n1": model.plan.n1, "n2": model.plan.n2,
                           "layer_groups": [model.plan.group(i) for i in range(model.plan.num_layers)]},
        "base_model": {
            "name": model.base_model_name,
            "fingerprint": model.base_fingerprint,
            "model_type": getattr(base_cfg, "model_type", None),
            "architecture": type(model.hf.base_model).__name__,
            "num_layers": model.stack.num_layers,
            "hidden_size": getattr(base_cfg, "hidden_size", None) or getattr(base_cfg, "dim", None),
        },
        "task": model.task.to_dict(),
        # What the adapter serves: the length it trained with, but never more than its backbone has positions
        # (a default of 128 on a 64-position model records 64, so the adapter passes the import schema).
        "max_seq_length": min(max_seq_length, position_limit(base_cfg) or max_seq_length),
        "param_counts": model.param_counts(),
        "metrics": metrics or {},
        "training": training or {},
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_hex(weights), "size_bytes": len(weights)},
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def serialize(model: SpafitModel, *, max_seq_length: int = 128, metrics: dict | None = None,
              training: dict | None = None, dtype: torch.dtype | None = None) -> tuple[dict, bytes]:
    """(config, weights bytes) of the model's trained tensors; `dtype` may halve them for storage."""
    tensors = {k: v.detach().to("cpu", dtype=dtype or v.dtype).contiguous()
               for k, v in sorted(model.adapter_state_dict().items())}
    weights = st_save(tensors, metadata={"format": FORMAT})
    cfg = adapter_config(model, weights, max_seq_length=max_seq_length, metrics=metrics, training=training)
    return cfg, weights


def save_adapter(model: SpafitModel, path: str | Path, **kwargs) -> dict[str, Any]:
    """Write the adapter folder; returns its config."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg, weights = serialize(model, **kwargs)
    (path / WEIGHTS_FILE).write_bytes(weights)
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg



def load_weights(cfg: dict, weights: bytes) -> dict[str, torch.Tensor]:
    """Tensors of a weights blob, after checking its sha256 against the config. safetensors only."""
    digest = sha256_hex(weights)
    if digest != cfg["weights"]["sha256"]:
        raise AdapterError(f"{WEIGHTS_FILE} does not match its recorded sha256 (got {digest[:12]}…, "
                           f"expected {cfg['weights']['sha256'][:12]}…): the file was altered or corrupted")
    try:
        return st_load(weights)
    except (SafetensorError, Exception) as e:  # a malformed header raises various errors
        raise AdapterError(f"{WEIGHTS_FILE} is not a valid safetensors file: {e}") from None


def config_path(folder: Path) -> Path:
    """The config file of an adapter folder: ours, else the name older versions wrote."""
    own = folder / CONFIG_FILE
    return own if own.is_file() or not (folder / LEGACY_CONFIG_FILE).is_file() else folder / LEGACY_CONFIG_FILE


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter folder, verified against its own sha256."""
    path = Path(path)
    cfg_path, w_path = config_path(path), path / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise AdapterError(f"{path} has no {CONFIG_FILE}")
    if not w_path.is_file():
        others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" ({', '.join(others)} found: pickled weights are never loaded)" if others else ""
        raise AdapterError(f"{path} has no {WEIGHTS_FILE}{hint}")
    cfg = parse_config(cfg_path.read_bytes())
    return cfg, load_weights(cfg, w_path.read_bytes())


def check_fingerprint(cfg: dict, fingerprint: str) -> None:
    want = cfg["base_model"]["fingerprint"]
    if want != fingerprint:
        raise AdapterMismatchError(
            f"adapter was trained on base model {cfg['base_model']['name']!r} with weights {want[:19]}…, "
            f"but the loaded backbone's weights are {fingerprint[:19]}…: use the same base model",
            field="base_model", detail={"expected": want, "actual": fingerprint})


def model_from_adapter(cfg: dict, tensors: dict[str, torch.Tensor], *, base_model: str | None = None,
                       with_tokenizer: bool = True, dtype: torch.dtype | None = None) -> SpafitModel:
    """A SpafitModel on a fresh backbone with the adapter loaded; `base_model` overrides where the base
    weights come from (a local folder, say), the fingerprint still has to match; `dtype` casts the base (as the
    model it was trained on was: a bf16 base gives that model's logits only in bf16)."""
    model = SpafitModel.from_pretrained(base_model or cfg["base_model"]["name"],
                                        MethodConfig.from_dict(cfg["method"]), TaskSpec.from_dict(cfg["task"]),
                                        with_tokenizer=with_tokenizer, dtype=dtype)
    check_fingerprint(cfg, model.base_fingerprint)
    model.load_adapter_state_dict(tensors)
    model.eval()
    return model


def load_adapter(path: str | Path, *, base_model: str | None = None, dtype: torch.dtype | None = None) -> SpafitModel:
    cfg, tensors = read_adapter(path)
    model = model_from_adapter(cfg, tensors, base_model=base_model, dtype=dtype)
    model.max_seq_length = cfg.get("max_seq_length", 128)
    return model


# ----------------------------------------------------------------------- single-file transport
def pack(cfg: dict, weights: bytes) -> bytes:
    """A zip of the two files (deterministic: fixed timestamps), for download and import."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in ((CONFIG_FILE, json.dumps(cfg, indent=2, sort_keys=True).encode() + b"\n"),
                           (WEIGHTS_FILE, weights)):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return buf.getvalue()


def unpack(data: bytes, *, max_bytes: int = 256 << 20) -> tuple[dict, bytes]:
    """(config, weights bytes) from a zip made by `pack` (or by zipping an adapter folder). Exactly the
    two files, no paths, bounded sizes: anything else is refused before it is decompressed."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise AdapterError(f"adapter upload is not a zip of {CONFIG_FILE} and {WEIGHTS_FILE}") from None
    with z:
        infos = {Path(i.filename).name: i for i in z.infolist() if not i.is_dir()}
        if CONFIG_FILE not in infos and LEGACY_CONFIG_FILE in infos:  # an archive made before the rename
            infos[CONFIG_FILE] = infos.pop(LEGACY_CONFIG_FILE)
        if {"adapter_model.safetensors", "adapter_model.bin"} & set(infos):
            pickled = " (and adapter_model.bin is pickled: never loaded)" if "adapter_model.bin" in infos else ""
            raise AdapterError("this archive is a PEFT adapter (adapter_model.*), not a SPAFIT one: import it as "
                               "PEFT (`spafit import --format peft`, or PUT /v1/tasks/{task}/adapter?format=peft)"
                               + pickled, field="format")
        extra = sorted(set(infos) - {CONFIG_FILE, WEIGHTS_FILE})
        if extra:
            raise AdapterError(f"adapter archive may hold only {CONFIG_FILE} and {WEIGHTS_FILE}; found {extra}"
                               + (" (pickled weights are never loaded)" if any(
                                   e.endswith((".bin", ".pt", ".pkl", ".pickle")) for e in extra) else ""))
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if name not in infos:
                raise AdapterError(f"adapter archive lacks {name}")
            if infos[name].file_size > max_bytes:
                raise AdapterError(f"{name} is larger than the limit of {max_bytes} bytes")
        cfg = parse_config(read_member(z, infos[CONFIG_FILE], "adapter archive"))
        weights = read_member(z, infos[WEIGHTS_FILE], "adapter archive")
    return cfg, weights


def verify(cfg: dict, weights: bytes, *, fingerprint: str, expected_shapes: dict[str, tuple] | None) -> dict:
    """Everything a registry checks before accepting an adapter: sha256, base model, tensor names and
    shapes, finite values. Returns the tensors."""
    tensors = load_weights(cfg, weights)
    check_fingerprint(cfg, fingerprint)
    if expected_shapes is not None:
        check_shapes(expected_shapes, {k: tuple(v.shape) for k, v in tensors.items()})
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise AdapterError(f"adapter tensor {bad[0]} holds NaN or infinite values")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and v.numel() and v.abs().max() > MAX_ABS_VALUE]
    if bad:  # finite, yet a forward would overflow (trained adapters hold values of order 1)
        raise AdapterError(f"adapter tensor {bad[0]} holds values beyond +-{MAX_ABS_VALUE:g}")
    return tensors
