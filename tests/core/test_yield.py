"""A pass that steps aside for a light tenant (BatchingConfig.yield_to_light): the engine suspends a pass at a
layer boundary and resumes it exactly, and the batcher runs the light tenant's rows in between."""

from __future__ import annotations

import threading

import pytest
import torch

from spafit_core.batching import BatchingConfig, MicroBatcher
from spafit_core.engine import PassSuspended, Row, pass_control
from spafit_core.layers import LayerGate
from tests.core.test_batching import assert_same_predictions
from tests.core.test_engine import METHODS, TEXTS, engine_with_adapters


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    return engine_with_adapters(tiny_dirs("bert"), len(METHODS))


def gates(engine) -> list[LayerGate]:
    bb = engine.backbone()
    return sorted((m for m in bb.base.modules() if isinstance(m, LayerGate)), key=lambda g: g.index)


def mixed_rows(engine) -> list[Row]:
    """Rows of every adapter (n1/n2, ranks, targets and heads all differ), interleaved so the engine reorders
    them by LoRA rank."""
    rows = []
    for i, text in enumerate(TEXTS * 2):
        a = engine.adapter(f"t{i % len(METHODS)}")
        rows.append(Row(a, engine.encode(a, [text])[0]))
    return rows


class LayerCalls:
    """Counts the runs of each encoder layer; once layer `at` has run, sets `event` (its first run) and calls
    `then(n)` (its n-th run, every run)."""

    def __init__(self, engine, event: threading.Event | None = None, at: int | None = None, then=None):
        self.counts = [0] * len(gates(engine))
        self.handles = []
        for g in gates(engine):
            def hook(_module, _args, _out, i=g.index):
                self.counts[i] += 1
                if i == at:
                    if then is not None:
                        then(self.counts[i])
                    if event is not None:
                        event.set()
            self.handles.append(g.layer.register_forward_hook(hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("at", [None, 0, 1, 2])
def test_a_pass_stepped_aside_at_any_layer_resumes_to_exactly_the_uninterrupted_logits(engine, at):
    rows = mixed_rows(engine)
    want = engine.forward(rows)
    n_layers = len(gates(engine))
    event = threading.Event()
    if at is None:
        event.set()  # set before the pass: it steps aside before its first layer
    calls = LayerCalls(engine, event, at)
    try:
        with pytest.raises(PassSuspended) as stepped, pass_control(yield_to=event):
            engine.forward(rows)
        state = stepped.value.state
        assert state.layer == (0 if at is None else at + 1)
        assert sorted(state.pos) == list(range(len(rows))) and state.pos != list(range(len(rows)))  # reordered
        with pass_control(resume=state):
            got = engine.forward(rows)
    finally:
        calls.remove()
    assert calls.counts == [1] * n_layers  # every layer ran once: nothing computed twice
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_a_pass_resumes_exactly_after_its_adapters_moved_in_the_pools(tiny_dirs):
    """Between stepping aside and going on, adapters of the pass are evicted (the light pass could need their
    slots): the rows hold their adapters, the pass borrows slots again, and the saved rows follow its order."""
    engine = engine_with_adapters(tiny_dirs("bert"), len(METHODS))
    rows = mixed_rows(engine)
    want = engine.forward(rows)
    event = threading.Event()
    event.set()
    with pytest.raises(PassSuspended) as stepped, pass_control(yield_to=event):
        engine.forward(rows)
    for name in ("t0", "t2", "t4"):
        assert engine.evict(name)
    with pass_control(resume=stepped.value.state):
        got = engine.forward(rows)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def _batcher(engine, **config) -> MicroBatcher:
    return MicroBatcher(engine, BatchingConfig(max_batch_size=32, max_wait_ms=1, shared_batch_size=4, **config))


A_ROWS = TEXTS * 5 + TEXTS[:2]  # 32 rows: a full pass


def backlog(batcher) -> list:
    """Tenant a's 64 rows (two full passes, so a is a backlogged tenant, not a light one), queued before start."""
    return [batcher.submit("t0", A_ROWS, tenant="a") for _ in range(2)]


def test_a_light_tenants_rows_run_while_the_pass_in_flight_steps_aside_then_it_goes_on(engine):
    """Tenant a's first 32-row pass (of 64 rows queued) is in flight when tenant b's request arrives (after its
    layer 1): the pass steps aside before layer 2, b's rows run in a pass of their own, then a's pass goes on
    from layer 2. b is answered before a; every answer is the engine's own; each layer ran once per pass."""
    want_a, want_b = engine.predict("t0", A_ROWS), engine.predict("t1", TEXTS[:2])
    batcher = _batcher(engine)
    b: list = []
    b_first: list[bool] = []
    calls = LayerCalls(engine, at=1, then=lambda n: n == 1 and b.append(batcher.submit("t1", TEXTS[:2], tenant="b")))
    try:
        a = backlog(batcher)
        a[0].add_done_callback(lambda _: b_first.append(b[0].done()))  # b arrived during a[0]'s pass
        batcher.start()
        got_a = [f.result(timeout=30) for f in a]
        got_b = b[0].result(timeout=30)
    finally:
        batcher.stop()
        calls.remove()
    for got in got_a:
        assert_same_predictions(got, want_a)
    assert_same_predictions(got_b, want_b)
    assert batcher.stats["yields"] == 1
    # Each pass (a's first, split at layer 2; b's; a's others, small while b is in its window) ran each layer once
    assert calls.counts == [batcher.stats["batches"]] * len(gates(engine))
    assert b_first == [True]  # b answered before the pass it arrived in


def test_a_pass_steps_aside_once_and_not_for_its_own_tenant_or_a_flood(engine):
    """Arrivals that do not make the pass in flight step aside: more rows of a tenant already in it; a new
    tenant with more rows than a small pass (a flood's first burst); a light tenant during a pass that already
    stepped aside once (it goes on; the newcomer runs next)."""
    batcher = _batcher(engine)
    late: list = []

    def arrivals(n):
        if n == 1:
            late.append(batcher.submit("t0", TEXTS[:1], tenant="a"))  # a is in the pass
            late.append(batcher.submit("t2", TEXTS * 2, tenant="c"))  # 12 rows: more than a small pass
    calls = LayerCalls(engine, at=0, then=arrivals)
    try:
        a = backlog(batcher)
        batcher.start()
        for f in a:
            f.result(timeout=30)
        for f in late:
            f.result(timeout=30)
    finally:
        batcher.stop()
        calls.remove()
    assert len(late) == 2 and batcher.stats["yields"] == 0

    # a's pass steps aside for b (after layer 1); d arrives while it goes on (b answered, layer 3 running again):
    # the resumed pass is not asked to step aside a second time, d runs after it.
    batcher = _batcher(engine)
    light: list = []

    def first(n):
        if n == 1:
            light.append(batcher.submit("t1", TEXTS[:1], tenant="b"))

    def during_resumed(_n):
        if len(light) == 1 and light[0].done():
            light.append(batcher.submit("t3", TEXTS[:1], tenant="d"))
    calls = LayerCalls(engine, at=1, then=first)
    second = LayerCalls(engine, at=len(gates(engine)) - 1, then=during_resumed)
    try:
        a = backlog(batcher)
        batcher.start()
        for f in a:
            f.result(timeout=30)
        for f in light:
            f.result(timeout=30)
    finally:
        batcher.stop()
        calls.remove()
        second.remove()
    assert len(light) == 2  # d arrived during a's resumed pass
    assert batcher.stats["yields"] == 1


def test_no_pass_steps_aside_when_yielding_is_off(engine):
    batcher = _batcher(engine, yield_to_light=False)
    b: list = []
    calls = LayerCalls(engine, at=1, then=lambda n: n == 1 and b.append(batcher.submit("t1", TEXTS[:2], tenant="b")))
    try:
        a = backlog(batcher)
        batcher.start()
        for f in a:
            f.result(timeout=30)
        b[0].result(timeout=30)
    finally:
        batcher.stop()
        calls.remove()
    assert batcher.stats["yields"] == 0
