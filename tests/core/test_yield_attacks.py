"""Attacks on stepping aside (BatchingConfig.yield_to_light): exactness across architectures, the batcher's
bookkeeping of parked passes (cancellation, hot-swap, eviction, poisoned rows, stop / restart, dead thread),
starvation, stats and the arrival races."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from spafit_core.batching import MAX_STEPS_ASIDE, BatchingConfig, MicroBatcher
from spafit_core.engine import PassSuspended, Row, pass_control
from spafit_core.engine.forward import _PASS
from spafit_core.errors import PredictionFailedError
from tests.core.test_batching import assert_same_predictions
from tests.core.test_engine import METHODS, TASKS, TEXTS, engine_with_adapters, random_adapter
from tests.core.test_yield import A_ROWS, _batcher, backlog, gates, serve


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    return engine_with_adapters(tiny_dirs("bert"), len(METHODS))


def on_layer(engine, index: int, fn):
    """Call fn(batch rows, padded length) after encoder layer `index` runs; returns the hook handle."""
    def hook(_m, _a, out):
        h = out[0] if isinstance(out, tuple) else out
        fn(h.shape[0], h.shape[1])
    return gates(engine)[index].layer.register_forward_hook(hook)


# ------------------------------------------------------------------ engine level: every architecture, every layer
@pytest.mark.parametrize("arch", ["roberta", "distilbert", "electra", "deberta-v2"])
def test_suspend_and_resume_is_exact_on_every_architecture_and_layer(tiny_dirs, arch):
    """Mixed adapters (ranks, n1/n2, heads all differ; DeBERTa falls back per adapter group), rows of different
    lengths: stepping aside before any layer (0..L-1), then resuming, gives the uninterrupted logits."""
    path = tiny_dirs(arch)
    e = engine_with_adapters(path, len(METHODS))
    rows = []
    for i, text in enumerate(TEXTS * 2):
        a = e.adapter(f"t{i % len(METHODS)}")
        rows.append(Row(a, e.encode(a, [text])[0]))
    want = e.forward(rows)
    n = len(gates(e))
    for at in range(n):
        event = threading.Event()
        h = on_layer(e, at - 1, lambda *_, ev=event: ev.set()) if at else None
        if not at:
            event.set()
        try:
            try:
                with pass_control(yield_to=event):
                    got = e.forward(rows)  # DeBERTa's fallback never steps aside: it just completes
                state = None
            except PassSuspended as s:
                state = s.state
        finally:
            if h is not None:
                h.remove()
        if state is not None:
            assert state.layer == at
            with pass_control(resume=state):
                got = e.forward(rows)
        else:
            assert arch == "deberta-v2"
        for g, w in zip(got, want, strict=True):
            assert (g - w).abs().max() <= 1e-5


def test_resume_state_in_one_thread_never_reaches_another_threads_forward(engine):
    """pass_control is per thread (a context variable): another thread's forward neither steps aside for this
    thread's set event nor takes its resume state; nested pass_control() switches both off."""
    rows = [Row(engine.adapter("t0"), f) for f in engine.encode(engine.adapter("t0"), TEXTS)]
    want = engine.forward(rows)
    ev = threading.Event()
    ev.set()
    out: list = []
    with pass_control(yield_to=ev):
        t = threading.Thread(target=lambda: out.append(engine.forward(rows)))
        t.start()
        t.join()
        with pass_control():
            inner = engine.forward(rows)
        with pytest.raises(PassSuspended):
            engine.forward(rows)
    assert _PASS.get() == (None, None)
    for g, w, i in zip(out[0], want, inner, strict=True):
        assert torch.equal(g, w) and torch.equal(i, w)


def test_fan_out_and_training_forward_never_step_aside(engine, tiny_dirs):
    """Fan-out (staged Routes of its own) and a training model (LayerGate without a Route) under a set
    yield event: no step aside, same answers."""
    want = engine.fan_out_many(["t0", "t1", "t3"], TEXTS[:3])
    ev = threading.Event()
    ev.set()
    with pass_control(yield_to=ev):
        got = engine.fan_out_many(["t0", "t1", "t3"], TEXTS[:3])
    for g, w in zip(got, want, strict=True):
        for k in w:
            assert g[k]["label"] == w[k]["label"] and abs(g[k]["score"] - w[k]["score"]) <= 1e-6
    m, _, _ = random_adapter(tiny_dirs("bert"), METHODS[0], TASKS[0], seed=3)
    batch = dict(m.tokenizer(TEXTS[:2], padding=True, return_tensors="pt"))
    with torch.no_grad():
        ref = m(batch)
        with pass_control(yield_to=ev):
            again = m(batch)
    assert torch.equal(ref[0], again[0])


# ------------------------------------------------------------------ batcher: parked passes
def test_a_row_dropped_before_a_parked_pass_ran_does_not_break_its_resume(engine):
    """A take packed into two passes (max_tokens): a request with a row in the second is cancelled while the
    first runs. `_run` drops that row before the second pass (it runs 15 of its 16 rows) and the pass steps aside
    for light tenant b; the batcher parks the rows the pass ran. Found by an attack: it parked the unfiltered 16
    with the 15-row state, the resume mismatched (IndexError in `_forward`), and `_isolate` recomputed the whole
    pass row by row (answers right, the pass computed twice)."""
    want_short, want_long = engine.predict("t0", ["ok"] * 16), engine.predict("t0", [TEXTS[5]] * 15)
    batcher = _batcher(engine, max_tokens=16 * 13)  # 16 "ok" (3 tokens) | 16 long rows (13 tokens)
    short = batcher.submit("t0", ["ok"] * 16, tenant="a")
    long_ = batcher.submit("t0", [TEXTS[5]] * 15, tenant="a")
    gone = batcher.submit("t0", [TEXTS[5]], tenant="a")
    more = batcher.submit("t0", A_ROWS, tenant="a")  # a is backlogged
    light: list = []
    passes: list[tuple[int, int]] = []

    def after_layer0(rows, length):
        passes.append((rows, length))
        if (rows, length) == (16, 3) and not gone.done():
            gone.cancel()  # the client of `gone` went away during the first pass
        if (rows, length) == (15, 13) and not light:
            light.append(batcher.submit("t1", TEXTS[:1], tenant="b"))
    errors: list[Exception] = []
    isolate = batcher._isolate
    batcher._isolate = lambda batch, e: (errors.append(e), isolate(batch, e))[1]
    h = on_layer(engine, 0, after_layer0)
    try:
        batcher.start()
        assert_same_predictions(short.result(timeout=30), want_short)
        assert_same_predictions(long_.result(timeout=30), want_long)
        more.result(timeout=30)
        light[0].result(timeout=30)
    finally:
        batcher.stop()
        h.remove()
    assert light and gone.cancelled()
    assert not errors, f"the resumed pass failed: {errors!r}; then recomputed as {passes[3:]}"
    assert batcher.stats["retries"] == 0 and batcher.stats["failed_rows"] == 0, (batcher.stats, passes)
    assert (1, 13) not in passes, passes  # no one-row recomputation of the long pass


def test_a_light_tenant_arriving_while_the_pass_is_prepared_still_gets_it_to_step_aside(engine, monkeypatch):
    """b's rows arrive after the take that built a's pass was tokenised and before the pass started (`_flight`
    still None): the pass steps aside at once for them. Found by an attack: `_run` cleared the event when it
    started the pass, so the pass never stepped aside and b waited for all of it (issue 12's wait)."""
    batcher = _batcher(engine)
    tokenize = batcher._tokenize
    b: list = []

    def tokenize_then_b_arrives(pending):
        out = tokenize(pending)
        if not b:
            b.append(batcher.submit("t1", TEXTS[:2], tenant="b"))  # arrives while a's take is tokenised
        return out
    monkeypatch.setattr(batcher, "_tokenize", tokenize_then_b_arrives)
    b_first: list[bool] = []
    a = backlog(batcher)
    a[0].add_done_callback(lambda _: b_first.append(b[0].done()))
    batcher.start()
    try:
        for f in a:
            f.result(timeout=30)
        assert_same_predictions(b[0].result(timeout=30), engine.predict("t1", TEXTS[:2]))
    finally:
        batcher.stop()
    assert b_first == [True], "b waited for the whole pass that was being prepared when it arrived"


def test_yields_counts_only_passes_that_stepped_aside(engine):
    """A light tenant arriving during the last layer asks the pass to step aside, but no layer boundary is left:
    the pass completes, and stats['yields'] does not count it (found by an attack: it counted the asking)."""
    batcher = _batcher(engine)
    b: list = []
    stepped: list[int] = []
    last = len(gates(engine)) - 1

    def at_last(rows, _):
        if rows == len(A_ROWS) and not b:
            b.append(batcher.submit("t1", TEXTS[:2], tenant="b"))
    serve(batcher, [on_layer(engine, last, at_last), on_layer(engine, 0, lambda rows, _: stepped.append(rows))], b)
    # every pass ran layer 0 once (none resumed above it): nothing stepped aside
    assert batcher.stats["batches"] == len(stepped)
    assert batcher.stats["yields"] == 0, batcher.stats


@pytest.mark.parametrize("change", ["hot_swap", "evict"])
def test_adapter_swapped_or_evicted_while_parked_answers_from_the_old_version(tiny_dirs, change, monkeypatch):
    """t0 is loaded again with other weights (another rank, 3 labels) or evicted, from another thread, while a's
    pass is parked (between b's pass and a's resume): a's requests, submitted before, get the old version's
    answers, with no retry."""
    e = engine_with_adapters(tiny_dirs("bert"), 2)
    want_a, want_b = e.predict("t0", A_ROWS), e.predict("t1", TEXTS[:2])
    _, cfg, w = random_adapter(tiny_dirs("bert"), METHODS[2], TASKS[1], seed=99)
    batcher = _batcher(e)
    b: list = []
    changer: list[threading.Thread] = []

    def change_it():
        e.load("t0", cfg, w) if change == "hot_swap" else e.evict("t0")

    def at(rows, _):
        if rows == len(A_ROWS) and not b:
            b.append(batcher.submit("t1", TEXTS[:2], tenant="b"))
        elif rows == 2 and b and not changer:  # b's pass: a's is parked; the change waits for b's locks
            changer.append(threading.Thread(target=change_it))
            changer[0].start()
    go_on = batcher._go_on

    def after_the_change(parked):
        if changer:
            changer[0].join(10)
        return go_on(parked)
    monkeypatch.setattr(batcher, "_go_on", after_the_change)
    got, (got_b,) = serve(batcher, [on_layer(e, 0, at)], b)
    assert changer and batcher.stats["yields"] >= 1 and batcher.stats["retries"] == 0
    for g in got:
        assert_same_predictions(g, want_a)  # both a's requests were submitted before the change
    assert_same_predictions(got_b, want_b)
    if change == "hot_swap":  # requests after it get the new one
        assert e.predict("t0", TEXTS[:1])[0]["label"] in ("a", "b", "c")


def test_requests_cancelled_or_expired_while_parked_leave_the_rest_answered(engine):
    batcher = _batcher(engine)
    want = engine.predict("t0", TEXTS)
    b: list = []
    a_small = [batcher.submit("t0", TEXTS, tenant="a", timeout_s=t) for t in (30, 30, 0.3, 30, 30)]
    a_rest = batcher.submit("t0", A_ROWS, tenant="a")
    slept: list = []

    def at(rows, _):
        if rows == len(A_ROWS) and not b:
            b.append(batcher.submit("t1", TEXTS[:2], tenant="b"))
        elif rows == 2 and b and not slept:  # b's pass, a's parked: one request cancelled, one expires
            a_small[1].cancel()
            time.sleep(0.35)
            slept.append(1)
    h = on_layer(engine, 0, at)
    try:
        batcher.start()
        for i, f in enumerate(a_small):
            if i == 1:
                assert f.cancelled()
                continue
            assert_same_predictions(f.result(timeout=30), want)  # the expired one was in flight: answered
        a_rest.result(timeout=30)
        b[0].result(timeout=30)
    finally:
        batcher.stop()
        h.remove()
    assert batcher.stats["yields"] == 1 and batcher.stats["retries"] == 0


def test_a_poisoned_row_failing_after_the_resume_fails_only_its_own_request(engine, monkeypatch):
    """A row that breaks the model at layer 2 is in a pass that stepped aside before layer 2: the failure comes
    on the resume; `_isolate` reruns from scratch per adapter, then per row; only its request fails."""
    poison = engine.encode(engine.adapter("t0"), ["awful actor"])[0]["input_ids"]
    forward = engine.forward
    holding = threading.local()

    def flagged(rows):
        holding.poison = any(r.features["input_ids"] == poison for r in rows)
        return forward(rows)
    monkeypatch.setattr(engine, "forward", flagged)
    want = {f"t{i}": engine.predict(f"t{i}", TEXTS[:4]) for i in range(6)}

    def breaks(_m, _a, _o):
        if getattr(holding, "poison", False):
            raise RuntimeError("The size of tensor a (1024) must match the size of tensor b (512)")
    hb = gates(engine)[2].layer.register_forward_hook(breaks)
    batcher = _batcher(engine)
    good = [batcher.submit(f"t{i}", TEXTS[:4], tenant="a") for i in range(6)]
    bad = batcher.submit("t0", ["awful actor", "ok"], tenant="a")
    more = batcher.submit("t0", [t for t in A_ROWS if t != "awful actor"], tenant="a")
    b: list = []
    h = on_layer(engine, 1, lambda rows, _: rows == 32 and not b and b.append(
        batcher.submit("t1", TEXTS[:2], tenant="b")))
    try:
        batcher.start()
        for i, f in enumerate(good):
            assert_same_predictions(f.result(timeout=30), want[f"t{i}"])
        with pytest.raises(PredictionFailedError):
            bad.result(timeout=30)
        more.result(timeout=30)
        b[0].result(timeout=30)
    finally:
        batcher.stop()
        h.remove()
        hb.remove()
    assert b and batcher.stats["yields"] == 1 and batcher.stats["failed_rows"] == 1


def _park_then(engine, batcher, during_light):
    """a's first pass steps aside for b after layer 0; during b's pass, c (light) arrives (so a's pass stays
    parked one more round) and `during_light()` runs."""
    light: list = []

    def at(rows, _):
        if rows == len(A_ROWS) and not light:
            light.append(batcher.submit("t1", TEXTS[:1], tenant="b"))
        elif rows == 1 and len(light) == 1:
            light.append(batcher.submit("t2", TEXTS[1:3], tenant="c"))
            during_light()
    return light, on_layer(engine, 0, at)


def _all_answered(a: list, light: list, want: list) -> None:
    """a's requests answered exactly (`want` each), and every light tenant's answered."""
    for f in a:
        assert_same_predictions(f.result(timeout=30), want)
    for f in light:
        f.result(timeout=30)


def test_parked_passes_survive_stop_and_are_answered_after_start(engine):
    want = engine.predict("t0", A_ROWS)
    batcher = _batcher(engine)
    stopper: list = []

    def stop_soon():
        t = threading.Thread(target=batcher.stop)
        t.start()
        stopper.append(t)
        while batcher._running:
            time.sleep(0.001)
    light, h = _park_then(engine, batcher, stop_soon)
    try:
        a = backlog(batcher)
        batcher.start()
        for _ in range(500):
            if stopper and not stopper[0].is_alive():
                break
            time.sleep(0.01)
        assert not batcher.alive
        assert batcher._parked and not a[0].done()  # kept, not lost
        batcher.start()
        _all_answered(a, light, want)
    finally:
        batcher.stop()
        h.remove()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_parked_passes_survive_a_dead_thread_and_run_after_ensure_running(engine, monkeypatch):
    want = engine.predict("t0", A_ROWS)
    batcher = _batcher(engine)
    take = batcher._take
    kill = threading.Event()

    def maybe_die(light_only=False):
        if kill.is_set() and light_only:
            kill.clear()
            raise SystemExit("killed")
        return take(light_only=light_only)
    monkeypatch.setattr(batcher, "_take", maybe_die)
    light, h = _park_then(engine, batcher, kill.set)
    try:
        a = backlog(batcher)
        batcher.start()
        batcher._thread.join(30)
        assert not batcher.alive and batcher._parked
        assert batcher.ensure_running()
        _all_answered(a, light, want)
    finally:
        batcher.stop()
        h.remove()


def test_a_stream_of_light_tenants_at_every_layer_never_starves_the_backlog(engine):
    """A new light tenant arrives after every layer of every pass that holds a's rows: a's 64 rows are still all
    answered; no pass steps aside more than MAX_STEPS_ASIDE times."""
    batcher = _batcher(engine)
    light: list = []

    def arrive(rows, _):
        if rows >= 4 and len(light) < 300:  # a's passes (the light ones hold 1 row)
            light.append(batcher.submit("t1", TEXTS[:1], tenant=f"l{len(light)}"))
    handles = [on_layer(engine, i, arrive) for i in range(len(gates(engine)))]
    t0 = time.monotonic()
    got_a, _ = serve(batcher, handles, light)
    assert [len(g) for g in got_a] == [len(A_ROWS)] * 2
    assert time.monotonic() - t0 < 20
    passes_of_a = batcher.stats["batches"] - len(light)  # the light ones ran alone (one row each)
    assert batcher.stats["yields"] <= MAX_STEPS_ASIDE * max(passes_of_a, 1)
    assert batcher.served["a"] == 64


def test_on_batch_seconds_of_a_resumed_pass_leave_out_the_light_pass(engine):
    got: list[tuple[int, int, float]] = []
    batcher = MicroBatcher(engine, BatchingConfig(max_batch_size=32, max_wait_ms=1, shared_batch_size=4),
                           on_batch=lambda *x: got.append(x))
    b: list = []

    def at(rows, _):
        if rows == len(A_ROWS) and not b:
            b.append(batcher.submit("t1", TEXTS[:2], tenant="b"))
        elif rows == 2 and b:
            time.sleep(0.5)  # the light pass is slow
    serve(batcher, [on_layer(engine, 0, at)], b)
    assert got[0][0] == 2  # b's pass first
    first_a = got[1]
    assert first_a[0] == 32 and first_a[2] < 0.4, got  # a's pass: its own time only
    assert sum(x[0] for x in got) == batcher.stats["rows"] and len(got) == batcher.stats["batches"]


def test_deberta_mixed_pass_steps_aside_and_falls_back_exactly_in_the_batcher(tiny_dirs):
    e = engine_with_adapters(tiny_dirs("deberta-v2"), 3)
    texts = TEXTS * 2
    want = {n: e.predict(n, texts) for n in ("t0", "t1", "t2")}
    batcher = _batcher(e, max_batch_size=36)
    futs = [batcher.submit(n, texts, tenant="a") for n in ("t0", "t1", "t2")] + \
        [batcher.submit("t0", texts * 3, tenant="a")]
    b: list = []
    resumed: list = []

    def before_layer0(_m, args):  # before the gate: the mixed pass steps aside before layer 0 fails
        if args[0].shape[0] == 36 and not b:
            b.append(batcher.submit("t1", TEXTS[:1], tenant="b"))
        if _PASS.get()[1] is not None:
            resumed.append(1)
    h = gates(e)[0].register_forward_pre_hook(before_layer0)
    try:
        batcher.start()
        for f, n in zip(futs, ("t0", "t1", "t2"), strict=False):
            assert_same_predictions(f.result(timeout=30), want[n])
        futs[-1].result(timeout=30)
        assert_same_predictions(b[0].result(timeout=30), e.predict("t1", TEXTS[:1]))
    finally:
        batcher.stop()
        h.remove()
    assert resumed and batcher.stats["yields"] == 1 and batcher.stats["retries"] == 0


def test_a_pass_resumes_exactly_after_its_backbone_was_dropped_and_loaded_again(tiny_dirs):
    """max_backbones=1: between stepping aside and going on, a pass on another base model drops this pass's
    backbone (it is not in use while suspended); the resume loads it again, borrows slots for the rows' held
    adapters, and gives the uninterrupted logits."""
    e = engine_with_adapters(tiny_dirs("bert"), 3)
    _, cfg, w = random_adapter(tiny_dirs("roberta"), METHODS[0], TASKS[0], seed=7)
    e.max_backbones = 1
    rows = []
    for i, text in enumerate(TEXTS * 2):
        a = e.adapter(f"t{i % 3}")
        rows.append(Row(a, e.encode(a, [text])[0]))
    want = e.forward(rows)
    ev = threading.Event()
    h = on_layer(e, 1, lambda *_: ev.set())
    try:
        with pytest.raises(PassSuspended) as s, pass_control(yield_to=ev):
            e.forward(rows)
    finally:
        h.remove()
    e.load("r0", cfg, w)  # the other backbone: the first is dropped with its bank
    e.predict("r0", TEXTS[:2])
    assert len(e.backbones) == 1 and canonical(tiny_dirs("bert")) not in e.backbones
    with pass_control(resume=s.value.state):
        got = e.forward(rows)
    for g, wt in zip(got, want, strict=True):
        assert (g - wt).abs().max() <= 1e-5


def canonical(path):
    from spafit_core.backbone import canonical_model_name

    return canonical_model_name(path)
