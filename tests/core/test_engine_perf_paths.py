"""The engine's performance paths: adapters held in slot pools (read back as packed buffers in shared
layouts), one padded head module for every head, in-place delta application, and bias deltas folded into
the module's own op."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load
from torch import nn

from spafit_core import TaskSpec
from spafit_core.engine import Engine, Row, _slots
from spafit_core.layers import AdaptedLayerNorm, AdaptedLinear, Delta, Route, route
from tests.core.test_engine import METHODS, TASKS, TEXTS, loaded_engine, random_adapter


@pytest.fixture(scope="module")
def adapters(tiny_dirs):
    path = tiny_dirs("bert")
    return {f"p{i}": random_adapter(path, m, TASKS[i % len(TASKS)], seed=50 + i) for i, m in enumerate(METHODS)}


@pytest.fixture
def engine(adapters, tiny_bert):
    return loaded_engine(tiny_bert, adapters)


def test_a_resident_adapter_lives_in_pool_rows_that_read_back_as_its_tensors(engine, adapters):
    labels = engine.bank().pools.labels
    for name, (model, _, w) in adapters.items():
        a = engine.adapter(name)
        assert a.buffer is None and a.slot is not None and a.pools is engine.bank().pools
        tensors = st_load(w)
        scaling = model.plan.scaling
        head = sum(t.numel() for k, t in tensors.items() if k.startswith("head."))
        deltas = sum(t.numel() for k, t in tensors.items() if not k.startswith("head."))
        # head rows are padded to the most labels resident: counted at that size
        assert deltas * 4 < a.nbytes <= (deltas + head * labels) * 4
        for key, (b, A, B) in a.deltas.items():
            for t, kind, scale in ((b, "bias_delta", 1.0), (A, "lora_A", 1.0), (B, "lora_B", scaling)):
                if t is None:
                    assert f"{key}.{kind}" not in tensors
                else:
                    assert torch.allclose(t, tensors[f"{key}.{kind}"] * scale, atol=0, rtol=1e-6)
        for k, t in a.head_state.items():
            assert torch.equal(t, tensors["head." + k])


def test_adapters_of_the_same_shape_share_one_layout(tiny_bert):
    e = Engine(device="cpu", default_base_model=tiny_bert)
    method, task = dict(name="spafit", n1=1, n2=2, rank=2), TaskSpec(labels=("a", "b"))
    for i in range(3):
        _, cfg, w = random_adapter(tiny_bert, method, task, seed=i)
        e.load(f"s{i}", cfg, w)
    _, cfg, w = random_adapter(tiny_bert, dict(method, rank=3), task, seed=9)
    e.load("other", cfg, w)
    layouts = [e.adapter(n).layout for n in ("s0", "s1", "s2", "other")]
    assert layouts[0] is layouts[1] is layouts[2] and layouts[3] is not layouts[0]
    assert len({e.adapter(n).slot for n in ("s0", "s1", "s2", "other")}) == 4


def test_moving_an_adapter_copies_its_buffer_and_keeps_the_views_consistent(engine):
    a = engine.adapter("p0")
    packed = a.to(torch.device("cpu"))  # read back from the pools: a detached copy
    assert packed.slot is None and packed.buffer is not None and packed.to(torch.device("cpu")) is packed
    half = a.to(torch.device("cpu"), torch.float64)
    assert half.buffer.dtype == torch.float64 and half.nbytes == packed.nbytes * 2
    for va, vb in zip(a.deltas.values(), half.deltas.values(), strict=True):
        for x, y in zip(va, vb, strict=True):
            assert (x is None) == (y is None) and (x is None or torch.equal(x.double(), y))


def test_heads_share_one_padded_module_and_stay_per_adapter(engine):
    """Every head runs in one call of the head module padded to the most labels, yet each row gets its own
    adapter's logits, as many as its task has labels."""
    a, b = engine.adapter("p0"), engine.adapter("p4")  # both 2-label classification heads
    assert engine.bank().pools.labels == 3  # the zoo's largest head
    feats = engine.encode(a, TEXTS[:2])
    mixed = engine.forward([Row(a, feats[0]), Row(b, feats[0]), Row(a, feats[1])])
    assert (mixed[0] - engine.forward([Row(a, feats[0])])[0]).abs().max() <= 1e-5
    assert (mixed[1] - engine.forward([Row(b, feats[0])])[0]).abs().max() <= 1e-5
    assert not torch.allclose(mixed[0], mixed[1])


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_delta_in_place_equals_out_of_place(per_row, with_bias):
    g = torch.Generator().manual_seed(0)
    Bt, T, i, o, r = 3, 5, 8, 6, 2
    x, y = torch.randn(Bt, T, i, generator=g), torch.randn(Bt, T, o, generator=g)
    lead = (Bt,) if per_row else ()
    d = Delta(bias=torch.randn(*lead, *((1,) if per_row else ()), o, generator=g) if with_bias else None,
              A=torch.randn(*lead, r, i, generator=g), B=torch.randn(*lead, o, r, generator=g))
    want = d.apply(x, y.clone())  # autograd on: out of place
    with torch.no_grad():
        y2 = y.clone()
        got = d.apply(x, y2)
    assert got.data_ptr() == y2.data_ptr()  # updated in place
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():
        kept = y.clone()
        d.apply(x, kept, fresh=False)
    assert torch.equal(kept, y)  # not ours: left alone


def test_folded_bias_and_lora_train_like_the_textbook_formula():
    torch.manual_seed(0)
    lin = AdaptedLinear(nn.Linear(8, 6).requires_grad_(False), "k")
    lin.attach(bias=True, rank=2, scaling=2.0)
    with torch.no_grad():
        lin.bias_delta.normal_()
        lin.lora_B.normal_()
    x = torch.randn(3, 4, 8)
    y = lin(x)
    ref = x @ lin.base.weight.t() + lin.base.bias + lin.bias_delta + 2.0 * (x @ lin.lora_A.t() @ lin.lora_B.t())
    assert torch.allclose(y, ref, atol=1e-5)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in (lin.bias_delta, lin.lora_A, lin.lora_B)]
    for p in (lin.bias_delta, lin.lora_A, lin.lora_B):
        p.grad = None
    (x @ lin.base.weight.t() + lin.base.bias + lin.bias_delta
     + 2.0 * (x @ lin.lora_A.t() @ lin.lora_B.t())).square().sum().backward()
    for got, p in zip(grads, (lin.bias_delta, lin.lora_A, lin.lora_B), strict=True):
        assert torch.allclose(got, p.grad, atol=1e-4)


def test_layer_norm_bias_delta_folds_and_a_subclass_keeps_its_own_forward():
    class Shifted(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) + 1.0

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    for base, extra in ((nn.LayerNorm(8), 0.0), (Shifted(8), 1.0)):
        ln = AdaptedLayerNorm(base, "k")
        ln.attach(bias=True)
        with torch.no_grad():
            ln.bias_delta.normal_()
        want = nn.functional.layer_norm(x, (8,), base.weight, base.bias) + extra + ln.bias_delta
        assert torch.allclose(ln(x), want, atol=1e-6)
        per_row = Delta(bias=torch.randn(2, 1, 8))
        with torch.no_grad(), route(Route(deltas={"k": per_row})):
            got = ln(x)
        assert torch.allclose(got, want + per_row.bias, atol=1e-6)


def test_mixed_route_folds_per_row_bias_exactly(engine):
    """Per-row deltas over adapters whose biases cover different modules: the folded path gives each
    row exactly its own adapter's result."""
    names = list(engine.bank().names())
    rows = [Row(engine.adapter(n), engine.encode(engine.adapter(n), [TEXTS[i % len(TEXTS)]])[0])
            for i, n in enumerate(names)]
    pools = engine.bank().pools
    with pools.lock, _slots(pools, [r.adapter for r in rows]) as (row_slot, distinct):
        assert row_slot.shape == (len(rows),)
        for d in pools.route(row_slot, distinct).values():  # per-row bias rows, the module's own bias moved in
            _, rest = d.fold_bias(torch.zeros(d.h.m.bias.widths[0]) if d.h.bias_col is not None else None)
            assert rest is None or rest.bias is None or rest.bias.dim() == 3
    mixed = engine.forward(rows)
    for r, got in zip(rows, mixed, strict=True):
        assert (got - engine.forward([r])[0]).abs().max() <= 1e-5


def test_single_adapter_route_matches_the_adapters_own_model(engine, adapters):
    for name, (model, _, _) in adapters.items():
        a = engine.adapter(name)
        for text in TEXTS[:2]:
            batch = dict(model.tokenizer([text], truncation=True, max_length=32, return_tensors="pt"))
            with torch.no_grad():
                want = model(batch)[0]
            got = engine.forward([Row(a, engine.encode(a, [text])[0])])[0]
            assert (got - want).abs().max() <= 1e-5

