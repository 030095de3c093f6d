"""The adapter bank: adapters by name in an LRU bounded by bytes, resident in slot pools on the backbone's
device, with a pinned CPU tier on GPU hosts. Load and evict are idempotent; a replacement is atomic."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

from ..adapter import parse_config
from ..errors import AdapterNotLoadedError
from ..slots import SlotPools
from .base import Backbone
from .packed import LoadedAdapter, build_adapter


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
        self._counted_labels = 0  # the head padding the resident adapters' `nbytes` were counted at
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
            if current is not None and current.sha256 == sha and current.config == parse_config(cfg):
                return current  # the same content (weights and config: labels, max_seq_length) again
        adapter = build_adapter(self.backbone, name, cfg, weights)  # slow part outside the lock
        with self._lock:
            old = [self._warm.get(name), self._hot.get(name)]
            self._admit(adapter)  # replaces the hot entry; where it fails, the old version stays
            self._warm.pop(name, None)
            self._retire([a for a in old if a is not None and a is not adapter])
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
            self._refresh_bytes()
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
                    self._refresh_bytes()
            if keep:
                self._warm[a.name] = a
                while self._bytes(self._warm) > self.cpu_bytes and self._warm:
                    self._warm.popitem(last=False)

    def _refresh_bytes(self) -> None:
        """If the heads were re-padded since the resident adapters' bytes were counted (by this attach or detach, or
        by a slot a forward borrowed meanwhile), count them again: their bytes changed with the heads. Call under
        both locks."""
        if self.pools.labels == self._counted_labels:
            return
        self._counted_labels = self.pools.labels
        for a in self._hot.values():
            if a.pools is self.pools and a.slot is not None:
                a.nbytes = self.pools.nbytes_of(a.slot)

    @staticmethod
    def _bytes(tier: OrderedDict) -> int:
        return sum(a.nbytes for a in tier.values())
