"""Training-step benchmark: one optimizer step (forward, cross-entropy loss, backward, AdamW step,
zero_grad) of spafit, spafit with the frozen-prefix cache, lora, bitfit and full, with Hugging Face PEFT's
LoRA as the external reference, on the packaged MiniLM and on a randomly initialised BERT-large-shaped
model (24 layers, hidden 1024, 16 heads, intermediate 4096).

Time: all variants of one model live in one process (frozen backbone weights shared between them, each
with its own head, adapter tensors and optimizer), and each round runs every variant once in a random
order; the figure is each variant's time divided by our lora's time in the same round (median and
min-max over rounds). Peak memory: each variant in a fresh process; the baseline is the RSS after the
model, the optimizer and (for the cache variant) the batch's cached hidden states exist; the peak is the
kernel's RSS high-water mark (VmHWM, reset at the baseline through /proc/self/clear_refs) over
`--mem-steps` steps. The first step allocates AdamW's moments, so the peak includes them.

    python -m benchmarks.train_step --quick      # about a minute
    python -m benchmarks.train_step              # the full run (about 15 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from typing import Any

# isort: off
from benchmarks import common  # first: it sets OMP_WAIT_POLICY before torch loads
# isort: on
import torch
import torch.nn.functional as F
from torch import nn

from spafit_core.config import MethodConfig, TaskSpec
from spafit_core.model import SpafitModel, load_hf_classifier

TASK = TaskSpec(labels=("neg", "pos"))
RANK, ALPHA = 8, 16.0
PEFT_TARGETS = ["query", "key", "value", "attention.output.dense"]  # = our default LoRA targets
VARIANTS = ("lora", "spafit", "spafit+cache", "bitfit", "full", "peft-lora")
DEFAULT_MODELS = "minilm,bert-large"
BERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)


# ------------------------------------------------------------------------------ models
def master_model(model: str) -> nn.Module:
    """The HF classifier every variant starts from (same weights, same head initialisation)."""
    torch.manual_seed(0)
    if model == "minilm":
        return load_hf_classifier("minilm", TASK)
    from transformers import AutoModelForSequenceClassification, BertConfig

    cfg = BertConfig(**BERT_LARGE, num_labels=2)  # dropout 0.1 as in BERT-large
    return AutoModelForSequenceClassification.from_config(cfg)


def clone(master: nn.Module, share_backbone: bool) -> nn.Module:
    """A copy of `master`; with share_backbone its base-model tensors are shared (new frozen Parameter
    objects over the same storage), so several adapter variants fit in memory side by side."""
    memo: dict[int, Any] = {}
    if share_backbone:
        for p in master.base_model.parameters():
            memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
    return copy.deepcopy(master, memo)


def build(variant: str, hf: nn.Module, n1: int, n2: int):
    """(model, forward() -> logits given batch/prefix, trainable params)."""
    if variant == "peft-lora":
        from peft import LoraConfig, get_peft_model

        pm = get_peft_model(hf, LoraConfig(task_type="SEQ_CLS", r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                           target_modules=PEFT_TARGETS))
        pm.train()
        return pm, lambda batch, prefix: pm(**batch).logits, [p for p in pm.parameters() if p.requires_grad]
    name = "spafit" if variant.startswith("spafit") else variant
    method = MethodConfig(name=name, n1=n1, n2=n2, rank=RANK, alpha=ALPHA) if name == "spafit" else \
        MethodConfig(name=name, rank=RANK, alpha=ALPHA)
    m = SpafitModel(hf, method, TASK, base_model_name="benchmark", base_fingerprint="benchmark")
    m.prefix_eval = variant == "spafit+cache"  # as the trainer does when it caches
    m.train()
    return m, lambda batch, prefix: m(batch, prefix_hidden=prefix), [p for p in m.parameters() if p.requires_grad]


def make_batch(vocab: int, batch: int, seq: int) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    return b, torch.randint(0, 2, (batch,), generator=g)


class Step:
    """One full optimizer step of one variant."""

    def __init__(self, variant: str, model, forward, params, batch, labels):
        self.variant, self.model, self.forward, self.params = variant, model, forward, params
        self.batch, self.labels = batch, labels
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.prefix = None
        if variant == "spafit+cache":
            self.prefix = self.build_prefix()

    def build_prefix(self) -> torch.Tensor:
        """What the trainer's PrefixCache stores for this batch (eval mode: no dropout in the prefix)."""
        self.model.eval()
        h = self.model.prefix_hidden(self.batch)
        self.model.train()
        return h

    def __call__(self) -> float:
        logits = self.forward(self.batch, self.prefix)
        loss = F.cross_entropy(logits.float(), self.labels)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def n1_n2(model: str, args) -> tuple[int, int]:
    return (args.n1, args.n2) if model == "bert-large" else (args.minilm_n1, args.minilm_n2)


def batch_size(model: str, args) -> int:
    return args.bert_batch if model == "bert-large" else args.minilm_batch


# ------------------------------------------------------------------------------ timing (one process)
def time_model(model: str, args) -> dict[str, Any]:
    t0 = time.perf_counter()
    master = master_model(model)
    common.log(f"[{model}] master model in {time.perf_counter() - t0:.1f}s")
    n1, n2 = n1_n2(model, args)
    batch, labels = make_batch(master.config.vocab_size, batch_size(model, args), args.seq_len)
    steps: dict[str, Step] = {}
    trainable: dict[str, int] = {}
    for v in VARIANTS:
        hf = clone(master, share_backbone=v != "full")
        m, fwd, params = build(v, hf, n1, n2)
        steps[v] = Step(v, m, fwd, params, batch, labels)
        trainable[v] = sum(p.numel() for p in params)
    del master
    gc.collect()
    cached = steps["spafit+cache"]
    fns = {v: steps[v] for v in VARIANTS}
    fns["cache-build"] = cached.build_prefix  # the one-off per-batch cost of filling the cache
    common.log(f"[{model}] batch {batch_size(model, args)} x {args.seq_len}, n1={n1}, n2={n2}; "
               f"{args.warmup} warmup + {args.repeats} rounds")
    t = common.Timing.run(fns, repeats=args.repeats, warmup=args.warmup, seed=args.seed, log=common.log)
    hidden = cached.prefix.shape[-1]
    per_example = args.seq_len * hidden * 4
    return {
        "batch": batch_size(model, args), "seq_len": args.seq_len, "n1": n1, "n2": n2, "rank": RANK,
        "num_layers": steps["lora"].model.stack.num_layers, "hidden": hidden,
        "trainable_params": trainable,
        "timing": t.to_json(),
        "ratio_to_lora": {v: t.ratio(v, "lora") for v in fns},
        "cache_build_over_cached_step": t.ratio("cache-build", "spafit+cache"),
        "cache_bytes_per_example": {"float32": per_example, "bfloat16": per_example // 2,
                                    "formula": f"{args.seq_len} tokens x {hidden} hidden x bytes"},
    }


# ------------------------------------------------------------------------------ memory (fresh process each)
def child_memory(model: str, variant: str, args) -> dict[str, Any]:
    master = master_model(model)
    n1, n2 = n1_n2(model, args)
    batch, labels = make_batch(master.config.vocab_size, batch_size(model, args), args.seq_len)
    m, fwd, params = build(variant, master, n1, n2)
    step = Step(variant, m, fwd, params, batch, labels)
    del master
    gc.collect()
    base = common.rss_bytes()
    ok = common.reset_peak_rss()
    t0 = time.perf_counter()
    for _ in range(args.mem_steps):
        step()
    seconds = time.perf_counter() - t0
    gc.collect()
    return {"variant": variant, "rss_after_load": base, "peak_delta": common.peak_rss_bytes() - base,
            "after_steps_delta": common.rss_bytes() - base, "peak_reset": ok, "steps": args.mem_steps,
            "seconds": seconds}


def memory_model(model: str, args) -> dict[str, Any]:
    out = {}
    for v in VARIANTS:
        child_args = ["--child", model, v, "--seq-len", str(args.seq_len), "--mem-steps", str(args.mem_steps),
                      "--bert-batch", str(args.bert_batch), "--minilm-batch", str(args.minilm_batch),
                      "--n1", str(args.n1), "--n2", str(args.n2), "--minilm-n1", str(args.minilm_n1),
                      "--minilm-n2", str(args.minilm_n2), "--threads", str(args.threads or 0)]
        t0 = time.perf_counter()
        out[v] = common.run_child("benchmarks.train_step", child_args)
        common.log(f"[{model}] memory {v}: peak +{out[v]['peak_delta'] / 2**20:.0f} MiB "
                   f"({time.perf_counter() - t0:.0f}s)")
    lora = out["lora"]["peak_delta"]
    for v in VARIANTS:
        out[v]["peak_ratio_to_lora"] = out[v]["peak_delta"] / lora
    return out


# ------------------------------------------------------------------------------ report
def report(res: dict[str, Any]) -> str:
    lines = []
    for model, r in res["models"].items():
        t = r["timing"]
        mem = r.get("memory", {})
        lines.append(f"\n### {model}: batch {t['batch']} x {t['seq_len']} tokens, {t['num_layers']} layers, "
                     f"spafit n1={t['n1']} n2={t['n2']}, rank {t['rank']}\n")
        rows = []
        wall = t["timing"]["summary"]["wall"]
        for v in (*VARIANTS, "cache-build"):
            s = t["ratio_to_lora"][v]
            m = mem.get(v)
            rows.append([v, t["trainable_params"].get(v, "-"), common.fmt_ratio(s["wall"]), common.fmt_ratio(s["cpu"]),
                         common.fmt_seconds(wall[v]),
                         f"{m['peak_delta'] / 2**20:.0f} MiB" if m else "-",
                         f"{m['peak_ratio_to_lora']:.2f}" if m else "-"])
        lines.append(common.markdown_table(
            ["variant", "trainable params", "step / lora, wall (median [min-max])", "step / lora, CPU time",
             "wall median (CPU)", "peak RSS over load", "peak / lora"], rows))
        c = t["cache_bytes_per_example"]
        lines.append(f"\ncache: {c['float32'] / 1024:.0f} KiB per example in float32 ({c['formula']}), "
                     f"{c['bfloat16'] / 1024:.0f} KiB in bfloat16; building it for one batch costs "
                     f"{common.fmt_ratio(t['cache_build_over_cached_step']['wall'])} of a cached step (wall)")
        if model == "bert-large":
            sp = t["ratio_to_lora"]["spafit"]["wall"]["median"]
            cached = t["ratio_to_lora"]["spafit+cache"]["wall"]["median"]
            lines.append(f"\ntargets (wall medians): spafit <= 0.85x lora: {sp:.3f} -> "
                         f"{'met' if sp <= 0.85 else 'MISSED'}; spafit+cache <= 0.70x lora: {cached:.3f} -> "
                         f"{'met' if cached <= 0.70 else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: MiniLM only (unless --models), 64 tokens, batch 4 (BERT-large 1), 2 rounds")
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--minilm-batch", type=int, default=16)
    p.add_argument("--bert-batch", type=int, default=4)
    p.add_argument("--n1", type=int, default=8, help="BERT-large spafit n1")
    p.add_argument("--n2", type=int, default=16, help="BERT-large spafit n2")
    p.add_argument("--minilm-n1", type=int, default=2)
    p.add_argument("--minilm-n2", type=int, default=4)
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument("--memory-models", default=None, help="models whose peak memory is measured (default: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the core count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="train_step")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    threads = common.setup_threads(args.threads or None)
    if args.child:
        print(__import__("json").dumps(child_memory(args.child[0], args.child[1], args)))
        return
    if args.quick:
        args.repeats, args.minilm_batch, args.bert_batch, args.seq_len = 2, 4, 1, 64
        args.out += "_quick"
        if args.models == DEFAULT_MODELS:
            args.models = "minilm"
    models = [m for m in args.models.split(",") if m]
    mem_models = models if args.memory_models is None else [m for m in args.memory_models.split(",") if m]
    t0 = time.perf_counter()
    res: dict[str, Any] = {"command": common.command_line(), "machine": common.machine(), "threads": threads,
                           "load_average_start": common.load_average(), "models": {}}
    for model in models:
        res["models"][model] = {"timing": time_model(model, args)}
        gc.collect()
        if model in mem_models:
            res["models"][model]["memory"] = memory_model(model, args)
    res["wall_seconds"] = time.perf_counter() - t0
    res["load_average_end"] = common.load_average()
    path = common.write_result(args.out, res)
    print(f"# train_step ({res['machine']['cpu']}, {res['machine']['cores']} cores, {threads} torch threads, "
          f"torch {res['machine']['torch']}; CPU times)")
    print(report(res))
    print(f"\nraw: {common.shown(path)}; {res['wall_seconds']:.0f}s; load average "
          f"{res['load_average_start'][0]:.1f} at start, {res['load_average_end'][0]:.1f} at end")


if __name__ == "__main__":
    main(sys.argv[1:])
