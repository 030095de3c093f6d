"""Dynamic micro-batching: concurrency, grouping, backpressure and timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from spafit_core.batching import BatchingConfig, MicroBatcher
from spafit_core.errors import OverloadedError, RequestTimeoutError
from tests.core.test_engine import TEXTS, engine_with_adapters


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    return engine_with_adapters(tiny_dirs("bert"), 4)


def assert_same_predictions(got: list[dict], want: list[dict]) -> None:
    """The batcher's answers are the engine's own: same labels, scores within 1e-5."""
    assert [p["label"] for p in got] == [d["label"] for d in want]
    assert all(abs(p["score"] - d["score"]) <= 1e-5 for p, d in zip(got, want, strict=True))


def test_concurrent_requests_are_batched_and_answered_exactly(engine):
    batcher = MicroBatcher(engine, BatchingConfig(max_batch_size=16, max_wait_ms=20)).start()
    try:
        results, errors = {}, []
        barrier = threading.Barrier(8)

        def client(k):
            try:
                barrier.wait()
                name = f"t{k % 4}"
                results[k] = (name, batcher.submit(name, TEXTS[k % 3: k % 3 + 3]).result(timeout=30))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for k, (name, preds) in results.items():
            direct = engine.predict(name, TEXTS[k % 3: k % 3 + 3])
            assert_same_predictions(preds, direct)
        assert batcher.stats["rows"] == 24
        assert batcher.stats["batches"] < 24  # rows of different tasks shared forward passes
    finally:
        batcher.stop()


def test_full_queue_is_refused_as_overload(engine):
    batcher = MicroBatcher(engine, BatchingConfig(max_queue=4))  # not started: nothing drains
    batcher.submit("t0", TEXTS[:3])
    with pytest.raises(OverloadedError, match="queue is full"):
        batcher.submit("t1", TEXTS[:2])
    assert batcher.depth == 3 and batcher.stats["overloads"] == 1


def test_expired_requests_time_out_instead_of_running(engine):
    batcher = MicroBatcher(engine)
    fut = batcher.submit("t0", TEXTS[:2], timeout_s=0.01)
    import time

    time.sleep(0.05)
    batcher.start()
    try:
        with pytest.raises(RequestTimeoutError):
            fut.result(timeout=10)
        assert batcher.stats["timeouts"] == 1 and batcher.stats["batches"] == 0
    finally:
        batcher.stop()


def test_packing_respects_rows_tokens_and_sorts_by_length(engine):
    batcher = MicroBatcher(engine, BatchingConfig(max_batch_size=3, max_tokens=40))
    texts = ["ok", "good movie", " ".join(["good"] * 12), "the plot was very boring and bad", "fine", "bad"]
    batcher.submit("t0", texts)
    batcher._tokenize_pending()  # what the worker does first
    items = list(batcher._queues[""])
    batches = batcher._pack(items)
    assert sum(len(b) for b in batches) == len(texts)
    for b in batches:
        assert len(b) <= 3
        assert len(b) * max(it.length for it in b) <= 40
    lengths = [it.length for b in batches for it in b]
    assert lengths == sorted(lengths)


def test_async_predict(engine):
    batcher = MicroBatcher(engine).start()
    try:
        async def go():
            return await asyncio.gather(*(batcher.predict(f"t{i % 4}", ["good movie"]) for i in range(6)))

        out = asyncio.run(go())
        assert len(out) == 6 and all(len(o) == 1 for o in out)
    finally:
        batcher.stop()


# ------------------------------------------------------------------------------ isolation and supervision
POISON = "awful actor"


def _poisoned_forward(engine, monkeypatch, poison: str = POISON):
    """engine.forward fails for any batch holding a row of `poison`'s tokens (as a row that breaks the model
    would); records each batch's (adapter names, rows) otherwise."""
    bad = engine.encode(engine.adapter("t0"), [poison])[0]["input_ids"]
    forward = engine.forward
    calls: list[list[tuple[str, int]]] = []

    def poisoned(rows):
        calls.append([(r.adapter.name, len(r.features["input_ids"])) for r in rows])
        if any(r.features["input_ids"] == bad for r in rows):
            raise RuntimeError("The size of tensor a (1024) must match the size of tensor b (512)")
        return forward(rows)

    monkeypatch.setattr(engine, "forward", poisoned)
    return calls


def test_a_batch_with_one_poisoned_row_answers_every_other_row(engine, monkeypatch):
    from spafit_core.errors import PredictionFailedError

    want = {f"t{i}": engine.predict(f"t{i}", TEXTS[:3]) for i in range(4)}
    calls = _poisoned_forward(engine, monkeypatch)
    batcher = MicroBatcher(engine, BatchingConfig(max_batch_size=32, max_wait_ms=1))
    good = {f"t{i}": batcher.submit(f"t{i}", TEXTS[:3]) for i in range(4)}  # queued before the thread starts:
    bad = batcher.submit("t1", ["good movie", POISON])  # one batch holds every row
    batcher.start()
    try:
        for name, fut in good.items():
            got = fut.result(timeout=30)
            assert_same_predictions(got, want[name])
        with pytest.raises(PredictionFailedError, match="ref [0-9a-f]{32}") as err:
            bad.result(timeout=30)
        assert err.value.status == 500 and err.value.type == "prediction-failed"
    finally:
        batcher.stop()
    assert len(calls[0]) == 14  # the first pass held all 14 rows; then per adapter, then t1's rows one by one
    assert batcher.stats["failed_rows"] == 1 and batcher.stats["retries"] == 2


def test_the_loop_survives_an_exception_and_fails_only_the_rows_it_held(engine, monkeypatch):
    from spafit_core.errors import PredictionFailedError

    batcher = MicroBatcher(engine, BatchingConfig(max_wait_ms=1))
    pack = batcher._pack
    boom = iter([True])
    monkeypatch.setattr(batcher, "_pack", lambda items: (_ for _ in ()).throw(KeyError("bug"))
                        if next(boom, False) else pack(items))
    batcher.on_batch = lambda *a: 1 / 0  # a failing metrics callback must not cost an answer either
    batcher.start()
    try:
        with pytest.raises(PredictionFailedError):
            batcher.submit("t0", TEXTS[:2]).result(timeout=30)
        assert len(batcher.submit("t1", TEXTS[:2]).result(timeout=30)) == 2
        assert batcher.alive and batcher.stats["loop_errors"] == 1
    finally:
        batcher.stop()


def test_the_loop_survives_a_cancellation_racing_set_result(engine, monkeypatch):
    """The client's cancel lands between the batcher's last check and set_result (InvalidStateError)."""
    from concurrent.futures import Future

    import spafit_core.batching as batching

    raced = []

    class RacyFuture(Future):
        def set_result(self, result):
            if not raced:
                raced.append(self.cancel())  # the cancel wins the race
            return super().set_result(result)

    monkeypatch.setattr(batching, "Future", RacyFuture)
    batcher = MicroBatcher(engine, BatchingConfig(max_wait_ms=1)).start()
    try:
        first = batcher.submit("t0", TEXTS[:2])
        for _ in range(200):
            if first.done():
                break
            threading.Event().wait(0.02)
        assert raced == [True] and first.cancelled()
        assert len(batcher.submit("t1", TEXTS[:3]).result(timeout=30)) == 3  # the thread lives on
        assert batcher.alive
    finally:
        batcher.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread dies on purpose
def test_a_dead_batcher_thread_is_seen_and_restarted_on_the_same_queue(engine, monkeypatch):
    batcher = MicroBatcher(engine, BatchingConfig(max_wait_ms=1))
    take = batcher._take
    monkeypatch.setattr(batcher, "_take", lambda **_: (_ for _ in ()).throw(SystemExit("killed")))
    batcher.start()
    batcher._thread.join(10)
    assert not batcher.alive
    fut = batcher.submit("t2", TEXTS[:2])  # waits in the queue meanwhile
    monkeypatch.setattr(batcher, "_take", take)
    assert batcher.ensure_running() and batcher.alive and batcher.stats["restarts"] == 1
    try:
        assert len(fut.result(timeout=30)) == 2
        assert not batcher.ensure_running()  # alive: nothing to do
    finally:
        batcher.stop()
    assert not batcher.ensure_running()  # stopped on purpose: not restarted


def test_rows_of_cancelled_requests_are_dropped_before_they_run(engine, monkeypatch):
    calls = _poisoned_forward(engine, monkeypatch, poison="unused")
    batcher = MicroBatcher(engine, BatchingConfig(max_wait_ms=1))  # not started yet
    gone = batcher.submit("t0", TEXTS[:3], tenant="a")
    kept = batcher.submit("t1", TEXTS[:2], tenant="a")
    assert batcher.depth == 5
    assert gone.cancel()
    assert batcher.depth == 2 and batcher.stats["dropped"] == 3  # out of the queue and of the tenant's count

    async def client_goes_away():  # an awaiting task cancelled (the HTTP client disconnected)
        task = asyncio.ensure_future(batcher.predict("t2", TEXTS[:4], tenant="a"))
        while batcher.depth < 6:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.05)

    asyncio.run(client_goes_away())
    assert batcher.depth == 2 and batcher.stats["dropped"] == 7
    batcher.start()
    try:
        assert len(kept.result(timeout=30)) == 2
    finally:
        batcher.stop()
    assert [name for call in calls for name, _ in call] == ["t1", "t1"]


# ------------------------------------------------------------------------------ fair shares
def test_a_tenants_backlog_delays_only_itself(engine, monkeypatch):
    calls = _poisoned_forward(engine, monkeypatch, poison="unused")
    batcher = MicroBatcher(engine, BatchingConfig(max_batch_size=8, max_wait_ms=1, quantum=16))
    flood = [batcher.submit("t0", TEXTS[:4], tenant="a") for _ in range(16)]  # 64 rows first
    quiet = batcher.submit("t1", TEXTS[:3], tenant="b")  # 3 rows after them
    batcher.start()
    try:
        quiet.result(timeout=30)
        for f in flood:
            f.result(timeout=30)
    finally:
        batcher.stop()
    assert "t1" in {name for name, _ in calls[0]}  # b's rows ran in the very first pass, not after a's 64
    assert batcher.served == {"a": 64, "b": 3}


def weighted_first_passes(engine, monkeypatch, weights: dict[str, float]) -> tuple[list[str], MicroBatcher]:
    """Tenants heavy and light each queue 48 rows of 4 tokens (quantum 8: 2 rows a turn at weight 1); the adapters
    of the first 4 passes' 32 rows (both still backlogged then), and the stopped batcher."""
    calls = _poisoned_forward(engine, monkeypatch, poison="unused")
    batcher = MicroBatcher(engine, BatchingConfig(max_batch_size=8, max_wait_ms=1, quantum=8, weights=weights))
    futures = [batcher.submit("t0", ["good movie"] * 4, tenant="heavy") for _ in range(12)]
    futures += [batcher.submit("t1", ["good movie"] * 4, tenant="light") for _ in range(12)]
    batcher.start()
    try:
        for f in futures:
            f.result(timeout=30)
    finally:
        batcher.stop()
    return [name for call in calls[:4] for name, _ in call], batcher


def test_weights_share_the_engine_in_proportion(engine, monkeypatch):
    first, _ = weighted_first_passes(engine, monkeypatch, {"heavy": 3.0})
    assert first.count("t0") == 24 and first.count("t1") == 8


def test_a_light_tenant_runs_in_the_next_pass_and_passes_stay_small_while_it_is_served(engine, monkeypatch):
    """Tenant a has 320 rows queued; tenant b sends 2 rows during a's 3rd, 6th, 9th and 12th passes. Each of b's
    requests runs in the very next pass (not after a's turn), every pass from then on holds at most
    `shared_batch_size` rows of a (b's wait for the pass in flight is one small pass), and once b has been quiet
    for `shared_window_s` a's passes are full again. Every answer is the engine's own."""
    import time

    want_b = engine.predict("t1", TEXTS[1:3])
    forward = engine.forward
    calls: list[list[str]] = []  # adapter name per row, per pass
    b_futures: list = []

    def slow(rows):  # a pass takes 20 ms (a CPU pass costs about its rows; here b arrives inside one)
        calls.append([r.adapter.name for r in rows])
        if len(calls) in (3, 6, 9, 12):
            b_futures.append(batcher.submit("t1", TEXTS[1:3], tenant="b"))
        time.sleep(0.02)
        return forward(rows)

    monkeypatch.setattr(engine, "forward", slow)
    batcher = MicroBatcher(engine, BatchingConfig(max_batch_size=32, max_wait_ms=1, shared_batch_size=4,
                                                  shared_window_s=0.2))
    a_futures = [batcher.submit("t0", TEXTS * 2 + TEXTS[:4], tenant="a") for _ in range(20)]  # 320 rows
    batcher.start()
    try:
        for f in a_futures:
            f.result(timeout=60)
        got_b = [f.result(timeout=60) for f in b_futures]
    finally:
        batcher.stop()
    assert len(b_futures) == 4
    for got in got_b:
        assert_same_predictions(got, want_b)
    assert [len(c) for c in calls[:3]] == [32, 32, 32]  # a alone: full passes
    with_b = [i for i, c in enumerate(calls) if "t1" in c]
    assert with_b == [3, 6, 9, 12]  # each b request in the pass right after the one it arrived in
    assert all(calls[i] == ["t1", "t1"] for i in with_b)  # in a pass of its own: a's rows would only add to it
    # The full pass b's first request arrived in stepped aside for it (yield_to_light) and went on after it; from
    # then to b's last pass, small passes (b's 2 rows + a's 2, or a's 4), each of which also stepped aside for b.
    assert calls[4] == calls[2] == ["t0"] * 32
    for i in range(5, 13):
        assert len(calls[i]) <= 4 and calls[i].count("t0") <= 4, (i, calls[i])
    assert batcher.stats["yields"] == 4
    assert max(len(c) for c in calls[13:]) == 32  # b quiet for the window: a's passes are full again
    assert batcher.served == {"a": 320, "b": 8}


def test_one_tenants_steady_stream_runs_in_full_passes(engine, monkeypatch):
    """One tenant, 24 closed-loop clients against passes of 8: its queue runs dry now and then, so it is served as
    a light tenant again and again, and a light tenant bounds the backlogged tenants' passes for a window. Its own
    backlog must not be bounded: no one else waits. Before, its passes held `shared_batch_size` rows (1 here)."""
    sizes = steady_pass_sizes(engine, monkeypatch, {"a": 24})
    assert sum(sizes) == 24 * 15
    assert len(sizes) <= 2 * 24 * 15 // 8, sizes  # passes of 8 at most: 45 at least; one-row passes made 360


def steady_pass_sizes(engine, monkeypatch, clients: dict[str, int], rounds: int = 15) -> list[int]:
    """Closed-loop clients (so many per tenant), each sending one row `rounds` times and waiting for it, against
    passes of at most 8 rows that take 5 ms each, with one-row shared passes and a 60 s window: the passes' sizes.
    Every answer is the engine's own."""
    import time

    want = engine.predict("t0", TEXTS[:1])
    forward = engine.forward
    sizes: list[int] = []

    def slow(rows):  # a pass takes 5 ms, so the clients' next rows queue up behind it
        time.sleep(0.005)
        out = forward(rows)
        sizes.append(len(rows))  # passes that ran to the end (one that steps aside is counted when it goes on)
        return out

    monkeypatch.setattr(engine, "forward", slow)
    batcher = MicroBatcher(engine, BatchingConfig(max_batch_size=8, max_wait_ms=1, shared_batch_size=1,
                                                  shared_window_s=60)).start()
    errors: list[BaseException] = []

    def client(tenant):
        try:
            for _ in range(rounds):
                assert_same_predictions(batcher.submit("t0", TEXTS[:1], tenant=tenant).result(timeout=60), want)
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=client, args=(t,)) for t, n in clients.items() for _ in range(n)]
    try:
        for c in threads:
            c.start()
        for c in threads:
            c.join(timeout=120)
    finally:
        batcher.stop()
    assert not errors, errors[0]
    return sizes


def test_a_backlog_is_tokenised_a_pass_at_a_time_not_ahead_of_a_light_tenant(engine, monkeypatch):
    """Tenant a has 320 rows waiting untokenised when tenant b's 2 rows arrive: each tokenizer call before a pass
    holds at most a pass's worth of a's rows (not all 320 in front of b's), b runs in the next pass, and a's rows
    are all served, with the engine's own answers."""
    encode, forward = engine.encode, engine.forward
    encoded: list[int] = []  # rows per tokenizer call
    passes: list[list[str]] = []
    b_future: list = []

    def counting(adapter, inputs):
        encoded.append(len(inputs))
        return encode(adapter, inputs)

    def recording(rows):
        passes.append([r.adapter.name for r in rows])
        if len(passes) == 2:
            b_future.append(batcher.submit("t1", TEXTS[:2], tenant="b"))
        return forward(rows)

    monkeypatch.setattr(engine, "encode", counting)
    monkeypatch.setattr(engine, "forward", recording)
    batcher = MicroBatcher(engine, BatchingConfig(max_batch_size=32, max_wait_ms=1, shared_batch_size=4))
    flood = [batcher.submit("t0", TEXTS * 2 + TEXTS[:4], tenant="a") for _ in range(20)]  # 320 rows
    batcher.start()
    try:
        got_a = [f.result(timeout=60) for f in flood]
        got_b = b_future[0].result(timeout=60)
    finally:
        batcher.stop()
    assert max(encoded) <= 32 + 2, encoded  # a pass's worth of a's (two 16-row requests), b's 2 with them
    assert sum(encoded) == 322  # every row tokenised once
    assert passes[2] == ["t1", "t1"]  # b in the pass after the one in flight, alone
    assert_same_predictions(got_b, engine.predict("t1", TEXTS[:2]))
    assert_same_predictions(got_a[0], engine.predict("t0", TEXTS * 2 + TEXTS[:4]))
    assert batcher.served == {"a": 320, "b": 2}


def test_a_flood_that_starts_while_a_light_tenant_is_served_runs_in_small_passes(engine, monkeypatch):
    """Tenant b has just been served (all it had, in one pass); then tenant a's 64 rows arrive at once, as a new
    tenant whose quantum pays for more than a pass: within b's window a's passes hold at most `shared_batch_size`
    rows, and b's next request runs in the pass right after the one in flight."""
    b_next = lambda batcher: [batcher.submit("t1", TEXTS[:2], tenant="b")]  # noqa: E731  (during a's 2nd pass)
    with b_served_then(engine, monkeypatch, 3, b_next) as (calls, late, batcher):
        flood = batcher.submit("t0", TEXTS * 10 + TEXTS[:4], tenant="a")  # more than a pass holds: not light
        flood.result(timeout=30)
        late_result(late, 30)
    assert calls[0] == ["t1", "t1"]
    assert all(len(c) <= 4 for c in calls[1:]), str([len(c) for c in calls])  # not 32-row passes of a
    assert calls[3].count("t1") == 2  # b's rows in the pass after the one in flight when they came
    assert batcher.served == {"a": 64, "b": 4}


def test_a_floods_first_burst_does_not_share_a_light_tenants_pass(engine, monkeypatch):
    """Tenant b is being served (light); tenant a's first burst, 4 requests of 3 rows (they fit a pass, so a is
    new and could pass for light), and b's next row arrive during the same pass. b's row runs in the next pass, not beside
    a's 12 (at the noisy-neighbour benchmark's flood onset it shared a 104 ms pass of 18 rows), and a's rows
    follow in small passes."""
    def burst(batcher):  # during b's first pass: a's burst (4 requests, 12 rows), then b's next request
        return [*(batcher.submit("t0", TEXTS[:3], tenant="a") for _ in range(4)),
                batcher.submit("t1", TEXTS[:1], tenant="b")]

    with b_served_then(engine, monkeypatch, 1, burst) as (calls, late, batcher):
        *got_a, got_b = (f.result(timeout=30) for f in late)
    assert calls[0] == ["t1", "t1"]
    # b's row in the next pass, beside at most a small pass's worth of a's (b's previous pass ran alone, so this
    # one is shared: light tenants that keep coming back must not shut the others out), not beside all 12
    assert "t1" in calls[1] and calls[1].count("t0") <= 4, str(calls)
    assert all(len(c) <= 4 for c in calls[2:]), str([len(c) for c in calls])
    for got in got_a:
        assert_same_predictions(got, engine.predict("t0", TEXTS[:3]))
    assert_same_predictions(got_b, engine.predict("t1", TEXTS[:1]))
    assert batcher.served == {"a": 12, "b": 3}


def test_a_light_tenants_larger_request_still_runs_whole_in_the_next_pass(engine, monkeypatch):
    """Tenant b has been light (served alone) while tenant a floods; b's next request holds 6 rows, more than a
    small pass: b stays light (it was within the window), so its 6 rows run together in the next pass instead
    of waiting for a's turn in the round robin."""
    b_next = lambda batcher: [batcher.submit("t1", TEXTS, tenant="b")]  # noqa: E731  (during a's 2nd pass)
    with b_served_then(engine, monkeypatch, 3, b_next) as (calls, late, batcher):
        flood = [batcher.submit("t0", TEXTS * 2, tenant="a") for _ in range(8)]
        got_b = late_result(late, 30)
        for f in flood:
            f.result(timeout=30)
    assert calls[0] == ["t1", "t1"]
    with_b = [c for c in calls[1:] if "t1" in c]
    assert len(with_b) == 1 and with_b[0].count("t1") == len(TEXTS), str(calls)
    assert calls.index(with_b[0]) == 3, str(calls)  # the pass right after the one it arrived in
    assert_same_predictions(got_b, engine.predict("t1", TEXTS))


@contextlib.contextmanager
def b_served_then(engine, monkeypatch, at_pass: int, during):
    """A batcher (small shared passes, a 60 s window) that has served tenant b's 2 rows in a pass of their own,
    recording each pass's adapters; `during(batcher)` runs inside pass `at_pass` and its futures are yielded with
    the passes and the batcher (stopped on exit)."""
    calls: list[list[str]] = []
    late: list = []
    forward = engine.forward

    def recording(rows):
        calls.append([r.adapter.name for r in rows])
        if len(calls) == at_pass:
            late.extend(during(batcher))
        return forward(rows)

    monkeypatch.setattr(engine, "forward", recording)
    batcher = MicroBatcher(engine, BatchingConfig(max_batch_size=32, max_wait_ms=1, shared_batch_size=4,
                                                  shared_window_s=60)).start()
    try:
        batcher.submit("t1", TEXTS[:2], tenant="b").result(timeout=30)
        yield calls, late, batcher
    finally:
        batcher.stop()


def late_result(futures: list, timeout: float):
    """The result of the one future a forward hook submitted (waiting for the hook to have run)."""
    import time

    deadline = time.monotonic() + timeout
    while not futures and time.monotonic() < deadline:
        time.sleep(0.01)
    return futures[0].result(timeout=timeout)


def test_a_tenant_over_its_share_is_refused_apart_from_a_full_queue(engine):
    from spafit_core.errors import TenantOverloadedError

    batcher = MicroBatcher(engine, BatchingConfig(max_queue=20, max_queue_per_tenant=12))  # not started
    batcher.submit("t0", TEXTS[:6], tenant="a")
    batcher.submit("t0", TEXTS[:6], tenant="a")
    with pytest.raises(TenantOverloadedError, match="12 rows waiting") as err:
        batcher.submit("t0", TEXTS[:1], tenant="a")
    assert err.value.status == 429
    batcher.submit("t1", TEXTS[:6], tenant="b")  # another tenant still gets in
    batcher.submit("t1", TEXTS[:2], tenant="c")
    with pytest.raises(OverloadedError, match="queue is full"):  # the whole queue: 503 for anyone
        batcher.submit("t1", TEXTS[:1], tenant="d")
    assert batcher.depths() == {"a": 12, "b": 6, "c": 2}
    assert batcher.stats["tenant_overloads"] == 1 and batcher.stats["overloads"] == 1


def test_a_request_cancelled_while_its_rows_are_made_never_leaves_them_queued(engine, monkeypatch):
    batcher = MicroBatcher(engine)  # not started: rows stay queued unless withdrawn
    submit, release, entered = batcher.submit, threading.Event(), threading.Event()

    def slow_submit(*args, **kw):  # tokenising (or loading the adapter) takes a while
        entered.set()
        assert release.wait(10)
        return submit(*args, **kw)

    monkeypatch.setattr(batcher, "submit", slow_submit)

    async def gone_while_submitting():
        task = asyncio.ensure_future(batcher.predict("t0", TEXTS[:3], tenant="a"))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.01)
        release.set()
        for _ in range(200):
            if batcher.stats["dropped"]:
                break
            await asyncio.sleep(0.01)

    asyncio.run(gone_while_submitting())
    assert batcher.depth == 0 and batcher.stats["dropped"] == 3
    batcher.stop()


def test_a_row_costs_its_tokens_so_long_inputs_use_up_a_share_faster(engine, monkeypatch):
    calls = _poisoned_forward(engine, monkeypatch, poison="unused")
    long = " ".join(["the plot was very boring and bad"] * 4)  # 30 tokens a row (the adapter's limit is 32)
    batcher = MicroBatcher(engine, BatchingConfig(max_batch_size=32, max_tokens=1 << 20, max_wait_ms=1, quantum=60))
    futures = [batcher.submit("t0", [long] * 8, tenant="long") for _ in range(4)]
    futures += [batcher.submit("t1", ["good movie"] * 8, tenant="short") for _ in range(4)]  # 4 tokens a row
    batcher.start()
    try:
        for f in futures:
            f.result(timeout=30)
    finally:
        batcher.stop()
    first = calls[0]  # both had a backlog: turns of 60 tokens each, i.e. 2 long rows or 15 short ones
    assert first.count(("t0", 30)) == 4 and first.count(("t1", 4)) == 28  # 120 tokens against 112, not 16 rows each


def test_requests_waiting_together_are_tokenised_in_one_call_with_each_answer_exact(engine, monkeypatch):
    want = {f"t{i}": engine.predict(f"t{i}", TEXTS[i % 3:]) for i in range(4)}
    calls = []
    encode = engine.encode
    monkeypatch.setattr(engine, "encode", lambda adapter, inputs: calls.append(len(inputs)) or encode(adapter, inputs))
    batcher = MicroBatcher(engine, BatchingConfig(max_batch_size=32, max_wait_ms=1))
    futures = {name: batcher.submit(name, TEXTS[i % 3:]) for i, name in enumerate(want)}  # before the thread runs
    batcher.start()
    try:
        for name, fut in futures.items():
            got = fut.result(timeout=30)
            assert_same_predictions(got, want[name])
    finally:
        batcher.stop()
    limits = {engine.adapter(name).max_seq_length for name in want}
    assert len(calls) == len(limits) < len(want)  # one tokenizer call per length limit, not one per request
    assert sum(calls) == sum(len(TEXTS[i % 3:]) for i in range(4))


def test_inputs_that_fail_to_tokenise_fail_only_their_own_request(engine, monkeypatch):
    from spafit_core.errors import PredictionFailedError

    encode = engine.encode

    def fragile(adapter, inputs):
        if POISON in inputs:
            raise ValueError("the tokenizer choked")
        return encode(adapter, inputs)

    monkeypatch.setattr(engine, "encode", fragile)
    batcher = MicroBatcher(engine, BatchingConfig(max_wait_ms=1))
    good = [batcher.submit("t0", TEXTS[:2]) for _ in range(3)]
    bad = batcher.submit("t0", ["fine", POISON])
    batcher.start()
    try:
        assert all(len(f.result(timeout=30)) == 2 for f in good)
        with pytest.raises(PredictionFailedError, match="ref [0-9a-f]{32}"):
            bad.result(timeout=30)
        assert batcher.depth == 0 and batcher.depths() == {}  # no row of it is left counted
    finally:
        batcher.stop()


@pytest.mark.serial  # a 1 s bound: run alone, not next to the parallel suite
def test_an_idle_batcher_runs_a_lone_request_without_waiting_for_company(engine):
    batcher = MicroBatcher(engine, BatchingConfig(max_wait_ms=3000)).start()
    try:
        batcher.submit("t0", TEXTS[:1]).result(timeout=30)  # warm
        import time

        start = time.perf_counter()
        batcher.submit("t1", TEXTS[:1]).result(timeout=30)
        assert time.perf_counter() - start < 1.0  # not the 3 s a busy batcher would wait for company
    finally:
        batcher.stop()


def test_a_request_cancelled_before_it_is_tokenised_leaves_no_row_behind(engine):
    batcher = MicroBatcher(engine, BatchingConfig(max_wait_ms=1))  # not started: everything stays pending
    gone = batcher.submit("t0", TEXTS[:3], tenant="a")
    kept = batcher.submit("t1", TEXTS[:2], tenant="a")
    assert batcher.depths() == {"a": 5}
    gone.cancel()
    assert batcher.depth == 2 and batcher.depths() == {"a": 2}
    batcher.start()
    try:
        assert len(kept.result(timeout=30)) == 2
    finally:
        batcher.stop()
    assert batcher.stats["dropped"] == 3


def test_a_huge_request_is_tokenised_in_the_big_request_lane_and_answered_exactly(engine):
    from spafit_core import batching

    # Inputs are cut to what their first 32 tokens need; still over BATCH_TOKENIZE_CHARS: not the worker's time
    big = ["good movie " * 2000] * 200 + ["bad plot"]
    assert sum(len(batching.cut_text(x, 32)) for x in big) > batching.BATCH_TOKENIZE_CHARS
    want = engine.predict("t0", big)
    batcher = MicroBatcher(engine, BatchingConfig(max_wait_ms=1))  # not started: the lane waits too
    fut = batcher.submit("t0", big, tenant="a")
    assert not batcher._pending and batcher.depths() == {"a": 201}  # counted, in the lane
    batcher.start()
    try:
        got = fut.result(timeout=30)
    finally:
        batcher.stop()
    assert_same_predictions(got, want)
    assert batcher.depths() == {}
