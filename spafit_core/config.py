"""Configuration dataclasses for methods, tasks and training; each validates itself on construction.

Layer indices may be given as integers (an index) or as floats (a fraction of the stack depth L); `MethodConfig.resolve(L)`
turns them into integers and checks them against the real depth.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

METHODS = ("spafit", "lora", "bitfit", "full")
# Logical names of the linear modules inside one encoder layer (see stratify.ROLE_NAMES).
TARGET_ROLES = ("query", "key", "value", "attention_output", "ffn_in", "ffn_out")
DEFAULT_TARGETS = ("query", "key", "value", "attention_output")
TASK_TYPES = ("single_label_classification", "multi_label_classification", "regression")
TaskType = Literal["single_label_classification", "multi_label_classification", "regression"]


def _index(value: int | float | None, name: str, num_layers: int, default_fraction: float) -> int:
    """A layer index from an int, a fraction of L in [0, 1], or None (the default fraction)."""
    if value is None:
        return int(round(default_fraction * num_layers))
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer layer index or a fraction of L, not a boolean", field=name)
    if isinstance(value, float):  # a float is always a fraction of L (1.0 means L)
        return int(round(value * num_layers))
    return int(value)


MAX_ALPHA = 4096  # LoRA scaling numerator: (alpha / r) * B A; the jobs API has the same bound

@dataclass(frozen=True)
class MethodConfig:
    """Which parameters train. `spafit` splits the L encoder layers at n1 < n2 into
    frozen [0, n1), bias-only [n1, n2) and LoRA + bias [n2, L). The baselines are the same code:
    `lora` is LoRA on every layer, `bitfit` every bias of every layer, `full` every weight.
    """

    name: str = field(default="spafit", metadata={"help": "spafit | lora | bitfit | full"})
    n1: int | float | None = field(
        default=None, metadata={"help": "first bias-only layer; int index or fraction of L (default L/3)"}
    )
    n2: int | float | None = field(
        default=None, metadata={"help": "first LoRA layer; int index or fraction of L (default 2L/3)"}
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator: delta = (alpha / r) * B A"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    targets: tuple[str, ...] = field(
        default=DEFAULT_TARGETS, metadata={"help": f"LoRA target roles, any of {TARGET_ROLES}"}
    )
    group3_bias: bool = field(default=True, metadata={"help": "train biases in the LoRA group too"})

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(f"name: method must be one of {', '.join(METHODS)}; got {self.name!r}", field="name")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be an integer >= 1; got {self.rank!r}", field="rank")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not math.isfinite(self.alpha)
                or not 0 < self.alpha <= MAX_ALPHA):
            raise ConfigError(f"alpha must be a number in (0, {MAX_ALPHA}]; got {self.alpha!r}", field="alpha")
        if not isinstance(self.group3_bias, bool):
            raise ConfigError(f"group3_bias must be true or false; got {self.group3_bias!r}", field="group3_bias")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1); got {self.dropout!r}", field="dropout")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets and self.name in ("spafit", "lora"):
            raise ConfigError(f"targets must name at least one of {', '.join(TARGET_ROLES)}", field="targets")
        for t in targets:
            if t not in TARGET_ROLES:
                raise ConfigError(
                    f"targets: unknown LoRA target {t!r}; allowed: {', '.join(TARGET_ROLES)}", field="targets"
                )
        object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))
        for name in ("n1", "n2"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ConfigError(f"{name} must be an integer layer index or a fraction of L; got {v!r}", field=name)
            if isinstance(v, float) and not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} as a fraction of L must be in [0, 1] (an int is a layer index); "
                                  f"got {v!r}", field=name)
            if v < 0:
                raise ConfigError(f"{name} must be >= 0; got {v!r}", field=name)
        same_kind = isinstance(self.n1, float) == isinstance(self.n2, float)
        if self.n1 is not None and self.n2 is not None and same_kind and self.n1 > self.n2:
            raise ConfigError(f"n1 must be <= n2; got n1={self.n1}, n2={self.n2}", field="n1")

    def resolve(self, num_layers: int) -> ResolvedMethod:
        """Integer group boundaries for a stack of `num_layers`, checked 0 <= n1 <= n2 <= L."""
        return _PLANS[self.name](self, num_layers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown method field(s): {', '.join(unknown)}", field=unknown[0])
        data = dict(data)
        if "targets" in data and data["targets"] is not None:
            data["targets"] = tuple(data["targets"]) if not isinstance(data["targets"], str) else (data["targets"],)
        elif "targets" in data:
            data.pop("targets")
        return cls(**data)


@dataclass(frozen=True)
class ResolvedMethod:
    """A method bound to a concrete depth: which group each layer falls in."""

    config: MethodConfig
    num_layers: int
    n1: int
    n2: int
    lora: bool
    group3_bias: bool
    full: bool = False

    def group(self, layer: int) -> int:
        """1 = frozen, 2 = bias only, 3 = LoRA (+ bias if group3_bias). `full` puts every layer in 3."""
        if self.full:
            return 3
        if layer < self.n1:
            return 1
        if layer < self.n2:
            return 2
        return 3

    def trains_bias(self, layer: int) -> bool:
        g = self.group(layer)
        return g == 2 or (g == 3 and (self.group3_bias or self.full))

    def has_lora(self, layer: int) -> bool:
        return self.lora and self.group(layer) == 3

    @property
    def scaling(self) -> float:
        return self.config.alpha / self.config.rank

    @property
    def first_trained_layer(self) -> int:
        """Layers below this index are frozen with no delta: their output can be cached or shared."""
        for i in range(self.num_layers):
            if self.trains_bias(i) or self.has_lora(i) or self.full:
                return i
        return self.num_layers


def _plan_spafit(c: MethodConfig, L: int) -> ResolvedMethod:
    n1 = _index(c.n1, "n1", L, 1 / 3)
    n2 = _index(c.n2, "n2", L, 2 / 3)
    for name, v in (("n1", n1), ("n2", n2)):
        if not 0 <= v <= L:
            raise ConfigError(f"{name} must satisfy 0 <= n1 <= n2 <= L={L}; got {name}={v}", field=name)
    if n1 > n2:
        raise ConfigError(f"n1 must satisfy 0 <= n1 <= n2 <= L={L}; got n1={n1} > n2={n2}", field="n1")
    return ResolvedMethod(c, L, n1, n2, lora=True, group3_bias=c.group3_bias)


# One plan per method: the baselines are SPAFIT with degenerate boundaries, so they share every line of
# code that counts, trains, saves and serves.
_PLANS = {
    "spafit": _plan_spafit,
    "lora": lambda c, L: ResolvedMethod(c, L, 0, 0, lora=True, group3_bias=False),  # PEFT's bias="none"
    "bitfit": lambda c, L: ResolvedMethod(c, L, 0, L, lora=False, group3_bias=False),
    "full": lambda c, L: ResolvedMethod(c, L, 0, 0, lora=False, group3_bias=True, full=True),
}


@dataclass(frozen=True)
class TaskSpec:
    """What the head predicts. `labels` is the label map (index -> name) that travels with the adapter."""

    task_type: str = "single_label_classification"
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise ConfigError(f"task_type must be one of {', '.join(TASK_TYPES)}; got {self.task_type!r}",
                              field="task_type")
        labels = tuple(str(x) for x in self.labels)
        object.__setattr__(self, "labels", labels)
        if self.task_type == "regression":
            if len(labels) > 1:
                raise ConfigError("a regression task has one output and no label names", field="labels")
        elif len(labels) < 2 and self.task_type == "single_label_classification":
            raise ConfigError(f"classification needs at least 2 labels; got {list(labels)}", field="labels")
        elif len(labels) < 1:
            raise ConfigError("multi-label classification needs at least 1 label", field="labels")
        if len(set(labels)) != len(labels):
            raise ConfigError(f"labels must be unique; got {list(labels)}", field="labels")

    @property
    def num_labels(self) -> int:
        return 1 if self.task_type == "regression" else len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        return {"task_type": self.task_type, "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        return cls(task_type=data.get("task_type", "single_label_classification"),
                   labels=tuple(data.get("labels") or ()))


@dataclass
class TrainConfig:
    """Optimisation settings. Defaults suit adapters on a small encoder; `learning_rate=None` picks a
    per-method default (2e-5 for full fine-tuning, 1e-3 for adapters and biases). The head, the bias deltas and the
    LoRA factors each take `learning_rate` unless their own rate is set; 1e-3 for all three is measured in
    benchmarks/ACCURACY.md (*Learning rates per part*: 3x either way for the head or the biases moved nothing beyond
    noise; LoRA at 3e-4 under-fit and at 3e-3 collapsed one data set to its majority class).

    Frozen-prefix cache semantics: with `prefix_cache`, the embeddings and the frozen layers below the first
    trained one run once per example, in eval mode (no dropout), before the first step; while `train()` runs
    they stay in eval mode, and when it returns every module is back in the mode it had before. The cache
    keeps `prefix_cache_max_bytes` on the training device; on CUDA the rest goes to pinned host memory up to
    `prefix_cache_host_max_bytes`; rows beyond both are recomputed when their batch comes (same values)."""

    epochs: int = 3
    batch_size: int = 16
    learning_rate: float | None = None
    head_learning_rate: float | None = None  # None: learning_rate (or the method's default)
    bias_learning_rate: float | None = None  # bias deltas; None: learning_rate
    lora_learning_rate: float | None = None  # LoRA factors A and B; None: learning_rate
    weight_decay: float = 0.0  # applied to weights only (LoRA, head), never to biases or LayerNorm
    warmup_ratio: float = 0.06
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    max_seq_length: int = 128
    seed: int = 42
    early_stopping_patience: int | None = None  # epochs without improvement before stopping
    amp: str = "auto"  # auto | bf16 | fp16 | no; auto = bf16 where CUDA supports it, else no
    prefix_cache: bool = False  # SPAFIT: run embeddings + frozen group 1 once, reuse later epochs
    prefix_cache_dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    prefix_cache_max_bytes: int = 2 << 30  # on the training device; beyond: host memory (CUDA) or recompute
    prefix_cache_host_max_bytes: int = 8 << 30  # CUDA only: pinned host memory for what the device does not hold
    validation_fraction: float = 0.1  # without validation data, this stratified, seeded share becomes it (0: none)
    eval_batch_size: int | None = None
    log_every_steps: int = 10
    checkpoint_every_steps: int | None = None  # None: only at each epoch's end (if a checkpoint_dir is set)
    device: str = "auto"

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1; got {v!r}", field=name)

        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "log_every_steps"):
            positive_int(name)
        if not isinstance(self.max_seq_length, int) or not 8 <= self.max_seq_length <= 8192:
            raise ConfigError(f"max_seq_length must be an integer in [8, 8192]; got {self.max_seq_length!r}",
                              field="max_seq_length")
        for name in ("learning_rate", "head_learning_rate", "bias_learning_rate", "lora_learning_rate"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1):
                raise ConfigError(f"{name} must be in (0, 1); got {v!r}", field=name)
        for name in ("prefix_cache_max_bytes", "prefix_cache_host_max_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0; got {v!r}", field=name)
        if isinstance(self.validation_fraction, bool) or not isinstance(self.validation_fraction, int | float) \
                or not 0 <= self.validation_fraction <= 0.5:
            raise ConfigError(f"validation_fraction must be in [0, 0.5]; got {self.validation_fraction!r}",
                              field="validation_fraction")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1); got {self.warmup_ratio!r}", field="warmup_ratio")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0; got {self.weight_decay!r}", field="weight_decay")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm must be > 0 or None; got {self.max_grad_norm!r}", field="max_grad_norm")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ConfigError("early_stopping_patience must be >= 1 or None", field="early_stopping_patience")
        if self.amp not in ("auto", "bf16", "fp16", "no"):
            raise ConfigError(f"amp must be auto, bf16, fp16 or no; got {self.amp!r}", field="amp")
        if self.prefix_cache_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError("prefix_cache_dtype must be auto, float32, bfloat16 or float16",
                              field="prefix_cache_dtype")
        if self.checkpoint_every_steps is not None:
            positive_int("checkpoint_every_steps")
        if self.eval_batch_size is not None:
            positive_int("eval_batch_size")

    def lr_for(self, method: str, kind: str | None = None) -> float:
        """The learning rate of `kind` (head | bias | lora | None for the rest) under `method`."""
        own = {"head": self.head_learning_rate, "bias": self.bias_learning_rate,
               "lora": self.lora_learning_rate}.get(kind or "")
        if own is not None:
            return own
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-5 if method == "full" else 1e-3

    # Fields that do not change what a run computes: a checkpoint may be resumed with other values.
    RESUMABLE_CHANGES = ("device", "log_every_steps", "checkpoint_every_steps", "eval_batch_size",
                         "prefix_cache_max_bytes", "prefix_cache_host_max_bytes")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training field(s): {', '.join(unknown)}", field=unknown[0])
        return cls(**data)
