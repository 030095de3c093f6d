"""The frozen base model that every adapter trained on it shares, and its head templates."""

from __future__ import annotations

import copy
import inspect
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..backbone import canonical_model_name, fingerprint, resolve_model_path, wrap_stack
from ..config import TaskSpec
from ..model import load_hf_classifier, load_tokenizer, quiet_transformers
from .packed import PackedLayout


class _BaseStub(nn.Module):
    """Stands in for the base model inside a head-only copy of the HF classifier: returns the base
    outputs computed once for the whole mixed batch (sliced to this head's rows)."""

    def __init__(self):
        super().__init__()
        self.outputs = None

    def forward(self, *args, **kwargs):
        return self.outputs


class Backbone:
    """A frozen base model shared by every adapter trained on it."""

    def __init__(self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.name = canonical_model_name(name)
        self.path = resolve_model_path(name)
        hf = load_hf_classifier(name, TaskSpec(task_type="regression"))
        self.config = hf.config
        self.base = hf.base_model
        self.base_prefix = hf.base_model_prefix
        self.fingerprint = fingerprint(self.base)  # before any cast: adapters name the fp32 weights
        self.stack, self.adapted = wrap_stack(self.base)
        self.device = torch.device(device)
        self.base.to(self.device, dtype=dtype)
        self.base.eval()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.dtype = next(self.base.parameters()).dtype
        self.tokenizer = load_tokenizer(name)
        # A fast tokenizer keeps its truncation length in the one shared Rust object and each call sets it first:
        # threads tokenising for adapters of different `max_seq_length` took each other's (rows silently cut at
        # another adapter's length). Every call holds this lock (`Engine.encode`); the tokenizer still runs a
        # batch on several cores inside a call.
        self.tokenizer_lock = threading.Lock()
        self.pad_id = self.tokenizer.pad_token_id or 0
        self._head_templates: dict[tuple[int, str], nn.Module] = {}
        # Each template's tensor shapes, read once when it is made: a forward runs `functional_call` on the
        # template (its parameters swapped for the rows' own for the call), so reading them from the module while
        # a load checks an adapter's shapes raced that call (vmap's "tensor escaped" errors on the load).
        self._head_shapes: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
        self._head_lock = threading.Lock()  # one template made per key
        self._layouts: dict[tuple, PackedLayout] = {}
        self._input_names = set(inspect.signature(self.base.forward).parameters)
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.base.parameters())
        self.max_length = position_limit(self.config, self.base)  # tokens per input, at most

    def head_shapes(self, task: TaskSpec) -> dict[str, tuple[int, ...]]:
        """Per head tensor name, its shape for `task`'s head (what an adapter's head tensors must match)."""
        key = (task.num_labels, task.task_type)
        self._head(*key)
        return self._head_shapes[key]

    def padded_head(self, num_labels: int) -> nn.Module:
        """The head module that serves every head of up to `num_labels` labels (their label dimensions
        zero-padded, the extra logits sliced away)."""
        return self._head(num_labels, "single_label_classification" if num_labels > 1 else "regression")

    def head_label_dims(self) -> dict[str, tuple[int, ...]]:
        """Per head tensor name, its dimensions with one entry per label."""
        one, two = self.head_shapes(TaskSpec(task_type="regression")), self.head_shapes(TaskSpec(labels=("a", "b")))
        return {k: tuple(i for i, (a, b) in enumerate(zip(v, two[k], strict=True)) if a != b) for k, v in one.items()}

    def _head(self, num_labels: int, task_type: str) -> nn.Module:
        key = (num_labels, task_type)
        model = self._head_templates.get(key)
        if model is not None:
            return model
        with self._head_lock:
            model = self._head_templates.get(key)
            if model is None:
                from transformers import AutoModelForSequenceClassification

                cfg = copy.deepcopy(self.config)
                cfg.num_labels, cfg.problem_type = num_labels, task_type
                with quiet_transformers(), torch.device("meta"):
                    model = AutoModelForSequenceClassification.from_config(cfg)
                setattr(model, model.base_model_prefix, _BaseStub())
                model = model.to_empty(device="cpu").eval()
                for p in model.parameters():
                    p.requires_grad_(False)
                self._head_shapes[key] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
                self._head_templates[key] = model  # published after its shapes
        return model

    def model_inputs(self, batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k in self._input_names}

    def layout(self, deltas: dict[str, Sequence[tuple[int, ...] | None]],
               head: dict[str, tuple[int, ...]]) -> PackedLayout:
        """The shared layout for adapters with these delta (bias, A, B) and head tensor shapes."""
        sig = (tuple((k, *v) for k, v in deltas.items()), tuple(head.items()))
        layout = self._layouts.get(sig)
        if layout is None:
            layout = self._layouts.setdefault(sig, PackedLayout.of(deltas, head))
        return layout


def position_limit(config: Any, base: nn.Module | None = None) -> int | None:
    """The most tokens one input may have on this backbone: `max_position_embeddings`, less the offset of
    models that number positions after the padding index (RoBERTa: 514 - 2). None where it states none.
    (The tokenizer's `model_max_length` is advice, not a limit: training does not apply it either.)"""
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int) or n <= 0:
        return None
    padding_idx = getattr(getattr(base, "embeddings", None), "padding_idx", None)
    return n - (padding_idx + 1) if isinstance(padding_idx, int) else n
