"""The adapted modules: a Linear / LayerNorm wrapper that adds a bias delta and a LoRA update, and a
layer gate that lets a forward pass start above, or stop at, a given layer.

A wrapper's delta comes from one of two places:
- its own parameters (training: one adapter, `attach()`ed, trained by the optimizer);
- the current `Route` (serving: the engine's bank puts each module's per-row tensors in a context
  variable for one forward pass, so one backbone serves rows of many adapters at once).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

TRAIN_DTYPE = torch.float32  # every trainable tensor, whatever the base's dtype


@dataclass
class Delta:
    """One module's update for one forward pass. Unbatched (shared by every row) or per-row:
    bias (out,) or (B, 1, out); A (r, in) or (B, r, in); B (out, r) or (B, out, r), already scaled."""

    bias: torch.Tensor | None = None
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None

    def apply(self, x: torch.Tensor, y: torch.Tensor, *, fresh: bool = True) -> torch.Tensor:
        """y + x A^T B^T + bias. With autograd off and `y` a fresh output of the module's own op, `y` is
        updated in place: the LoRA product accumulates into it inside the matmul (no temporaries)."""
        per_row = self.bias is not None and self.bias.dim() == 3 or self.A is not None and self.A.dim() == 3
        if per_row:
            rows = (self.bias if self.bias is not None else self.A).shape[0]
            if x.dim() != 3 or x.shape[0] != rows:
                raise MixedBatchUnsupported(f"input of shape {tuple(x.shape)} is not per-row over {rows} rows")
        inplace = fresh and not torch.is_grad_enabled() and y.is_contiguous()
        if self.A is not None:
            xa = x @ self.A.transpose(-1, -2)  # (B, T, r): (B, T, in) @ (B, in, r), or broadcast (r, in)
            if not inplace:
                y = y + xa @ self.B.transpose(-1, -2)
            elif per_row:
                y.baddbmm_(xa, self.B.transpose(-1, -2))  # (B, T, out) += (B, T, r) @ (B, r, out)
            else:
                y.view(-1, y.shape[-1]).addmm_(xa.reshape(-1, xa.shape[-1]), self.B.t())
        if self.bias is not None:
            y = y.add_(self.bias) if inplace else y + self.bias
        return y

    def fold_bias(self, bias: torch.Tensor | None, *, per_row: bool = True) -> tuple[torch.Tensor | None, Delta | None]:
        """(the bias for the module's own op, what is left to `apply` after it). An unbatched bias delta
        folds into the module's bias. With `per_row` and autograd off, the module's bias moves into the
        per-row one instead (its matmul then writes no bias; the per-row add writes both)."""
        if self.bias is None:
            return bias, self
        if self.bias.dim() == 1:
            rest = Delta(A=self.A, B=self.B) if self.A is not None else None
            return (self.bias if bias is None else bias + self.bias), rest
        if per_row and bias is not None and not torch.is_grad_enabled():
            return None, Delta(self.bias + bias, self.A, self.B)
        return bias, self


class MixedBatchUnsupported(RuntimeError):
    """A module sees an input that is not laid out per row (e.g. DeBERTa's shared relative-position
    projection): the engine then runs that batch one adapter group at a time instead."""


@dataclass
class Route:
    """Per-forward routing: deltas by module key, and which layers run."""

    deltas: dict[str, Delta] = field(default_factory=dict)
    skip_below: int = 0  # layers with a smaller index pass their input through
    inject: torch.Tensor | None = None  # hidden states fed to layer `skip_below` instead of its input
    stop_at: int | None = None  # layers >= stop_at pass through; the input of layer stop_at is captured
    captured: torch.Tensor | None = None
    # `inject` is inject_rows[inject_index] (rows branched from one state): a linear fed `inject` itself runs
    # its frozen weight on the distinct rows and copies the result out (its deltas still per row)
    inject_rows: torch.Tensor | None = None
    inject_index: torch.Tensor | None = None
    # Set (by another thread) to ask this pass to step aside: the next layer to run raises `LayerYield` with its
    # input instead, and a later pass resumes there (`skip_below`, `inject`). None: the pass never steps aside.
    yield_to: threading.Event | None = None


class LayerYield(Exception):  # noqa: N818  (a control-flow signal, not an error)
    """A pass stepped aside before layer `layer` (its `Route.yield_to` was set); `hidden` is that layer's input."""

    def __init__(self, layer: int, hidden: torch.Tensor):
        super().__init__(f"stepped aside before layer {layer}")
        self.layer, self.hidden = layer, hidden


_ROUTE: contextvars.ContextVar[Route | None] = contextvars.ContextVar("spafit_route", default=None)


@contextlib.contextmanager
def route(r: Route) -> Iterator[Route]:
    token = _ROUTE.set(r)
    try:
        yield r
    finally:
        _ROUTE.reset(token)


class AdaptedLinear(nn.Module):
    """y = x W^T + b (+ bias_delta) (+ scaling * dropout(x) A^T B^T). W and b are the frozen base."""

    def __init__(self, base: nn.Linear, key: str):
        super().__init__()
        self.base = base
        self.key = key
        self.bias_delta: nn.Parameter | None = None
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.scaling = 1.0
        self.lora_dropout: nn.Module = nn.Identity()

    # Some model code reads `.weight` / `.bias` of its linears directly: keep them reachable.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def attach(self, *, bias: bool, rank: int = 0, scaling: float = 1.0, dropout: float = 0.0) -> None:
        """Give this module trainable adapter parameters. LoRA starts as a no-op: B = 0 (as in the paper),
        A ~ Kaiming-uniform; the bias delta starts at zero. They are float32 whatever the base's dtype (a
        bf16 / fp16 base keeps its memory saving; the optimizer state and small updates keep full precision)."""
        w = self.base.weight
        if bias:
            self.bias_delta = nn.Parameter(torch.zeros(self.out_features, dtype=TRAIN_DTYPE, device=w.device))
        if rank:
            self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=TRAIN_DTYPE, device=w.device))
            nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=TRAIN_DTYPE, device=w.device))
            self.scaling = scaling
            self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            self.lora_dropout.train(self.base.training)  # in the mode of the model it joins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = _ROUTE.get()
        d = r.deltas.get(self.key) if r is not None else None
        bias = self.base.bias  # bias deltas fold into the linear's own bias: no extra pass over y
        if self.bias_delta is not None:
            bias = self.bias_delta if bias is None else bias + self.bias_delta
            bias = bias.to(self.base.weight.dtype)  # a float32 delta on a bf16 / fp16 base
        if d is not None:
            bias, d = d.fold_bias(bias)
        if r is not None and r.inject_rows is not None and x is r.inject:  # the same input in several rows
            y = F.linear(r.inject_rows, self.base.weight, bias).index_select(0, r.inject_index)
        else:
            y = F.linear(x, self.base.weight, bias)
        if self.lora_A is not None:
            xa = self.lora_dropout(x)
            autocast = torch.is_autocast_enabled(x.device.type)
            if xa.dtype != self.lora_A.dtype and not autocast:
                xa = xa.to(self.lora_A.dtype)
            h = F.linear(xa, self.lora_A)  # (..., r)
            if autocast or y.dtype == h.dtype == self.lora_B.dtype:
                # y + scaling * h B^T in one op: (N, out) + (N, r) @ (r, out)
                y = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.t(),
                                alpha=self.scaling).view(y.shape)
            else:  # float32 factors on a low-precision base: the update in float32, added in the base's dtype
                y = y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)
        if d is not None:
            y = d.apply(x, y)
        return y

    def merged(self) -> nn.Linear:
        """A plain Linear with this module's own delta folded in (for the standalone export)."""
        out = nn.Linear(self.in_features, self.out_features, bias=True,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            w = self.base.weight.clone()
            if self.lora_A is not None:
                w += self.scaling * (self.lora_B @ self.lora_A)
            out.weight.copy_(w)
            b = self.base.bias.clone() if self.base.bias is not None else torch.zeros_like(out.bias)
            if self.bias_delta is not None:
                b += self.bias_delta
            out.bias.copy_(b)
        return out


class AdaptedLayerNorm(nn.Module):
    """LayerNorm with an optional bias delta (BitFit trains LayerNorm biases too)."""

    def __init__(self, base: nn.LayerNorm, key: str):
        super().__init__()
        self.base = base
        self.key = key
        self.bias_delta: nn.Parameter | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def attach(self, *, bias: bool, **_: object) -> None:
        if bias:
            w = self.base.weight
            self.bias_delta = nn.Parameter(torch.zeros(w.shape, dtype=TRAIN_DTYPE, device=w.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = _ROUTE.get()
        d = r.deltas.get(self.key) if r is not None else None
        b = self.base
        if type(b).forward is not nn.LayerNorm.forward:  # a subclass with its own forward: no folding
            y = b(x)
            fresh = self.bias_delta is not None
            if fresh:
                y = y + self.bias_delta.to(y.dtype)
        else:  # bias deltas fold into the normalisation's own bias
            fresh = True
            bias = b.bias
            if self.bias_delta is not None:
                bias = self.bias_delta if bias is None else bias + self.bias_delta
                bias = bias.to(b.weight.dtype if b.weight is not None else x.dtype)
            if d is not None:
                bias, d = d.fold_bias(bias, per_row=False)
            y = F.layer_norm(x, b.normalized_shape, b.weight, bias, b.eps)
        if d is not None:
            y = d.apply(x, y, fresh=fresh)
        return y

    def merged(self) -> nn.LayerNorm:
        b = self.base
        out = nn.LayerNorm(b.normalized_shape, eps=b.eps, elementwise_affine=True,
                           device=b.weight.device, dtype=b.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(b.weight)
            out.bias.copy_(b.bias + (self.bias_delta if self.bias_delta is not None else 0))
        return out


class LayerGate(nn.Module):
    """Wraps encoder layer `index`. Under a Route it can pass its input through (layers below the point
    where a cached or shared hidden state is injected, or above a capture point), so that the frozen
    prefix is computed once. Outside a Route it is the layer itself."""

    def __init__(self, layer: nn.Module, index: int):
        super().__init__()
        self.layer = layer
        self.index = index
        self._tuple_len: int | None = None  # 0: the layer returns a tensor; n: a tuple of n

    def _passthrough(self, hidden: torch.Tensor):
        if not self._tuple_len:
            return hidden
        return (hidden,) + (None,) * (self._tuple_len - 1)

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        r = _ROUTE.get()
        if r is None:
            return self._run(hidden, *args, **kwargs)
        if r.stop_at is not None and self.index >= r.stop_at:
            if self.index == r.stop_at:
                r.captured = hidden
            if self._tuple_len is None:  # learn the output format once, on a real call
                self._run(hidden, *args, **kwargs)
            return self._passthrough(hidden)
        if self.index < r.skip_below:
            if self._tuple_len is None:
                self._run(hidden, *args, **kwargs)
            return self._passthrough(hidden)
        if r.inject is not None and self.index == r.skip_below:
            hidden = r.inject
        if r.yield_to is not None and r.yield_to.is_set():
            raise LayerYield(self.index, hidden)
        return self._run(hidden, *args, **kwargs)

    def _run(self, hidden, *args, **kwargs):
        out = self.layer(hidden, *args, **kwargs)
        if self._tuple_len is None:
            self._tuple_len = len(out) if isinstance(out, tuple) else 0
        return out
