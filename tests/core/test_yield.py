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
    return MicroBatcher(engine, BatchingConfig(**{"max_batch_size": 32, "max_wait_ms": 1, "shared_batch_size": 4,
                                                  **config}))


A_ROWS = TEXTS * 5 + TEXTS[:2]  # 32 rows: a full pass


def backlog(batcher) -> list:
    """Tenant a's 64 rows (two full passes, so a is a backlogged tenant, not a light one), queued before start."""
    return [batcher.submit("t0", A_ROWS, tenant="a") for _ in range(2)]


def serve(batcher, hooks: list, late: list, queued=None) -> tuple[list, list]:
    """Tenant a's `backlog` queued (then `queued(a's futures)`, before the start), the batcher started: a's
    answers, then those of the futures the hooks submitted meanwhile (`late`); whatever happens, the batcher is
    stopped and the hooks removed."""
    try:
        a = backlog(batcher)
        if queued is not None:
            queued(a)
        batcher.start()
        got_a = [f.result(timeout=30) for f in a]
        return got_a, [f.result(timeout=30) for f in late]
    finally:
        batcher.stop()
        for h in hooks:
            h.remove()


def test_a_light_tenants_rows_run_while_the_pass_in_flight_steps_aside_then_it_goes_on(engine):
    """Tenant a's first 32-row pass (of 64 rows queued) is in flight when tenant b's request arrives (after its
    layer 1): the pass steps aside before layer 2, b's rows run in a pass of their own, then a's pass goes on
    from layer 2. b is answered before a; every answer is the engine's own; each layer ran once per pass."""
    want_a, want_b = engine.predict("t0", A_ROWS), engine.predict("t1", TEXTS[:2])
    batcher = _batcher(engine)
    b: list = []
    b_first: list[bool] = []
    calls = LayerCalls(engine, at=1, then=lambda n: n == 1 and b.append(batcher.submit("t1", TEXTS[:2], tenant="b")))
    def b_first_when_a_is_answered(a):  # b arrives during a[0]'s pass
        a[0].add_done_callback(lambda _: b_first.append(b[0].done()))
    got_a, (got_b,) = serve(batcher, [calls], b, b_first_when_a_is_answered)
    for got in got_a:
        assert_same_predictions(got, want_a)
    assert_same_predictions(got_b, want_b)
    assert batcher.stats["yields"] == 1
    # Each pass (a's first, split at layer 2; b's; a's others, small while b is in its window) ran each layer once
    assert calls.counts == [batcher.stats["batches"]] * len(gates(engine))
    assert b_first == [True]  # b answered before the pass it arrived in


def test_a_pass_does_not_step_aside_for_its_own_tenant_or_a_flood(engine):
    """Arrivals that do not make the pass in flight step aside: more rows of a tenant already in it; a new
    tenant with more rows than a small pass (a flood's first burst)."""
    batcher = _batcher(engine)
    late: list = []

    def arrivals(n):
        if n == 1:
            late.append(batcher.submit("t0", TEXTS[:1], tenant="a"))  # a is in the pass
            late.append(batcher.submit("t2", TEXTS * 2, tenant="c"))  # 12 rows: more than a small pass
    calls = LayerCalls(engine, at=0, then=arrivals)
    serve(batcher, [calls], late)
    assert len(late) == 2 and batcher.stats["yields"] == 0


def test_a_pass_steps_aside_at_most_max_steps_aside_times(engine):
    """A new light tenant arrives at every layer a's 32-row pass runs: the pass steps aside MAX_STEPS_ASIDE times
    (after layers 0, 1, 2), then goes on to its end whatever arrives; every light tenant is answered exactly."""
    from spafit_core.batching import MAX_STEPS_ASIDE

    batcher = _batcher(engine)
    light: list = []

    def arrive(_module, _args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        if hidden.shape[0] == len(A_ROWS):  # a's first pass (the others are small: the light tenants' window)
            light.append(batcher.submit("t1", TEXTS[:1], tenant=f"light{len(light)}"))
    handles = [g.layer.register_forward_hook(arrive) for g in gates(engine)]
    _, got = serve(batcher, handles, light)
    assert MAX_STEPS_ASIDE == 3 and len(gates(engine)) == 4
    assert len(light) == 4 and batcher.stats["yields"] == MAX_STEPS_ASIDE
    for g in got:
        assert_same_predictions(g, engine.predict("t1", TEXTS[:1]))


def test_no_pass_steps_aside_when_yielding_is_off(engine):
    batcher = _batcher(engine, yield_to_light=False)
    b: list = []
    calls = LayerCalls(engine, at=1, then=lambda n: n == 1 and b.append(batcher.submit("t1", TEXTS[:2], tenant="b")))
    serve(batcher, [calls], b)
    assert len(b) == 1 and batcher.stats["yields"] == 0


def test_light_rows_that_arrive_during_the_light_pass_also_run_before_the_pass_goes_on(engine):
    """a's 32-row pass steps aside for b; c (another light tenant) arrives during b's pass, when nothing may step
    aside: c's pass still runs before a's goes on (the kept pass checks for light rows waiting before it
    resumes)."""
    batcher = _batcher(engine)
    light: list = []
    ends: list[int] = []  # rows of each pass, at its last layer

    def first(_module, _args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        if hidden.shape[0] == len(A_ROWS) and not light:  # a's first pass, after layer 0
            light.append(batcher.submit("t1", TEXTS[:1], tenant="b"))
        elif hidden.shape[0] == 1 and len(light) == 1:  # b's pass
            light.append(batcher.submit("t2", TEXTS[1:3], tenant="c"))

    def last(_module, _args, out):
        ends.append((out[0] if isinstance(out, tuple) else out).shape[0])
    g = gates(engine)
    handles = [g[0].layer.register_forward_hook(first), g[-1].layer.register_forward_hook(last)]
    _, (got_b, got_c) = serve(batcher, handles, light)
    assert ends[:3] == [1, 2, len(A_ROWS)], ends  # b, c, then a's pass goes on
    assert batcher.stats["yields"] == 2  # stepped aside for b, kept aside for c
    assert_same_predictions(got_b, engine.predict("t1", TEXTS[:1]))
    assert_same_predictions(got_c, engine.predict("t2", TEXTS[1:3]))
