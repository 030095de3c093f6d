"""Attacks on the engine's serving core (slot pools, mixed forwards, fan-out, hot-swap, eviction): every row of a
mixed batch must equal its lone run, fan-outs must equal separate calls, a request holding an adapter must get
that adapter's answer whatever happened to its slot, and the byte bounds must hold."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from spafit_core import MethodConfig, TaskSpec
from spafit_core.adapter import serialize
from spafit_core.engine import Engine, Row
from spafit_core.engine.fanout import FanOut
from spafit_core.errors import AdapterNotLoadedError
from spafit_core.model import SpafitModel
from spafit_core.train import set_seed
from tests.core.test_engine import TEXTS

TOL = 1e-5
LONG = " ".join(["the plot was very boring and bad"] * 12)
ALL_TEXTS = [*TEXTS, LONG, "a"]


def labels(n: int) -> tuple[str, ...]:
    return tuple(f"l{i}" for i in range(n))


def make(path, method: dict, task: TaskSpec, seed: int, scale: float = 0.2):
    """(config, weights) of an adapter whose every trainable tensor is random * scale."""
    set_seed(seed)
    m = SpafitModel.from_pretrained(path, MethodConfig(**method), task)
    with torch.no_grad():
        for t in m.adapter_state_dict().values():
            t.copy_(torch.randn_like(t) * scale)
    m.eval()
    return serialize(m, max_seq_length=32)


# every kind the claims name: methods, ranks, n1/n2 splits (n1 = n2, n1 = 0, n2 = L, head only), targets,
# 2-class / 3-class / regression / 1-label multi-label / thousand-label heads
KINDS = {
    "sp-1-2-r2": (dict(name="spafit", n1=1, n2=2, rank=2), TaskSpec(labels=("neg", "pos"))),
    "sp-2-2-r3": (dict(name="spafit", n1=2, n2=2, rank=3), TaskSpec(labels=("a", "b", "c"))),
    "sp-0-4-r1": (dict(name="spafit", n1=0, n2=4, rank=1), TaskSpec(task_type="regression")),
    "sp-0-0-r5": (dict(name="spafit", n1=0, n2=0, rank=5), TaskSpec(labels=("a", "b"))),
    "sp-4-4": (dict(name="spafit", n1=4, n2=4, rank=2), TaskSpec(labels=("a", "b", "c"))),
    "sp-3-3-q": (dict(name="spafit", n1=3, n2=3, rank=7, targets=("query",)), TaskSpec(labels=labels(1000))),
    "sp-1-3-ffn": (dict(name="spafit", n1=1, n2=3, rank=4, targets=("ffn_in", "value")),
                   TaskSpec(task_type="multi_label_classification", labels=("x",))),
    "lora-r1-v": (dict(name="lora", rank=1, targets=("value",)), TaskSpec(task_type="regression")),
    "lora-r8": (dict(name="lora", rank=8), TaskSpec(labels=labels(5))),
    "bitfit": (dict(name="bitfit"), TaskSpec(labels=("neg", "pos"))),
}


@pytest.fixture(scope="module")
def kinds(tiny_dirs):
    path = tiny_dirs("bert")
    return {n: make(path, m, t, seed=300 + i) for i, (n, (m, t)) in enumerate(KINDS.items())}


def engine_of(path: str, adapters: dict, **kw) -> Engine:
    e = Engine(device="cpu", default_base_model=path, **kw)
    for name, (cfg, w) in adapters.items():
        e.load(name, cfg, w)
    return e


def row(e: Engine, name_or_adapter, text) -> Row:
    a = e.adapter(name_or_adapter) if isinstance(name_or_adapter, str) else name_or_adapter
    return Row(a, e.encode(a, [text])[0])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=TOL, rtol=0, equal_nan=True)


def assert_rows_alone(e: Engine, rows, got=None, ref: Engine | None = None):
    """Each row of `rows` (or of the given `got`) equals its lone run (on `ref`, the same adapter name)."""
    got = e.forward(rows) if got is None else got
    assert len(got) == len(rows)
    cache: dict = {}
    for k, (r, g) in enumerate(zip(rows, got, strict=True)):
        key = (id(r.adapter), tuple(r.features["input_ids"]))
        if key not in cache:
            if ref is None:
                cache[key] = e.forward([r])[0]
            else:
                a = ref.adapter(r.adapter.name)
                cache[key] = ref.forward([Row(a, r.features)])[0]
        assert same(g, cache[key]), (k, r.adapter.name, (g - cache[key]).abs().max())


# ----------------------------------------------------------------------------------------- mixed batches
def test_hundreds_of_rows_of_every_kind_equal_their_lone_runs(tiny_bert, kinds):
    e = engine_of(tiny_bert, kinds)
    rng = random.Random(1)
    names = list(kinds)
    rows = [row(e, rng.choice(names), rng.choice(ALL_TEXTS)) for _ in range(300)]
    assert_rows_alone(e, rows)
    # and batches of one, of two of the same adapter, and of one row per kind
    for n in names:
        assert_rows_alone(e, [row(e, n, TEXTS[0])])
        assert_rows_alone(e, [row(e, n, TEXTS[0]), row(e, n, LONG)])
    assert_rows_alone(e, [row(e, n, TEXTS[3]) for n in names])


def test_mixed_rows_equal_the_same_adapters_on_a_fresh_engine(tiny_bert, kinds):
    """The pools' history (slots reused, heads re-padded, rank columns widened) never shows in the logits: an
    engine that loaded, evicted and reloaded in a scrambled order answers as a fresh one."""
    fresh = engine_of(tiny_bert, kinds)
    e = Engine(device="cpu", default_base_model=tiny_bert)
    names = list(kinds)
    rng = random.Random(2)
    for _ in range(30):
        n = rng.choice(names)
        if rng.random() < 0.4:
            e.evict(n)
        else:
            e.load(n, *kinds[n])
    for n in names:
        e.load(n, *kinds[n])
    rows = [row(e, rng.choice(names), rng.choice(ALL_TEXTS)) for _ in range(60)]
    assert_rows_alone(e, rows, ref=fresh)


def test_extreme_weights_never_leak_nan_or_inf_into_other_rows(tiny_bert, kinds):
    """An adapter with huge (finite) weights overflows its own rows to inf / NaN; every other row of the mixed
    batch and of a fan-out stays exactly its lone value, finite."""
    path = tiny_bert
    wild = {
        "huge-lora": make(path, dict(name="lora", rank=2), TaskSpec(labels=("a", "b")), seed=7, scale=1e30),
        "huge-bias": make(path, dict(name="bitfit"), TaskSpec(labels=("a", "b", "c")), seed=8, scale=1e37),
        "huge-sp": make(path, dict(name="spafit", n1=2, n2=3, rank=2), TaskSpec(task_type="regression"), seed=9,
                        scale=1e25),
    }
    e = engine_of(tiny_bert, {**kinds, **wild})
    rng = random.Random(3)
    names = list(kinds) + list(wild)
    rows = [row(e, names[i % len(names)], rng.choice(ALL_TEXTS)) for i in range(60)]
    got = e.forward(rows)
    assert not all(torch.isfinite(g).all() for r, g in zip(rows, got, strict=True) if r.adapter.name in wild)
    for r, g in zip(rows, got, strict=True):
        if r.adapter.name in kinds:
            assert torch.isfinite(g).all(), r.adapter.name
    assert_rows_alone(e, rows, got)
    normal = ["sp-1-2-r2", "sp-0-0-r5", "bitfit", "sp-4-4"]
    fan = e.fan_out_many([*normal, *wild], TEXTS[:3])
    for text, out in zip(TEXTS[:3], fan, strict=True):
        for n in normal:
            alone = e.predict(n, [text])[0]
            assert abs(out[n]["score"] - alone["score"]) <= TOL and out[n]["label"] == alone["label"]


# ----------------------------------------------------------------------------------------- slot reuse / swap
def test_a_held_row_keeps_its_adapters_answer_after_its_slot_is_reused(tiny_bert, kinds):
    e = engine_of(tiny_bert, kinds)
    path = tiny_bert
    for name, (m, t) in KINDS.items():
        held = row(e, name, TEXTS[1])
        want = e.forward([held])[0]
        slot = held.adapter.slot
        assert e.evict(name)
        cfg, w = make(path, m, t, seed=999)  # same shapes: takes the freed slot and rows
        e.load(name + "-new", cfg, w)
        assert e.adapter(name + "-new").slot == slot
        other = row(e, name + "-new", TEXTS[1])
        got = e.forward([held, other, held])
        assert same(got[0], want) and same(got[2], want), name
        assert same(e.forward([held])[0], want)
        assert not same(got[1], want)
        e.evict(name + "-new")
        e.load(name, *kinds[name])


def test_labels_growing_while_forwards_run_repad_heads_without_changing_any_answer(tiny_bert, kinds):
    small = {k: kinds[k] for k in ("sp-1-2-r2", "sp-0-4-r1", "sp-2-2-r3", "bitfit", "sp-1-3-ffn")}
    e = engine_of(tiny_bert, small)
    rows = [row(e, n, t) for n in small for t in TEXTS[:3]]
    want = [e.forward([r])[0] for r in rows]
    stop, bad, done = threading.Event(), [], [0]

    def forwards():
        rng = random.Random(4)
        while not stop.is_set():
            pick = [rng.randrange(len(rows)) for _ in range(rng.randint(1, 12))]
            for k, g in zip(pick, e.forward([rows[k] for k in pick]), strict=True):
                if not same(g, want[k]):
                    bad.append((rows[k].adapter.name, (g - want[k]).abs().max().item()))
            done[0] += 1

    t = threading.Thread(target=forwards)
    t.start()
    big = {}
    try:
        for i, n in enumerate((4, 40, 400, 2500)):
            cfg, w = make(tiny_bert, dict(name="spafit", n1=1, n2=2, rank=3 + i), TaskSpec(labels=labels(n)),
                          seed=40 + i)
            big[f"big{n}"] = (cfg, w)
            e.load(f"big{n}", cfg, w)
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(60)
    assert done[0] > 0 and not bad, bad[:3]
    ref = engine_of(tiny_bert, big)
    mixed = [row(e, n, t) for n in [*big, *small] for t in TEXTS[:2]]
    got = e.forward(mixed)
    assert [g.shape[0] for g in got[: 2 * len(big)]] == [4, 4, 40, 40, 400, 400, 2500, 2500]
    for r, g in zip(mixed[: 2 * len(big)], got[: 2 * len(big)], strict=True):
        assert same(g, ref.forward([Row(ref.adapter(r.adapter.name), r.features)])[0])
    assert_rows_alone(e, mixed, got)


def test_evict_and_reload_of_one_name_while_threads_forward_it(tiny_bert, kinds):
    """Swaps of one name between versions (and evictions of it) race forwards of rows built from whichever
    version was current: each row gets its own version's lone answer."""
    m, t = KINDS["sp-1-2-r2"]
    versions = [kinds["sp-1-2-r2"], make(tiny_bert, m, t, seed=77), make(tiny_bert, dict(m, rank=6), t, seed=78)]
    ref = {}
    for cfg, w in versions:
        r = Engine(device="cpu", default_base_model=tiny_bert)
        a = r.load("v", cfg, w)
        ref[a.sha256] = {text: r.forward([row(r, a, text)])[0] for text in TEXTS}
    others = {k: kinds[k] for k in ("sp-0-0-r5", "lora-r8", "sp-3-3-q")}
    e = engine_of(tiny_bert, {**others, "v": versions[0]})
    alone = {n: {text: e.forward([row(e, n, text)])[0] for text in TEXTS} for n in others}
    stop, bad, errors, count = threading.Event(), [], [], [0]

    def swapper():
        rng = random.Random(5)
        while not stop.is_set():
            if rng.random() < 0.3:
                e.evict("v")
            e.load("v", *rng.choice(versions))

    def forwarder(seed):
        rng = random.Random(seed)
        held = []
        while not stop.is_set():
            try:
                held.append(row(e, "v", rng.choice(TEXTS)))
            except AdapterNotLoadedError:
                pass
            held = held[-6:]
            rows = held + [row(e, n, rng.choice(TEXTS)) for n in rng.sample(list(others), 2)]
            rng.shuffle(rows)
            try:
                got = e.forward(rows)
            except Exception as ex:  # noqa: BLE001
                errors.append(repr(ex))
                continue
            for r, g in zip(rows, got, strict=True):
                text = next(x for x in TEXTS if e.encode(r.adapter, [x])[0] == r.features)
                w = ref[r.adapter.sha256][text] if r.adapter.name == "v" else alone[r.adapter.name][text]
                if not same(g, w):
                    bad.append(r.adapter.name)
            count[0] += 1

    threads = [threading.Thread(target=swapper)] + [threading.Thread(target=forwarder, args=(s,)) for s in (1, 2)]
    for th in threads:
        th.start()
    time.sleep(4)
    stop.set()
    for th in threads:
        th.join(60)
    assert count[0] > 5 and not errors and not bad, (count, errors[:2], bad[:5])


def test_a_tiny_device_budget_makes_every_mixed_forward_borrow_slots_and_stays_exact(tiny_bert, kinds):
    """device_bytes of one adapter: every load evicts the rest (dropped on a CPU host); rows held before
    borrow slots for their forward (several at once, widening columns and heads) and stay exact."""
    ref = engine_of(tiny_bert, kinds)
    e = Engine(device="cpu", default_base_model=tiny_bert, device_bytes=1,
               loader=lambda name: kinds[name])
    rows = []
    for n in kinds:
        rows += [row(e, n, t) for t in TEXTS[:2]]
    assert len(e.bank().pools) == 1
    random.Random(6).shuffle(rows)
    assert_rows_alone(e, rows, ref=ref)
    assert len(e.bank().pools) == 1  # the borrowed slots went back
    out = e.fan_out_many(list(kinds), TEXTS[:2])
    for text, got in zip(TEXTS[:2], out, strict=True):
        for n in kinds:
            assert abs(got[n]["score"] - ref.predict(n, [text])[0]["score"]) <= TOL


# ----------------------------------------------------------------------------------------- fan-out
def fan_logits(e: Engine, adapters, texts):
    bb = e.backbone()
    return e._fan_out_together(bb, FanOut(adapters, e._encode_mixed(adapters[0], texts)))


def test_fan_out_with_duplicate_tasks_and_every_split_equals_separate_calls(tiny_bert, kinds):
    e = engine_of(tiny_bert, kinds)
    names = ["sp-4-4", "sp-1-2-r2", "sp-4-4", "bitfit", "sp-2-2-r3", "sp-3-3-q", "sp-0-4-r1", "sp-1-2-r2",
             "lora-r1-v", "sp-1-3-ffn", "sp-0-0-r5", "lora-r8"]
    out = e.fan_out_many(names, ALL_TEXTS)
    for text, got in zip(ALL_TEXTS, out, strict=True):
        assert list(got) == list(dict.fromkeys(names))
        for n in got:
            alone = e.predict(n, [text])[0]
            assert got[n]["label"] == alone["label"] and abs(got[n]["score"] - alone["score"]) <= TOL, n
    adapters = [e.adapter(n) for n in names]
    logits = fan_logits(e, adapters, ALL_TEXTS)
    for text, per in zip(ALL_TEXTS, logits, strict=True):
        for a, g in zip(adapters, per, strict=True):
            assert same(g, e.forward([row(e, a, text)])[0]), a.name
    for n in kinds:  # one task, one input
        assert abs(e.fan_out([n], TEXTS[2])[n]["score"] - e.predict(n, [TEXTS[2]])[0]["score"]) <= TOL


def test_fan_out_after_an_adapter_is_evicted_and_reloaded_between_calls(tiny_bert, kinds):
    e = engine_of(tiny_bert, kinds)
    names = ["sp-1-2-r2", "sp-3-3-q", "lora-r8"]
    first = e.fan_out_many(names, TEXTS[:2])
    e.evict("sp-3-3-q")
    with pytest.raises(AdapterNotLoadedError):
        e.fan_out_many(names, TEXTS[:2])
    e.load("filler", *kinds["sp-3-3-q"])  # takes its slot
    e.load("sp-3-3-q", *kinds["sp-3-3-q"])
    again = e.fan_out_many(names, TEXTS[:2])
    for a, b in zip(first, again, strict=True):
        for n in names:
            assert abs(a[n]["score"] - b[n]["score"]) <= TOL


def test_fan_outs_queued_while_their_adapters_are_replaced_get_the_versions_they_asked(tiny_bert, kinds):
    """Fan-outs that resolved their adapters, then waited for the engine while those adapters were replaced
    and evicted (their slots reused by others): each gets the answers of the adapters it resolved."""
    e = engine_of(tiny_bert, kinds)
    calls = [["sp-1-2-r2", "sp-3-3-q"], ["lora-r8", "sp-0-0-r5", "sp-4-4"], ["sp-3-3-q", "bitfit"]]
    resolved = [[e.adapter(n) for n in c] for c in calls]
    want = [[[e.forward([row(e, a, t)])[0] for a in adapters] for t in TEXTS[:2]] for adapters in resolved]
    results, errors = {}, []

    def call(k):
        try:
            results[k] = fan_logits(e, resolved[k], TEXTS[:2])
        except Exception as ex:  # noqa: BLE001
            errors.append(repr(ex))

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(calls))]
    with e._forward_lock:
        for th in threads:
            th.start()
        for _ in range(300):
            if len(e._fan_pending.get(e.backbone().name, [])) == len(calls):
                break
            time.sleep(0.01)
        for i, n in enumerate(("sp-1-2-r2", "sp-3-3-q", "lora-r8", "sp-4-4")):
            m, t = KINDS[n]
            e.load(n, *make(tiny_bert, m, t, seed=500 + i))  # replaced
        e.evict("sp-0-0-r5")
        e.load("thief", *make(tiny_bert, *KINDS["sp-0-0-r5"], seed=600))  # takes the freed slot
    for th in threads:
        th.join(60)
    assert not errors, errors
    for k in range(len(calls)):
        for per_got, per_want in zip(results[k], want[k], strict=True):
            for g, w in zip(per_got, per_want, strict=True):
                assert same(g, w), calls[k]


def test_one_callers_bad_input_fails_only_that_caller_in_a_shared_fan_out(tiny_bert, kinds):
    e = engine_of(tiny_bert, kinds)
    bb = e.backbone()
    good_names = [["sp-1-2-r2", "sp-3-3-q"], ["bitfit", "sp-0-0-r5"], ["lora-r8"]]
    good = [FanOut([e.adapter(n) for n in c], e.encode(e.adapter(c[0]), TEXTS[:2])) for c in good_names]
    bad_feats = [dict(f) for f in e.encode(e.adapter("sp-2-2-r3"), TEXTS[:1])]
    bad_feats[0]["input_ids"] = [2, 10**6, 3]  # a token id past the vocabulary: fails inside the pass
    bad = FanOut([e.adapter("sp-2-2-r3")], bad_feats)
    jobs = [good[0], bad, good[1], good[2]]
    errors: dict[int, BaseException] = {}
    results: dict[int, list] = {}

    def call(k):
        try:
            results[k] = e._fan_out_together(bb, jobs[k])
        except BaseException as ex:  # noqa: BLE001
            errors[k] = ex

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(jobs))]
    with e._forward_lock:
        for th in threads:
            th.start()
        for _ in range(300):
            if len(e._fan_pending.get(bb.name, [])) == len(jobs):
                break
            time.sleep(0.01)
    for th in threads:
        th.join(60)
    assert list(errors) == [1]
    for k, job in ((0, good[0]), (2, good[1]), (3, good[2])):
        for f, per in zip(job.feats, results[k], strict=True):
            for a, g in zip(job.adapters, per, strict=True):
                assert same(g, e.forward([Row(a, f)])[0])
    assert len(e.bank().pools) == len(kinds)


# ----------------------------------------------------------------------------------------- bytes
def test_growing_labels_keep_the_byte_accounting_honest(tiny_bert):
    """Heads are padded to the most labels resident: when a thousand-label adapter joins, every resident head
    grows to that size. The bank's byte count (what its LRU bound is enforced on) must grow with it, so the
    pools never hold more than ~1.1x the bytes the bank accounts for."""
    e = Engine(device="cpu", default_base_model=tiny_bert)
    for i in range(24):
        e.load(f"s{i}", *make(tiny_bert, dict(name="lora", rank=2), TaskSpec(labels=("a", "b")), seed=i))
    bank = e.bank()
    assert bank.capacity_bytes <= 1.1 * bank.nbytes
    e.load("wide", *make(tiny_bert, dict(name="lora", rank=2), TaskSpec(labels=labels(2000)), seed=99))
    assert bank.capacity_bytes <= 1.1 * bank.nbytes, (bank.capacity_bytes, bank.nbytes)


def test_the_device_budget_holds_after_heads_are_repadded(tiny_bert):
    """The LRU bound by bytes: a load past `device_bytes` evicts; after a wide head re-pads every resident head,
    the pools' rows in use must still fit the budget (within the pools' 1/32 growth)."""
    one = make(tiny_bert, dict(name="lora", rank=2), TaskSpec(labels=("a", "b")), seed=0)
    probe = engine_of(tiny_bert, {"p": one})
    per = probe.adapter("p").nbytes
    wide = make(tiny_bert, dict(name="lora", rank=2), TaskSpec(labels=labels(2000)), seed=99)
    wide_bytes = engine_of(tiny_bert, {"w": wide}).adapter("w").nbytes
    budget = 20 * per + wide_bytes
    e = Engine(device="cpu", default_base_model=tiny_bert, device_bytes=budget)
    for i in range(20):
        e.load(f"s{i}", *make(tiny_bert, dict(name="lora", rank=2), TaskSpec(labels=("a", "b")), seed=i))
    e.load("wide", *wide)
    pools = e.bank().pools
    used = sum(p.used_rows * p.widths[0] * 4 for p in
               [m.lora for m in pools.modules.values() if m.lora is not None] + list(pools.bias.values())
               + list(pools.head.values()))
    assert used <= 1.1 * budget, (used, budget)


def test_evicting_the_widest_head_stops_padding_the_heads_loaded_after_it(tiny_bert):
    """Heads are padded to the most labels *resident*: once the thousand-label adapter is gone, a two-label
    adapter loaded next costs what it cost before (not 1000x its head), and the pools stop running every
    head at a thousand labels."""
    e = Engine(device="cpu", default_base_model=tiny_bert)
    two = TaskSpec(labels=("a", "b"))
    before = e.load("a", *make(tiny_bert, dict(name="lora", rank=2), two, seed=1)).nbytes
    e.load("wide", *make(tiny_bert, dict(name="lora", rank=2), TaskSpec(labels=labels(1000)), seed=2))
    e.evict("wide")
    after = e.load("b", *make(tiny_bert, dict(name="lora", rank=2), two, seed=3)).nbytes
    assert after == before, (before, after)
    assert e.bank().pools.labels == 2


def test_eviction_frees_every_row_and_slot_for_reuse(tiny_bert, kinds):
    e = engine_of(tiny_bert, kinds)
    pools = e.bank().pools

    def used():
        return sum(m.lora.used_rows for m in pools.modules.values() if m.lora is not None) + \
            sum(p.used_rows for p in (*pools.bias.values(), *pools.head.values()))

    full, cap = used(), pools.capacity_bytes
    for _ in range(3):
        for n in kinds:
            e.evict(n)
        assert used() == 0 and len(pools) == 0
        for n in kinds:
            e.load(n, *kinds[n])
        assert used() == full and pools.capacity_bytes == cap  # the same rows, reused: no growth


# ----------------------------------------------------------------------------------------- thread stress
def test_stress_forward_load_evict_stats_and_fan_out_at_once(tiny_bert, kinds):
    """Mixed forwards, fan-outs, loads of new adapters (pools growing, heads re-padding), evictions, stats
    and byte counts all at once, for a few seconds: no errors, no deadlock, every answer exact."""
    stable = {k: kinds[k] for k in ("sp-1-2-r2", "sp-0-4-r1", "sp-3-3-q", "bitfit", "lora-r8")}
    e = engine_of(tiny_bert, stable)
    want = {(n, t): e.forward([row(e, n, t)])[0] for n in stable for t in TEXTS[:3]}
    churn = [make(tiny_bert, m, t, seed=700 + i) for i, (m, t) in enumerate(KINDS.values())]
    churn.append(make(tiny_bert, dict(name="lora", rank=9), TaskSpec(labels=labels(1500)), seed=799))
    stop = time.monotonic() + 4
    errors, bad, counts = [], [], {}

    def loop(name, fn):
        counts[name] = 0
        try:
            while time.monotonic() < stop:
                fn()
                counts[name] += 1
        except Exception as ex:  # noqa: BLE001
            errors.append((name, repr(ex)))

    rng_lock = threading.Lock()
    rng = random.Random(8)

    def pick(k):
        with rng_lock:
            return [(rng.choice(list(stable)), rng.choice(TEXTS[:3])) for _ in range(k)]

    def forward():
        reqs = pick(rng.randint(1, 20))
        rows = [row(e, n, t) for n, t in reqs]
        for (n, t), g in zip(reqs, e.forward(rows), strict=True):
            if not same(g, want[(n, t)]):
                bad.append(("forward", n))

    def fan():
        names = sorted({n for n, _ in pick(3)})
        for t, out in zip(TEXTS[:3], e.fan_out_many(names, TEXTS[:3]), strict=True):
            for n in names:
                ref = postproc(e, n, want[(n, t)])
                if abs(out[n]["score"] - ref) > TOL:
                    bad.append(("fan", n))

    k = iter(range(10**9))

    def load_evict():
        i = next(k)
        e.load(f"c{i}", *churn[i % len(churn)])
        if i >= 3:
            e.evict(f"c{i - 3}")

    def stats():
        e.stats()
        b = e.bank()
        _ = b.capacity_bytes, b.nbytes, b.names()

    run_all([threading.Thread(target=loop, args=a, daemon=True) for a in
             (("forward", forward), ("forward2", forward), ("fan", fan), ("load", load_evict), ("stats", stats))],
            stop, counts, errors, bad)
    assert min(counts.values()) > 0, counts


def run_all(threads: list[threading.Thread], stop: float, counts: dict, errors: list, bad: list) -> None:
    """Start `threads` (each runs until `stop`), join them with 40 s to spare, and fail on a thread still
    running (a deadlock), an error or a wrong answer any of them recorded."""
    for th in threads:
        th.start()
    for th in threads:
        th.join(max(1.0, stop + 40 - time.monotonic()))
    assert not [th for th in threads if th.is_alive()], f"deadlock: {counts}"
    assert not errors and not bad, (errors[:3], bad[:3], counts)


def postproc(e: Engine, name: str, logits: torch.Tensor) -> float:
    from spafit_core.outputs import postprocess

    return postprocess(e.adapter(name).task, logits)["score"]


# ----------------------------------------------------------------------------------------- more shapes
@pytest.mark.parametrize("arch", ["roberta", "distilbert"])
def test_heads_of_other_architectures_repad_to_thousands_of_labels_and_stay_exact(tiny_dirs, arch):
    path = tiny_dirs(arch)
    specs = [(dict(name="spafit", n1=1, n2=2, rank=2), TaskSpec(labels=("a", "b"))),
             (dict(name="lora", rank=3), TaskSpec(task_type="regression")),
             (dict(name="bitfit"), TaskSpec(labels=labels(1200))),
             (dict(name="spafit", n1=2, n2=2, rank=1), TaskSpec(labels=labels(3)))]
    adapters = {f"h{i}": make(path, m, t, seed=80 + i) for i, (m, t) in enumerate(specs)}
    e = Engine(device="cpu", default_base_model=path)
    held = {}
    for n, (cfg, w) in adapters.items():  # loaded one by one: each held row sees the heads re-padded later
        e.load(n, cfg, w)
        held[n] = [row(e, n, t) for t in TEXTS[:2]]
        held[n] = (held[n], e.forward(held[n]))
    rows = [r for rs, _ in held.values() for r in rs]
    got = e.forward(rows)
    want = [g for _, gs in held.values() for g in gs]
    for r, g, w in zip(rows, got, want, strict=True):
        assert same(g, w), r.adapter.name
    assert_rows_alone(e, rows, got)
    out = e.fan_out_many(list(adapters), TEXTS[:2])
    for text, per in zip(TEXTS[:2], out, strict=True):
        for n in adapters:
            assert abs(per[n]["score"] - e.predict(n, [text])[0]["score"]) <= TOL


def test_big_concurrent_fan_outs_with_pairs_split_over_passes_stay_exact(tiny_bert, kinds):
    """Two fan-outs of 12 tasks x 25 inputs (singles and text pairs mixed) queue at once: past FAN_OUT_ROWS
    each runs in its own pass; each answer equals the separate call."""
    e = engine_of(tiny_bert, kinds)
    names = list(kinds)
    inputs = [ALL_TEXTS[i % len(ALL_TEXTS)] if i % 3 else (TEXTS[i % 6], TEXTS[(i + 1) % 6]) for i in range(25)]
    results, errors = {}, []

    def call(k):
        try:
            results[k] = e.fan_out_many(names[k:] + names[:k], inputs)
        except Exception as ex:  # noqa: BLE001
            errors.append(repr(ex))

    threads = [threading.Thread(target=call, args=(k,)) for k in range(2)]
    with e._forward_lock:
        for th in threads:
            th.start()
        time.sleep(0.3)
    for th in threads:
        th.join(120)
    assert not errors, errors
    alone = {n: [e.predict(n, [x])[0] for x in inputs] for n in names}
    for k in range(2):
        for i, per in enumerate(results[k]):
            for n in names:
                assert abs(per[n]["score"] - alone[n][i]["score"]) <= TOL and per[n]["label"] == alone[n][i]["label"]


def test_reading_a_resident_adapters_tensors_while_it_is_evicted(tiny_bert, kinds):
    """`LoadedAdapter.deltas` / `head_state` / `packed()` read a resident adapter back from the pools; an
    eviction racing the read moves it to its own buffer: the read must return its tensors either way."""
    e = engine_of(tiny_bert, {"x": kinds["sp-1-2-r2"]})
    want = e.adapter("x").packed().clone()
    errors, stop = [], threading.Event()

    def churn():
        while not stop.is_set():
            e.evict("x")
            e.load("x", *kinds["sp-1-2-r2"])

    t = threading.Thread(target=churn)
    t.start()
    try:
        end = time.monotonic() + 1
        while time.monotonic() < end:
            try:
                a = e.adapter("x")
            except AdapterNotLoadedError:
                continue
            try:
                got = a.packed()
                if not torch.equal(got, want):
                    errors.append("wrong tensors")
            except Exception as ex:  # noqa: BLE001
                errors.append(repr(ex))
    finally:
        stop.set()
        t.join(30)
    assert not errors, (len(errors), errors[:2])


# ----------------------------------------------------------------------------------------- failed growth
@pytest.fixture
def oom_on_growth(monkeypatch):
    """While armed, any pool that must grow (reallocate) raises as a device out of memory would."""
    from spafit_core import slots as slots_module

    armed = [False]
    real = slots_module.RowPool.take

    def take(self, n):
        if armed[0] and self.top + max(0, n - len(self.free)) > self.data[0].shape[0]:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, n)

    monkeypatch.setattr(slots_module.RowPool, "take", take)
    return armed


def test_a_replace_that_fails_to_fit_keeps_the_old_version_serving(tiny_bert, kinds, oom_on_growth):
    """Hot-swap is atomic: a new version that cannot be admitted (the pools cannot grow) leaves the old one
    serving, and no slot is left behind held by nobody."""
    e = engine_of(tiny_bert, {k: kinds[k] for k in ("sp-1-2-r2", "lora-r8", "bitfit")})
    want = e.predict("sp-1-2-r2", TEXTS[:2])
    pools = e.bank().pools
    slots = len(pools)
    oom_on_growth[0] = True
    bigger = make(tiny_bert, dict(name="spafit", n1=1, n2=2, rank=12), TaskSpec(labels=labels(50)), seed=11)
    with pytest.raises(RuntimeError, match="out of memory"):
        e.load("sp-1-2-r2", *bigger)
    oom_on_growth[0] = False
    got = e.predict("sp-1-2-r2", TEXTS[:2])  # the old version still serves
    assert all(abs(g["score"] - w["score"]) <= TOL for g, w in zip(got, want, strict=True))
    assert len(pools) == slots == len(e.bank().names())  # no slot held by nobody


def test_pools_stay_consistent_after_an_attach_fails_midway(tiny_bert, kinds, oom_on_growth):
    """An attach that fails part way (after raising a module's LoRA rank, before the table is rebuilt) must not
    leave the table's columns out of step with the modules: later loads and every row stay exact."""
    base = {k: kinds[k] for k in ("sp-1-2-r2", "bitfit", "sp-0-4-r1")}
    e = engine_of(tiny_bert, base)
    oom_on_growth[0] = True
    wide = make(tiny_bert, dict(name="spafit", n1=1, n2=2, rank=9), TaskSpec(labels=labels(40)), seed=12)
    with pytest.raises(RuntimeError, match="out of memory"):
        e.load("wide", *wide)
    oom_on_growth[0] = False
    e.evict("bitfit")  # a free slot: the next attach writes its table row in place (no rebuild)
    del base["bitfit"]
    same_rank = make(tiny_bert, dict(name="spafit", n1=1, n2=2, rank=9), TaskSpec(labels=("a", "b")), seed=13)
    e.load("nine", *same_rank)  # rank 9 where the failed attach left the module at rank 9
    ref = engine_of(tiny_bert, {**base, "nine": same_rank})
    rows = [row(e, n, t) for n in [*base, "nine"] for t in TEXTS[:3]]
    assert_rows_alone(e, rows, ref=ref)


def test_a_borrow_that_fails_returns_the_slots_already_borrowed(tiny_bert, kinds, oom_on_growth):
    """A forward's rows of two evicted adapters: the first borrows a slot (free rows), the second cannot (the
    pools must grow and cannot). The forward fails; the slot the first borrowed must go back, and no row of the
    pools is left held by nobody."""
    e = engine_of(tiny_bert, {k: kinds[k] for k in ("bitfit", "lora-r8", "sp-1-2-r2")})
    pools = e.bank().pools

    def used():
        return sum(m.lora.used_rows for m in pools.modules.values() if m.lora is not None) + \
            sum(p.used_rows for p in (*pools.bias.values(), *pools.head.values()))

    held = [row(e, "bitfit", TEXTS[0]), row(e, "lora-r8", TEXTS[0])]
    want = [e.forward([r])[0] for r in held]
    e.evict("bitfit")
    e.evict("lora-r8")
    e.load("thief", *make(tiny_bert, *KINDS["lora-r8"], seed=17))  # takes lora-r8's rows
    slots, rows = len(pools), used()
    oom_on_growth[0] = True
    with pytest.raises(RuntimeError, match="out of memory"):
        e.forward(held)
    oom_on_growth[0] = False
    assert (len(pools), used()) == (slots, rows)  # nothing left borrowed
    assert all(same(g, w) for g, w in zip(e.forward(held), want, strict=True))


def test_threads_thrashing_a_one_adapter_budget_through_the_loader_stay_exact(tiny_bert, kinds):
    """device_bytes of one adapter, a loader: every lookup loads (evicting the rest) while other threads'
    mixed forwards and fan-outs borrow slots for the adapters they hold. Every answer exact, no error."""
    names = ["sp-1-2-r2", "sp-3-3-q", "lora-r8", "bitfit", "sp-0-4-r1"]
    ref = engine_of(tiny_bert, {n: kinds[n] for n in names})
    want = {(n, t): ref.forward([row(ref, n, t)])[0] for n in names for t in TEXTS[:2]}
    e = Engine(device="cpu", default_base_model=tiny_bert, device_bytes=1, loader=lambda name: kinds[name])
    stop = time.monotonic() + 3
    errors, bad, counts = [], [], {}

    def loop(name, seed, fan):
        rng, counts[name] = random.Random(seed), 0
        try:
            while time.monotonic() < stop:
                picks = [(rng.choice(names), rng.choice(TEXTS[:2])) for _ in range(rng.randint(1, 6))]
                if fan:
                    tasks = sorted({n for n, _ in picks})
                    for t, out in zip(TEXTS[:2], e.fan_out_many(tasks, TEXTS[:2]), strict=True):
                        for n in tasks:
                            if abs(out[n]["score"] - postproc(ref, n, want[(n, t)])) > TOL:
                                bad.append(("fan", n))
                else:
                    rows = [row(e, n, t) for n, t in picks]
                    for (n, t), g in zip(picks, e.forward(rows), strict=True):
                        if not same(g, want[(n, t)]):
                            bad.append(("forward", n))
                counts[name] += 1
        except Exception as ex:  # noqa: BLE001
            errors.append((name, repr(ex)))

    run_all([threading.Thread(target=loop, args=(f"t{k}", k, k == 2), daemon=True) for k in range(3)],
            stop, counts, errors, bad)
    assert len(e.bank().pools) <= 1


def test_a_suspended_pass_resumes_exactly_after_its_slots_were_reused_and_heads_repadded(tiny_bert, kinds):
    """A mixed pass steps aside before layer 2; meanwhile its adapters are evicted or replaced, thieves with
    other ranks and a thousand-label head take their slots: the resumed pass gives the uninterrupted logits."""
    from spafit_core.engine import PassSuspended, pass_control

    e = engine_of(tiny_bert, kinds)
    names = ["sp-1-2-r2", "sp-3-3-q", "lora-r8", "bitfit", "sp-0-4-r1", "sp-1-3-ffn", "sp-2-2-r3"]
    rows = [row(e, n, TEXTS[k % len(TEXTS)]) for k, n in enumerate(names * 2)]
    want = e.forward(rows)
    event = threading.Event()
    gate = e.backbone().base.encoder.layer[1]
    handle = gate.register_forward_hook(lambda *a: event.set())
    try:
        with pytest.raises(PassSuspended) as stepped, pass_control(yield_to=event):
            e.forward(rows)
    finally:
        handle.remove()
    assert stepped.value.state.layer == 2
    for i, n in enumerate(("sp-1-2-r2", "lora-r8", "bitfit")):
        e.evict(n)
        e.load(f"thief{i}", *make(tiny_bert, dict(name="lora", rank=11 + i), TaskSpec(labels=labels(700)),
                                  seed=900 + i))
    e.load("sp-3-3-q", *make(tiny_bert, *KINDS["sp-3-3-q"], seed=901))  # replaced
    with pass_control(resume=stepped.value.state):
        got = e.forward(rows)
    for r, g, w in zip(rows, got, want, strict=True):
        assert same(g, w), r.adapter.name


def test_one_callers_failed_borrow_in_a_shared_fan_out_never_reaches_another_caller(tiny_bert, kinds, monkeypatch):
    """Three fan-outs share a pass. Caller B holds an adapter no longer in the pools whose wide head cannot be
    made (its head pools cannot grow: out of memory); caller C holds another one of the same LoRA rank. B's
    failure must stay B's: A and C get their exact answers, in the shared pass or alone."""
    from spafit_core import slots as slots_module
    from spafit_core.engine import build_adapter

    real = slots_module.SlotPools._repad_heads
    armed = [False]

    def widen(self, heads, n):  # re-padding the head pools to more labels fails
        if armed[0]:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, heads, n)

    monkeypatch.setattr(slots_module.SlotPools, "_repad_heads", widen)
    kinds = {k: v for k, v in kinds.items() if k != "sp-3-3-q"}  # at most 5 labels resident
    e = engine_of(tiny_bert, kinds)
    bb = e.backbone()
    e.evict("bitfit")  # a free slot
    b_cfg, b_w = make(tiny_bert, dict(name="lora", rank=12), TaskSpec(labels=labels(900)), seed=31)
    c_cfg, c_w = make(tiny_bert, dict(name="lora", rank=12), TaskSpec(labels=("a", "b")), seed=32)
    held_b = build_adapter(bb, "b-wide", b_cfg, b_w)  # as a request holds an adapter replaced since
    held_c = build_adapter(bb, "c-12", c_cfg, c_w)
    ref = engine_of(tiny_bert, {**kinds, "c-12": (c_cfg, c_w)})
    feats = e.encode(e.adapter("sp-1-2-r2"), TEXTS[:2])
    jobs = [FanOut([e.adapter("sp-1-2-r2"), e.adapter("lora-r8")], feats), FanOut([held_b], feats),
            FanOut([held_c, e.adapter("sp-2-2-r3")], feats)]
    results, errors = {}, {}

    def call(k):
        try:
            results[k] = e._fan_out_together(bb, jobs[k])
        except BaseException as ex:  # noqa: BLE001
            errors[k] = ex

    threads = [threading.Thread(target=call, args=(k,)) for k in range(3)]
    armed[0] = True
    with e._forward_lock:
        for th in threads:
            th.start()
        for _ in range(300):
            if len(e._fan_pending.get(bb.name, [])) == 3:
                break
            time.sleep(0.01)
    for th in threads:
        th.join(60)
    armed[0] = False
    assert list(errors) == [1], errors
    for k in (0, 2):
        for f, per in zip(feats, results[k], strict=True):
            for a, g in zip(jobs[k].adapters, per, strict=True):
                assert same(g, ref.forward([Row(ref.adapter(a.name), f)])[0]), a.name


def test_reloading_a_name_with_the_same_weights_but_a_new_config_takes_the_new_config(tiny_bert, kinds):
    """Load is idempotent for the same content; new content under the same name replaces the old. Label names
    and max_seq_length live in the config: the same weights with renamed labels / a new length are new content."""
    import copy

    cfg, w = kinds["sp-1-2-r2"]
    e = engine_of(tiny_bert, {"x": (cfg, w)})
    cfg2 = copy.deepcopy(cfg)
    cfg2["task"]["labels"] = ["bad", "good"]
    cfg2["max_seq_length"] = 5
    a = e.load("x", cfg2, w)
    assert a.task.labels == ("bad", "good") and a.max_seq_length == 5
    assert e.predict("x", [TEXTS[0]])[0]["label"] in ("bad", "good")


def test_an_adapter_read_while_it_leaves_the_pools_reads_its_own_buffer(tiny_bert):
    """`LoadedAdapter.packed()` racing a retire: the retire lands between the read of its buffer (still None: it
    is in the pools) and the read of its pools (None by then). Staged by retiring it on the first read of
    `buffer`; it once failed with AttributeError on `None.lock`."""
    e = Engine(device="cpu", default_base_model=tiny_bert)
    cfg, w = make(tiny_bert, dict(name="spafit", n1=1, n2=2, rank=2), TaskSpec(labels=("a", "b")), seed=5)
    a = e.load("a", cfg, w)
    want = a.packed().clone()
    assert a.buffer is None and a.pools is not None  # in the pools only
    bank, fired = e.bank(), []

    class RetiredOnFirstRead(type(a)):
        def __getattribute__(self, name):
            value = super().__getattribute__(name)
            if name == "buffer" and not fired:
                fired.append(True)
                bank.evict("a")  # sets the buffer, then clears `pools`
            return value

    a.__class__ = RetiredOnFirstRead
    got = a.packed()
    assert fired and a.pools is None
    assert torch.equal(got, want)
