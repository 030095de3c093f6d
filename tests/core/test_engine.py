"""The multi-adapter engine: hot-swap, mixed-task batches, fan-out and the adapter bank."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from spafit_core import AdapterError, AdapterMismatchError, MethodConfig, TaskSpec
from spafit_core.adapter import serialize
from spafit_core.engine import Engine, Row
from spafit_core.errors import AdapterNotLoadedError
from spafit_core.model import SpafitModel
from spafit_core.train import collate, set_seed
from tests.tiny import make_tiny_model

TEXTS = ["good movie", "the plot was very boring and bad", "ok", "i love this film it is great fun",
         "awful actor", "not bad but not great either and the plot is thin"]
METHODS = [
    dict(name="spafit", n1=1, n2=2, rank=2),
    dict(name="spafit", n1=2, n2=3, rank=4),
    dict(name="spafit", n1=0, n2=4, rank=1),
    dict(name="spafit", n1=3, n2=3, rank=3, targets=("query", "value", "ffn_in")),
    dict(name="lora", rank=2),
    dict(name="bitfit"),
]
TASKS = [TaskSpec(labels=("neg", "pos")), TaskSpec(labels=("a", "b", "c")),
         TaskSpec(task_type="regression"), TaskSpec(task_type="multi_label_classification", labels=("x", "y"))]


def random_adapter(path, method: dict, task: TaskSpec, seed: int):
    """A model whose every trainable tensor is random (so every delta is non-zero), and its adapter."""
    set_seed(seed)
    m = SpafitModel.from_pretrained(path, MethodConfig(**method), task)
    with torch.no_grad():
        for t in m.adapter_state_dict().values():
            t.copy_(torch.randn_like(t) * 0.2)
    m.eval()
    cfg, weights = serialize(m, max_seq_length=32)
    return m, cfg, weights


def engine_with_adapters(path: str, n: int) -> Engine:
    """A CPU engine on the tiny backbone at `path` with `n` random adapters t0..t{n-1} (METHODS[i], TASKS[i % 2])."""
    e = Engine(device="cpu", default_base_model=path)
    for i in range(n):
        _, cfg, w = random_adapter(path, METHODS[i], TASKS[i % 2], seed=i)
        e.load(f"t{i}", cfg, w)
    return e


@pytest.fixture(scope="module")
def zoo(tiny_dirs):
    path = tiny_dirs("bert")
    out = {}
    for i, method in enumerate(METHODS):
        task = TASKS[i % len(TASKS)]
        out[f"task{i}"] = random_adapter(path, method, task, seed=i)
    return out


def loaded_engine(base_model: str, adapters: dict) -> Engine:
    """A CPU engine on `base_model` with every (model, config, weights) of `adapters` loaded by name."""
    e = Engine(device="cpu", default_base_model=base_model)
    for name, (_, cfg, weights) in adapters.items():
        e.load(name, cfg, weights)
    return e


@pytest.fixture
def engine(zoo, tiny_bert):
    return loaded_engine(tiny_bert, zoo)


def reference_logits(model: SpafitModel, text: str) -> torch.Tensor:
    batch = dict(model.tokenizer([text], truncation=True, max_length=32, return_tensors="pt"))
    with torch.no_grad():
        return model(batch)[0]


def test_engine_matches_each_adapters_own_model(engine, zoo):
    for name, (model, _, _) in zoo.items():
        adapter = engine.adapter(name)
        rows = [Row(adapter, f) for f in engine.encode(adapter, TEXTS)]
        for text, got in zip(TEXTS, engine.forward(rows), strict=True):
            assert (got - reference_logits(model, text)).abs().max().item() <= 1e-5, name


def test_mixed_batches_equal_each_row_alone(engine, zoo):
    """Random mixes over adapters with different n1/n2/rank/targets/methods and heads."""
    rng = random.Random(0)
    names = list(zoo)
    for trial in range(12):
        picks = [(rng.choice(names), rng.choice(TEXTS)) for _ in range(rng.randint(2, 16))]
        rows = []
        for name, text in picks:
            a = engine.adapter(name)
            rows.append(Row(a, engine.encode(a, [text])[0]))
        mixed = engine.forward(rows)
        for row, got in zip(rows, mixed, strict=True):
            alone = engine.forward([row])[0]
            assert got.shape == alone.shape
            assert (got - alone).abs().max().item() <= 1e-5, (trial, row.adapter.name)


def test_mixed_batch_on_deberta_falls_back_per_adapter_and_stays_exact(tiny_dirs):
    path = tiny_dirs("deberta-v2")
    e = Engine(device="cpu", default_base_model=path)
    models = {}
    for i, method in enumerate(METHODS[:3]):
        models[f"d{i}"], cfg, w = random_adapter(path, method, TaskSpec(labels=("neg", "pos")), seed=10 + i)
        e.load(f"d{i}", cfg, w)
    out = e.predict_mixed([(n, t) for n in models for t in TEXTS[:2]])
    i = 0
    for m in models.values():
        for t in TEXTS[:2]:
            want = torch.softmax(reference_logits(m, t), -1).max().item()
            assert abs(out[i]["score"] - want) <= 1e-5
            i += 1


def test_fan_out_equals_separate_calls(engine, zoo):
    names = list(zoo)
    for text in TEXTS[:3]:
        fan = engine.fan_out(names, text)
        for n in names:
            single = engine.predict(n, [text])[0]
            assert fan[n]["label"] == single["label"]
            assert abs(fan[n]["score"] - single["score"]) <= 1e-5


def test_fan_out_runs_the_shared_prefix_once(engine, zoo, monkeypatch):
    """With every task's first trained layer >= 1, layer 0 runs on one row, not one per task."""
    names = ["task0", "task1", "task3"]  # first trained layers 1, 2, 3
    layer0 = engine.backbone().base.encoder.layer[0].layer
    batch_sizes = []
    handle = layer0.register_forward_hook(lambda m, a, o: batch_sizes.append(a[0].shape[0]))
    try:
        engine.fan_out(names, TEXTS[1])
    finally:
        handle.remove()
    assert batch_sizes == [1]


def test_hot_swap_never_reloads_or_copies_the_backbone(engine, zoo):
    bb = engine.backbone()
    ptrs = {n: p.data_ptr() for n, p in bb.base.named_parameters()}
    before = {n: p.clone() for n, p in bb.base.named_parameters()}
    for name in list(zoo) * 2:
        engine.predict(name, TEXTS[:2])
    assert engine.backbone_loads == 1
    assert {n: p.data_ptr() for n, p in bb.base.named_parameters()} == ptrs
    assert all(torch.equal(p, before[n]) for n, p in bb.base.named_parameters())


def test_outputs_by_task_type(engine):
    single = engine.predict("task1", ["good movie"], top_k=2)[0]  # 3 classes, top_k 2
    assert len(single["scores"]) == 2 and single["label"] == single["scores"][0]["label"]
    full = engine.predict("task1", ["good movie"])[0]
    assert abs(sum(s["score"] for s in full["scores"]) - 1) < 1e-5 and len(full["scores"]) == 3
    reg = engine.predict("task2", ["good movie"])[0]
    assert isinstance(reg["value"], float) and reg["label"] is None
    multi = engine.predict("task3", ["good movie"])[0]
    assert {s["label"] for s in multi["scores"]} == {"x", "y"}
    assert all(0 <= s["score"] <= 1 for s in multi["scores"])
    assert multi["labels"] == [s["label"] for s in multi["scores"] if s["score"] >= 0.5] or \
        set(multi["labels"]) == {s["label"] for s in multi["scores"] if s["score"] >= 0.5}


def test_text_pairs_are_supported(engine):
    out = engine.predict("task0", [{"text": "good movie", "text_pair": "bad plot"}, ("ok", "fine")])
    assert len(out) == 2
    with pytest.raises(AdapterError, match="pairs"):
        engine.predict("task0", ["good", ("ok", "fine")])


def test_bank_is_lru_bounded_by_bytes(tiny_bert, zoo):
    size = {n: len(w) for n, (_, _, w) in zoo.items()}
    budget = size["task0"] + size["task1"] + 64
    e = Engine(device="cpu", default_base_model=tiny_bert, device_bytes=budget)
    for n in ("task0", "task1"):
        e.load(n, *zoo[n][1:])
    e.adapter("task0")  # task0 is now the most recently used
    e.load("task4", *zoo["task4"][1:])
    bank = e.bank()
    assert "task1" not in bank and "task0" in bank and "task4" in bank
    assert bank.nbytes <= max(budget, size["task4"])
    assert bank.stats["evictions"] >= 1


def test_load_and_evict_are_idempotent_and_replace_atomically(tiny_bert, zoo):
    e = Engine(device="cpu", default_base_model=tiny_bert)
    _, cfg0, w0 = zoo["task0"]
    first = e.load("t", cfg0, w0)
    assert e.load("t", cfg0, w0) is first  # same content: no-op
    old = e.predict("t", ["good movie"])[0]
    _, cfg4, w4 = zoo["task4"]
    e.load("t", cfg4, w4)  # new version under the same name
    assert e.adapter("t").sha256 == cfg4["weights"]["sha256"]
    assert e.predict("t", ["good movie"])[0]["scores"] != old["scores"]
    assert e.evict("t") is True and e.evict("t") is False
    with pytest.raises(AdapterNotLoadedError):
        e.adapter("t")


def test_loader_fills_misses_once_under_concurrency(tiny_bert, zoo):
    calls = []
    lock = threading.Lock()

    def loader(name):
        with lock:
            calls.append(name)
        return zoo[name][1], zoo[name][2]

    e = Engine(device="cpu", default_base_model=tiny_bert, loader=loader)
    errors = []

    def work():
        try:
            for n in ("task0", "task1", "task2"):
                e.predict(n, ["good"])
        except Exception as ex:  # pragma: no cover - reported below
            errors.append(ex)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(calls) == ["task0", "task1", "task2"]


def test_adapter_for_another_backbone_is_refused(tiny_bert, zoo, tmp_path):
    other = make_tiny_model(tmp_path / "other", "bert", seed=7)
    e = Engine(device="cpu", default_base_model=str(other))
    _, cfg, w = zoo["task0"]
    cfg = dict(cfg, base_model=dict(cfg["base_model"], name=str(other)))
    with pytest.raises(AdapterMismatchError, match="base model"):
        e.load("x", cfg, w)


def test_adapter_with_wrong_shapes_is_refused(tiny_bert, zoo):
    e = Engine(device="cpu", default_base_model=tiny_bert)
    _, cfg, w = zoo["task0"]
    lying = dict(cfg, method=dict(cfg["method"], rank=8))  # says rank 8, holds rank 2
    with pytest.raises(AdapterMismatchError, match="lora"):
        e.load("x", lying, w)


def test_full_finetuning_results_are_not_served_as_adapters(tiny_bert):
    _, cfg, w = random_adapter(tiny_bert, dict(name="full"), TaskSpec(labels=("a", "b")), seed=0)
    with pytest.raises(AdapterError, match="full"):
        Engine(device="cpu", default_base_model=tiny_bert).load("f", cfg, w)


def test_collate_pads_and_masks():
    b = collate([{"input_ids": [2, 5, 3]}, {"input_ids": [2, 3]}], pad_id=0)
    assert b["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
