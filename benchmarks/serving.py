"""Serving benchmark on the packaged MiniLM: the multi-adapter engine against the alternatives, every
figure a ratio of two things measured side by side in one run (interleaved rounds, median and min-max).

(a) time to first prediction for a new task: hot-swap (the adapter is in the bank; switching only
    changes the route), loading the adapter into the bank (verify + build) and predicting, vs loading a
    merged fine-tuned model from disk (`SpafitModel.save_merged` then
    `AutoModelForSequenceClassification.from_pretrained`) and predicting;
(b) one mixed batch of 32 rows over 8 tasks vs a same-task batch of 32 (the mean over the 8 tasks),
    vs grouping the rows by task (8 forward passes of 4 rows), and, on 8 LoRA adapters, our mixed batch
    vs HF PEFT's (`adapter_names=`);
(c) fan-out of one input to 16 tasks vs one mixed batch of the same 16 rows, for three sets of 16 tasks: spafit
    with n1 in {2, 3} (and vs 16 separate calls), spafit with its default stratification (n1 = 2 of 6), and
    tasks with n1 = 0 (lora, bitfit, spafit n1 = 0: no prefix to share);
(d) resident memory per loaded adapter vs its tensor bytes (fresh process, 200 adapters);
(g) the limit, like for like: one mixed batch of 32 rows over 32 distinct adapters against the bare backbone
    (the plain HF model with its head: no adapter code at all) on the same padded rows (lengths spread
    between half the length and the length), at 16, 64 and 128 tokens; and the engine's per-forward adapter
    bookkeeping (the rows' slots and order, the table lookup, each module's runs of rows) against the forward;
(p) a torch.profiler summary of (g)'s mixed batch and the bare backbone at 16 tokens (self CPU time by op);
(e) 1,000 registered adapters behind a 64-adapter bank under a Zipf request mix (misses go through the
    engine's `loader` to verify + build from serialized bytes), against an engine holding all 1,000,
    request by request.

Adapters are not trained: every trainable tensor (deltas and head) is random and non-zero, N(0, 0.02),
on the real MiniLM backbone, which costs exactly what trained ones cost. Methods vary (spafit with
different n1/n2/rank, lora, bitfit) and so do heads (2 and 3 classes, regression).

    python -m benchmarks.serving --quick    # about a minute
    python -m benchmarks.serving            # the full run
    python -m benchmarks.serving --parts g,c --out serving_limit   # the like-for-like figures alone
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# isort: off
from benchmarks import common  # first: it sets OMP_WAIT_POLICY before torch loads
# isort: on
import torch

from spafit_core.adapter import model_from_adapter, serialize
from spafit_core.config import MethodConfig, TaskSpec
from spafit_core.engine import Engine, Row
from spafit_core.engine.slot_lease import lease_slots, route_rows
from spafit_core.model import SpafitModel, load_hf_classifier
from spafit_core.train import collate

BASE = "minilm"
TWO, THREE, REG = TaskSpec(labels=("neg", "pos")), TaskSpec(labels=("a", "b", "c")), TaskSpec(task_type="regression")
MIX = [  # 8 tasks of varied methods and heads
    (dict(name="spafit", n1=2, n2=4, rank=8), TWO),
    (dict(name="spafit", n1=1, n2=3, rank=4), THREE),
    (dict(name="lora", rank=8), TWO),
    (dict(name="spafit", n1=3, n2=5, rank=16), REG),
    (dict(name="bitfit"), TWO),
    (dict(name="spafit", n1=0, n2=3, rank=8), THREE),
    (dict(name="lora", rank=4), REG),
    (dict(name="spafit", n1=2, n2=2, rank=8), TWO),
]
LORA_RANKS = (4, 8, 8, 16, 4, 8, 16, 8)  # the 8 LoRA adapters compared with PEFT (2-class heads)
FANOUT = [dict(name="spafit", n1=n1, n2=n2, rank=r) for n1, n2, r in
          ((2, 4, 8), (3, 5, 8), (2, 5, 4), (3, 4, 16))]  # x 4 heads = 16 tasks, every n1 > 0
WORDS = ("the service answers many tasks from one frozen backbone while each adapter adds its own small "
         "deltas to a few layers and a head so that switching between tasks costs almost nothing and "
         "requests for different tasks share one batch on the same model").split()
SENTENCE = "switching tasks on a shared frozen backbone should cost almost nothing at all"


# ------------------------------------------------------------------------------ adapters
class Factory:
    """Random adapters on the real backbone: one template model per (method, task), refilled per seed."""

    def __init__(self, base_fingerprint: str, max_seq_length: int = 128):
        self.fp = base_fingerprint
        self.max_seq_length = max_seq_length
        self._templates: dict[str, SpafitModel] = {}

    def template(self, method: dict, task: TaskSpec) -> SpafitModel:
        key = json.dumps([method, task.to_dict()], sort_keys=True)
        if key not in self._templates:
            hf = load_hf_classifier(BASE, task)
            self._templates[key] = SpafitModel(hf, MethodConfig(**method), task, base_model_name=BASE,
                                               base_fingerprint=self.fp).eval()
        return self._templates[key]

    def make(self, method: dict, task: TaskSpec, seed: int) -> tuple[dict, bytes]:
        m = self.template(method, task)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for t in m.adapter_state_dict().values():
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
        return serialize(m, max_seq_length=self.max_seq_length)


def long_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(300)) for _ in range(n)]


# ------------------------------------------------------------------------------ (a) hot-swap
def bench_hot_swap(engine: Engine, fac: Factory, args, tmp: Path) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification

    for i, name in enumerate(("swap-a", "swap-b")):
        engine.load(name, *fac.make(*MIX[i * 2], seed=100 + i))
    cfg_c, w_c = fac.make(*MIX[0], seed=102)  # the "new task"
    merged_dir = tmp / "merged"
    with torch.no_grad():
        from safetensors.torch import load as st_load

        model_from_adapter(cfg_c, st_load(w_c), with_tokenizer=False).save_merged(merged_dir)
    tok = engine.backbone().tokenizer  # the merged path reuses a loaded tokenizer (favours it)
    state = {"last": "swap-a"}

    def hot_swap():
        state["last"] = "swap-b" if state["last"] == "swap-a" else "swap-a"
        return engine.predict(state["last"], [SENTENCE])

    def cold_load():
        engine.evict("new-task")
        engine.load("new-task", cfg_c, w_c)
        return engine.predict("new-task", [SENTENCE])

    def merged_from_disk():
        m = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
        with torch.no_grad():
            return m(**tok([SENTENCE], return_tensors="pt")).logits

    loaded = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()

    def merged_loaded():  # a merged model already in memory: the plain-HF cost of the prediction itself
        with torch.no_grad():
            return loaded(**tok([SENTENCE], return_tensors="pt")).logits

    fns = {"hot_swap": hot_swap, "cold_load": cold_load, "merged_from_disk": merged_from_disk,
           "merged_loaded": merged_loaded}
    common.log("(a) time to first prediction")
    t = common.Timing.run(fns, repeats=args.repeats_a, warmup=1, seed=args.seed, log=common.log)
    # Sanity: the engine and the merged model give the same answer.
    cold_load()
    eng = torch.tensor(engine.predict("new-task", [SENTENCE])[0]["scores"][0]["score"])
    ref = torch.softmax(merged_from_disk()[0], -1).max()
    return {"timing": t.to_json(),
            "ratios": {"merged_from_disk / hot_swap": t.ratio("merged_from_disk", "hot_swap"),
                       "merged_from_disk / load_into_bank_and_predict": t.ratio("merged_from_disk", "cold_load"),
                       "load_into_bank_and_predict / hot_swap": t.ratio("cold_load", "hot_swap"),
                       "hot_swap / merged_model_already_loaded": t.ratio("hot_swap", "merged_loaded")},
            "check_max_abs_diff_engine_vs_merged": float((eng - ref).abs())}


# ------------------------------------------------------------------------------ (b) mixed batches
def peft_model_from(adapters: list[tuple[str, dict, bytes]]):
    """A PeftModel on MiniLM holding the same LoRA adapters (same tensors, same heads) as ours."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load as st_load

    hf = load_hf_classifier(BASE, TWO)
    stack_path = "encoder.layer"
    pm = None
    for name, cfg, weights in adapters:
        m = cfg["method"]
        lc = LoraConfig(task_type="SEQ_CLS", r=m["rank"], lora_alpha=m["alpha"], lora_dropout=0.0,
                        target_modules=["query", "key", "value", "attention.output.dense"])
        if pm is None:
            pm = get_peft_model(hf, lc, adapter_name=name)
        else:
            pm.add_adapter(name, lc)
        tensors = st_load(weights)
        base = pm.base_model.model.base_model
        with torch.no_grad():
            for k, t in tensors.items():
                if k.startswith("head."):
                    wrapper = pm.base_model.model.classifier
                    getattr(wrapper.modules_to_save[name], k.rsplit(".", 1)[1]).copy_(t)
                    continue
                key, _, kind = k.rpartition(".")
                assert key.startswith(stack_path) and kind in ("lora_A", "lora_B"), k
                mod = base.get_submodule(key)
                getattr(mod, kind)[name].weight.copy_(t)
    pm.eval()
    return pm


def bench_mixed(engine: Engine, fac: Factory, args, seq_len: int) -> dict[str, Any]:
    bb = engine.backbone()
    mix = [engine.load(f"mix{i}", *fac.make(m, t, seed=200 + i)) for i, (m, t) in enumerate(MIX)]
    lora_blobs = [(f"lora{i}", *fac.make(dict(name="lora", rank=r), TWO, seed=300 + i))
                  for i, r in enumerate(LORA_RANKS)]
    loras = [engine.load(n, c, w) for n, c, w in lora_blobs]
    pm = peft_model_from(lora_blobs)
    texts = long_texts(32, seed=seq_len)
    enc = bb.tokenizer(texts, truncation=True, max_length=seq_len)
    feats = [{k: enc[k][i] for k in ("input_ids", "token_type_ids")} for i in range(32)]
    assert all(len(f["input_ids"]) == seq_len for f in feats)
    batch = collate(feats, bb.pad_id)
    mixed = [Row(mix[i % 8], f) for i, f in enumerate(feats)]  # row i -> task i mod 8: interleaved
    groups = [[Row(mix[g], feats[i]) for i in range(g, 32, 8)] for g in range(8)]  # the same rows, by task
    lora_mixed = [Row(loras[i % 8], f) for i, f in enumerate(feats)]
    peft_names = [f"lora{i % 8}" for i in range(32)]

    def same_task():  # the mean over the 8 tasks of a 32-row single-task batch
        for a in mix:
            engine.forward([Row(a, f) for f in feats])

    def peft_mixed():
        with torch.no_grad():
            return pm(**batch, adapter_names=peft_names).logits

    one_task = [Row(mix[0], f) for f in feats]  # batching alone, no mixing: 32 rows of task 0 vs 8 x 4

    fns = {"mixed_32x8": lambda: engine.forward(mixed), "same_task_x8": same_task,
           "grouped_8x4": lambda: [engine.forward(g) for g in groups],
           "task0_32": lambda: engine.forward(one_task),
           "task0_8x4": lambda: [engine.forward(one_task[i:i + 4]) for i in range(0, 32, 4)],
           "ours_lora_mixed": lambda: engine.forward(lora_mixed), "peft_lora_mixed": peft_mixed}
    common.log(f"(b) mixed batches, 32 rows x {seq_len} tokens")
    t = common.Timing.run(fns, repeats=args.repeats_b, warmup=1, seed=args.seed, log=common.log)
    t.scale("same_task_x8", "same_task", 8)
    # Sanity: exactness of the mixed batch and agreement with PEFT.
    got = engine.forward(mixed)
    alone = max(float((got[i] - engine.forward([r])[0]).abs().max()) for i, r in enumerate(mixed))
    ours = torch.stack(engine.forward(lora_mixed))
    peft_diff = float((ours - peft_mixed().float()).abs().max())
    # throughput ratios: time of the alternative / time of the mixed batch (same rows, same work)
    return {"seq_len": seq_len, "rows": 32, "tasks": 8, "timing": t.to_json(),
            "ratios": {"mixed / same_task": t.ratio("same_task", "mixed_32x8"),
                       "mixed / grouped_8x4": t.ratio("grouped_8x4", "mixed_32x8"),
                       "one task: 32 rows / 8 x 4 rows (batching alone)": t.ratio("task0_8x4", "task0_32"),
                       "ours / peft (8 LoRA)": t.ratio("peft_lora_mixed", "ours_lora_mixed")},
            "check_max_abs_diff_mixed_vs_alone": alone, "check_max_abs_diff_ours_vs_peft": peft_diff}


# ------------------------------------------------------------------------------ (c) fan-out
FANOUT_SETS = {  # 16 tasks each (4 methods x 4 heads); (n1, n2) on MiniLM's 6 layers
    "mix": FANOUT,  # n1 in {2, 3}: the prefix is shared for 2 layers, 3 for half the tasks
    "default": [dict(name="spafit")] * 4,  # the default stratification, n1 = L/3 = 2, n2 = 2L/3 = 4, rank 8
    "unshared": [dict(name="lora", rank=8), dict(name="bitfit"), dict(name="spafit", n1=0, n2=3, rank=8),
                 dict(name="lora", rank=4)],  # n1 = 0 for every task: no frozen prefix to share
}


def bench_fan_out(engine: Engine, fac: Factory, args) -> dict[str, Any]:
    text = SENTENCE
    fns, names_of = {}, {}
    for tag, methods in FANOUT_SETS.items():
        names = []
        for i in range(16):
            name = f"fan-{tag}{i}"
            engine.load(name, *fac.make(methods[i % 4], (TWO, THREE, REG, TWO)[i // 4], seed=400 + i))
            names.append(name)
        names_of[tag] = names
        fns[f"fan_out:{tag}"] = lambda n=names: engine.fan_out(n, text)
        fns[f"mixed_batch_16:{tag}"] = lambda n=names: engine.predict_mixed([(x, text) for x in n])
    fns["separate_16:mix"] = lambda n=names_of["mix"]: [engine.predict(x, [text]) for x in n]
    texts8 = [f"{text} {w}" for w in WORDS[:8]]  # 8 callers, one input each, to the 16 tasks at once

    def concurrent_8(n=names_of["mix"]):
        callers = [threading.Thread(target=engine.fan_out, args=(n, t)) for t in texts8]
        for c in callers:
            c.start()
        for c in callers:
            c.join()

    fns["fan_out_8_callers_concurrent:mix"] = concurrent_8
    fns["fan_out_8_callers_one_by_one:mix"] = lambda n=names_of["mix"]: [engine.fan_out(n, t) for t in texts8]
    common.log("(c) fan-out of one input to 16 tasks")
    t = common.Timing.run(fns, repeats=args.repeats_c, warmup=1, seed=args.seed, log=common.log)
    diff = 0.0
    for names in names_of.values():
        fan = engine.fan_out(names, text)
        diff = max(diff, max(abs(fan[n]["score"] - engine.predict(n, [text])[0]["score"]) for n in names))
    ntok = len(engine.encode(engine.adapter(names_of["mix"][0]), [text])[0]["input_ids"])
    ratios = {"separate_16 / fan_out (n1 in {2, 3})": t.ratio("separate_16:mix", "fan_out:mix"),
              "8 fan-outs one by one / 8 concurrent callers (n1 in {2, 3})":
                  t.ratio("fan_out_8_callers_one_by_one:mix", "fan_out_8_callers_concurrent:mix")}
    for tag, label in (("mix", "n1 in {2, 3}"), ("default", "default n1 = 2"), ("unshared", "n1 = 0, unshared")):
        ratios[f"mixed_batch_16 / fan_out ({label})"] = t.ratio(f"mixed_batch_16:{tag}", f"fan_out:{tag}")
    stages = {tag: fan_out_stages(engine, names_of[tag], text, args.repeats_c) for tag in ("mix", "default")}
    for tag, label in (("mix", "n1 in {2, 3}"), ("default", "default n1 = 2")):
        st = stages[tag]
        if "fan_out_trunk_at_branch_rate_ms" in st:  # the measured ratio, scaled by the time the trunk would save
            st["mixed_batch_16_over_fan_out_trunk_at_branch_rate"] = (
                ratios[f"mixed_batch_16 / fan_out ({label})"]["cpu"]["median"]
                * st["fan_out_ms"] / st["fan_out_trunk_at_branch_rate_ms"])
        common.log(f"(c) stages, {label}: {st}")
    return {"tokens": ntok, "tasks": 16, "timing": t.to_json(), "ratios": ratios, "check_max_abs_score_diff": diff,
            "stages": stages}


def _cpu_timed(obj, name: str, spent: list[float]):
    """Wrap `obj.name` (an instance attribute shadowing the method; `del obj.name` restores it) so that each call
    appends its CPU seconds to `spent`."""
    orig = getattr(obj, name)

    def timed(*a, **kw):
        t0 = time.process_time()
        try:
            return orig(*a, **kw)
        finally:
            spent.append(time.process_time() - t0)

    setattr(obj, name, timed)


def fan_out_stages(engine: Engine, names: list[str], text: str, repeats: int) -> dict[str, Any]:
    """Where one fan-out's time goes, by stage (CPU time, median over `repeats` calls, apart from the timed
    rounds: the timers cost a little): the trunk (one row through the layers below every task's first trained
    layer), each later stage's rows and layers, the heads. And what the fan-out would cost if its trunk ran at
    the last stage's cost per row-layer (a batch of many rows), a derived figure: the part of the gap to the mixed
    batch that is the single trunk row's."""
    depth = engine.backbone().stack.num_layers
    starts = [min(engine.adapter(n).first_trained_layer, depth) for n in names]
    bounds = sorted({0, *starts, depth})
    rows, layers = [], []
    for lo, hi in zip(bounds, bounds[1:], strict=False):  # the stages `Engine._fan_out_shared` runs
        rows.append(sum(1 for s in starts if s <= lo) + any(s > lo for s in starts))  # branches + the trunk
        layers.append(hi - lo)
    totals: list[float] = []
    heads: list[float] = []
    head_ms: list[float] = []
    per_call: list[list[float]] = []
    calls: list[float] = []
    _cpu_timed(engine, "_stage", calls)
    _cpu_timed(engine, "_heads", heads)
    try:
        engine.fan_out(names, text)
        for _ in range(repeats):
            calls.clear()
            heads.clear()
            t0 = time.process_time()
            engine.fan_out(names, text)
            totals.append(time.process_time() - t0)
            per_call.append(list(calls))
            head_ms.append(sum(heads) * 1e3)
    finally:
        del engine._stage, engine._heads
    assert all(len(c) == len(rows) for c in per_call), "the stages measured are not the stages expected"
    med = [statistics.median(c[k] for c in per_call) * 1e3 for k in range(len(rows))]
    total = statistics.median(totals) * 1e3
    out = {"stage_rows": rows, "stage_layers": layers, "stage_ms": med, "fan_out_ms": total,
           "heads_ms": statistics.median(head_ms)}
    if min(starts) > 0:  # stage 0 is the trunk alone: one row
        # a layer call's cost as fixed + rows x per-row, from the one-row trunk and the last stage's rows
        per_row = (med[-1] / layers[-1] - med[0] / layers[0]) / (rows[-1] - rows[0])
        out["layer_call_fixed_ms"], out["layer_call_per_row_ms"] = med[0] / layers[0] - per_row, per_row
        per_row_layer = med[-1] / (rows[-1] * layers[-1])
        out["trunk_per_row_layer_over_last_stage"] = med[0] / layers[0] / per_row_layer
        out["fan_out_trunk_at_branch_rate_ms"] = total - med[0] + layers[0] * per_row_layer
    return out


# ------------------------------------------------------------------------------ (g) the bare backbone
def bookkeeping(pools, adapters, lease=lease_slots, route=route_rows) -> None:
    """What a mixed forward spends deciding which adapter rows go where: the rows' slots, their order (rows of
    one LoRA rank together), the table lookup and each module's runs of rows (`engine.forward.Engine._forward`).
    `lease`, `route`: an earlier engine's own functions (part f)."""
    with pools.lock, lease(pools, adapters) as slots:
        order = pools.row_order(slots)
        if order is not None:
            slots = [slots[i] for i in order]
        route(pools, slots)


def spread_rows(bb, n: int, length: int, seed: int) -> list[dict[str, list[int]]]:
    """`n` rows of realistic spread: lengths uniform between length / 2 and length (one row at `length`, so
    every batch pads to it)."""
    rng = random.Random(seed)
    lengths = [length] + [rng.randint(max(4, length // 2), length) for _ in range(n - 1)]
    feats = []
    for text, k in zip(long_texts(n, seed=seed), lengths, strict=True):
        enc = bb.tokenizer(text, truncation=True, max_length=k)
        feats.append({key: enc[key] for key in ("input_ids", "token_type_ids")})
    return feats


def bench_backbone(engine: Engine, fac: Factory, args) -> dict[str, Any]:
    bb = engine.backbone()
    adapters = [engine.load(f"d{i}", *fac.make(*MIX[i % 8], seed=900 + i)) for i in range(32)]
    bare = load_hf_classifier(BASE, TWO).eval()  # frozen MiniLM + a plain 2-label head, no adapter code
    pools = engine.bank().pools
    fns: dict[str, Any] = {}
    lens = [int(x) for x in args.limit_lens.split(",")]
    checks, mixed_of = {}, {}
    for L in lens:
        feats = spread_rows(bb, 32, L, seed=L)
        batch = collate(feats, bb.pad_id)
        mixed = mixed_of[L] = [Row(adapters[i], f) for i, f in enumerate(feats)]  # 32 rows, 32 distinct adapters
        same = [Row(adapters[0], f) for f in feats]

        def run_bare(b=batch):
            with torch.inference_mode():
                return bare(**b).logits

        def bookkeeping_x20(rows=mixed):  # what a forward spends deciding which adapter rows go where
            for _ in range(20):
                bookkeeping(pools, [r.adapter for r in rows])

        fns[f"bare_backbone_{L}"] = run_bare
        fns[f"mixed_32x32_{L}"] = lambda r=mixed: engine.forward(r)
        fns[f"same_task_32_{L}"] = lambda r=same: engine.forward(r)
        fns[f"bookkeeping_{L}_x20"] = bookkeeping_x20
        got = engine.forward(mixed)
        checks[L] = max(float((got[i] - engine.forward([r])[0]).abs().max()) for i, r in enumerate(mixed[:8]))
    common.log(f"(g) mixed batch of 32 rows over 32 adapters vs the bare backbone, {lens} tokens")
    t = common.Timing.run(fns, repeats=args.repeats_g, warmup=1, seed=args.seed, log=common.log)
    for L in lens:
        t.scale(f"bookkeeping_{L}_x20", f"bookkeeping_{L}", 20)
    ratios = {}
    for L in lens:
        ratios[f"{L} tokens: mixed 32x32 / bare backbone (throughput)"] = t.ratio(f"bare_backbone_{L}",
                                                                                  f"mixed_32x32_{L}")
        ratios[f"{L} tokens: mixed 32x32 / same task 32 (throughput)"] = t.ratio(f"same_task_32_{L}",
                                                                                 f"mixed_32x32_{L}")
        ratios[f"{L} tokens: bookkeeping / mixed forward"] = t.ratio(f"bookkeeping_{L}", f"mixed_32x32_{L}")
    attribution = {L: lora_share(engine, mixed_of[L], args.repeats_g) for L in lens}
    common.log(f"(g) the LoRA runs' share of the mixed forward: {attribution}")
    return {"rows": 32, "adapters": 32, "seq_lens": lens, "timing": t.to_json(), "ratios": ratios,
            "check_max_abs_diff_mixed_vs_alone": checks, "lora_share": attribution}


def lora_share(engine: Engine, rows: list[Row], repeats: int) -> dict[str, float]:
    """CPU time spent in the slot kernel's LoRA runs (gathers and batched matmuls) per mixed forward, over
    `repeats` forwards apart from the timed rounds (the timer costs a little)."""
    kern = engine.bank().pools.kernel
    spent: list[float] = []
    totals, lora = [], []
    _cpu_timed(kern, "lora_", spent)
    try:
        engine.forward(rows)
        for _ in range(repeats):
            spent.clear()
            t0 = time.process_time()
            engine.forward(rows)
            totals.append(time.process_time() - t0)
            lora.append(sum(spent))
    finally:
        del kern.lora_
    return {"forward_ms": statistics.median(totals) * 1e3, "lora_runs_ms": statistics.median(lora) * 1e3,
            "lora_runs / forward": statistics.median(a / b for a, b in zip(lora, totals, strict=True))}


# ------------------------------------------------------------------------------ (p) profile of the limit
def bench_profile(engine: Engine, fac: Factory, args) -> dict[str, Any]:
    """torch.profiler over the mixed batch of (g) (32 rows, 32 adapters, 16 tokens) and the bare backbone on the
    same rows: self CPU time per op, per forward (the main thread's)."""
    from torch.profiler import ProfilerActivity, profile

    bb = engine.backbone()
    adapters = [engine.load(f"d{i}", *fac.make(*MIX[i % 8], seed=900 + i)) for i in range(32)]
    bare = load_hf_classifier(BASE, TWO).eval()
    batch = collate(feats := spread_rows(bb, 32, 16, seed=16), bb.pad_id)
    mixed = [Row(adapters[i], f) for i, f in enumerate(feats)]

    def run_bare():
        with torch.inference_mode():
            return bare(**batch).logits

    out = {}
    for name, fn in (("bare_backbone", run_bare), ("mixed_32x32", lambda: engine.forward(mixed))):
        for _ in range(2):
            fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.repeats_p):
                fn()
        ops = {e.key: e.self_cpu_time_total / args.repeats_p / 1e3 for e in prof.key_averages()}
        out[name] = {"total_ms": sum(ops.values()),
                     "ops_ms": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:14])}
    return out


# ------------------------------------------------------------------------------ (d) memory per adapter
def write_adapters(fac: Factory, n: int, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n + 1):  # +1: the warm-up adapter
        m, t = MIX[i % len(MIX)]
        cfg, w = fac.make(m, t, seed=1000 + i)
        (folder / f"{i}.json").write_text(json.dumps(cfg))
        (folder / f"{i}.safetensors").write_bytes(w)


def child_memory(folder: Path, n: int, engine_pkg: str | None = None) -> dict[str, Any]:
    """In a fresh process: RSS growth while loading n adapters into the bank, over their tensor bytes.
    `engine_pkg`: a folder holding `spafit_core_ref` (an earlier engine, see part f) to measure instead."""
    from safetensors import safe_open

    # What a registry hands over: config text and weights bytes, read before the baseline; the config is
    # parsed per load (the engine keeps the parsed dict), the bytes are the caller's and not retained.
    blobs = [((folder / f"{i}.json").read_text(), (folder / f"{i}.safetensors").read_bytes()) for i in range(n + 1)]
    tensor_bytes = []
    for i in range(n + 1):
        with safe_open(folder / f"{i}.safetensors", "pt") as f:
            tensor_bytes.append(sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()))
    engine_cls = Engine if engine_pkg is None else import_ref_engine(Path(engine_pkg)).Engine
    engine = engine_cls(device="cpu", default_base_model=BASE, device_bytes=1 << 40)
    engine.load("warmup", json.loads(blobs[0][0]), blobs[0][1])  # lazy initialisations happen here
    engine.predict("warmup", [SENTENCE])
    gc.collect()
    before = common.rss_bytes()
    for i in range(1, n + 1):
        engine.load(f"a{i}", json.loads(blobs[i][0]), blobs[i][1])
    gc.collect()
    after = common.rss_bytes()
    engine.predict("a1", [SENTENCE])  # still serves
    total = sum(tensor_bytes[1:])
    by_method: dict[str, list[int]] = {}
    for i in range(1, n + 1):
        by_method.setdefault(MIX[i % len(MIX)][0]["name"], []).append(tensor_bytes[i])
    return {"adapters": n, "rss_growth": after - before, "tensor_bytes": total,
            "ratio": (after - before) / total, "mean_tensor_bytes": total / n,
            "growth_per_adapter": (after - before) / n, "bank_nbytes": engine.bank().nbytes - tensor_bytes[0],
            "mean_tensor_bytes_by_method": {k: sum(v) / len(v) for k, v in by_method.items()}}


def bench_memory(fac: Factory, args, tmp: Path, engine_pkg: Path | None = None) -> dict[str, Any]:
    folder = tmp / "adapters"
    if not folder.exists():
        write_adapters(fac, args.mem_adapters, folder)
    runs = []
    extra = [] if engine_pkg is None else [str(engine_pkg)]
    for r in range(args.repeats_d):
        runs.append(common.run_child("benchmarks.serving",
                                     ["--child-memory", str(folder), str(args.mem_adapters), *extra]))
        common.log(f"(d{'' if engine_pkg is None else ', ref engine'}) run {r + 1}/{args.repeats_d}: "
                   f"{runs[-1]['ratio']:.4f}x")
    return {"runs": runs, "ratio": common.summary([r["ratio"] for r in runs])}


# ------------------------------------------------------------------------------ (f) engine at a git ref vs now
def extract_ref(ref: str, tmp: Path) -> Path:
    """`spafit_core` as committed at `ref`, unpacked under a folder as the package `spafit_core_ref`."""
    import io
    import subprocess
    import tarfile

    dest = tmp / "ref"
    data = subprocess.run(["git", "archive", ref, "spafit_core"], cwd=common.REPO, capture_output=True,
                          check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    (dest / "spafit_core").rename(dest / "spafit_core_ref")
    return dest


def import_ref_engine(folder: Path):
    import importlib

    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module("spafit_core_ref.engine")


def bench_engine_ref(fac: Factory, args, tmp: Path) -> dict[str, Any]:
    """The same work on the engine as committed at `--engine-ref` and on the working tree's, interleaved in
    one process (each engine on its own copy of the backbone); ratios are ref time / current time."""
    import importlib.util

    folder = extract_ref(args.engine_ref, tmp)
    ref_mod = import_ref_engine(folder)
    engines = {"ref": ref_mod.Engine(device="cpu", default_base_model=BASE, device_bytes=1 << 40),
               "new": Engine(device="cpu", default_base_model=BASE, device_bytes=1 << 40)}
    rows_cls = {"ref": ref_mod.Row, "new": Row}
    blobs = [fac.make(m, t, seed=700 + i) for i, (m, t) in enumerate(MIX)]
    fan_blobs = [fac.make(FANOUT[i % 4], (TWO, THREE, REG, TWO)[i // 4], seed=800 + i) for i in range(16)]
    blobs32 = [fac.make(*MIX[i % 8], seed=900 + i) for i in range(32)]
    fns: dict[str, Any] = {}
    for tag, eng in engines.items():
        d32 = [eng.load(f"d{i}", c, w) for i, (c, w) in enumerate(blobs32)]
        for L in (16, 64):  # 32 rows over 32 distinct adapters, spread lengths
            rows32 = [rows_cls[tag](d32[i], f) for i, f in enumerate(spread_rows(eng.backbone(), 32, L, seed=L))]
            fns[f"mixed_32_rows_32_adapters_{L}:{tag}"] = lambda e=eng, r=rows32: e.forward(r)
        if tag == "ref" and hasattr(ref_mod, "gather_deltas"):  # the per-forward bookkeeping: per-row tensors...
            fns["bookkeeping_32_adapters_x10:ref"] = \
                lambda a=d32, g=ref_mod.gather_deltas: [g(a) for _ in range(10)]
        else:  # ...vs one row-to-slot index and one table lookup
            pools = eng.bank().pools

            ref_lease = None
            if tag == "ref" and importlib.util.find_spec("spafit_core_ref.engine.slot_lease") is not None:
                ref_lease = importlib.import_module("spafit_core_ref.engine.slot_lease")  # with the rank runs

            def bookkeeping_x10(a=d32, pools=pools, new=tag == "new", ref_lease=ref_lease):
                for _ in range(10):
                    if new:
                        bookkeeping(pools, a)
                    elif ref_lease is not None:
                        bookkeeping(pools, a, ref_lease.lease_slots, ref_lease.route_rows)
                    else:  # a ref with slot pools, before the rank runs
                        with pools.lock, ref_mod._slots(pools, a) as (row_slot, distinct):
                            pools.route(row_slot, distinct)

            fns[f"bookkeeping_32_adapters_x10:{tag}"] = bookkeeping_x10
        mix = [eng.load(f"mix{i}", c, w) for i, (c, w) in enumerate(blobs)]
        fan = [f"fan{i}" for i in range(16)]
        for name, (c, w) in zip(fan, fan_blobs, strict=True):
            eng.load(name, c, w)
        bb = eng.backbone()
        for L in (16, 64):
            enc = bb.tokenizer(long_texts(32, seed=L), truncation=True, max_length=L)
            feats = [{k: enc[k][i] for k in ("input_ids", "token_type_ids")} for i in range(32)]
            mixed = [rows_cls[tag](mix[i % 8], f) for i, f in enumerate(feats)]
            same = [rows_cls[tag](mix[0], f) for f in feats]
            fns[f"mixed_32x{L}:{tag}"] = lambda e=eng, r=mixed: e.forward(r)
            fns[f"same_task_32x{L}:{tag}"] = lambda e=eng, r=same: e.forward(r)
        # short calls repeated inside a round, so that one round's time is not mostly noise
        fns[f"predict_1_row_x10:{tag}"] = lambda e=eng: [e.predict("mix0", [SENTENCE]) for _ in range(10)]
        fns[f"fan_out_16_x3:{tag}"] = lambda e=eng, n=fan: [e.fan_out(n, SENTENCE) for _ in range(3)]
    common.log(f"(f) engine at {args.engine_ref} vs the working tree")
    t = common.Timing.run(fns, repeats=args.repeats_f, warmup=1, seed=args.seed, log=common.log)
    work = sorted({k.split(":")[0] for k in fns})
    out = {"ref": args.engine_ref, "timing": t.to_json(),
           "ratios": {f"{w}: ref / new": t.ratio(f"{w}:ref", f"{w}:new") for w in work}}
    if "d" in args.parts.split(","):
        out["memory_ref"] = bench_memory(fac, args, tmp, engine_pkg=folder)
    return out


# ------------------------------------------------------------------------------ (e) Zipf over 1,000 adapters
def bench_zipf(fac: Factory, args) -> dict[str, Any]:
    n = args.registered
    store: dict[str, tuple[dict, bytes]] = {}
    t0 = time.perf_counter()
    for i in range(n):
        m, t = MIX[i % len(MIX)]
        store[f"z{i}"] = fac.make(m, t, seed=5000 + i)
    common.log(f"(e) {n} serialized adapters in {time.perf_counter() - t0:.1f}s")
    from safetensors.torch import load as st_load

    sizes = [sum(x.numel() * x.element_size() for x in st_load(w).values()) for _, w in store.values()]
    budget = int(args.cache * sum(sizes) / len(sizes))  # a bank sized for `cache` adapters of mean size
    calls = {"n": 0}

    def loader(name: str) -> tuple[dict, bytes]:
        calls["n"] += 1
        return store[name]

    cached = Engine(device="cpu", default_base_model=BASE, device_bytes=budget, loader=loader)
    resident = Engine(device="cpu", default_base_model=BASE, device_bytes=1 << 40)
    for name, (c, w) in store.items():
        resident.load(name, c, w)
    rng = random.Random(args.seed)
    ranks = list(store)
    rng.shuffle(ranks)  # popularity rank -> adapter: unrelated to method
    weights = [1.0 / (k + 1) ** args.zipf for k in range(n)]
    warm = rng.choices(ranks, weights, k=args.requests // 4)
    reqs = rng.choices(ranks, weights, k=args.requests)
    for name in warm:  # fill the bank to steady state; not measured
        cached.predict(name, [SENTENCE])
    cached.bank().stats.update(hits=0, misses=0, evictions=0, loads=0)
    lat = {"bank_64": [], "all_resident": []}
    hit = []
    for i, name in enumerate(reqs):
        order = ((cached, "bank_64"), (resident, "all_resident"))
        for eng, key in (order if i % 2 == 0 else order[::-1]):  # alternate who goes first
            misses = eng.bank().stats["misses"]
            t = time.perf_counter()
            eng.predict(name, [SENTENCE])
            lat[key].append(time.perf_counter() - t)
            if eng is cached:
                hit.append(eng.bank().stats["misses"] == misses)
    st = cached.bank().stats

    def pct(v, q):
        v = sorted(v)
        return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]

    out = {"registered": n, "cache_adapters": args.cache, "bank_bytes": budget, "zipf_s": args.zipf,
           "requests": len(reqs), "warmup_requests": len(warm), "hit_rate": st["hits"] / (st["hits"] + st["misses"]),
           "misses": st["misses"], "evictions": st["evictions"],
           "resident_adapters_at_end": len(cached.bank().names())}
    for key, v in lat.items():
        out[key] = {"p50": pct(v, 50), "p90": pct(v, 90), "p99": pct(v, 99), "mean": sum(v) / len(v)}
    hits = [t for t, h in zip(lat["bank_64"], hit, strict=True) if h]
    misses = [t for t, h in zip(lat["bank_64"], hit, strict=True) if not h]
    out["bank_64"]["hit_p50"] = pct(hits, 50) if hits else None
    out["bank_64"]["miss_p50"] = pct(misses, 50) if misses else None
    for q in ("p50", "p90", "p99", "mean"):
        out[f"{q}_ratio"] = out["bank_64"][q] / out["all_resident"][q]
    out["miss_over_hit_p50"] = (out["bank_64"]["miss_p50"] / out["bank_64"]["hit_p50"]) if hits and misses else None
    return out


# ------------------------------------------------------------------------------ report
def met(value: float, target: float, higher: bool = True) -> str:
    ok = value >= target if higher else value <= target
    return "met" if ok else "MISSED"


TARGETS = {"mixed / same_task": 0.85, "mixed / grouped_8x4": 1.5, "separate_16 / fan_out (n1 in {2, 3})": 2.0,
           "mixed_batch_16 / fan_out (n1 in {2, 3})": 1.5, "mixed_batch_16 / fan_out (default n1 = 2)": 1.5}
for _L in (16, 64, 128):  # issue 14: the limit
    TARGETS[f"{_L} tokens: mixed 32x32 / bare backbone (throughput)"] = 0.95
    TARGETS[f"{_L} tokens: bookkeeping / mixed forward"] = (0.01, False)


def _timing_tables(part: dict[str, Any]) -> list[str]:
    s = part["timing"]["summary"]
    rows = [[k, common.fmt_seconds(v), common.fmt_seconds(s["cpu"][k])] for k, v in s["wall"].items()]
    out = [common.markdown_table(["path", "wall median (CPU)", "process CPU time median"], rows), ""]
    rows = []
    for name, r in part["ratios"].items():
        target, higher = TARGETS.get(name), True
        if isinstance(target, tuple):
            target, higher = target
        rows.append([name, common.fmt_ratio(r["wall"]), common.fmt_ratio(r["cpu"]),
                     f"{'>=' if higher else '<'} {target}" if target else "-",
                     met(r["cpu"]["median"], target, higher) if target else "-"])
    out.append(common.markdown_table(["figure", "ratio, wall (median [min-max])", "ratio, CPU time", "target",
                                      "met? (CPU time median)"], rows))
    return out


def report(res: dict[str, Any]) -> str:
    out = []
    if "a" in res:
        out.append("\n### (a) time to first prediction for a new task\n")
        out += _timing_tables(res["a"])
    for b in res.get("b", []):
        out.append(f"\n### (b) mixed batch, 32 rows x {b['seq_len']} tokens over 8 tasks "
                   "(ratios are throughput: other path's time / mixed batch's time)\n")
        out += _timing_tables(b)
        out.append(f"\nchecks: mixed vs alone max |diff| {b['check_max_abs_diff_mixed_vs_alone']:.2e}; "
                   f"ours vs PEFT max |diff| {b['check_max_abs_diff_ours_vs_peft']:.2e}")
    if "c" in res:
        c = res["c"]
        out.append(f"\n### (c) fan-out of one input ({c['tokens']} tokens) to 16 tasks\n")
        out += _timing_tables(c)
        for tag, st in c.get("stages", {}).items():
            stages = ", ".join(f"{r} row{'s' * (r > 1)} x {n} layer{'s' * (n > 1)} {ms:.1f} ms"
                               for r, n, ms in zip(st["stage_rows"], st["stage_layers"], st["stage_ms"], strict=True))
            out.append(f"\nstages ({tag}), CPU time: {stages}; heads {st['heads_ms']:.1f} ms; "
                       f"fan-out {st['fan_out_ms']:.1f} ms")
            if "fan_out_trunk_at_branch_rate_ms" in st:
                out.append(f"the trunk's cost per row-layer is {st['trunk_per_row_layer_over_last_stage']:.2f}x "
                           f"the last stage's; with the trunk at that rate, mixed batch / fan-out would be "
                           f"{st['mixed_batch_16_over_fan_out_trunk_at_branch_rate']:.3f}; a layer call costs "
                           f"{st['layer_call_fixed_ms']:.2f} ms + {st['layer_call_per_row_ms']:.2f} ms a row")
    if "g" in res:
        g = res["g"]
        out.append(f"\n### (g) the limit: one mixed batch of {g['rows']} rows over {g['adapters']} distinct adapters "
                   "vs the bare backbone (plain HF model, no adapter code), same padded rows\n")
        out += _timing_tables(g)
        out.append("\nchecks: mixed vs alone max |diff| by length " +
                   ", ".join(f"{k}: {v:.2e}" for k, v in g["check_max_abs_diff_mixed_vs_alone"].items()))
        if "lora_share" in g:
            out.append("\nthe LoRA runs (gathers and batched matmuls) per mixed forward, CPU time: " + "; ".join(
                f"{L} tokens {v['lora_runs_ms']:.1f} ms of {v['forward_ms']:.1f} ms ({v['lora_runs / forward']:.1%})"
                for L, v in g["lora_share"].items()))
    if "p" in res:
        p = res["p"]
        out.append("\n### (p) profile, 32 rows x 16 tokens: self CPU time per forward by op (main thread)\n")
        names = list(dict.fromkeys(k for v in p.values() for k in v["ops_ms"]))
        out.append(common.markdown_table(["op", *p], [[k, *(f"{v['ops_ms'].get(k, 0):.2f} ms" for v in p.values())]
                                                      for k in names] +
                                         [["total", *(f"{v['total_ms']:.1f} ms" for v in p.values())]]))
    if "d" in res:
        d = res["d"]
        r0 = d["runs"][0]
        out.append(f"\n### (d) resident memory per adapter ({r0['adapters']} adapters, mean "
                   f"{r0['mean_tensor_bytes'] / 1024:.0f} KiB of tensors each)\n")
        out.append(common.markdown_table(["figure", "ratio (median [min-max] over runs)", "target", "met?"], [
            ["RSS growth / tensor bytes", common.fmt_ratio(d["ratio"]), "<= 1.1",
             met(d["ratio"]["median"], 1.1, higher=False)]]))
    if "f" in res:
        f = res["f"]
        out.append(f"\n### (f) the engine as committed at {f['ref']} vs the working tree (ref time / new time)\n")
        out += _timing_tables(f)
        if "memory_ref" in f and "d" in res:
            out.append(f"\nresident memory / tensor bytes: {common.fmt_ratio(f['memory_ref']['ratio'])} at "
                       f"{f['ref']}, {common.fmt_ratio(res['d']['ratio'])} now")
    if "e" in res:
        e = res["e"]
        out.append(f"\n### (e) {e['registered']} adapters, bank of {e['cache_adapters']}, Zipf s={e['zipf_s']}, "
                   f"{e['requests']} requests\n")
        rows = [[k, f"{e['bank_64'][k] * 1e3:.1f} ms", f"{e['all_resident'][k] * 1e3:.1f} ms", f"{e[k + '_ratio']:.2f}"]
                for k in ("p50", "p90", "p99", "mean")]
        out.append(common.markdown_table(["latency (wall, CPU)", f"bank of {e['cache_adapters']}",
                                          f"all {e['registered']} resident", "ratio"], rows))
        out.append(f"\nhit rate {e['hit_rate']:.3f}; miss p50 / hit p50 = {e['miss_over_hit_p50']:.2f} "
                   f"({e['bank_64']['miss_p50'] * 1e3:.1f} ms vs {e['bank_64']['hit_p50'] * 1e3:.1f} ms)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--parts", default="a,b,g,c,d,e")
    p.add_argument("--seq-lens", default="16,64", help="(b) tokens per row, one table each")
    p.add_argument("--repeats-a", type=int, default=15)
    p.add_argument("--repeats-b", type=int, default=8)
    p.add_argument("--repeats-c", type=int, default=15)
    p.add_argument("--repeats-d", type=int, default=3)
    p.add_argument("--repeats-g", type=int, default=10)
    p.add_argument("--repeats-p", type=int, default=5, help="(p) forwards profiled per path")
    p.add_argument("--limit-lens", default="16,64,128", help="(g) tokens per row (the longest), one set each")
    p.add_argument("--mem-adapters", type=int, default=200)
    p.add_argument("--registered", type=int, default=1000)
    p.add_argument("--cache", type=int, default=64)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="serving")
    p.add_argument("--engine-ref", default=None,
                   help="(f) a git ref whose spafit_core engine to compare with the working tree's")
    p.add_argument("--repeats-f", type=int, default=10)
    p.add_argument("--child-memory", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    threads = common.setup_threads(args.threads or None)
    if args.child_memory:
        c = args.child_memory
        print(json.dumps(child_memory(Path(c[0]), int(c[1]), c[2] if len(c) > 2 else None)))
        return
    if args.quick:
        args.seq_lens, args.repeats_a, args.repeats_b, args.repeats_c, args.repeats_d = "16", 3, 2, 3, 1
        args.repeats_g = 3
        args.mem_adapters, args.registered, args.requests, args.out = 50, 200, 150, args.out + "_quick"
    parts = set(args.parts.split(","))
    t_start = time.perf_counter()
    engine = Engine(device="cpu", default_base_model=BASE, device_bytes=1 << 40)
    fac = Factory(fingerprint_of(engine))
    res: dict[str, Any] = {"command": common.command_line(), "machine": common.machine(), "threads": threads,
                           "load_average_start": common.load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "a" in parts:
            res["a"] = bench_hot_swap(engine, fac, args, tmp)
        if "b" in parts:
            res["b"] = [bench_mixed(engine, fac, args, int(L)) for L in args.seq_lens.split(",")]
        if "g" in parts:
            res["g"] = bench_backbone(engine, fac, args)
        if "c" in parts:
            res["c"] = bench_fan_out(engine, fac, args)
        if "p" in parts:
            res["p"] = bench_profile(engine, fac, args)
        if "d" in parts:
            res["d"] = bench_memory(fac, args, tmp)
        if args.engine_ref:
            res["f"] = bench_engine_ref(fac, args, tmp)
        if "e" in parts:
            del engine
            gc.collect()
            res["e"] = bench_zipf(fac, args)
    res["wall_seconds"] = time.perf_counter() - t_start
    res["load_average_end"] = common.load_average()
    path = common.write_result(args.out, res)
    m = res["machine"]
    print(f"# serving ({m['cpu']}, {m['cores']} cores, {threads} torch threads, torch {m['torch']}; "
          f"CPU times; adapters random, not trained)")
    print(report(res))
    print(f"\nraw: {common.shown(path)}; {res['wall_seconds']:.0f}s; load average "
          f"{res['load_average_start'][0]:.1f} at start, {res['load_average_end'][0]:.1f} at end")


def fingerprint_of(engine: Engine) -> str:
    return engine.backbone().fingerprint


if __name__ == "__main__":
    main(sys.argv[1:])
