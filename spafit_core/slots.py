"""Adapter slot pools: every resident adapter's deltas and head tensors in device-resident pools, so a
mixed forward gathers each module's per-row tensors in one indexed op instead of rebuilding them per adapter.

- `RowPool`: rows on one device (row 0 all zeros); rows are handed out one at a time and reused once freed,
  so a pool never fragments and stores no padding; capacity grows by 1/32 at a time.
- `SlotPools`: the pools of one bank: per adapted module one pool of LoRA rows (`[A row | pre-scaled B^T
  row]` per rank), one pool of bias rows per width (shared by the modules of that width), one pool per head
  tensor (label dimensions padded to the most labels resident; the padded logits are sliced away). A
  resident adapter holds one slot `g`; `table[g]` holds its pool rows: one column per module bias, `R`
  columns per module LoRA (its rank rows, then the zero row: padded to the largest rank resident there,
  which adds exact zeros), one per head tensor. A forward passes one row-to-slot index; one
  `table.index_select` gives every module its rows, a host-side read of `meta` says which modules some row
  adapts (the others are skipped) and, per module, the runs of rows of one rank (`row_order` puts rows of
  one rank together), and each module gathers and applies its own rows when it runs: its LoRA per run, at
  the run's rank, so a row's LoRA costs its own rank, not the batch's largest.
- `SlotKernel` (in `slot_ops.py` with the per-forward `SlotDelta` views, both re-exported
  here): how a module applies its rows. `TorchGather` (gather, then batched matmul, the reference)
  is the implementation there; a segmented-matmul kernel (punica-style SGMV / BGMV) implements the same two
  calls, registers in `KERNELS` and is chosen by name (`Engine(slot_kernel=...)`, SPAFIT_ENGINE_SLOT_KERNEL).

Invariants: pools change only under `SlotPools.lock`, which a forward holds for its whole run, so a forward
never sees a slot half-written or reused (atomic hot-swap); an adapter leaving the pools first gets its
tensors back in its own packed buffer, so a request still holding it is served exactly (it borrows a slot
for its forward). Device work is queued without waiting; the forward's one synchronisation is the copy of
the logits to the host.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .slot_ops import (  # noqa: F401  (SlotKernel, TorchGather, KERNELS and SlotDelta re-exported)
    KERNELS,
    SlotDelta,
    SlotKernel,
    TorchGather,
    _Bound,
    _Handle,
    kernel,
)

GROWTH = 32  # a full pool grows by 1/GROWTH of its size: capacity stays within ~3% of the rows in use
TRIM_BYTES = 1 << 20  # host memory freed by pool growth before it is handed back to the OS (see `_trim`)
_freed = [0]  # host bytes freed by pool growth since the last trim


def _trim() -> None:
    """Hand freed heap pages back to the OS. Pools grow by reallocation; on the CPU the old blocks land in
    glibc's heap between live ones and stay resident (measured: 1.45x the tensor bytes in RSS after 200
    adapters, 1.03x after a trim). No-op where glibc is not the allocator."""
    _freed[0] = 0
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _note_freed(t: torch.Tensor) -> None:
    if t.device.type == "cpu":
        _freed[0] += t.numel() * t.element_size()


# --------------------------------------------------------------------------------------- pools
class RowPool:
    """Rows on one device, in one or more tensors that share row ids (LoRA: A rows and B^T rows); row 0 of
    each stays zero."""

    def __init__(self, widths: tuple[int, ...], device: torch.device, dtype: torch.dtype):
        self.widths = widths
        self.data = [torch.zeros((1, w), device=device, dtype=dtype) for w in widths]
        self.top = 1  # rows [1, top) have been handed out at least once
        self.free: list[int] = []

    def take(self, n: int) -> list[int]:
        rows = [self.free.pop() for _ in range(min(n, len(self.free)))]
        need = n - len(rows)
        if need:
            cap = self.data[0].shape[0]
            if self.top + need > cap:
                cap = max(self.top + need, cap + cap // GROWTH)
                grown = []
                for d in self.data:
                    g = torch.zeros((cap, d.shape[1]), device=d.device, dtype=d.dtype)
                    g[: self.top].copy_(d[: self.top])
                    grown.append(g)
                    _note_freed(d)
                self.data = grown
            rows += range(self.top, self.top + need)
            self.top += need
        return rows

    def release(self, rows: list[int]) -> None:
        self.free.extend(rows)

    @property
    def used_rows(self) -> int:
        return self.top - 1 - len(self.free)

    @property
    def nbytes(self) -> int:
        return sum(d.numel() * d.element_size() for d in self.data)


class _Module:
    """The pools of one adapted module and their columns in the table."""

    def __init__(self, key: str):
        self.key = key
        self.bias: RowPool | None = None  # (out,) rows
        self.lora: RowPool | None = None  # per rank: [A row (in,) | pre-scaled B^T row (out,)] in one row
        self.in_features = 0
        self.rank = 0  # LoRA columns in the table: the largest rank resident
        self.bias_col: int | None = None
        self.lora_cols: slice | None = None
        self.index = 0  # in the pools' module order (`SlotPools.meta` columns)
        self.bias_pos = 0  # among the modules sharing its bias pool


class SlotPools:
    """Every resident adapter of one bank, in pools on `device`. Thread-safe under `lock`.
    `head_label_dims`: per head tensor name, its dimensions that have one entry per label."""

    def __init__(self, device: torch.device, dtype: torch.dtype, head_label_dims: dict[str, tuple[int, ...]],
                 kernel_name: str = "torch"):
        self.device, self.dtype = device, dtype
        self.kernel = kernel(kernel_name)
        self.lock = threading.RLock()
        self.modules: dict[str, _Module] = {}
        self.bias: dict[int, RowPool] = {}  # width -> the bias rows of every module of that width
        self.bias_cols: dict[int, torch.Tensor] = {}  # width -> its modules' table columns, in order
        self.head: dict[str, RowPool] = {}  # head state_dict name -> rows of its (padded) flat tensor
        self.head_shapes: dict[str, tuple[int, ...]] = {}  # padded shapes
        self.head_label_dims = head_label_dims
        self.head_cols: dict[str, int] = {}
        self.labels = 0  # label dimension of the head pools: the most labels resident
        self.table = torch.zeros((0, 0), dtype=torch.int32, device=device)  # (G, C) slot -> pool rows
        self._records: dict[int, dict[str, Any]] = {}  # slot -> its pool rows
        self._free_slots: list[int] = []
        self._handles: dict[str, _Handle] = {}
        # (G, 2M) on the host: per slot and module, its LoRA rank (first M columns) and whether it has a bias
        # delta (last M): a forward reads its slots' rows to skip modules no row adapts and trim LoRA columns
        # to the batch's largest rank, without touching the device
        self.meta = torch.zeros((0, 0), dtype=torch.int32)

    # -- sizes
    @property
    def capacity_bytes(self) -> int:
        """Everything the pools hold (rows in use, free rows, zero rows, the table): what they cost."""
        with self.lock:
            pools = [m.lora for m in self.modules.values() if m.lora is not None]
            pools += list(self.bias.values()) + list(self.head.values())
            return sum(p.nbytes for p in pools) + self.table.numel() * self.table.element_size()

    def __len__(self) -> int:
        return len(self._records)

    # -- attach / detach
    @torch.inference_mode(False)  # pools outlive the forward that may grow them
    def attach(self, layout, buffer: torch.Tensor, num_labels: int) -> int:
        """Write an adapter's tensors (its packed `buffer` in `layout`) into pool rows; its slot. All or nothing:
        where it fails (a pool cannot grow), every row it took goes back and the table matches the modules."""
        with self.lock:
            deltas, heads = layout.delta_views(buffer), layout.head_views(buffer)
            rec: dict[str, Any] = {"modules": {}, "head": {}, "labels": num_labels}
            try:
                widened = self._ensure_columns(deltas, heads, num_labels)
                for key, (b, a, bb) in deltas.items():
                    m, r = self.modules[key], {}
                    rec["modules"][key] = r
                    if b is not None:
                        (r["bias"],) = m.bias.take(1)
                        m.bias.data[0][r["bias"]].copy_(b, non_blocking=True)
                    if a is not None:
                        rows = r["lora"] = m.lora.take(a.shape[0])
                        idx = torch.tensor(rows, device=self.device)
                        both = torch.cat([a, bb.t()], 1).to(self.device, self.dtype, non_blocking=True)
                        m.lora.data[0].index_copy_(0, idx, both)
                for k, t in heads.items():
                    (rec["head"][k],) = self.head[k].take(1)
                    self.head[k].data[0][rec["head"][k]].copy_(self._pad_head(k, t).reshape(-1), non_blocking=True)
            except BaseException:
                self._release(rec)
                self._shrink_heads()  # heads widened for this adapter go back to the most labels resident
                self._rebuild_table()  # columns back in step with the modules' ranks
                raise
            slot = self._free_slots.pop() if self._free_slots else len(self._records)
            self._records[slot] = rec
            if widened or slot >= self.table.shape[0]:
                self._rebuild_table()
            else:
                self.table[slot] = torch.tensor(self._table_row(rec), device=self.device)
                self.meta[slot] = torch.tensor(self._meta_row(rec))
            if _freed[0] > TRIM_BYTES:
                _trim()
            return slot

    def _release(self, rec: dict) -> None:
        for key, r in rec["modules"].items():
            m = self.modules[key]
            if "bias" in r:
                m.bias.release([r["bias"]])
            if "lora" in r:
                m.lora.release(r["lora"])
        for k, row in rec["head"].items():
            self.head[k].release([row])

    @torch.inference_mode(False)  # pools outlive the forward that may grow them
    def read(self, slot: int, layout, device: torch.device | None = None) -> torch.Tensor:
        """The packed buffer (in `layout`) of the adapter in `slot`, on `device` (pinned host memory where the
        pools are on a GPU)."""
        with self.lock:
            rec = self._records[slot]
            device = torch.device(device or self.device)
            pin = device.type == "cpu" and self.device.type == "cuda"
            buffer = torch.empty(layout.numel, dtype=self.dtype, device=device, pin_memory=pin)
            for key, (b, a, bb) in layout.delta_views(buffer).items():
                m, r = self.modules[key], rec["modules"][key]
                if b is not None:
                    b.copy_(m.bias.data[0][r["bias"]], non_blocking=True)
                if a is not None:
                    idx = torch.tensor(r["lora"], device=self.device)
                    both = m.lora.data[0].index_select(0, idx)
                    a.copy_(both[:, : m.in_features], non_blocking=True)
                    bb.copy_(both[:, m.in_features:].t(), non_blocking=True)
            for k, t in layout.head_views(buffer).items():
                padded = self.head[k].data[0][rec["head"][k]].view(self.head_shapes[k])
                t.copy_(padded[tuple(slice(0, n) for n in t.shape)], non_blocking=True)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # the host reads the buffer next
            return buffer

    @torch.inference_mode(False)  # pools outlive the forward that may grow them
    def detach(self, slot: int, *, shrink: bool = True) -> None:
        """Free `slot` and its rows (reused by later attaches; never while a forward holds the lock). `shrink`: if
        it held the widest head, the others shrink back to the most labels resident; a slot borrowed for one forward
        is given back without (an adapter that borrows one for every forward would re-pad every head twice a
        forward), and the bank's next detach shrinks them."""
        with self.lock:
            rec = self._records.pop(slot)
            self._release(rec)
            self.table[slot] = 0
            self.meta[slot] = 0
            self._free_slots.append(slot)
            if shrink:
                self._shrink_heads()

    def _shrink_heads(self) -> None:
        need = max((r["labels"] for r in self._records.values()), default=1)
        if need < self.labels:
            self._repad_heads(dict(self.head_shapes), need)
            if _freed[0] > TRIM_BYTES:
                _trim()

    def nbytes_of(self, slot: int) -> int:
        """The bytes of the pool rows `slot` holds (head rows at their padded size)."""
        with self.lock:
            rec = self._records[slot]
            n = 0
            for key, r in rec["modules"].items():
                m = self.modules[key]
                n += m.bias.widths[0] if "bias" in r else 0
                n += len(r["lora"]) * m.lora.widths[0] if "lora" in r else 0
            n += sum(self.head[k].widths[0] for k in rec["head"])
            return n * torch.empty((), dtype=self.dtype).element_size()

    # -- the forward pass
    def route(self, row_slot: torch.Tensor, distinct: list[int], slots: list[int | None] | None = None) -> _Bound:
        """Per-module deltas of a batch whose row i is in slot row_slot[i] (or one slot for every row), over
        the `distinct` slots: one indexed op on the table; each module gathers its own rows when it runs.
        Modules that no row's adapter adapts get no delta. `slots`: the same per row on the host (None: a row
        with no adapter, all its deltas zero); with it, each module's LoRA runs over runs of rows of one rank
        (`row_order` makes them few), otherwise over every row at the batch's largest rank."""
        active = self.meta[distinct].amax(0).tolist() if distinct else [0] * (2 * len(self.modules))
        # int32 in the table (half the bytes), int64 per forward (the gathers' native index type)
        cols = self.table.index_select(0, row_slot).long()
        spans = None
        if slots is not None and len(slots) > 1:
            bare = [i for i, s in enumerate(slots) if s is None]
            if bare:
                bare_idx = torch.tensor(bare)
                if cols.device.type != "cpu":  # without waiting, as every host-to-device copy of a forward
                    bare_idx = bare_idx.pin_memory().to(cols.device, non_blocking=True)
                cols.index_fill_(0, bare_idx, 0)
            spans = self._spans(slots)
        return _Bound(self._handles, cols, active, self, spans)

    def _ranks(self, slots: list[int | None]) -> torch.Tensor:
        """(B, M) on the host: each row's LoRA rank in each module (0 for rows with no adapter)."""
        n = len(self.modules)
        real = [i for i, s in enumerate(slots) if s is not None]
        if len(real) == len(slots):
            return self.meta[slots, :n]
        ranks = torch.zeros((len(slots), n), dtype=self.meta.dtype)
        if real:
            ranks[real] = self.meta[[slots[i] for i in real], :n]
        return ranks

    def row_order(self, slots: list[int | None]) -> list[int] | None:
        """An order of the rows that puts rows of one LoRA rank together (rows with no LoRA first), and within
        a rank those whose LoRA starts at the same module: each module's LoRA then runs over a few contiguous
        runs at their own rank. None where the rows are in such an order already."""
        ranks = self._ranks(slots)
        nz = ranks > 0
        keys = list(zip(ranks.amax(1).tolist(), torch.where(nz.any(1), nz.int().argmax(1), -1).tolist(),
                        strict=True))
        order = sorted(range(len(slots)), key=keys.__getitem__)
        return None if order == sorted(order) else order

    def _spans(self, slots: list[int | None]) -> dict[int, list[tuple[int, int, int]]]:
        """Per module index, its LoRA as (start, stop, rank) runs of rows: per run of rows of one largest rank,
        from its first to its last row that has LoRA in the module, at their largest rank there."""
        ranks = self._ranks(slots)
        top = ranks.amax(1).tolist()
        runs, lo = [], 0
        for i in range(1, len(top) + 1):
            if i == len(top) or top[i] != top[lo]:
                if top[lo]:
                    runs.append((lo, i))
                lo = i
        spans: dict[int, list[tuple[int, int, int]]] = {}
        for lo, hi in runs:
            sub = ranks[lo:hi]
            nz = (sub > 0).int()
            has = nz.any(0).tolist()
            first, last, r = nz.argmax(0).tolist(), nz.flip(0).argmax(0).tolist(), sub.amax(0).tolist()
            for m, ok in enumerate(has):
                if ok:
                    spans.setdefault(m, []).append((lo + first[m], hi - last[m], r[m]))
        return spans

    def head_params(self, cols: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each head tensor per row (B, *padded shape): one gather per head tensor."""
        return {k: F.embedding(cols[:, c], self.head[k].data[0]).view(-1, *self.head_shapes[k])
                for k, c in self.head_cols.items()}

    # -- layout of the table
    def _ensure_columns(self, deltas, heads, num_labels: int) -> bool:
        widened = False
        for key, (b, a, bb) in deltas.items():
            m = self.modules.get(key)
            if m is None:
                m = self.modules[key] = _Module(key)
            if b is not None and m.bias is None:  # bias rows of one width share a pool: one gather per forward
                w = b.shape[0]
                if w not in self.bias:
                    self.bias[w] = RowPool((w,), self.device, self.dtype)
                m.bias, widened = self.bias[w], True
            if a is not None:
                if m.lora is None:
                    m.lora = RowPool((a.shape[1] + bb.shape[0],), self.device, self.dtype)
                    m.in_features = a.shape[1]
                if a.shape[0] > m.rank:
                    m.rank, widened = a.shape[0], True
        if num_labels > self.labels or set(heads) - set(self.head):
            self._repad_heads({k: tuple(t.shape) for k, t in heads.items()}, max(num_labels, self.labels))
            widened = True
        return widened

    def _repad_heads(self, shapes: Mapping[str, tuple[int, ...]], labels: int) -> None:
        """Head pools padded to `labels` entries per label dimension (more or fewer than now); rows already held
        are re-padded at the same row ids. Nothing changes unless every new pool could be made."""
        new = {}
        for k, s in shapes.items():
            dims = self.head_label_dims.get(k, ())
            shape = tuple(labels if i in dims else n for i, n in enumerate(s))
            old = self.head.get(k)
            if old is not None and shape == self.head_shapes[k]:  # no label dimension: the pool stays as it is
                continue
            pool = RowPool((_prod(shape),), self.device, self.dtype)
            if old is not None:
                pool.take(old.top - 1)
                pool.free = list(old.free)
                prev = old.data[0][: old.top].view(-1, *self.head_shapes[k])
                keep = (slice(None), *(slice(0, min(a, b)) for a, b in zip(prev.shape[1:], shape, strict=True)))
                pool.data[0][: old.top].view(-1, *shape)[keep].copy_(prev[keep])
                _note_freed(old.data[0])
            new[k] = (pool, shape)
        for k, (pool, shape) in new.items():
            self.head[k], self.head_shapes[k] = pool, shape
        self.labels = labels

    def _rebuild_table(self) -> None:
        col = 0
        for m in self.modules.values():
            m.bias_col = m.lora_cols = None
            if m.bias is not None:
                m.bias_col, col = col, col + 1
            if m.lora is not None:
                m.lora_cols, col = slice(col, col + m.rank), col + m.rank
        self.head_cols = {}
        for k in self.head:
            self.head_cols[k], col = col, col + 1
        self.bias_cols = {}
        for w in self.bias:
            mods = [m for m in self.modules.values() if m.bias is self.bias[w]]
            for j, m in enumerate(mods):
                m.bias_pos = j
            self.bias_cols[w] = torch.tensor([m.bias_col for m in mods], device=self.device)
        rows = max(self.table.shape[0], max(self._records, default=-1) + 1)
        rows += rows // GROWTH
        table = torch.zeros((rows, col), dtype=torch.int32)
        self.meta = torch.zeros((rows, 2 * len(self.modules)), dtype=torch.int32)
        for i, m in enumerate(self.modules.values()):
            m.index = i
        for slot, rec in self._records.items():
            table[slot] = torch.tensor(self._table_row(rec, col))
            self.meta[slot] = torch.tensor(self._meta_row(rec))
        self.table = table.to(self.device)
        self._handles = {k: _Handle(m, self.kernel) for k, m in self.modules.items()}

    def _table_row(self, rec: dict, width: int | None = None) -> list[int]:
        row = [0] * (self.table.shape[1] if width is None else width)
        for key, r in rec["modules"].items():
            m = self.modules[key]
            if "bias" in r:
                row[m.bias_col] = r["bias"]
            if "lora" in r:
                lo = m.lora_cols.start
                row[lo: lo + len(r["lora"])] = r["lora"]
        for k, rowid in rec["head"].items():
            row[self.head_cols[k]] = rowid
        return row

    def _meta_row(self, rec: dict) -> list[int]:
        n = len(self.modules)
        row = [0] * (2 * n)
        for key, r in rec["modules"].items():
            i = self.modules[key].index
            row[i] = len(r.get("lora", ()))
            row[n + i] = int("bias" in r)
        return row

    def _pad_head(self, k: str, t: torch.Tensor) -> torch.Tensor:
        shape = self.head_shapes[k]
        if tuple(t.shape) == shape:
            return t
        out = torch.zeros(shape, dtype=t.dtype, device=t.device)
        out[tuple(slice(0, n) for n in t.shape)] = t
        return out


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
