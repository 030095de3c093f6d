"""The gather/forward side of the slot pools (`slots.py`): how a module applies its rows to a batch
(`SlotKernel`, `TorchGather`, the `KERNELS` registry chosen by name) and the per-forward views a route hands
the adapted modules (`_Bound`: module key -> its `SlotDelta` over the batch's table rows). Nothing here
changes a pool; a forward holds `SlotPools.lock` while these run.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .slots import SlotPools, _Module


# --------------------------------------------------------------------------------------- kernels
class SlotKernel:
    """Applies a module's slot rows to a batch. `idx` holds pool row indices, one row of them per batch row
    (or a single row shared by the whole batch)."""

    name = "abstract"

    def bias_rows(self, pool: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(B, out) bias deltas of rows `idx` (B,) of `pool` (N, out)."""
        raise NotImplementedError

    def lora_(self, y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, in_features: int,
              idx: torch.Tensor, inplace: bool, spans: list[tuple[int, int, int]] | None = None) -> torch.Tensor:
        """y + x A_i B_i^T per row i, where row n of `pool` (N, in + out) is [A row | pre-scaled B^T row] and
        row i's rank rows are idx[i]: A_i = pool[idx[i], :in] (R, in), B_i^T = pool[idx[i], in:] (R, out).
        In place into `y` where `inplace`. `idx` (B, R), or (1, R) for one adapter. `spans` (per-row batches):
        the rows to update, as (start, stop, rank) runs of rows; rows outside them are left as they are and a
        run uses its first `rank` columns of `idx` (the rows' own rank: no padding to the batch's largest)."""
        raise NotImplementedError


class TorchGather(SlotKernel):
    """Gather the rows (one `embedding` per pool), then one batched matmul per factor."""

    name = "torch"

    def bias_rows(self, pool, idx):
        return F.embedding(idx, pool)

    def lora_(self, y, x, pool, in_features, idx, inplace, spans=None):
        if idx.shape[0] == 1:  # one adapter for every row: plain matmuls, any input layout
            rows = F.embedding(idx[0], pool)  # (R, in + out): one gather for both factors
            a, bt = rows[:, :in_features], rows[:, in_features:]  # (R, in), (R, out)
            xa = x @ a.t()  # (..., R)
            if inplace:
                y.view(-1, y.shape[-1]).addmm_(xa.reshape(-1, xa.shape[-1]), bt)
                return y
            return y + xa @ bt
        if spans is None:
            spans = [(0, idx.shape[0], idx.shape[1])]
        if not inplace:
            y = y.clone(memory_format=torch.contiguous_format)
        for lo, hi, r in spans:  # rows [lo, hi): one gather and two batched matmuls at their rank r
            rows = F.embedding(idx[lo:hi, :r], pool)  # (b, r, in + out)
            xa = torch.bmm(x[lo:hi], rows[..., :in_features].transpose(1, 2))  # (b, T, r)
            y[lo:hi].baddbmm_(xa, rows[..., in_features:])  # (b, T, out) += (b, T, r) @ (b, r, out)
        return y


KERNELS: dict[str, SlotKernel] = {"torch": TorchGather()}


def kernel(name: str) -> SlotKernel:
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown slot kernel {name!r}; available: {sorted(KERNELS)}") from None


# --------------------------------------------------------------------------------------- per-forward views
class _Handle:
    """One module's pools, columns and kernel (rebuilt when the table's columns change)."""

    __slots__ = ("m", "bias_col", "lora_cols", "kernel", "index", "width", "pos")

    def __init__(self, m: _Module, k: SlotKernel):
        self.m, self.bias_col, self.lora_cols, self.kernel, self.index = m, m.bias_col, m.lora_cols, k, m.index
        self.width = m.bias.widths[0] if m.bias is not None else 0
        self.pos = m.bias_pos


class _Bound(Mapping):
    """The route's `deltas` for one forward: module key -> its `SlotDelta` over this batch's table rows, for
    the modules some row's adapter adapts."""

    def __init__(self, handles: dict[str, _Handle], cols: torch.Tensor, active: list[int], pools: SlotPools,
                 spans: dict[int, list[tuple[int, int, int]]] | None = None):
        self.handles, self.cols, self.active, self.pools = handles, cols, active, pools  # cols: (B, C) or (1, C)
        self.spans = spans  # module index -> its LoRA's runs of rows (None: every row, at the largest rank)
        self.n = len(active) // 2
        self._bias: dict[int, torch.Tensor] = {}

    def bias_rows(self, width: int) -> torch.Tensor:
        """(B, M, width): the bias rows of every module of this width, gathered once per forward."""
        rows = self._bias.get(width)
        if rows is None:
            p = self.pools
            rows = self._bias[width] = p.kernel.bias_rows(p.bias[width].data[0], self.cols[:, p.bias_cols[width]])
        return rows

    def get(self, key, default=None):
        h = self.handles.get(key)
        if h is None:
            return default
        rank, bias = self.active[h.index], self.active[self.n + h.index]
        if not rank and not bias:
            return default
        return SlotDelta(h, self, rank, bias)

    def __getitem__(self, key):
        d = self.get(key)
        if d is None:
            raise KeyError(key)
        return d

    def __iter__(self) -> Iterator[str]:
        return (k for k, h in self.handles.items() if self.active[h.index] or self.active[self.n + h.index])

    def __len__(self) -> int:
        return sum(1 for _ in self)


class SlotDelta:
    """A module's update for one forward from its pools (duck-types `layers.Delta`): `bias` is the
    gathered per-row bias (B, 1, out), or one (out,) for a single-adapter batch, once folded."""

    __slots__ = ("h", "bound", "cols", "rank", "has_bias", "bias", "folded")

    def __init__(self, h: _Handle, bound: _Bound, rank: int, has_bias: bool):
        self.h, self.bound, self.cols = h, bound, bound.cols
        self.rank, self.has_bias = rank, has_bias  # rank: the batch's largest here
        self.bias, self.folded = None, False

    def _bias(self) -> torch.Tensor | None:
        h = self.h
        if not self.has_bias:
            return None
        rows = self.bound.bias_rows(h.width)[:, h.pos]  # (B, out), a view
        if rows.shape[0] == 1:
            return rows[0]  # (out,)
        return rows.unsqueeze(1)  # (B, 1, out)

    def fold_bias(self, bias: torch.Tensor | None, *, per_row: bool = True):
        """(the bias for the module's own op, what is left to `apply`), as `layers.Delta.fold_bias`."""
        mine = self._bias()
        if mine is None:
            return bias, self
        self.folded = True
        if mine.dim() == 1:  # one adapter: its bias delta folds into the module's bias
            return (mine if bias is None else bias + mine), (self if self.rank else None)
        if per_row and bias is not None and not torch.is_grad_enabled():
            self.bias = mine + bias  # the module's matmul writes no bias; the per-row add writes both
            return None, self
        self.bias = mine
        return bias, self

    def apply(self, x: torch.Tensor, y: torch.Tensor, *, fresh: bool = True) -> torch.Tensor:
        from .layers import MixedBatchUnsupported

        h, cols = self.h, self.cols
        bias = self.bias if self.folded else self._bias()
        rows = cols.shape[0]
        if rows > 1 and (x.dim() != 3 or x.shape[0] != rows):
            raise MixedBatchUnsupported(f"input of shape {tuple(x.shape)} is not per-row over {rows} rows")
        inplace = fresh and not torch.is_grad_enabled() and y.is_contiguous()
        if self.rank:
            lo = h.lora_cols.start
            spans = self.bound.spans.get(h.index, []) if self.bound.spans is not None else None
            y = h.kernel.lora_(y, x, h.m.lora.data[0], h.m.in_features, cols[:, lo: lo + self.rank], inplace,
                               spans)
            inplace = not torch.is_grad_enabled()  # y is fresh now, in any case
        if bias is not None:
            y = y.add_(bias) if inplace else y + bias
        return y
