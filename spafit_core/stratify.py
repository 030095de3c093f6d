"""Find an encoder's layer stack and, inside each layer, the linear modules by role and the bias terms.

Works on any Hugging Face encoder whose layers live in one `nn.ModuleList` of length L; roles are found
by module-name suffix, so BERT (and MiniLM), RoBERTa/XLM-R, ELECTRA, DistilBERT and DeBERTa-v2 need no
special code. An architecture whose stack or a requested role cannot be found raises an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import UnsupportedArchitectureError

# Role -> module-name suffixes (relative to one layer) across the supported families.
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "query": ("attention.self.query", "attention.q_lin", "attention.self.query_proj", "self_attn.q_proj"),
    "key": ("attention.self.key", "attention.k_lin", "attention.self.key_proj", "self_attn.k_proj"),
    "value": ("attention.self.value", "attention.v_lin", "attention.self.value_proj", "self_attn.v_proj"),
    "attention_output": ("attention.output.dense", "attention.out_lin", "self_attn.out_proj"),
    "ffn_in": ("intermediate.dense", "ffn.lin1", "fc1"),
    "ffn_out": ("output.dense", "ffn.lin2", "fc2"),
}
# Attribute names of the depth in the configs of the supported families.
_DEPTH_ATTRS = ("num_hidden_layers", "n_layers", "num_layers")


@dataclass(frozen=True)
class LayerModules:
    """One encoder layer: its linear modules by role and every module that carries a bias."""

    index: int
    roles: dict[str, str]  # role -> module path relative to the layer
    biased: tuple[str, ...]  # paths (relative to the layer) of Linear/LayerNorm modules with a bias


@dataclass(frozen=True)
class Stack:
    """Where the layers are (`path` relative to the base model) and what each contains."""

    path: str
    layers: tuple[LayerModules, ...]
    architecture: str

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def module_key(self, layer: int, rel: str) -> str:
        """The stable name of a module relative to the base model, used as adapter tensor prefix."""
        return f"{self.path}.{layer}.{rel}"


def depth_of(config) -> int | None:
    for attr in _DEPTH_ATTRS:
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def architecture_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return f"{type(model).__name__} (model_type={model_type!r})" if model_type else type(model).__name__


def find_stack(base_model: nn.Module) -> Stack:
    """Locate the encoder layer stack of a base (headless) model."""
    arch = architecture_name(base_model)
    depth = depth_of(getattr(base_model, "config", None))
    candidates = [
        (name, mod)
        for name, mod in base_model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (depth is None or len(mod) == depth)
    ]
    # Prefer the list whose entries are the biggest (the transformer blocks, not e.g. a list of heads).
    candidates = [c for c in candidates if all(type(m) is type(c[1][0]) for m in c[1])]
    if not candidates:
        raise UnsupportedArchitectureError(
            f"cannot find the encoder layer stack of {arch}: no nn.ModuleList of length {depth}",
            detail={"architecture": arch},
        )
    path, stack = max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))
    layers = []
    for i, layer in enumerate(stack):
        roles: dict[str, str] = {}
        linear_names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        for role, suffixes in ROLE_NAMES.items():
            for n in linear_names:
                if any(n == s or n.endswith("." + s) for s in suffixes):
                    # "output.dense" also ends "attention.output.dense": the FFN output is the shorter match.
                    if role == "ffn_out" and "attention" in n:
                        continue
                    roles.setdefault(role, n)
        biased = tuple(
            n for n, m in layer.named_modules()
            if isinstance(m, nn.Linear | nn.LayerNorm) and getattr(m, "bias", None) is not None
        )
        layers.append(LayerModules(i, roles, biased))
    return Stack(path, tuple(layers), arch)


def require_roles(stack: Stack, roles: tuple[str, ...]) -> None:
    """Raise a clear error if any requested LoRA target role is missing in any layer."""
    for layer in stack.layers:
        missing = [r for r in roles if r not in layer.roles]
        if missing:
            found = ", ".join(f"{r}={p}" for r, p in layer.roles.items()) or "none"
            raise UnsupportedArchitectureError(
                f"{stack.architecture}: layer {layer.index} has no module for target(s) {', '.join(missing)}; "
                f"roles found: {found}",
                field="targets",
                detail={"architecture": stack.architecture, "missing": missing},
            )
