"""Attacks on stop 28's changes: the shared-pass bound (tenant_queues._limit / _light_waiting) with several tenants,
heads that shrink back (slots._repad_heads) after a failed attach and not on every borrowed slot, the cache
triggers' columns."""

from __future__ import annotations

import pytest

from tests.core.test_batching import steady_pass_sizes
from tests.core.test_engine import TEXTS, engine_with_adapters


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    return engine_with_adapters(tiny_dirs("bert"), 4)


def test_two_tenants_steady_streams_run_in_full_passes(engine, monkeypatch):
    """Two tenants, 12 closed-loop clients each, against passes of 8: neither is light (each keeps a backlog), so
    no pass should be bounded at `shared_batch_size` (1). Each tenant's backlog stays in `_new` (mid-quantum,
    never in the ring), so `_light_waiting` counts both as light ones "with no backlog" and every pass holds one
    row: 288 rows in ~260 passes (the single-tenant collapse d885063 fixed, with two tenants)."""
    sizes = steady_pass_sizes(engine, monkeypatch, {"a": 12, "b": 12}, rounds=12)
    assert sum(sizes) == 24 * 12
    assert len(sizes) <= 2 * 24 * 12 // 8, sizes  # passes of 8 at most: 36 at least; one-row passes made ~260


# ----------------------------------------------------------------------------------------- slot pools
from spafit_core import TaskSpec  # noqa: E402
from spafit_core.engine import Engine, Row  # noqa: E402,F401
from spafit_core.slots import SlotPools  # noqa: E402
from tests.core.test_slot_attacks import assert_rows_alone, engine_of, labels, make, row  # noqa: E402


def _narrow_and_wide(tiny_bert):
    two = TaskSpec(labels=("a", "b"))
    narrow = {f"s{i}": make(tiny_bert, dict(name="lora", rank=2), two, seed=40 + i) for i in range(6)}
    wide = make(tiny_bert, dict(name="lora", rank=3), TaskSpec(labels=labels(1000)), seed=77)
    return narrow, wide


def _borrowing_engine(tiny_bert):
    """Six resident 2-label adapters and a 1000-label one that was evicted while a request held it: every
    forward of that request borrows a slot for it."""
    narrow, wide = _narrow_and_wide(tiny_bert)
    e = engine_of(tiny_bert, {**narrow, "wide": wide})
    held = e.adapter("wide")
    e.evict("wide")
    assert e.bank().pools.labels == 2
    return e, held, narrow, wide


def test_rows_stay_exact_after_a_borrowed_wide_head_shrinks_back(tiny_bert):
    """A borrowed 1000-label head widens every head for its forwards; they stay wide until the bank next lets an
    adapter go (not re-padded twice a forward), and the bank's byte counts follow both moves. Rows stay exact
    throughout."""
    e, held, narrow, wide = _borrowing_engine(tiny_bert)
    ref = engine_of(tiny_bert, {**narrow, "wide": wide})
    texts = TEXTS[:2]
    bank = e.bank()
    for _ in range(2):
        rows = [row(e, "s0", texts[0]), Row(held, e.encode(held, [texts[1]])[0]), row(e, "s3", texts[1])]
        assert_rows_alone(e, rows, ref=ref)
        assert bank.pools.labels == 1000  # the borrow gave its slot back without re-padding every head
        assert_rows_alone(e, [row(e, f"s{i}", t) for i in range(6) for t in texts], ref=ref)
    e.load("s9", *make(tiny_bert, dict(name="lora", rank=2), TaskSpec(labels=("a", "b")), seed=99))
    for a in bank._hot.values():  # counted at the heads' width the borrow left
        assert a.nbytes == bank.pools.nbytes_of(a.slot)
    e.evict("s9")  # the bank's next detach shrinks them back
    assert bank.pools.labels == 2
    for a in bank._hot.values():
        assert a.nbytes == bank.pools.nbytes_of(a.slot)
    assert_rows_alone(e, [row(e, f"s{i}", t) for i in range(6) for t in texts], ref=ref)


def test_a_wide_adapter_borrowed_every_forward_does_not_repad_every_head_twice_a_forward(tiny_bert, monkeypatch):
    """A request of a thousand-label adapter that is not resident (evicted while it waited, or a device budget
    too small for it to stay) borrows a slot each pass. Before today's change the heads stayed padded; now each
    borrow widens every head pool to 1000 labels and its detach shrinks them all back: two reallocations and
    copies of every resident head per forward."""
    e, held, _, _ = _borrowing_engine(tiny_bert)
    calls: list[int] = []
    repad = SlotPools._repad_heads

    def counting(self, shapes, n):
        calls.append(n)
        return repad(self, shapes, n)

    monkeypatch.setattr(SlotPools, "_repad_heads", counting)
    for _ in range(10):
        e.forward([row(e, "s0", TEXTS[0]), Row(held, e.encode(held, [TEXTS[1]])[0])])
    assert len(calls) <= 2, calls


def test_postgres_triggers_ignore_last_used_and_webhook_clock_writes_and_hear_cascades(pg_url):
    """The statement triggers (0009): an update of api_keys.last_used_at (every minute per key in use) or of a
    tenant's webhook clock must not empty every replica's caches; a tenant deleted (its tasks and keys cascade)
    must."""
    import uuid

    import psycopg

    from app.services.cache import CHANNEL

    url = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as listen, psycopg.connect(url, autocommit=True) as w:
        listen.execute(f"LISTEN {CHANNEL}")

        def heard() -> int:
            return sum(1 for _ in listen.notifies(timeout=0.3))

        tid = uuid.uuid4()
        w.execute("INSERT INTO tenants (id, name, created_at) VALUES (%s, %s, now())", (tid, f"t-{tid}"))
        heard()
        w.execute("UPDATE api_keys SET last_used_at = now() WHERE tenant_id = %s", (tid,))
        w.execute("UPDATE tenants SET webhook_busy_until = now() WHERE id = %s", (tid,))
        assert heard() == 0
        w.execute("DELETE FROM tenants WHERE id = %s", (tid,))
        assert heard() >= 1


def test_an_attach_that_fails_after_widening_heads_leaves_them_as_they_were(tiny_bert, monkeypatch):
    """Attach is all or nothing: a thousand-label adapter whose attach fails after the heads were re-padded (its
    LoRA rows cannot be had: the pool cannot grow) must leave the heads at the labels resident, and the bank's
    byte counts must still match the pools (its LRU budget is enforced on them)."""
    from spafit_core import slots as slots_module

    narrow, wide = _narrow_and_wide(tiny_bert)
    e = engine_of(tiny_bert, narrow)
    bank, pools = e.bank(), e.bank().pools
    assert pools.labels == 2
    before = {n: a.nbytes for n, a in bank._hot.items()}
    lora_pools = {id(m.lora) for m in pools.modules.values() if m.lora is not None}
    real = slots_module.RowPool.take

    def take(self, n):
        if id(self) in lora_pools:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, n)

    monkeypatch.setattr(slots_module.RowPool, "take", take)
    with pytest.raises(RuntimeError, match="out of memory"):
        e.load("wide", *wide)
    monkeypatch.setattr(slots_module.RowPool, "take", real)
    assert {n: a.nbytes for n, a in bank._hot.items()} == {n: pools.nbytes_of(a.slot) for n, a in bank._hot.items()}
    assert pools.labels == 2, pools.labels  # heads not left padded to the failed adapter's 1000 labels
    assert {n: a.nbytes for n, a in bank._hot.items()} == before
