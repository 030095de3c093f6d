"""The engine's bounds: inputs truncated to what the backbone has positions for, backbones loaded without
stalling other models and bounded in number (LRU, never one in use), fan-out over head-only adapters."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from spafit_core import TaskSpec
from spafit_core.adapter import serialize
from spafit_core.engine import Engine, Row
from spafit_core.engine import forward as engine_module  # where the Engine looks up `Backbone`
from tests.core.test_engine import TEXTS, random_adapter
from tests.tiny import make_tiny_model

LONG = " ".join(["the plot was very boring and bad"] * 40)  # ~280 tokens; the tiny BERT has 64 positions


@pytest.fixture(scope="module")
def two_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounds")
    return [str(make_tiny_model(root / f"bert-{i}", "bert", seed=i)) for i in range(3)]


def overlong_adapter(path: str, seed: int = 5):
    """An adapter whose config claims 1024 tokens per input on a backbone with 64 positions (an old registry
    row, or one imported before the import check existed)."""
    model, _, _ = random_adapter(path, dict(name="spafit", n1=1, n2=2, rank=2), TaskSpec(labels=("neg", "pos")),
                                 seed=seed)
    cfg, weights = serialize(model, max_seq_length=1024)
    assert cfg["max_seq_length"] == 64  # what serialize records now: no more than the backbone's positions
    cfg["max_seq_length"] = 1024  # as an old row holds it
    return model, cfg, weights


def test_inputs_are_truncated_to_the_backbones_positions(tiny_bert):
    model, cfg, weights = overlong_adapter(tiny_bert)
    e = Engine(device="cpu", default_base_model=tiny_bert)
    adapter = e.load("long", cfg, weights)
    assert adapter.max_seq_length == 1024 and e.backbone().max_length == 64
    feats = e.encode(adapter, [LONG, "ok"])
    assert len(feats[0]["input_ids"]) == 64 and len(feats[1]["input_ids"]) == 3
    got = e.forward([Row(adapter, f) for f in feats])[0]
    batch = dict(model.tokenizer([LONG], truncation=True, max_length=64, return_tensors="pt"))
    with torch.no_grad():
        want = model(batch)[0]
    assert (got - want).abs().max().item() <= 1e-5


def test_an_overlong_adapter_mixes_with_others_in_one_batch(tiny_bert, two_bases):
    _, cfg, weights = overlong_adapter(tiny_bert)
    _, cfg2, weights2 = random_adapter(tiny_bert, dict(name="lora", rank=2), TaskSpec(labels=("a", "b")), seed=6)
    e = Engine(device="cpu", default_base_model=tiny_bert)
    long, short = e.load("long", cfg, weights), e.load("short", cfg2, weights2)
    rows = [Row(long, f) for f in e.encode(long, [LONG, LONG])] + [Row(short, f) for f in e.encode(short, TEXTS)]
    mixed = e.forward(rows)
    for row, got in zip(rows, mixed, strict=True):
        assert (got - e.forward([row])[0]).abs().max().item() <= 1e-5


def test_the_position_limit_of_roberta_leaves_out_its_padding_offset(tiny_dirs):
    e = Engine(device="cpu", default_base_model=tiny_dirs("roberta"))
    bb = e.backbone()
    assert bb.config.max_position_embeddings == 70 and bb.max_length == 70 - (bb.config.pad_token_id + 1)


def test_fan_out_over_head_only_tasks(tiny_bert):
    """n1 = n2 = number of layers: no layer trained, only the head (an AttributeError before)."""
    e = Engine(device="cpu", default_base_model=tiny_bert)
    names = []
    for i, labels in enumerate([("a", "b"), ("x", "y", "z")]):
        _, cfg, w = random_adapter(tiny_bert, dict(name="spafit", n1=4, n2=4, rank=2), TaskSpec(labels=labels),
                                   seed=20 + i)
        e.load(f"head{i}", cfg, w)
        names.append(f"head{i}")
    _, cfg, w = random_adapter(tiny_bert, dict(name="spafit", n1=1, n2=2, rank=2), TaskSpec(labels=("a", "b")),
                               seed=30)
    e.load("layers", cfg, w)
    for group in (names, [*names, "layers"]):
        for text in TEXTS[:3]:
            fan = e.fan_out(group, text)
            for n in group:
                single = e.predict(n, [text])[0]
                assert fan[n]["label"] == single["label"] and abs(fan[n]["score"] - single["score"]) <= 1e-5


class SlowBackbones:
    """Replaces the engine's Backbone class: loads of `slow` block until `release` is set; counts loads."""

    def __init__(self, monkeypatch, slow: str):
        self.slow, self.release, self.started = slow, threading.Event(), threading.Event()
        self.loads: list[str] = []
        real = engine_module.Backbone
        outer = self

        class Backbone(real):
            def __init__(self, name, **kw):
                outer.loads.append(name)
                if name == outer.slow:
                    outer.started.set()
                    assert outer.release.wait(30)
                super().__init__(name, **kw)

        monkeypatch.setattr(engine_module, "Backbone", Backbone)


def test_loading_a_backbone_never_blocks_predicts_on_another(two_bases, monkeypatch):
    a, b = two_bases[:2]
    _, cfg, w = random_adapter(a, dict(name="spafit", n1=1, n2=2, rank=2), TaskSpec(labels=("neg", "pos")), seed=1)
    slow = SlowBackbones(monkeypatch, b)
    e = Engine(device="cpu", default_base_model=a)
    e.load("on-a", cfg, w)
    loaders = [threading.Thread(target=e.backbone, args=(b,)) for _ in range(3)]  # three callers, one load
    for t in loaders:
        t.start()
    try:
        assert slow.started.wait(30)
        start = time.perf_counter()
        assert len(e.predict("on-a", TEXTS)) == len(TEXTS)  # while b is still loading
        assert time.perf_counter() - start < 5
        assert any(t.is_alive() for t in loaders)
    finally:
        slow.release.set()
        for t in loaders:
            t.join(30)
    assert slow.loads.count(b) == 1 and e.backbone_loads == 2
    assert e.backbones == [a, b]


def test_a_failed_backbone_load_fails_its_waiters_and_a_later_call_tries_again(two_bases, tmp_path):
    (tmp_path / "empty").mkdir()
    e = Engine(device="cpu", default_base_model=two_bases[0])
    for _ in range(2):
        with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises for an empty folder
            e.backbone(str(tmp_path / "empty"))
    assert e.backbones == [] and e._loading == {}


def test_resident_backbones_are_bounded_lru_and_one_in_use_is_never_evicted(two_bases):
    a, b, c = two_bases
    adapters = {}
    for i, base in enumerate((a, b)):
        _, cfg, w = random_adapter(base, dict(name="lora", rank=2), TaskSpec(labels=("neg", "pos")), seed=40 + i)
        adapters[base] = (f"on-{i}", cfg, w)
    e = Engine(device="cpu", default_base_model=a, max_backbones=2,
               loader=lambda name: next((cfg, w) for n, cfg, w in adapters.values() if n == name),
               base_model_of=lambda name: next(base for base, (n, _, _) in adapters.items() if n == name))
    before = e.predict("on-0", TEXTS)
    e.predict("on-1", TEXTS)
    assert e.backbones == [a, b]
    e.backbone(a)  # a is now the most recently used
    e.backbone(c)
    assert e.backbones == [a, c] and e.backbone_evictions == 1  # b was the least recently used
    stats = e.stats()
    assert stats["loads"] == 2 and stats["misses"] == 2  # the evicted bank's counters are kept

    with e._using(a):  # a batch running on a: loading b must not evict it
        e.backbone(b)  # c is the LRU one not in use
        assert e.backbones == [a, b]
        e.backbone(c)  # b is
        assert e.backbones == [a, c]
        e.max_backbones = 1
        e.backbone(b)  # every other one in use: over the bound until the batch ends
        assert e.backbones == [a, b]
    assert e.backbones == [b]
    e.max_backbones = 2
    after = e.predict("on-0", TEXTS)  # reloaded on demand after being evicted
    assert [p["label"] for p in after] == [p["label"] for p in before]
    assert all(abs(x["score"] - y["score"]) <= 1e-5 for x, y in zip(after, before, strict=True))
