"""Attacks on the method, training and adapter round trips: what a run computes must not depend on how it was
batched, interrupted or stored."""

from __future__ import annotations

import pytest
import torch

from spafit_core import MethodConfig, TaskSpec, TrainConfig
from spafit_core.adapter import load_adapter, save_adapter, serialize
from spafit_core.errors import TrainingCancelled
from spafit_core.model import SpafitModel
from spafit_core.train import encode, set_seed, train
from tests.tiny import make_tiny_model, toy_examples

LABELS = ("neg", "pos")
TEXTS = ["good movie", "the plot was very boring and bad", "ok"]


@pytest.fixture(scope="module")
def tiny_nodrop(tmp_path_factory) -> str:
    """A tiny BERT without dropout: runs that should compute the same thing compare to float rounding."""
    return str(make_tiny_model(tmp_path_factory.mktemp("nodrop") / "bert", "bert", dropout=0.0))


def make(path, seed=0, dtype=None, **method):
    set_seed(seed)
    method = {"n1": 1, "n2": 2, "rank": 2} | method
    return SpafitModel.from_pretrained(path, MethodConfig(**method), TaskSpec(labels=LABELS), dtype=dtype)


def data(model, n, seed=0):
    return encode(toy_examples(n, seed), model.tokenizer, 32, "single_label_classification")


def batch(model):
    return dict(model.tokenizer(TEXTS, padding=True, return_tensors="pt"))


# ----------------------------------------------------------------------------- a bf16 base
def test_an_adapter_trained_on_a_bf16_cast_of_the_base_loads_back_with_its_logits(tiny_bert, tmp_path):
    """The fingerprint was taken after the cast to bf16: an adapter trained on a bf16 base named other weights
    than the stored float32 ones, so neither load_adapter nor the engine (which fingerprints the stored weights)
    would take it."""
    from spafit_core.engine import Engine

    m = make(tiny_bert, dtype=torch.bfloat16)
    with torch.no_grad():
        for t in m.adapter_state_dict().values():
            t.copy_(torch.randn_like(t) * 0.2)
    m.eval()
    assert m.base_fingerprint == make(tiny_bert).base_fingerprint
    save_adapter(m, tmp_path / "a")
    loaded = load_adapter(tmp_path / "a", dtype=torch.bfloat16)
    assert loaded.hf.base_model.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(m(batch(m)), loaded(batch(loaded)))
    cfg, weights = serialize(m, max_seq_length=32)
    Engine(device="cpu", default_base_model=tiny_bert).load("t", cfg, weights)  # its fingerprint matches


def test_a_checkpoint_made_on_a_bf16_base_is_not_resumed_on_a_float32_one(tiny_bert, tmp_path):
    """With the fingerprint naming the stored weights, bf16 and float32 runs share it: the base's dtype must still
    keep a run from resuming another's moments and tensors as if it had computed them."""
    from spafit_core.errors import ConfigError

    ckpt, c = tmp_path / "c.safetensors", TrainConfig(epochs=1, batch_size=8, learning_rate=1e-2, device="cpu")
    m = make(tiny_bert, dtype=torch.bfloat16)
    train(m, data(m, 16), c, checkpoint_path=ckpt)
    with pytest.raises(ConfigError, match="dtype: bfloat16 then, float32 now"):
        other = make(tiny_bert)
        train(other, data(other, 16), c, checkpoint_path=ckpt)
    again = make(tiny_bert, dtype=torch.bfloat16)
    assert train(again, data(again, 16), c, checkpoint_path=ckpt).resumed_from_step == 2


# ----------------------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("n", [12, 14])
def test_gradient_accumulation_equals_one_batch_of_the_same_rows(tiny_nodrop, n):
    """batch_size 4 x 2 accumulation steps must equal batch_size 8: the same rows per step. The last group of an
    epoch (one micro-batch of 4 for n=12, micro-batches of 4 and 2 for n=14) was divided by 2 regardless, so its
    step followed half (or a wrongly weighted) gradient."""
    out = []
    for bs, accum in ((8, 1), (4, 2)):
        m = make(tiny_nodrop)
        r = train(m, data(m, n), TrainConfig(epochs=2, batch_size=bs, gradient_accumulation_steps=accum,
                                             learning_rate=1e-2, seed=1, validation_fraction=0, max_grad_norm=None))
        assert r.steps == 4
        out.append(m.adapter_state_dict())
    a, b = out
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


# ----------------------------------------------------------------------------- resume
def test_a_resumed_epoch_reports_the_loss_of_the_whole_epoch(tiny_bert, tmp_path):
    """Resumed mid-epoch, the epoch's loss in the history (events, the adapter's training summary) covered only
    the batches after the checkpoint."""
    c = TrainConfig(epochs=2, batch_size=4, learning_rate=5e-3, seed=3, checkpoint_every_steps=2, log_every_steps=1)
    ref = make(tiny_bert, dropout=0.1)
    ref_result = train(ref, data(ref, 32), c, validation=data(ref, 16, 1))
    ckpt = tmp_path / "ckpt.safetensors"
    first, steps = make(tiny_bert, dropout=0.1), []
    with pytest.raises(TrainingCancelled):
        train(first, data(first, 32), c, validation=data(first, 16, 1), checkpoint_path=ckpt,
              callback=lambda e: steps.append(e["step"]) if e["type"] == "progress" else None,
              should_stop=lambda: len(steps) >= 5)
    second = make(tiny_bert, seed=99, dropout=0.1)
    result = train(second, data(second, 32), c, validation=data(second, 16, 1), checkpoint_path=ckpt)
    assert result.resumed_from_step == 4
    a, b = ref.adapter_state_dict(), second.adapter_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in result.history] == [h["loss"] for h in ref_result.history]


# ----------------------------------------------------------------------------- train and serve the same tokens
def tiny_deberta_v3(path):
    """A tiny DeBERTa-v3-style encoder: relative attention only, no absolute positions (so no input length fails)."""
    from transformers import AutoModel, BertTokenizer, DebertaV2Config

    from tests.tiny import VOCAB

    torch.manual_seed(0)
    cfg = DebertaV2Config(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64, pad_token_id=0, relative_attention=True,
                          pos_att_type=["p2c", "c2p"], position_buckets=16, norm_rel_ebd="layer_norm",
                          share_att_key=True, position_biased_input=False, type_vocab_size=0)
    AutoModel.from_config(cfg).save_pretrained(path)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    return str(path)


def test_training_never_sees_longer_inputs_than_its_adapter_is_served(tmp_path):
    """On a backbone without absolute positions nothing stops a long input, so a run trained on 128 tokens while
    its adapter recorded (and the engine served) the backbone's 64."""
    import csv

    from spafit_core import finetune

    path = tiny_deberta_v3(tmp_path / "debv3")
    ex = toy_examples(40)
    with open(tmp_path / "long.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([(" ".join([t] * 12), LABELS[y]) for t, y in zip(ex.texts, ex.labels, strict=True)])
    r = finetune(str(tmp_path / "long.csv"), base_model=path, method=MethodConfig(n1=1, n2=2, rank=2),
                 train_config=TrainConfig(epochs=1, batch_size=8, max_seq_length=128, validation_fraction=0))
    cfg, _ = r.serialize()
    assert cfg["max_seq_length"] == r.max_seq_length == 64
    assert r.train_result.truncated_rows > 0  # rows over 64 tokens were cut to the served length


# ----------------------------------------------------------------------------- attacks that held (kept as guards)
@pytest.mark.parametrize("L, groups", [
    (1, [2]),  # L/3 rounds to 0, 2L/3 to 1: one bias-only layer, no LoRA layer
    (2, [1, 3]),  # n1 = n2 = 1: no bias-only layer
    (3, [1, 2, 3]),
    (5, [1, 1, 2, 3, 3]),
    (7, [1, 1, 2, 2, 2, 3, 3]),
    (25, [1] * 8 + [2] * 9 + [3] * 8),
])
def test_default_split_is_the_rounded_thirds_of_any_depth(L, groups):
    plan = MethodConfig().resolve(L)
    assert [plan.group(i) for i in range(L)] == groups
    assert plan.first_trained_layer == groups.index(2) if 2 in groups else groups.index(3)


def test_head_only_split_trains_the_head_and_nothing_else(tiny_bert):
    m = make(tiny_bert, n1=4, n2=4)
    assert m.param_counts()["without_head"] == 0 and m.plan.first_trained_layer == 4
    assert set(m.adapter_state_dict()) == {"head.classifier.weight", "head.classifier.bias"}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    train(m, data(m, 16), TrainConfig(epochs=1, batch_size=8, learning_rate=1e-2, prefix_cache=True))
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"hf.classifier.weight", "hf.classifier.bias"}


@pytest.mark.parametrize("name", ["spafit", "full"])
def test_weight_decay_spares_every_bias_and_layernorm(tiny_bert, name):
    from spafit_core.optim import param_groups

    m = make(tiny_bert, name=name)
    groups = param_groups(m, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    for n, p in m.named_parameters():
        if not p.requires_grad:
            continue
        spared = n.endswith(("bias", "bias_delta")) or "LayerNorm" in n
        assert (id(p) not in decayed) == spared, n
    assert sum(p.numel() for g in groups for p in g["params"]) == m.param_counts()["total"]
