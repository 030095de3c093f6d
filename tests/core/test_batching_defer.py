"""Attacks on the deferred tokenising of a backlog (a tenant's requests tokenised a pass's worth at a time) and on
light tenants' passes of their own: no tenant starves, no busy loop, counts stay right."""

from __future__ import annotations

import threading
import time

import pytest

from spafit_core.batching import BatchingConfig, MicroBatcher
from tests.core.test_engine import engine_with_adapters

LONG = " ".join(["the plot was very boring and bad, the acting was worse and the ending made no sense"] * 2)


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    return engine_with_adapters(tiny_dirs("bert"), 2)


def _record(engine, monkeypatch, on_pass=None):
    forward = engine.forward
    calls: list[list[str]] = []

    def recording(rows):
        calls.append([r.adapter.name for r in rows])
        if on_pass is not None:
            on_pass(len(calls))
        return forward(rows)

    monkeypatch.setattr(engine, "forward", recording)
    return calls


def test_a_flooder_whose_pass_worth_fits_its_quantum_does_not_come_back_as_a_new_tenant(engine, monkeypatch):
    """Tenant a floods short rows (a pass's worth fits its quantum, so each pass empties what was tokenised of it);
    tenant b has long rows in the round robin. a must not re-enter as a new tenant every pass (served ahead of the
    round robin) and starve b: b's rows are served while a still has a backlog."""
    assert len(engine.encode(engine.adapter("t1"), [LONG])[0]["input_ids"]) > 24  # b's rows: over a quantum each
    calls = _record(engine, monkeypatch)
    batcher = MicroBatcher(engine, BatchingConfig(max_batch_size=8, max_wait_ms=1, quantum=24, shared_batch_size=None))
    b = [batcher.submit("t1", [LONG] * 2, tenant="b") for _ in range(4)]  # 8 long rows
    a = [batcher.submit("t0", ["ok"] * 4, tenant="a") for _ in range(20)]  # 80 rows of 3 tokens: 8 a quantum
    batcher.start()
    try:
        for f in a + b:
            f.result(timeout=60)
    finally:
        batcher.stop()
    # The round robin gives b a row about every pass (a quantum pays for 8 of a's rows, ~1 of b's), not none
    # until a's whole backlog has run.
    assert sum(c.count("t1") for c in calls[:6]) >= 3, [(c.count("t0"), c.count("t1")) for c in calls]
    assert batcher.served == {"a": 80, "b": 8}
    assert batcher.depth == 0 and batcher.depths() == {}


def test_a_light_tenant_that_keeps_coming_back_does_not_starve_a_backlogged_one(engine, monkeypatch):
    """Tenant b sends its next request the moment its last is answered (before the next pass is taken): it is light
    every pass. Its passes of its own must not shut tenant a out: a's rows keep being served meanwhile."""
    calls = _record(engine, monkeypatch)
    batcher = MicroBatcher(engine, BatchingConfig(max_batch_size=8, max_wait_ms=1, shared_batch_size=2))
    sent: list = []

    def again(_f):
        if len(sent) < 20:
            f = batcher.submit("t1", ["ok"], tenant="b")
            sent.append(f)
            f.add_done_callback(again)

    a = [batcher.submit("t0", ["good movie"] * 4, tenant="a") for _ in range(8)]  # 32 rows
    first = batcher.submit("t1", ["ok"], tenant="b")
    sent.append(first)
    first.add_done_callback(again)
    batcher.start()
    try:
        for f in a:
            f.result(timeout=60)
        for f in list(sent):
            f.result(timeout=60)
    finally:
        batcher.stop()
    rows_a_while_b = sum(c.count("t0") for c in calls[:20])
    assert rows_a_while_b >= 8, calls[:20]  # a served alongside b's stream, not after it
    assert batcher.served["a"] == 32


def test_the_worker_does_not_spin_while_only_the_big_request_lane_has_work(engine, monkeypatch):
    """Only a big request (in the lane, tokenised slowly) waits: the worker has nothing to take and must sleep
    until the lane queues its rows, not loop."""
    encode = engine.encode

    def slow(adapter, inputs):
        if len(inputs) > 100:  # the lane's chunks
            time.sleep(0.2)
        return encode(adapter, inputs)

    monkeypatch.setattr(engine, "encode", slow)
    batcher = MicroBatcher(engine, BatchingConfig(max_batch_size=64, max_wait_ms=1))
    empty = []
    take = batcher._take

    def counting(**kw):
        items = take(**kw)
        if not items:
            empty.append(1)
        return items

    batcher._take = counting
    big = ["word " * 8] * 600  # 24,000 characters: the lane, in two slow chunks
    batcher.start()
    try:
        fut = batcher.submit("t0", big, tenant="a")
        assert len(fut.result(timeout=60)) == 600
    finally:
        batcher.stop()
    assert len(empty) < 20, len(empty)  # it slept while the lane worked (0.4 s), it did not loop


def test_cancelling_a_deferred_request_keeps_the_counts_right(engine, monkeypatch):
    """A request deferred (its tenant's queue already holds a pass's worth) and then cancelled leaves the counts
    (`depth`, `depths()`) right, and the others are served."""
    gate = threading.Event()
    forward = engine.forward

    def held(rows):
        gate.wait(30)
        return forward(rows)

    monkeypatch.setattr(engine, "forward", held)
    batcher = MicroBatcher(engine, BatchingConfig(max_batch_size=8, max_wait_ms=1))
    futures = [batcher.submit("t0", ["good movie"] * 4, tenant="a") for _ in range(8)]
    batcher.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(batcher._pending) == 8:
            time.sleep(0.01)
        time.sleep(0.1)
        with batcher._cond:
            deferred = [p.request.future for p in batcher._pending]
        assert deferred  # some of a's requests wait untokenised
        for f in deferred:
            f.cancel()
        assert batcher.depths().get("a", 0) == batcher.depth
        gate.set()
        for f in futures:
            if f not in deferred:
                assert len(f.result(timeout=30)) == 4
    finally:
        gate.set()
        batcher.stop()
    assert batcher.depth == 0 and batcher.depths() == {} and not batcher._pending_rows


def test_a_light_tenants_request_that_arrives_while_others_are_tokenised_keeps_it_light(engine, monkeypatch):
    """Tenant a has a backlog left untokenised; tenant b's second request arrives while b's first is being tokenised.
    b stays a light tenant: never put in the round robin behind a's turn (nor held as a backlog), and its second
    request runs in the pass right after its first."""
    encode = engine.encode
    later: list = []
    state: list[bool] = []  # per pass: b in the round robin or held as a backlog

    def tokenising(adapter, inputs):
        if "good" in inputs and not later:  # b's first request is being tokenised: its second arrives
            later.append(batcher.submit("t1", ["fine"] * 2, tenant="b"))
        return encode(adapter, inputs)

    first: list = []
    calls = _record(engine, monkeypatch, on_pass=lambda n: (
        state.append("b" in batcher._ring or "b" in batcher._held),
        first.append(batcher.submit("t1", ["good"] * 2, tenant="b")) if n == 2 else None))
    monkeypatch.setattr(engine, "encode", tokenising)
    batcher = MicroBatcher(engine, BatchingConfig(max_batch_size=8, max_wait_ms=1, shared_batch_size=4))
    a = [batcher.submit("t0", ["ok"] * 8, tenant="a") for _ in range(12)]  # 96 rows: most left untokenised
    batcher.start()
    try:
        for f in a + first + later:
            f.result(timeout=60)
    finally:
        batcher.stop()
    with_b = [i for i, c in enumerate(calls) if "t1" in c]
    assert len(with_b) == 2 and with_b[1] == with_b[0] + 1, calls
    assert not any(state), state
    assert batcher.served == {"a": 96, "b": 4}
