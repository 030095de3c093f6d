"""SpafitModel: a Hugging Face sequence-classification model with one method applied to it.

The backbone is `AutoModelForSequenceClassification`, so every supported architecture keeps its own
head and the merged export is a standard model folder. The method decides which adapted modules get
trainable parameters; everything else is frozen, and nothing below `n1` requires grad.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .backbone import canonical_model_name, fingerprint, resolve_model_path, unwrap_stack, wrap_stack
from .config import MethodConfig, ResolvedMethod, TaskSpec
from .errors import AdapterMismatchError, BaseModelUnavailable, ConfigError, UnsupportedArchitectureError
from .layers import TRAIN_DTYPE, AdaptedLinear, Route, route
from .stratify import architecture_name, require_roles

HEAD = "head."
FULL = "model."


def load_hf_classifier(base_model: str, task: TaskSpec, *, dtype: torch.dtype | None = None):
    """The HF classifier for `task` on `base_model` (hub id, folder or packaged alias)."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(base_model)
    kwargs = dict(num_labels=task.num_labels, problem_type=task.task_type)
    if task.labels:
        kwargs["id2label"] = dict(enumerate(task.labels))
        kwargs["label2id"] = {name: i for i, name in enumerate(task.labels)}
    if dtype is not None:
        kwargs["dtype"] = dtype
    with loading(base_model), quiet_transformers():  # the "newly initialized head" report is expected, not news
        return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)


def refuse_encoder_decoder(hf_model: nn.Module) -> None:
    """UnsupportedArchitectureError for an encoder-decoder classifier (BART, T5): the stack found would be one of
    two (BART: the decoder's), and the classifier reads the decoder; adapting either alone is not the method, so
    refuse rather than train (or import) something else silently."""
    if getattr(hf_model.config, "is_encoder_decoder", False):
        name = architecture_name(hf_model.base_model)
        raise UnsupportedArchitectureError(
            f"{name} is an encoder-decoder model; SPAFIT adapts the one layer stack of an encoder-only model "
            "(BERT, RoBERTa, DeBERTa, ELECTRA, DistilBERT, MiniLM ...)", field="base_model",
            detail={"architecture": name})


@contextlib.contextmanager
def loading(base_model: str):
    """transformers' OSError for a base model it cannot load (no such folder or hub id; offline and not in the
    cache; a folder without weights) as a BaseModelUnavailable naming it: a clear error for the CLI and a job's
    failure, not a traceback."""
    try:
        yield
    except OSError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BaseModelUnavailable(f"cannot load base model {base_model!r}: {first}", field="base_model") from e


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load reports and progress bars for the duration."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(base_model: str):
    from transformers import AutoTokenizer

    with loading(base_model):
        return AutoTokenizer.from_pretrained(resolve_model_path(base_model))


class SpafitModel(nn.Module):
    """One task's model: HF classifier + method. `adapter_state_dict()` is everything that trained."""

    def __init__(self, hf_model: nn.Module, method: MethodConfig, task: TaskSpec, *,
                 base_model_name: str, base_fingerprint: str | None = None, tokenizer=None):
        super().__init__()
        self.hf = hf_model
        self.method_config = method
        self.task = task
        self.base_model_name = canonical_model_name(base_model_name)
        self.tokenizer = tokenizer
        base = hf_model.base_model
        self.base_prefix = hf_model.base_model_prefix
        self.base_fingerprint = base_fingerprint or fingerprint(base)
        self._input_names = set(inspect.signature(hf_model.forward).parameters)
        self.prefix_eval = False  # keep embeddings + group 1 in eval mode (no dropout) while training

        for p in hf_model.parameters():
            p.requires_grad_(False)
        from .stratify import find_stack

        refuse_encoder_decoder(hf_model)
        self.stack = find_stack(base)
        self.plan: ResolvedMethod = method.resolve(self.stack.num_layers)
        self.adapted: dict[str, nn.Module] = {}
        if self.plan.full:
            hf_model.float()  # every weight trains: in float32, whatever the dtype it was loaded in
            for p in hf_model.parameters():
                p.requires_grad_(True)
        else:
            _require_biases(self.stack, self.plan)
            if self.plan.lora:
                require_roles(self.stack, method.targets)
            self.stack, self.adapted = wrap_stack(base, self.stack)
            self._attach()
            self._head_in_float32()
        for _, p in self.head_named_parameters():
            p.requires_grad_(True)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, base_model: str, method: MethodConfig, task: TaskSpec, *,
                        dtype: torch.dtype | None = None, with_tokenizer: bool = True) -> SpafitModel:
        # Loaded as stored and fingerprinted before the cast: an adapter names the stored weights (as the engine's
        # backbone does), so one trained on a bf16 / fp16 cast of float32 weights still loads and serves.
        hf = load_hf_classifier(base_model, task)
        fp = None
        if dtype is not None:
            fp = fingerprint(hf.base_model)
            hf.to(dtype)
        tok = load_tokenizer(base_model) if with_tokenizer else None
        return cls(hf, method, task, base_model_name=base_model, base_fingerprint=fp, tokenizer=tok)

    @classmethod
    def skeleton(cls, base_model: str, method: MethodConfig, task: TaskSpec) -> SpafitModel:
        """The model's structure on the meta device, from the config alone (no weights are read):
        enough for expected tensor shapes and parameter counts."""
        from .adapter_schema import TRANSFORMERS_IMPORT_LOCK

        with TRANSFORMERS_IMPORT_LOCK:  # a request thread may be importing it too (adapter_schema.auto_config)
            from transformers import AutoConfig, AutoModelForSequenceClassification
        with loading(base_model):
            config = AutoConfig.from_pretrained(resolve_model_path(base_model), num_labels=task.num_labels,
                                                problem_type=task.task_type)
        with quiet_transformers(), torch.device("meta"):
            hf = AutoModelForSequenceClassification.from_config(config)
        return cls(hf, method, task, base_model_name=base_model, base_fingerprint="meta")

    def _head_in_float32(self) -> None:
        """The head trains in float32 on a bf16 / fp16 base: its inputs are cast up on the way in."""
        for name, child in self.hf.named_children():
            if name == self.base_prefix or not any(True for _ in child.parameters()):
                continue
            if any(p.dtype != TRAIN_DTYPE for p in child.parameters()):
                child.to(TRAIN_DTYPE)
                child.register_forward_pre_hook(_inputs_to_float32)

    def _attach(self) -> None:
        for key, (bias, rank) in planned_deltas(self.stack, self.plan).items():
            self.adapted[key].attach(bias=bias, rank=rank, scaling=self.plan.scaling,
                                     dropout=self.method_config.dropout)

    # ----------------------------------------------------------------- parameters
    def head_named_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        prefix = self.base_prefix + "."
        for name, p in self.hf.named_parameters():
            if not name.startswith(prefix):
                yield name, p

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trained tensors, under stable names: `<module key>.bias_delta|lora_A|lora_B` for the
        backbone, `head.<name>` for the head, `model.<name>` for every weight under `full`."""
        out: dict[str, torch.Tensor] = {}
        if self.plan.full:
            for name, p in self.hf.named_parameters():
                out[FULL + name] = p.detach()
            return out
        for key, mod in self.adapted.items():
            for pname in ("bias_delta", "lora_A", "lora_B"):
                t = getattr(mod, pname, None)
                if t is not None:
                    out[f"{key}.{pname}"] = t.detach()
        for name, p in self.head_named_parameters():
            out[HEAD + name] = p.detach()
        return out

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.adapter_state_dict().items()}

    @torch.no_grad()
    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy trained tensors in; refuses any missing, unexpected or mis-shaped tensor."""
        own = self.adapter_state_dict()
        check_shapes(own, {k: tuple(v.shape) for k, v in tensors.items()})
        for k, t in tensors.items():
            own[k].copy_(t.to(own[k].dtype))

    def param_counts(self) -> dict:
        """Trainable parameters: total, without the head, in the head and per group, plus the base size."""
        per_group = {1: 0, 2: 0, 3: 0}
        head = sum(p.numel() for _, p in self.head_named_parameters())
        adapter_ids = {id(p) for m in self.adapted.values() for p in m.parameters(recurse=False)}
        base_total = sum(p.numel() for p in self.hf.base_model.parameters() if id(p) not in adapter_ids)
        if self.plan.full:
            total = sum(p.numel() for p in self.hf.parameters())
            without_head = total - head
            per_group = {"all": without_head}
        else:
            layer_of = {key: spec.index for spec in self.stack.layers
                        for key in (self.stack.module_key(spec.index, r) for r in
                                    dict.fromkeys([*spec.roles.values(), *spec.biased]))}
            for key, mod in self.adapted.items():
                n = sum(p.numel() for p in mod.parameters(recurse=False))
                if n:
                    per_group[self.plan.group(layer_of[key])] += n
            without_head = sum(per_group.values())
            total = without_head + head
        return {
            "total": total,
            "without_head": without_head,
            "head": head,
            "per_group": {str(k): v for k, v in per_group.items()},
            "base_model": base_total,
            "trainable_fraction": total / max(base_total, 1),
        }

    # ----------------------------------------------------------------- forward
    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.prefix_eval:
            for m in self.prefix_modules():
                m.eval()
        return self

    def prefix_modules(self) -> list[nn.Module]:
        """Embeddings and the frozen group-1 layers: their output never depends on the adapter."""
        base = self.hf.base_model
        mods = [m for m in [getattr(base, "embeddings", None)] if m is not None]
        layers = base.get_submodule(self.stack.path)
        mods += [layers[i] for i in range(self.plan.first_trained_layer)]
        return mods

    def model_inputs(self, batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k in self._input_names and k != "labels"}

    def forward(self, batch: dict, prefix_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_labels). With `prefix_hidden` (the cached input of the first trained layer),
        the embeddings' output is replaced and the frozen layers below are skipped."""
        inputs = self.model_inputs(batch)
        if prefix_hidden is None:
            return self.hf(**inputs).logits
        with route(Route(skip_below=self.plan.first_trained_layer, inject=prefix_hidden)):
            return self.hf(**inputs).logits

    @torch.no_grad()
    def prefix_hidden(self, batch: dict) -> torch.Tensor:
        """The hidden states entering layer `first_trained_layer` (B, T, H): what the frozen-prefix cache
        stores. Layers from there on are not run."""
        k = self.plan.first_trained_layer
        if k >= self.stack.num_layers:
            raise ConfigError("the frozen prefix covers every layer; there is nothing to cache above it",
                              field="n1")
        with route(Route(stop_at=k)) as r:
            self.hf.base_model(**self.model_inputs(batch))
        return r.captured

    # ----------------------------------------------------------------- export
    def merged_copy(self) -> nn.Module:
        """A standalone HF model with every delta folded into its weights (no wrappers, no gates)."""
        hf = copy.deepcopy(self.hf)
        if not self.plan.full:
            _, adapted = _rebind(hf, self)
            unwrap_stack(hf.base_model, self.stack, adapted, merge=True)
        for p in hf.parameters():
            p.requires_grad_(False)
        return hf

    def save_merged(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        merged = self.merged_copy()
        merged.config.problem_type = self.task.task_type
        merged.save_pretrained(path)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        return path


def _inputs_to_float32(_module: nn.Module, args: tuple) -> tuple:
    return tuple(a.to(TRAIN_DTYPE) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _require_biases(stack, plan: ResolvedMethod) -> None:
    """Refuse a plan whose bias-only layers have no bias terms (ModernBERT, LLaMA-style blocks): they would
    train nothing, and the job would train the head alone without a word."""
    bare = [spec.index for spec in stack.layers
            if plan.trains_bias(spec.index) and not spec.biased and not plan.has_lora(spec.index)]
    if bare:
        raise UnsupportedArchitectureError(
            f"{stack.architecture}: layer(s) {bare} have no bias terms, so method {plan.config.name!r} would train "
            "nothing there (only the head). Use method 'lora', or 'spafit' with n1 = n2 (no bias-only layers)",
            field="method", detail={"architecture": stack.architecture, "layers_without_bias": bare})


def _rebind(hf_copy: nn.Module, model: SpafitModel):
    """The adapted-module dict of a deep copy, found by key."""
    adapted = {m.key: m for m in hf_copy.modules() if hasattr(m, "key") and hasattr(m, "merged")}
    return model.stack, adapted


def planned_deltas(stack, plan: ResolvedMethod) -> dict[str, tuple[bool, int]]:
    """Module key -> (trains a bias delta, LoRA rank or 0) for every module the method adapts.
    The one place that turns a method's plan into tensors: training attaches these, the engine
    expects exactly these in an adapter."""
    out: dict[str, tuple[bool, int]] = {}
    if plan.full:
        return out
    c = plan.config
    for spec in stack.layers:
        lora_paths = {spec.roles[r] for r in c.targets} if plan.has_lora(spec.index) else set()
        for rel in dict.fromkeys([*spec.roles.values(), *spec.biased]):
            bias = plan.trains_bias(spec.index) and rel in spec.biased
            rank = c.rank if rel in lora_paths else 0
            if bias or rank:
                out[stack.module_key(spec.index, rel)] = (bias, rank)
    return out


def delta_shapes(stack, plan: ResolvedMethod, adapted: dict[str, nn.Module]) -> dict[str, tuple[int, ...]]:
    """Expected adapter tensor names and shapes for the backbone part (the head is separate)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key, (bias, rank) in planned_deltas(stack, plan).items():
        base = adapted[key].base
        out_dim = base.out_features if isinstance(base, nn.Linear) else base.weight.shape[0]
        if bias:
            shapes[f"{key}.bias_delta"] = (out_dim,)
        if rank:
            shapes[f"{key}.lora_A"] = (rank, base.in_features)
            shapes[f"{key}.lora_B"] = (out_dim, rank)
    return shapes


def check_shapes(expected: dict[str, tuple | torch.Tensor], got: dict[str, tuple]) -> None:
    """Raise AdapterMismatchError naming the first missing, unexpected and mis-shaped tensors."""
    exp = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in expected.items()}
    missing = sorted(set(exp) - set(got))
    unexpected = sorted(set(got) - set(exp))
    wrong = sorted(k for k in set(exp) & set(got) if tuple(got[k]) != exp[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {k}: adapter {tuple(got[k])} vs model {exp[k]}")
        raise AdapterMismatchError("adapter does not fit this model: " + "; ".join(parts),
                                   detail={"missing": missing[:20], "unexpected": unexpected[:20],
                                           "shape_mismatch": wrong[:20]})


def lora_modules(model: SpafitModel) -> list[AdaptedLinear]:
    return [m for m in model.adapted.values() if isinstance(m, AdaptedLinear) and m.lora_A is not None]
