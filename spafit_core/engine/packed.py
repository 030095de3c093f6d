"""An adapter as the engine holds it: verified once at load, its tensors packed in one buffer whose layout
(`PackedLayout`) is shared by every adapter of the same shapes. Resident adapters live in the bank's slot
pools instead (`slots.SlotPools`); the packed buffer is their form outside them."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..adapter import check_fingerprint, load_weights, parse_config
from ..config import MethodConfig, TaskSpec
from ..errors import AdapterError
from ..model import HEAD, check_shapes, delta_shapes
from ..slots import SlotPools

if TYPE_CHECKING:
    from .base import Backbone

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
        buffer, pools = self.buffer, self.pools
        if buffer is not None:
            return buffer
        if pools is None:  # it left the pools meanwhile: a retire writes its buffer before it clears `pools`
            return self.buffer
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
    head_shapes = backbone.head_shapes(task)
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
