"""One frozen backbone, many adapters.

- `Backbone`: one frozen base model per base-model name per process, its layer stack wrapped once.
- `AdapterBank`: adapters loaded, replaced and evicted at run time, LRU-bounded by bytes, with a
  device tier and a CPU tier where there is a GPU. Thread-safe; load and evict are idempotent.
  A resident adapter lives in the bank's slot pools (`slots.SlotPools`); outside them (in the pinned CPU
  tier, or held by a request after its eviction) it is one packed buffer in a layout shared by all
  adapters of the same shape. Resident bytes stay close to tensor bytes.
- `Engine.forward`: one forward pass over rows that belong to different adapters. The rows' slots make one
  index; each adapted module gathers its per-row bias and LoRA rows from the pools in one indexed op and
  applies them with batched matmuls (a row's rows are zero wherever its adapter does not adapt that
  module, so adapters with different n1/n2/rank mix; modules no row adapts are skipped). Deltas
  accumulate in place into each module's fresh output. Every row's head runs in one call of one head
  module padded to the most labels resident, with one copy of the logits to the host.
- `Engine.fan_out_many` (`fan_out` for one input): inputs asked of many tasks: the embeddings and the
  layers below the smallest first trained layer run once per input, on one batch of the inputs, then
  the batch branches into one row per (input, task).

Switching the task of a request never reloads or copies the backbone: adapters only ever contribute
deltas through the route of one forward pass.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapter import check_fingerprint, load_weights, parse_config
from .backbone import canonical_model_name, fingerprint, resolve_model_path, wrap_stack
from .config import MethodConfig, TaskSpec
from .errors import AdapterError, AdapterNotLoadedError
from .layers import MixedBatchUnsupported, Route, route
from .model import HEAD, check_shapes, delta_shapes, load_hf_classifier, load_tokenizer, quiet_transformers
from .outputs import postprocess
from .slots import SlotPools, kernel
from .train import collate

Input = str | tuple[str, str] | dict


# --------------------------------------------------------------------------------------- backbone
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
        self.pad_id = self.tokenizer.pad_token_id or 0
        self._head_templates: dict[tuple[int, str], nn.Module] = {}
        self._layouts: dict[tuple, PackedLayout] = {}
        self._input_names = set(inspect.signature(self.base.forward).parameters)
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.base.parameters())
        self.max_length = position_limit(self.config, self.base)  # tokens per input, at most

    def head_template(self, task: TaskSpec) -> nn.Module:
        """A head-only copy of the HF classifier for `task` (its base swapped for a stub)."""
        return self._head(task.num_labels, task.task_type)

    def padded_head(self, num_labels: int) -> nn.Module:
        """The head module that serves every head of up to `num_labels` labels (their label dimensions
        zero-padded, the extra logits sliced away)."""
        return self._head(num_labels, "single_label_classification" if num_labels > 1 else "regression")

    def head_label_dims(self) -> dict[str, tuple[int, ...]]:
        """Per head tensor name, its dimensions with one entry per label."""
        one, two = self.padded_head(1).state_dict(), self.padded_head(2).state_dict()
        return {k: tuple(i for i, (a, b) in enumerate(zip(v.shape, two[k].shape, strict=True)) if a != b)
                for k, v in one.items()}

    def _head(self, num_labels: int, task_type: str) -> nn.Module:
        key = (num_labels, task_type)
        if key not in self._head_templates:
            from transformers import AutoModelForSequenceClassification

            cfg = copy.deepcopy(self.config)
            cfg.num_labels, cfg.problem_type = num_labels, task_type
            with quiet_transformers(), torch.device("meta"):
                model = AutoModelForSequenceClassification.from_config(cfg)
            setattr(model, model.base_model_prefix, _BaseStub())
            model = model.to_empty(device="cpu").eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self._head_templates[key] = model
        return self._head_templates[key]

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


# --------------------------------------------------------------------------------------- adapters
Slot = tuple[int, tuple[int, ...], tuple[int, ...]]  # offset, shape, contiguous strides in a packed buffer


def _slot(offset: int, shape: Sequence[int]) -> Slot:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return offset, tuple(shape), tuple(reversed(strides))


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class PackedLayout:
    """Where each of an adapter's tensors sits in its one packed buffer. Adapters with the same tensor
    names and shapes (the same method and head on the same backbone) share one layout object. Holding one
    buffer instead of one tensor per module matters: each tensor object costs ~850 bytes of bookkeeping,
    10-15% of a small adapter; views are made per forward pass instead (a few microseconds each)."""

    deltas: tuple[tuple[str, Slot | None, Slot | None, Slot | None], ...]  # key, bias, A, B
    head: tuple[tuple[str, Slot], ...]  # head state_dict name -> slot
    numel: int

    @classmethod
    def of(cls, deltas: dict[str, Sequence[tuple[int, ...] | None]], head: dict[str, tuple[int, ...]]) -> PackedLayout:
        offset = 0

        def take(shape):
            nonlocal offset
            if shape is None:
                return None
            slot = _slot(offset, shape)
            offset += _numel(shape)
            return slot

        d = tuple((k, take(b), take(a), take(bb)) for k, (b, a, bb) in deltas.items())
        h = tuple((k, take(shape)) for k, shape in head.items())
        return cls(d, h, offset)

    def delta_views(self, buffer: torch.Tensor) -> dict[str, tuple[torch.Tensor | None, ...]]:
        view = _viewer(buffer)
        return {k: (view(b), view(a), view(bb)) for k, b, a, bb in self.deltas}

    def head_views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        view = _viewer(buffer)
        return {k: view(slot) for k, slot in self.head}


def _viewer(buffer: torch.Tensor) -> Callable[[Slot | None], torch.Tensor | None]:
    def view(slot: Slot | None) -> torch.Tensor | None:
        return None if slot is None else buffer.as_strided(slot[1], slot[2], buffer.storage_offset() + slot[0])

    return view


@dataclass(eq=False)
class LoadedAdapter:
    """An adapter as the engine holds it: its task and plan, and its tensors (per-module deltas, B pre-scaled,
    and head tensors) either in its bank's slot pools (`slot`, while resident on the device) or in one
    packed buffer in `layout` (before it is admitted, in the CPU tier, and after it leaves the pools: a
    request still holding it is then served from the buffer)."""

    name: str
    sha256: str
    config: dict
    task: TaskSpec
    first_trained_layer: int
    max_seq_length: int
    buffer: torch.Tensor | None  # (layout.numel,) in the backbone's dtype; None while only in the pools
    layout: PackedLayout
    nbytes: int
    device: torch.device
    rank: int = 0
    last_used: float = field(default_factory=time.monotonic)
    pools: SlotPools | None = None  # the pools holding it, with `slot`
    slot: int | None = None

    def packed(self) -> torch.Tensor:
        """Its packed buffer (read back from the pools where it is only there)."""
        if self.buffer is not None:
            return self.buffer
        pools = self.pools
        with pools.lock:
            if self.buffer is None:
                return pools.read(self.slot, self.layout)
            return self.buffer

    @property
    def deltas(self) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
        """Module key -> (bias (out,), A (r, in), B (out, r) pre-scaled), as views of its packed buffer."""
        return self.layout.delta_views(self.packed())

    @property
    def head_state(self) -> dict[str, torch.Tensor]:
        """The head's state_dict, as views of its packed buffer."""
        return self.layout.head_views(self.packed())

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> LoadedAdapter:
        """A detached copy with its buffer on `device` (the same object where nothing changes)."""
        packed = self.packed()
        buffer = packed.to(device, dtype=dtype or packed.dtype)
        if buffer is self.buffer:
            return self
        return LoadedAdapter(self.name, self.sha256, self.config, self.task, self.first_trained_layer,
                             self.max_seq_length, buffer, self.layout, buffer.numel() * buffer.element_size(),
                             torch.device(device), self.rank)


def build_adapter(backbone: Backbone, name: str, cfg: dict, weights: bytes) -> LoadedAdapter:
    """Verify (sha256, fingerprint, names and shapes, finiteness) and pack one adapter."""
    cfg = parse_config(cfg)
    method = MethodConfig.from_dict(cfg["method"])
    if method.name == "full":
        raise AdapterError("a `full` fine-tuning result carries every weight of the model; the shared-backbone "
                           "engine serves spafit, lora and bitfit adapters", field="method.name")
    task = TaskSpec.from_dict(cfg["task"])
    tensors = load_weights(cfg, weights)
    check_fingerprint(cfg, backbone.fingerprint)
    plan = method.resolve(backbone.stack.num_layers)
    head_shapes = {k: tuple(v.shape) for k, v in backbone.head_template(task).state_dict().items()}
    check_shapes(delta_shapes(backbone.stack, plan, backbone.adapted) | {HEAD + k: v for k, v in head_shapes.items()},
                 {k: tuple(v.shape) for k, v in tensors.items()})
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise AdapterError(f"adapter tensor {bad[0]} holds NaN or infinite values")
    bad = [k for k, v in tensors.items() if not v.is_floating_point()]
    if bad:
        raise AdapterError(f"adapter tensor {bad[0]} is not floating point")
    deltas: dict[str, list] = {}
    for k, t in tensors.items():
        if k.startswith(HEAD):
            continue
        key, _, kind = k.rpartition(".")
        deltas.setdefault(key, [None, None, None])[("bias_delta", "lora_A", "lora_B").index(kind)] = t
    deltas = {k: deltas[k] for k in sorted(deltas)}
    layout = backbone.layout({k: tuple(None if t is None else tuple(t.shape) for t in v) for k, v in deltas.items()},
                             head_shapes)
    buffer = torch.empty(layout.numel, dtype=backbone.dtype)
    with torch.no_grad():
        for (b, a, bb), views in zip(deltas.values(), layout.delta_views(buffer).values(), strict=True):
            for t, v, scale in zip((b, a, bb), views, (1.0, 1.0, plan.scaling), strict=True):
                if t is not None:  # lora_B is scaled once here instead of on every forward
                    v.copy_(t.float() * scale if scale != 1.0 else t)
        for k, v in layout.head_views(buffer).items():
            v.copy_(tensors[HEAD + k])
    return LoadedAdapter(name, cfg["weights"]["sha256"], cfg, task, plan.first_trained_layer,
                         int(cfg.get("max_seq_length") or 128), buffer, layout,
                         buffer.numel() * buffer.element_size(), torch.device("cpu"),
                         rank=method.rank if plan.lora else 0)


class AdapterBank:
    """Adapters by name, in an LRU bounded by bytes per tier: `device_bytes` on the backbone's device (in
    the bank's slot pools) and, where that is a GPU, `cpu_bytes` in pinned host memory (an adapter evicted
    from the GPU is kept on the CPU and moves back on its next use). A miss calls
    `loader(name) -> (config, weights)` if one is set. Lock order: the bank's lock, then the pools'."""

    def __init__(self, backbone: Backbone, *, device_bytes: int = 256 << 20, cpu_bytes: int = 1 << 30,
                 loader: Callable[[str], tuple[dict, bytes]] | None = None, slot_kernel: str = "torch"):
        self.backbone = backbone
        self.device_bytes = device_bytes
        self.cpu_bytes = cpu_bytes if backbone.device.type != "cpu" else 0
        self.loader = loader
        self.pools = SlotPools(backbone.device, backbone.dtype, backbone.head_label_dims(), slot_kernel)
        self._lock = threading.RLock()
        self._hot: OrderedDict[str, LoadedAdapter] = OrderedDict()  # in the pools, on the backbone's device
        self._warm: OrderedDict[str, LoadedAdapter] = OrderedDict()  # packed on the CPU (GPU hosts only)
        self._loading: dict[str, threading.Event] = {}
        self.stats = {"hits": 0, "misses": 0, "evictions": 0, "loads": 0}

    # -- queries
    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._hot or name in self._warm

    def names(self) -> list[str]:
        with self._lock:
            return list(self._hot) + list(self._warm)

    @property
    def nbytes(self) -> int:
        """The bytes of the adapters held: their pool rows (heads at their padded size) and CPU buffers."""
        with self._lock:
            return sum(a.nbytes for a in self._hot.values()) + sum(a.nbytes for a in self._warm.values())

    @property
    def capacity_bytes(self) -> int:
        """What holding them costs: the pools' whole capacity (free and zero rows, the table) and the CPU tier."""
        with self._lock:
            return self.pools.capacity_bytes + sum(a.nbytes for a in self._warm.values())

    # -- load / evict
    def load(self, name: str, cfg: dict, weights: bytes) -> LoadedAdapter:
        """Verify and hold an adapter. Idempotent: the same content again is a no-op; new content under
        the same name replaces the old atomically (requests already running keep the old one)."""
        with self._lock:
            current = self._hot.get(name) or self._warm.get(name)
            sha = (cfg.get("weights") or {}).get("sha256") if isinstance(cfg, dict) else None
            if current is not None and current.sha256 == sha:
                return current
        adapter = build_adapter(self.backbone, name, cfg, weights)  # slow part outside the lock
        with self._lock:
            old = [self._warm.pop(name, None), self._hot.pop(name, None)]
            self._admit(adapter)
            self._retire([a for a in old if a is not None])
            self.stats["loads"] += 1
            return adapter

    def evict(self, name: str) -> bool:
        """Drop an adapter from every tier. Idempotent; True if it was held."""
        with self._lock:
            old = [a for a in (self._hot.pop(name, None), self._warm.pop(name, None)) if a is not None]
            self._retire(old)
            return bool(old)

    def get(self, name: str) -> LoadedAdapter:
        """The adapter, resident in the pools, loading it through `loader` on a miss."""
        with self._lock:
            a = self._hot.get(name)
            if a is not None:
                self._hot.move_to_end(name)
                self.stats["hits"] += 1
                return a
            a = self._warm.pop(name, None)
            if a is not None:  # CPU tier hit: promote
                self.stats["hits"] += 1
                self._admit(a)
                return a
            self.stats["misses"] += 1
            if self.loader is None:
                raise AdapterNotLoadedError(f"adapter {name!r} is not loaded", detail={"adapter": name})
            event = self._loading.get(name)
            owner = event is None
            if owner:
                event = self._loading[name] = threading.Event()
        if not owner:  # another thread is loading it: wait for that instead of loading twice
            event.wait()
            with self._lock:
                if name in self._hot:
                    return self._hot[name]
            return self.get(name)
        try:
            cfg, weights = self.loader(name)
            return self.load(name, cfg, weights)
        finally:
            with self._lock:
                self._loading.pop(name, None)
            event.set()

    def _admit(self, adapter: LoadedAdapter) -> None:
        """Into the pools and the device tier, evicting least recently used ones past `device_bytes`. Call
        under the lock."""
        pools = self.pools
        with pools.lock:  # a forward in flight finishes first: it never sees a slot change under it
            buffer = adapter.buffer.to(pools.device, non_blocking=True) if adapter.buffer is not None else \
                adapter.packed()
            slot = pools.attach(adapter.layout, buffer, adapter.task.num_labels)
            adapter.pools, adapter.slot, adapter.buffer = pools, slot, None
            adapter.nbytes, adapter.device = pools.nbytes_of(slot), pools.device
        self._hot[adapter.name] = adapter
        self._hot.move_to_end(adapter.name)
        victims = []
        while self._bytes(self._hot) > self.device_bytes and len(self._hot) > 1:
            victims.append(self._hot.popitem(last=False)[1])
            self.stats["evictions"] += 1
        self._retire(victims, keep=bool(self.cpu_bytes))

    def _retire(self, adapters: list[LoadedAdapter], keep: bool = False) -> None:
        """Out of the pools, each with its tensors back in its own packed buffer (pinned host memory on a GPU
        host): a request still holding one is served from it. `keep`: into the CPU tier. Call under the lock."""
        cpu = torch.device("cpu")
        for a in adapters:
            with self.pools.lock:
                if a.pools is self.pools and a.slot is not None:
                    a.buffer = self.pools.read(a.slot, a.layout, cpu if keep else None)
                    self.pools.detach(a.slot)
                    a.pools, a.slot = None, None
                    a.nbytes, a.device = a.buffer.numel() * a.buffer.element_size(), a.buffer.device
            if keep:
                self._warm[a.name] = a
                while self._bytes(self._warm) > self.cpu_bytes and self._warm:
                    self._warm.popitem(last=False)

    @staticmethod
    def _bytes(tier: OrderedDict) -> int:
        return sum(a.nbytes for a in tier.values())


# --------------------------------------------------------------------------------------- engine
@dataclass
class Row:
    adapter: LoadedAdapter
    features: dict[str, list[int]]


class _Loading:
    """A backbone load in progress: other threads that need the same base model wait for it."""

    def __init__(self):
        self.done = threading.Event()
        self.error: BaseException | None = None


class Engine:
    """Serves predictions for many adapters on one backbone per base model."""

    def __init__(self, *, device: str = "auto", dtype: torch.dtype | None = None,
                 device_bytes: int = 256 << 20, cpu_bytes: int = 1 << 30,
                 loader: Callable[[str], tuple[dict, bytes]] | None = None,
                 base_model_of: Callable[[str], str] | None = None, default_base_model: str | None = None,
                 max_backbones: int = 4, slot_kernel: str = "torch"):
        from .train import pick_device

        self.device = pick_device(device)
        self.dtype = dtype
        self._device_bytes, self._cpu_bytes = device_bytes, cpu_bytes
        self._loader = loader
        self._base_model_of = base_model_of
        self.default_base_model = default_base_model
        self.slot_kernel = slot_kernel
        kernel(slot_kernel)  # an unknown name fails here, not on the first load
        self.max_backbones = max(1, max_backbones)
        self._backbones: OrderedDict[str, Backbone] = OrderedDict()  # LRU: least recently used first
        self._banks: dict[str, AdapterBank] = {}
        self._loading: dict[str, _Loading] = {}
        self._in_use: dict[str, int] = {}  # base model -> forward passes running on it (never evicted)
        self._retired = {"hits": 0, "misses": 0, "evictions": 0, "loads": 0}  # counters of evicted banks
        # Guards the maps above, never held while a backbone loads: a download never stalls other models.
        self._lock = threading.RLock()
        # One forward at a time: head stubs hold per-call state. Re-entrant for the per-group fallback.
        self._forward_lock = threading.RLock()
        self.backbone_loads = 0
        self.backbone_evictions = 0

    # -- backbones and banks
    def backbone(self, base_model: str | None = None) -> Backbone:
        """The backbone of `base_model` (default: the engine's), loaded on first use. The load runs outside
        the engine's lock (predicts on other backbones go on meanwhile); concurrent callers for the same
        model wait for one load. Past `max_backbones`, the least recently used one not running a forward
        pass is dropped with its adapters (it loads again when next needed)."""
        name = canonical_model_name(base_model or self.default_base_model)
        with self._lock:
            bb = self._backbones.get(name)
            if bb is not None:
                self._backbones.move_to_end(name)
                return bb
            loading = self._loading.get(name)
            owner = loading is None
            if owner:
                loading = self._loading[name] = _Loading()
        if not owner:
            loading.done.wait()
            if loading.error is not None:
                raise loading.error
            return self.backbone(name)
        try:
            bb = Backbone(name, device=self.device, dtype=self.dtype)  # slow: outside the lock
            bank = AdapterBank(bb, device_bytes=self._device_bytes, cpu_bytes=self._cpu_bytes, loader=self._loader,
                                slot_kernel=self.slot_kernel)
            with self._lock:
                self._backbones[name] = bb
                self._banks[name] = bank
                self.backbone_loads += 1
                self._trim(keep=name)
            return bb
        except BaseException as e:
            loading.error = e
            raise
        finally:
            with self._lock:
                self._loading.pop(name, None)
            loading.done.set()

    @property
    def backbones(self) -> list[str]:
        """Resident backbones, least recently used first."""
        with self._lock:
            return list(self._backbones)

    def _trim(self, keep: str | None = None) -> None:
        """Drop least recently used backbones beyond `max_backbones`, never one in use (or `keep`). Call under
        the lock."""
        while len(self._backbones) > self.max_backbones:
            victim = next((n for n in self._backbones if n != keep and not self._in_use.get(n)), None)
            if victim is None:  # every other one is running a batch: over the bound until they finish
                return
            del self._backbones[victim]
            bank = self._banks.pop(victim)
            for k, v in bank.stats.items():
                self._retired[k] += v
            self.backbone_evictions += 1

    @contextlib.contextmanager
    def _using(self, base_model: str) -> Iterator[Backbone]:
        """The backbone, marked in use (not evictable) for the block."""
        while True:
            bb = self.backbone(base_model)
            with self._lock:
                if self._backbones.get(bb.name) is bb:  # not evicted between the two steps
                    self._in_use[bb.name] = self._in_use.get(bb.name, 0) + 1
                    break
        try:
            yield bb
        finally:
            with self._lock:
                self._in_use[bb.name] -= 1
                if not self._in_use[bb.name]:
                    del self._in_use[bb.name]
                    self._trim()

    def bank(self, base_model: str | None = None) -> AdapterBank:
        bb = self.backbone(base_model)
        return self._banks[bb.name]

    def load(self, name: str, cfg: dict, weights: bytes) -> LoadedAdapter:
        base = parse_config(cfg)["base_model"]["name"]
        return self.bank(base).load(name, cfg, weights)

    def evict(self, name: str) -> bool:
        with self._lock:
            banks = list(self._banks.values())
        return any([b.evict(name) for b in banks])

    def adapter(self, name: str) -> LoadedAdapter:
        """A loaded adapter by name; on a miss the `base_model_of(name)` callback says which backbone."""
        with self._lock:
            banks = list(self._banks.values())
        for b in banks:
            if name in b:
                return b.get(name)
        base = self._base_model_of(name) if self._base_model_of else self.default_base_model
        return self.bank(base).get(name)

    def stats(self) -> dict[str, int]:
        out = {**self._retired, "adapters": 0, "adapter_bytes": 0}
        with self._lock:
            for b in self._banks.values():
                for k, v in b.stats.items():
                    out[k] += v
                out["adapters"] += len(b.names())
                out["adapter_bytes"] += b.nbytes
        return out

    # -- tokenisation
    def encode(self, adapter: LoadedAdapter, inputs: Sequence[Input]) -> list[dict[str, list[int]]]:
        """Token ids per input, truncated to what both the adapter and the backbone allow: an adapter that
        claims a longer `max_seq_length` than the backbone has positions still gets rows that fit."""
        bb = self._backbone_of(adapter)
        texts, pairs = split_inputs(inputs)
        limit = adapter.max_seq_length if bb.max_length is None else min(adapter.max_seq_length, bb.max_length)
        enc = bb.tokenizer(texts, pairs, truncation=True, max_length=limit) if pairs else \
            bb.tokenizer(texts, truncation=True, max_length=limit)
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        return [{k: enc[k][i] for k in keys} for i in range(len(texts))]

    def _encode_mixed(self, adapter: LoadedAdapter, inputs: Sequence[Input]) -> list[dict[str, list[int]]]:
        """As `encode`, for inputs that may mix single texts and text pairs (each kind in one call)."""
        pair = [not isinstance(x, str) and (not isinstance(x, dict) or x.get("text_pair") is not None)
                for x in inputs]
        if all(pair) or not any(pair):
            return self.encode(adapter, inputs)
        out: list[dict[str, list[int]] | None] = [None] * len(inputs)
        for kind in (False, True):
            idx = [i for i, p in enumerate(pair) if p is kind]
            for i, f in zip(idx, self.encode(adapter, [inputs[i] for i in idx]), strict=True):
                out[i] = f
        return out  # type: ignore[return-value]

    def _backbone_of(self, adapter: LoadedAdapter) -> Backbone:
        return self.backbone(_base_of(adapter))

    # -- forward
    @torch.inference_mode()
    def forward(self, rows: Sequence[Row]) -> list[torch.Tensor]:
        """Logits per row, rows of any adapters (on one backbone) in one forward pass."""
        if not rows:
            return []
        base = _base_of(rows[0].adapter)
        if any(_base_of(r.adapter) != base for r in rows):
            raise AdapterError("one batch may only mix adapters of the same base model")
        with self._using(base) as bb:
            return self._forward(bb, rows)

    def _forward(self, bb: Backbone, rows: Sequence[Row]) -> list[torch.Tensor]:
        batch = _to_device(collate([r.features for r in rows], bb.pad_id), bb.device)
        adapters = [r.adapter for r in rows]
        pools = self._banks[bb.name].pools
        with self._forward_lock, pools.lock:
            with _slots(pools, adapters) as (row_slot, distinct):
                deltas = pools.route(row_slot, distinct)
                try:
                    outputs = self._run(bb, batch, Route(deltas=deltas))
                except MixedBatchUnsupported:  # e.g. DeBERTa's shared relative-position projections
                    return self._forward_by_group(rows)
                return self._heads(bb, pools, outputs, adapters, deltas.cols)

    def _forward_by_group(self, rows: Sequence[Row]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(id(r.adapter), []).append(i)
        for idx in groups.values():
            for i, logits in zip(idx, self.forward([rows[i] for i in idx]), strict=True):
                out[i] = logits
        return out  # type: ignore[return-value]

    def _run(self, bb: Backbone, batch: dict, r: Route):
        with route(r):
            return bb.base(**bb.model_inputs(batch))

    def _heads(self, bb: Backbone, pools: SlotPools, outputs, adapters: Sequence[LoadedAdapter],
               cols: torch.Tensor) -> list[torch.Tensor]:
        """Every row's head in one call: the head module padded to the most labels resident, with each row's
        head tensors gathered from the pools (one row of them for a single-adapter batch; per row, batched
        with `vmap`, otherwise). One copy to the host at the end; padded logits sliced away."""
        head = bb.padded_head(pools.labels)
        stub = getattr(head, head.base_model_prefix)
        params = pools.head_params(cols)
        try:
            if cols.shape[0] == 1:
                stub.outputs = outputs
                logits = torch.func.functional_call(head, {k: v[0] for k, v in params.items()}, (),
                                                    strict=True).logits
            else:
                logits = _vmapped_head(head, stub, params, outputs)
        finally:
            stub.outputs = None
        logits = logits.float().cpu()  # the batch's one synchronisation
        return [logits[i, : a.task.num_labels] for i, a in enumerate(adapters)]

    # -- public prediction API
    def predict(self, name: str, inputs: Sequence[Input], top_k: int | None = None) -> list[dict[str, Any]]:
        adapter = self.adapter(name)
        rows = [Row(adapter, f) for f in self.encode(adapter, inputs)]
        return [postprocess(adapter.task, logits, top_k) for logits in self.forward(rows)]

    def predict_mixed(self, requests: Sequence[tuple[str, Input]], top_k: int | None = None) -> list[dict]:
        rows = []
        for name, inp in requests:
            adapter = self.adapter(name)
            rows.append(Row(adapter, self.encode(adapter, [inp])[0]))
        return [postprocess(r.adapter.task, logits, top_k) for r, logits in zip(rows, self.forward(rows), strict=True)]

    def fan_out(self, names: Sequence[str], inp: Input, top_k: int | None = None) -> dict[str, dict]:
        """One input asked of many tasks: the shared frozen prefix runs once, then one row per task."""
        return self.fan_out_many(names, [inp], top_k)[0]

    @torch.inference_mode()
    def fan_out_many(self, names: Sequence[str], inputs: Sequence[Input],
                     top_k: int | None = None) -> list[dict[str, dict]]:
        """Every input asked of every task in one forward: the frozen prefix (the layers below the smallest
        first trained layer) runs once per input, on a batch of the inputs, then branches into one row per
        (input, task). Tasks that truncate differently, or on other base models, branch in their own
        group. Per input, task name -> prediction."""
        adapters = [self.adapter(n) for n in names]
        out: list[dict[str, dict]] = [{} for _ in inputs]
        if not adapters or not inputs:
            return out
        groups: dict[tuple, list[int]] = {}
        for j, a in enumerate(adapters):
            bb = self._backbone_of(a)
            limit = a.max_seq_length if bb.max_length is None else min(a.max_seq_length, bb.max_length)
            groups.setdefault((_base_of(a), limit), []).append(j)
        for idx in groups.values():
            group = [adapters[j] for j in idx]
            feats = self._encode_mixed(group[0], inputs)  # the same for the whole group
            with self._using(_base_of(group[0])) as bb:
                logits = self._fan_out_shared(bb, group, feats)
            if logits is None:  # the model cannot mix adapters in one batch
                rows = [Row(a, f) for f in feats for a in group]
                logits = self._forward_by_group(rows)
            for i in range(len(inputs)):
                for jj, j in enumerate(idx):
                    a = adapters[j]
                    out[i][names[j]] = postprocess(a.task, logits[i * len(group) + jj], top_k)
        return [{n: d[n] for n in names} for d in out]  # in the order asked

    def _fan_out_shared(self, bb: Backbone, adapters: Sequence[LoadedAdapter],
                        feats: Sequence[dict[str, list[int]]]) -> list[torch.Tensor] | None:
        """Logits of each input under each adapter (row i * K + j: input i, adapter j), the layers below the
        first trained one run once per input. None where the model cannot mix adapters in one batch."""
        k_tasks, n = len(adapters), len(feats)
        k = min(a.first_trained_layer for a in adapters)
        inputs = _to_device(collate(list(feats), bb.pad_id), bb.device)  # (N, T)
        rows = [a for _ in feats for a in adapters]  # input-major
        many = {key: v.repeat_interleave(k_tasks, 0) for key, v in inputs.items()}  # (N * K, T)
        pools = self._banks[bb.name].pools
        with self._forward_lock, pools.lock, _slots(pools, rows) as (row_slot, distinct):
            deltas = pools.route(row_slot, distinct)
            if k >= bb.stack.num_layers:  # head-only adapters: the whole base is shared
                outputs = self._run(bb, inputs, Route())
                outputs = _repeat_output(outputs, k_tasks)
                return self._heads(bb, pools, outputs, rows, deltas.cols)
            with route(Route(stop_at=k)) as r:
                bb.base(**bb.model_inputs(inputs))
            if r.captured is None:  # no layer at index k ran (k is past the stack): run each row in full
                return self._forward(bb, [Row(a, f) for f in feats for a in adapters])
            shared = r.captured.repeat_interleave(k_tasks, 0) if k_tasks > 1 else r.captured  # (N * K, T, H)
            try:
                outputs = self._run(bb, many, Route(deltas=deltas, skip_below=k, inject=shared))
            except MixedBatchUnsupported:
                return None
            assert outputs.last_hidden_state.shape[0] == n * k_tasks
            return self._heads(bb, pools, outputs, rows, deltas.cols)


@contextlib.contextmanager
def _slots(pools: SlotPools, adapters: Sequence[LoadedAdapter]) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """The row-to-slot index of a batch whose row i belongs to adapters[i] (one entry where every row has
    the same adapter), on the pools' device, and its distinct slots. An adapter not in these pools (evicted or replaced while its
    request waited, or of a backbone since reloaded) borrows a slot for the block. Call under the pools'
    lock: no slot changes meanwhile."""
    borrowed: dict[int, int] = {}
    slots = []
    first = adapters[0]
    if all(a is first for a in adapters):
        adapters = adapters[:1]
    for a in adapters:
        s = a.slot if a.pools is pools else None
        if s is None:
            s = borrowed.get(id(a))
            if s is None:
                s = borrowed[id(a)] = pools.attach(a.layout, a.packed(), a.task.num_labels)
        slots.append(s)
    try:
        yield _to_device({"s": torch.tensor(slots)}, pools.device)["s"], list(set(slots))
    finally:
        for s in borrowed.values():
            pools.detach(s)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host tensors onto `device`: as they are on the CPU; through pinned memory, without waiting, on a GPU."""
    if device.type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def _vmapped_head(head: nn.Module, stub, params: dict[str, torch.Tensor], outputs) -> torch.Tensor:
    """The head on each row with that row's own head tensors: `vmap` over rows of a batch-of-one call."""
    keys = [k for k, v in outputs.items() if isinstance(v, torch.Tensor)]
    cls = type(outputs)

    def one(p, *tensors):
        stub.outputs = cls(**{k: t.unsqueeze(0) for k, t in zip(keys, tensors, strict=True)})
        return torch.func.functional_call(head, p, (), strict=True).logits[0]

    return torch.func.vmap(one)(params, *[outputs[k] for k in keys])


def _base_of(adapter: LoadedAdapter) -> str:
    return canonical_model_name(adapter.config["base_model"]["name"])


def _repeat_output(outputs, n: int):
    """A model output over N inputs as one over N * n rows, each input's row repeated n times."""
    kwargs = {k: v.repeat_interleave(n, 0) for k, v in outputs.items() if isinstance(v, torch.Tensor)}
    return type(outputs)(**kwargs)


def split_inputs(inputs: Sequence[Input]) -> tuple[list[str], list[str] | None]:
    texts, pairs = [], []
    for x in inputs:
        if isinstance(x, str):
            texts.append(x)
            pairs.append(None)
        elif isinstance(x, dict):
            texts.append(x["text"])
            pairs.append(x.get("text_pair"))
        else:
            texts.append(x[0])
            pairs.append(x[1])
    if all(p is None for p in pairs):
        return texts, None
    if any(p is None for p in pairs):
        raise AdapterError("mix of single texts and text pairs in one call; send them separately",
                           field="inputs")
    return texts, pairs
