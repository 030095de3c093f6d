"""The training loop on tiny random encoders: what changes, what must not, and resumability."""

from __future__ import annotations

import json

import pytest
import torch

from spafit_core import MethodConfig, TaskSpec, TrainConfig
from spafit_core.errors import TrainingCancelled
from spafit_core.model import SpafitModel
from spafit_core.train import encode, set_seed, train
from tests.tiny import toy_examples

LABELS = ("neg", "pos")


def make(path, name="spafit", task=TaskSpec(labels=LABELS), seed=0, **kw):
    set_seed(seed)
    kw.setdefault("rank", 4)
    return SpafitModel.from_pretrained(path, MethodConfig(name=name, **kw), task)


def data(model, n=48, seed=0, **kw):
    return encode(toy_examples(n, seed, model.task.task_type, **kw), model.tokenizer, 32, model.task.task_type)


def cfg(**kw):
    base = dict(epochs=2, batch_size=8, learning_rate=5e-3, log_every_steps=1, seed=3)
    return TrainConfig(**(base | kw))


def base_weights(model):
    adapter = {id(p) for m in model.adapted.values() for p in m.parameters(recurse=False)}
    return {n: p.detach().clone() for n, p in model.hf.base_model.named_parameters() if id(p) not in adapter}


def test_training_changes_only_what_the_method_allows(tiny_bert):
    m = make(tiny_bert, n1=1, n2=3)
    before_base = base_weights(m)
    before_adapter = {k: v.clone() for k, v in m.adapter_state_dict().items()}
    train(m, data(m), cfg())
    # Every backbone weight, group 1 included, is bit-identical.
    for n, p in m.hf.base_model.named_parameters():
        if n in before_base:
            assert torch.equal(p, before_base[n]), n
    after = m.adapter_state_dict()
    assert set(after) == set(before_adapter)
    group2 = [k for k in after if k.startswith(("encoder.layer.1.", "encoder.layer.2."))]
    assert group2 and all(k.endswith(".bias_delta") for k in group2)  # group 2: biases only
    assert all(not torch.equal(after[k], before_adapter[k]) for k in group2)
    assert not any(k.startswith("encoder.layer.0.") for k in after)  # group 1: nothing
    lora_b = [k for k in after if k.startswith("encoder.layer.3.") and k.endswith("lora_B")]
    assert len(lora_b) == 4 and all(after[k].abs().sum() > 0 for k in lora_b)


def test_training_reduces_loss_and_reports_the_best_epoch(tiny_bert):
    """A random tiny backbone learns slowly; real learning is tested on MiniLM (test_minilm.py)."""
    m = make(tiny_bert, n1=0, n2=0)
    result = train(m, data(m, 64), cfg(epochs=8, learning_rate=1e-2), validation=data(m, 32, seed=1))
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.85 * losses[0]
    accs = [h["metrics"]["accuracy"] for h in result.history]
    assert result.best_epoch == accs.index(max(accs)) + 1
    assert result.metrics == result.history[result.best_epoch - 1]["metrics"]
    assert result.main_metric == "accuracy"


def test_same_seed_same_result_on_cpu(tiny_bert):
    outs = []
    for _ in range(2):
        m = make(tiny_bert, n1=1, n2=2, dropout=0.1)
        train(m, data(m), cfg())
        outs.append(m.adapter_state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_progress_callback_reports_step_loss_lr_eta(tiny_bert):
    m = make(tiny_bert)
    events = []
    train(m, data(m, 32), cfg(), validation=data(m, 16, seed=1), callback=events.append)
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["step"] for e in progress] == list(range(1, 9))
    assert all(e["total_steps"] == 8 and e["loss"] > 0 and e["eta_seconds"] >= 0 for e in progress)
    assert progress[0]["lr"] != progress[-1]["lr"]  # warmup + linear decay moves it
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["epoch"] for e in evals] == [1, 2] and "accuracy" in evals[0]["metrics"]


def test_should_stop_cancels_between_steps(tiny_bert):
    m = make(tiny_bert)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(TrainingCancelled, match="step 3"):
        train(m, data(m), cfg(), should_stop=stop)


def test_killed_run_resumes_from_checkpoint_to_the_same_result(tiny_bert, tmp_path):
    """A run interrupted after step 5 resumes from its step-4 checkpoint and ends bit-identical to an
    uninterrupted run: same data order, optimizer moments, schedule and dropout RNG."""
    c = cfg(epochs=3, checkpoint_every_steps=2)
    ref = make(tiny_bert, n1=1, n2=2, dropout=0.1)
    ref_result = train(ref, data(ref), c, validation=data(ref, 16, seed=1))

    ckpt = tmp_path / "ckpt.safetensors"
    first = make(tiny_bert, n1=1, n2=2, dropout=0.1)
    steps = []
    with pytest.raises(TrainingCancelled):
        train(first, data(first), c, validation=data(first, 16, seed=1), checkpoint_path=ckpt,
              callback=lambda e: steps.append(e["step"]) if e["type"] == "progress" else None,
              should_stop=lambda: len(steps) >= 5)
    from spafit_core.train import read_checkpoint_meta

    assert read_checkpoint_meta(ckpt)["state"]["step"] == 4
    second = make(tiny_bert, n1=1, n2=2, dropout=0.1, seed=99)  # a fresh process: other init, same seed cfg
    events = []
    result = train(second, data(second), c, validation=data(second, 16, seed=1), checkpoint_path=ckpt,
                   callback=events.append)
    assert result.resumed_from_step == 4
    assert min(e["step"] for e in events if e["type"] == "progress") == 5  # did not start from zero
    assert result.steps == ref_result.steps
    a, b = ref.adapter_state_dict(), second.adapter_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_is_safetensors_without_pickle(tiny_bert, tmp_path):
    m = make(tiny_bert)
    ckpt = tmp_path / "c.safetensors"
    train(m, data(m, 16), cfg(epochs=1), checkpoint_path=ckpt)
    raw = ckpt.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + header_len])
    assert json.loads(header["__metadata__"]["spafit"])["format"] == "spafit-checkpoint"
    assert b"\x80\x04" not in raw[:8 + header_len]  # no pickle protocol marker in the header


def test_early_stopping_stops_when_the_metric_stalls(tiny_bert):
    m = make(tiny_bert)
    result = train(m, data(m), cfg(epochs=6, learning_rate=1e-9, early_stopping_patience=1),
                   validation=data(m, 16, seed=1))
    assert result.stopped_early and len(result.history) == 2 and result.best_epoch == 1


def test_prefix_cache_matches_uncached_training(tiny_dirs, tmp_path):
    """Without dropout, caching the frozen prefix is exact up to float rounding."""
    from tests.tiny import make_tiny_model

    path = str(make_tiny_model(tmp_path / "nodrop", "bert", dropout=0.0))
    runs = {}
    for use in (False, True):
        m = make(path, n1=2, n2=3)
        r = train(m, data(m), cfg(prefix_cache=use))
        runs[use] = (m.adapter_state_dict(), r)
    a, b = runs[False][0], runs[True][0]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert runs[True][1].prefix_cache_bytes > 0 and runs[False][1].prefix_cache_bytes == 0


@pytest.mark.parametrize("task_type", ["regression", "multi_label_classification"])
def test_regression_and_multilabel_heads_train(tiny_bert, task_type):
    task = TaskSpec(task_type=task_type, labels=() if task_type == "regression" else ("x", "y", "z"))
    m = make(tiny_bert, task=task, n1=0, n2=2)
    assert m.hf.config.num_labels == (1 if task_type == "regression" else 3)
    result = train(m, data(m, 48), cfg(epochs=5), validation=data(m, 16, seed=1))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    want = "pearson" if task_type == "regression" else "micro_f1"
    assert want in result.metrics


def test_text_pairs_train(tiny_bert):
    m = make(tiny_bert)
    d = data(m, 16, pairs=True)
    assert any(t == 1 for t in d.features[0]["token_type_ids"])  # the pair's segment ids are there
    train(m, d, cfg(epochs=1))


def test_truncated_rows_are_counted(tiny_bert):
    m = make(tiny_bert)
    ex = toy_examples(8)
    ex.texts[0] = " ".join(["good"] * 100)
    enc = encode(ex, m.tokenizer, 16, "single_label_classification")
    assert enc.truncated == 1 and max(len(f["input_ids"]) for f in enc.features) == 16


# ----------------------------------------------------------------------------- prefix cache semantics and bound
def test_prefix_cache_runs_the_prefix_in_eval_mode_and_restores_every_mode(tiny_bert):
    """With dropout > 0 and the cache on, the embeddings and frozen layers run in eval mode while training
    (their cached output has no dropout) and the layers above train with dropout; when train() returns every
    module is in the mode it had before, and a later model.train() trains the prefix too."""
    m = make(tiny_bert, n1=2, n2=3)
    m.train()
    before = {n: mod.training for n, mod in m.named_modules()}
    prefix = m.prefix_modules()
    upper = m.hf.base_model.get_submodule(m.stack.path)[3]
    seen = []

    def look(e):
        if e["type"] == "progress":
            seen.append((any(p.training for p in prefix for p in p.modules()), upper.training))

    r = train(m, data(m), cfg(prefix_cache=True), callback=look)
    assert r.prefix_cache_bytes > 0 and seen and all(s == (False, True) for s in seen)
    assert {n: mod.training for n, mod in m.named_modules()} == before
    assert not m.prefix_eval
    m.train()
    assert all(p.training for p in prefix)


def _logits(m):
    b = dict(m.tokenizer(["good movie", "the plot was very boring and bad", "ok"], padding=True,
                         return_tensors="pt"))
    with torch.no_grad():
        return m.hf.eval()(**b).logits


@pytest.mark.parametrize("fraction", [0.3, 0.0])
def test_a_bounded_prefix_cache_recomputes_what_it_does_not_hold(tmp_path, fraction):
    from tests.tiny import make_tiny_model

    path = str(make_tiny_model(tmp_path / "nodrop", "bert", dropout=0.0))
    full = make(path, n1=2, n2=3)
    ref = train(full, data(full), cfg(prefix_cache=True))
    bound = int(fraction * ref.prefix_cache_bytes)
    m = make(path, n1=2, n2=3)
    logs = []
    r = train(m, data(m), cfg(prefix_cache=True, prefix_cache_max_bytes=bound),
              callback=lambda e: logs.append(e.get("message", "")))
    assert 0 < ref.prefix_cache_bytes and r.prefix_cache_bytes <= bound
    assert any("recomputed each epoch" in msg and " 0 recomputed" not in msg for msg in logs)
    a, b = full.adapter_state_dict(), m.adapter_state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_prefix_cache_dtype_defaults_to_bf16_on_cuda_only():
    from spafit_core.train import cache_dtype

    assert TrainConfig().prefix_cache_dtype == "auto"
    assert cache_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert cache_dtype("auto", torch.device("cpu")) == torch.float32
    assert cache_dtype("float16", torch.device("cpu")) == torch.float16


# ----------------------------------------------------------------------------- resuming under another config
@pytest.fixture
def one_epoch_checkpoint(tiny_bert, tmp_path):
    m = make(tiny_bert, n1=1, n2=2)
    ckpt = tmp_path / "ckpt.safetensors"
    with pytest.raises(TrainingCancelled):  # after the first epoch's checkpoint
        train(m, data(m), cfg(epochs=2), checkpoint_path=ckpt, should_stop=_stop_after(7))
    return ckpt


def _stop_after(n):
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > n
    return stop


@pytest.mark.parametrize("change, words", [
    (dict(method=dict(n2=3)), "method.n2: 2 then, 3 now"),
    (dict(method=dict(name="lora")), "method.name: 'spafit' then, 'lora' now"),
    (dict(train=dict(learning_rate=1e-3)), "training.learning_rate: 0.005 then, 0.001 now"),
    (dict(train=dict(epochs=3, seed=4)), "training.epochs: 2 then, 3 now; training.seed: 3 then, 4 now"),
    (dict(base="other"), "base model"),
    (dict(task=("a", "b")), "task.labels"),
])
def test_resuming_under_another_method_config_or_base_is_refused_naming_it(tiny_bert, tiny_dirs, tmp_path,
                                                                         one_epoch_checkpoint, change, words):
    from spafit_core.errors import ConfigError
    from tests.tiny import make_tiny_model

    method = dict(n1=1, n2=2) | change.get("method", {})
    path = str(make_tiny_model(tmp_path / "other", "bert", seed=5)) if change.get("base") else tiny_bert
    task = TaskSpec(labels=change["task"]) if "task" in change else TaskSpec(labels=LABELS)
    m = make(path, task=task, **method)
    with pytest.raises(ConfigError, match="not resumed") as e:
        train(m, data(m), cfg(epochs=2) if "train" not in change else cfg(**({"epochs": 2} | change["train"])),
              checkpoint_path=one_epoch_checkpoint)
    assert words in str(e.value)


def test_resuming_with_only_operational_changes_is_accepted(tiny_bert, one_epoch_checkpoint):
    m = make(tiny_bert, n1=1, n2=2)
    r = train(m, data(m), cfg(epochs=2, log_every_steps=5, checkpoint_every_steps=3, eval_batch_size=4),
              checkpoint_path=one_epoch_checkpoint)
    assert r.resumed_from_step > 0


def test_fp16_grad_scaler_state_is_saved_and_restored(tiny_bert, tmp_path):
    from spafit_core.train import load_checkpoint, param_groups, save_checkpoint

    def parts(m, c):
        opt = torch.optim.AdamW(param_groups(m, c), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        return opt, sched, torch.amp.GradScaler("cpu", init_scale=2.0**16)

    c = cfg()
    m = make(tiny_bert)
    opt, sched, scaler = parts(m, c)
    scaler.scale(torch.ones(()))  # the scale exists once used
    scaler.update(new_scale=123.0)  # as if fp16 steps had backed it off from 2^16
    state = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best_metric": None, "best_epoch": None, "bad_epochs": 0,
             "history": [], "train_seconds": 0.0}
    save_checkpoint(tmp_path / "c.safetensors", m, opt, sched, state, None, c, scaler=scaler)
    m2 = make(tiny_bert)
    opt2, sched2, scaler2 = parts(m2, c)
    load_checkpoint(tmp_path / "c.safetensors", m2, opt2, sched2, c, scaler=scaler2)
    assert scaler2.get_scale() == 123.0


# ----------------------------------------------------------------------------- learning rates per kind
def test_head_bias_and_lora_take_their_own_learning_rates(tiny_bert):
    from spafit_core.train import param_groups

    m = make(tiny_bert, n1=1, n2=2)
    c = cfg(learning_rate=1e-3, head_learning_rate=1e-2, bias_learning_rate=2e-3, lora_learning_rate=5e-4)
    lrs = {g["kind"]: g["lr"] for g in param_groups(m, c)}
    assert lrs == {"head": 1e-2, "bias": 2e-3, "lora": 5e-4}
    assert {g["kind"]: g["lr"] for g in param_groups(m, cfg(learning_rate=1e-3))} == \
        {"head": 1e-3, "bias": 1e-3, "lora": 1e-3}
    # a LoRA rate of ~0 leaves the LoRA factors where they started while the head and biases move
    start = {k: v.clone() for k, v in m.adapter_state_dict().items()}
    train(m, data(m), cfg(lora_learning_rate=1e-12, learning_rate=5e-3))
    end = m.adapter_state_dict()
    moved = {k for k in start if (start[k] - end[k]).abs().max() > 1e-8}
    assert moved and not any(k.endswith(("lora_A", "lora_B")) for k in moved)
    assert any(k.endswith("bias_delta") for k in moved) and any(k.startswith("head.") for k in moved)


def test_learning_rates_out_of_range_name_their_field():
    from spafit_core.errors import ConfigError

    for name in ("head_learning_rate", "bias_learning_rate", "lora_learning_rate"):
        with pytest.raises(ConfigError) as e:
            TrainConfig(**{name: 2.0})
        assert e.value.field == name


# ----------------------------------------------------------------------------- a carved validation split
def test_without_validation_a_stratified_split_is_carved_and_picks_the_best_epoch(tiny_bert):
    m = make(tiny_bert)
    d = data(m, 200)
    logs = []
    r = train(m, d, cfg(epochs=2), callback=lambda e: logs.append(e.get("message", "")))
    assert r.extra["validation_carved_rows"] == 20 and r.best_epoch is not None and r.main_metric
    assert "accuracy" in r.metrics
    assert r.steps == 2 * -(-180 // 8)  # trained on the other 180 rows
    assert any("20 of 200 training rows held out" in msg for msg in logs)


def test_the_carved_split_is_stratified_seeded_and_optional(tiny_bert):
    from spafit_core.train import carve_validation

    m = make(tiny_bert)
    d = data(m, 200)
    d.labels = torch.tensor([0] * 150 + [1] * 50)
    tr, va = carve_validation(d, 0.2, seed=1, task_type="single_label_classification")
    assert (va.labels == 0).sum() == 30 and (va.labels == 1).sum() == 10 and len(tr) == 160
    tr2, va2 = carve_validation(d, 0.2, seed=1, task_type="single_label_classification")
    assert va.features == va2.features
    assert carve_validation(d, 0.2, seed=2, task_type="single_label_classification")[1].features != va.features
    assert carve_validation(d, 0.02, seed=1, task_type="single_label_classification") is None  # 4 rows: too few
    r = train(m, data(m, 200), cfg(epochs=1, validation_fraction=0.0))
    assert r.best_epoch is None and not r.extra


# ----------------------------------------------------------------------------- on a GPU (run where one is lent)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_the_cache_is_bf16_spills_to_pinned_host_memory_and_recomputes(tmp_path):
    from spafit_core.train import PrefixCache
    from tests.tiny import make_tiny_model

    path = str(make_tiny_model(tmp_path / "nodrop", "bert", dropout=0.0))
    m = make(path, n1=2, n2=3).to("cuda")
    d = data(m)
    whole = PrefixCache(m, d, 16, torch.device("cuda"), torch.bfloat16, 0)
    assert all(t.dtype == torch.bfloat16 and t.is_cuda for t in whole.states)
    part = PrefixCache(m, d, 16, torch.device("cuda"), torch.bfloat16, 0, max_bytes=whole.nbytes // 3,
                       host_max_bytes=whole.nbytes // 3)
    held = [t for t in part.states if t is not None]
    assert any(t.is_cuda for t in held) and any(not t.is_cuda and t.is_pinned() for t in held)
    assert part.recomputed_rows > 0 and part.device_bytes <= whole.nbytes // 3
    idx = list(range(len(d)))
    assert torch.allclose(part.batch(idx, torch.float32), whole.batch(idx, torch.float32), atol=1e-2)
    r = train(m, d, cfg(prefix_cache=True, device="cuda", prefix_cache_max_bytes=whole.nbytes // 3,
                        prefix_cache_host_max_bytes=whole.nbytes // 3))
    assert 0 < r.prefix_cache_bytes <= 2 * (whole.nbytes // 3)


@pytest.mark.gpu
@needs_cuda
def test_fp16_run_resumes_with_its_loss_scale_and_float32_factors(tiny_bert, tmp_path):
    from spafit_core.train import read_checkpoint_meta

    ckpt = tmp_path / "c.safetensors"
    m = make(tiny_bert, n1=1, n2=2)
    with pytest.raises(TrainingCancelled):
        train(m, data(m), cfg(epochs=2, amp="fp16", device="cuda"), checkpoint_path=ckpt,
              should_stop=_stop_after(7))
    saved = read_checkpoint_meta(ckpt)["grad_scaler"]
    assert saved and saved["scale"] > 0
    m2 = make(tiny_bert, n1=1, n2=2)
    r = train(m2, data(m2), cfg(epochs=2, amp="fp16", device="cuda"), checkpoint_path=ckpt)
    assert r.resumed_from_step > 0
    assert all(p.dtype == torch.float32 for p in m2.parameters() if p.requires_grad)


def test_a_checkpoint_from_an_older_version_is_not_resumed_but_replaced(tiny_bert, one_epoch_checkpoint):
    """Older checkpoints carry no run identity (method, task, base model): they cannot be checked, so the
    run starts over instead of resuming into another optimizer layout or configuration."""
    from safetensors.torch import load_file, save_file

    from spafit_core.train import read_checkpoint_meta

    meta = read_checkpoint_meta(one_epoch_checkpoint)
    del meta["run"]
    save_file(load_file(str(one_epoch_checkpoint)), str(one_epoch_checkpoint), metadata={"spafit": json.dumps(meta)})
    m = make(tiny_bert, n1=1, n2=2)
    logs = []
    r = train(m, data(m), cfg(epochs=2), checkpoint_path=one_epoch_checkpoint,
              callback=lambda e: logs.append(e.get("message", "")))
    assert r.resumed_from_step == 0 and any("older version" in msg for msg in logs)
    assert "run" in read_checkpoint_meta(one_epoch_checkpoint)


def test_with_dropout_cached_training_equals_training_with_a_dropout_free_prefix(tiny_bert):
    """The cache's semantics, stated as an equivalence: with dropout 0.1 everywhere, training with the cache
    gives the adapter that uncached training gives when the embeddings and frozen layers have no dropout."""
    from torch import nn

    cached = make(tiny_bert, n1=2, n2=3)
    train(cached, data(cached), cfg(prefix_cache=True))
    plain = make(tiny_bert, n1=2, n2=3)
    for mod in plain.prefix_modules():
        for d in mod.modules():
            if isinstance(d, nn.Dropout):
                d.p = 0.0
    train(plain, data(plain), cfg(prefix_cache=False))
    a, b = cached.adapter_state_dict(), plain.adapter_state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    noisy = make(tiny_bert, n1=2, n2=3)  # and it is a real difference: with prefix dropout the result differs
    train(noisy, data(noisy), cfg(prefix_cache=False))
    c = noisy.adapter_state_dict()
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-4


def test_finetune_runs_in_threads_are_each_what_they_are_alone(tiny_bert, tmp_path):
    """Runs share the process's random number generators (seeded per run; initialisation and dropout draw on
    them): two runs at once with the same seed each gave another adapter than alone, on every try (found by a
    stress hunt). Runs in one process now take turns: the same seed, the same adapter."""
    import hashlib
    import threading

    from spafit_core import finetune
    from tests.tiny import toy_csv

    (tmp_path / "train.csv").write_bytes(toy_csv(48, 0))
    (tmp_path / "val.csv").write_bytes(toy_csv(24, 100))

    def run() -> str:
        r = finetune(str(tmp_path / "train.csv"), str(tmp_path / "val.csv"), base_model=tiny_bert,
                     method=MethodConfig(n1=1, n2=2, rank=4, dropout=0.1),
                     train_config=TrainConfig(epochs=2, batch_size=8, learning_rate=5e-3, seed=1, device="cpu"))
        return hashlib.sha256(r.serialize()[1]).hexdigest()

    alone = run()
    together: list[str] = []
    start = threading.Barrier(2)

    def in_thread() -> None:
        start.wait()
        together.append(run())

    threads = [threading.Thread(target=in_thread) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == [alone, alone]
