"""Dynamic micro-batching: concurrency, grouping, backpressure and timeouts."""

from __future__ import annotations

import asyncio
import threading

import pytest

from spafit_core.batching import BatchingConfig, MicroBatcher
from spafit_core.engine import Engine
from spafit_core.errors import OverloadedError, RequestTimeoutError
from tests.core.test_engine import METHODS, TASKS, TEXTS, random_adapter


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    path = tiny_dirs("bert")
    e = Engine(device="cpu", default_base_model=path)
    for i in range(4):
        _, cfg, w = random_adapter(path, METHODS[i], TASKS[i % 2], seed=i)
        e.load(f"t{i}", cfg, w)
    return e


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
            assert [p["label"] for p in preds] == [d["label"] for d in direct]
            assert all(abs(p["score"] - d["score"]) <= 1e-5 for p, d in zip(preds, direct, strict=True))
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
    items = list(batcher._queue)
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
