"""Resumable training checkpoints: one safetensors file holding the trained tensors, the best epoch's tensors,
optimizer moments and RNG states as tensors, and everything else (step, epoch, scheduler, GradScaler state,
history, Python/NumPy RNG, the run's identity) as JSON in the file's metadata. No pickle. Written atomically,
so a reader sees the old checkpoint or the new one, never half. A checkpoint made under another method, task,
base model or training config is refused, naming every difference (`check_resumable`).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import TrainConfig
from .errors import ConfigError
from .model import SpafitModel

CHECKPOINT_FORMAT = "spafit-checkpoint"


def save_checkpoint(path: Path, model: SpafitModel, optimizer, scheduler, state: dict,
                    best: dict[str, torch.Tensor] | None, cfg: TrainConfig, *, scaler=None) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.adapter_state_dict().items():
        tensors[f"adapter/{k}"] = v.detach().cpu().contiguous()
    for k, v in (best or {}).items():
        tensors[f"best/{k}"] = v.contiguous()
    opt_state = optimizer.state_dict()
    for pid, pstate in opt_state["state"].items():
        for name, value in pstate.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optim/{pid}/{name}"] = t.detach().cpu().contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "state": state,
        "train_config": cfg.to_dict(),
        "run": run_identity(model),
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "optimizer_param_groups": opt_state["param_groups"],
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "python_rng": _py_rng_to_json(random.getstate()),
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"spafit": json.dumps(meta)})
        os.replace(tmp, path)  # atomic: a reader sees the old checkpoint or the new one, never half
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_checkpoint_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["spafit"])
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a SPAFIT training checkpoint")
    return meta


def run_identity(model: SpafitModel) -> dict:
    """What a checkpoint must have been made under to be resumed by this model: method, base model (its weights
    and the dtype they compute in: the fingerprint names the stored weights, a bf16 cast of them keeps it), task."""
    dtype = next(model.hf.base_model.parameters()).dtype
    return json.loads(json.dumps({"method": model.method_config.to_dict(), "task": model.task.to_dict(),
                                  "base_model": {"name": model.base_model_name, "fingerprint": model.base_fingerprint,
                                                 "dtype": str(dtype).removeprefix("torch.")}}))


def check_resumable(meta: dict, model: SpafitModel, cfg: TrainConfig, path: Path) -> None:
    """Refuse to resume a checkpoint made under another method, task, base model or training config (fields
    in TrainConfig.RESUMABLE_CHANGES aside), naming every difference."""
    diffs: list[str] = []
    then, now = meta.get("run") or {}, run_identity(model)
    for part in ("method", "task"):
        if part in then:
            diffs += [f"{part}.{k}: {then[part].get(k)!r} then, {now[part].get(k)!r} now"
                      for k in sorted(set(then[part]) | set(now[part])) if then[part].get(k) != now[part].get(k)]
    if "base_model" in then and then["base_model"].get("fingerprint") != now["base_model"]["fingerprint"]:
        diffs.append(f"base model: {then['base_model'].get('name')!r} then, {now['base_model']['name']!r} now "
                     "(other weights)")
    if then.get("base_model", {}).get("dtype") not in (None, now["base_model"]["dtype"]):  # older ones record none
        diffs.append(f"base model dtype: {then['base_model']['dtype']} then, {now['base_model']['dtype']} now")
    old_cfg, new_cfg = meta.get("train_config") or {}, json.loads(json.dumps(cfg.to_dict()))
    diffs += [f"training.{k}: {old_cfg[k]!r} then, {new_cfg[k]!r} now" for k in sorted(set(old_cfg) & set(new_cfg))
              if k not in TrainConfig.RESUMABLE_CHANGES and old_cfg[k] != new_cfg[k]]
    if diffs:
        raise ConfigError(f"the checkpoint {path.name} was made under another configuration, so it is not resumed: "
                          + "; ".join(diffs), field="checkpoint", detail={"differences": diffs})


def load_checkpoint(path: Path, model: SpafitModel, optimizer, scheduler, cfg: TrainConfig, *, scaler=None):
    meta = read_checkpoint_meta(path)
    check_resumable(meta, model, cfg, path)
    tensors = load_file(str(path))
    model.load_adapter_state_dict({k[len("adapter/"):]: v for k, v in tensors.items() if k.startswith("adapter/")})
    best = {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")} or None
    opt_state: dict[str, Any] = {"state": {}, "param_groups": meta["optimizer_param_groups"]}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, pid, name = k.split("/", 2)
            opt_state["state"].setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict(opt_state)
    sched = scheduler.state_dict()
    sched.update(meta["scheduler"])
    scheduler.load_state_dict(sched)
    if scaler is not None and meta.get("grad_scaler"):  # fp16: the loss scale it had reached, not the initial one
        scaler.load_state_dict(meta["grad_scaler"])
    torch.set_rng_state(tensors["rng/torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(_py_rng_from_json(meta["python_rng"]))
    n = meta["numpy_rng"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    return meta["state"], best


def _py_rng_to_json(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _py_rng_from_json(data: list) -> tuple:
    return (data[0], tuple(data[1]), data[2])
