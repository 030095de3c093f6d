"""SPAFIT's stratification and its baselines: what trains, what stays frozen, and how much."""

from __future__ import annotations

import pytest
import torch

from spafit_core import ConfigError, MethodConfig, TaskSpec, UnsupportedArchitectureError
from spafit_core.model import SpafitModel

ARCHS = ["bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta-v2"]
H, FFN, L, R, C = 32, 64, 4, 2, 3  # tiny config: hidden, intermediate, layers; rank; classes


def build(path, name="spafit", **kw):
    kw.setdefault("rank", R)
    return SpafitModel.from_pretrained(path, MethodConfig(name=name, **kw), TaskSpec(labels=("a", "b", "c")))


def bias_per_layer() -> int:
    # q, k, v, attention output (H each) + FFN in (I) + FFN out (H) + two LayerNorms (H each)
    return 4 * H + FFN + H + 2 * H


def lora_per_layer(targets: int = 4, rank: int = R) -> int:
    return targets * rank * (H + H)  # A (r, in) + B (out, r) for each H x H projection


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n1,n2", [(1, 3), (0, 2), (2, 2), (0, 0), (4, 4)])
def test_spafit_parameter_counts_match_closed_form(tiny_dirs, arch, n1, n2):
    m = build(tiny_dirs(arch), n1=n1, n2=n2)
    counts = m.param_counts()
    assert counts["per_group"] == {"1": 0, "2": (n2 - n1) * bias_per_layer(),
                                   "3": (L - n2) * (lora_per_layer() + bias_per_layer())}
    assert counts["without_head"] == (n2 - n1) * bias_per_layer() + (L - n2) * (lora_per_layer() + bias_per_layer())
    assert counts["total"] == counts["without_head"] + counts["head"]
    assert counts["total"] == sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ARCHS)
def test_baselines_parameter_counts_match_closed_form(tiny_dirs, arch):
    path = tiny_dirs(arch)
    assert build(path, "lora").param_counts()["without_head"] == L * lora_per_layer()
    assert build(path, "bitfit").param_counts()["without_head"] == L * bias_per_layer()
    full = build(path, "full")
    assert full.param_counts()["total"] == sum(p.numel() for p in full.hf.parameters())
    wide = build(path, "lora", targets=("query", "value", "ffn_in", "ffn_out"), rank=4)
    # query/value: 4 * (H + H) each; ffn_in: 4 * (H + I); ffn_out: 4 * (I + H)
    assert wide.param_counts()["without_head"] == L * (2 * 4 * 2 * H + 2 * 4 * (H + FFN))


def test_head_is_trained_and_embeddings_frozen(tiny_bert):
    m = build(tiny_bert, n1=1, n2=2)
    head = dict(m.head_named_parameters())
    assert set(head) == {"classifier.weight", "classifier.bias"}
    assert all(p.requires_grad for p in head.values())
    assert not any(p.requires_grad for p in m.hf.base_model.embeddings.parameters())
    assert m.param_counts()["head"] == C * H + C


def test_nothing_below_n1_requires_grad(tiny_bert):
    m = build(tiny_bert, n1=2, n2=3)
    layers = m.hf.base_model.encoder.layer
    for i in range(2):
        assert not any(p.requires_grad for p in layers[i].parameters()), f"layer {i} has trainable tensors"
    assert any(p.requires_grad for p in layers[2].parameters())


def test_autograd_never_reaches_group_1(tiny_bert):
    """The output of the last frozen layer carries no graph, so backward cannot run through group 1."""
    m = build(tiny_bert, n1=2, n2=3)
    m.train()
    seen = {}

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        seen[module.index] = (out.requires_grad, out.grad_fn)

    handles = [m.hf.base_model.encoder.layer[i].register_forward_hook(hook) for i in range(4)]
    tok = m.tokenizer(["good movie", "bad plot"], padding=True, return_tensors="pt")
    loss = m(dict(tok)).sum()
    loss.backward()
    for h in handles:
        h.remove()
    assert seen[0] == (False, None) and seen[1] == (False, None)
    assert seen[2][0] is True and seen[3][0] is True


def test_lora_starts_as_a_no_op(tiny_bert):
    plain = build(tiny_bert, "bitfit")  # no LoRA, zero bias deltas: the base model + the same head
    torch.manual_seed(0)
    lora = build(tiny_bert, "lora")
    lora.load_adapter_state_dict({k: v for k, v in lora.adapter_state_dict().items()} |
                                 {k: v for k, v in plain.adapter_state_dict().items() if k.startswith("head.")})
    assert any(k.endswith("lora_A") and v.abs().sum() > 0 for k, v in lora.adapter_state_dict().items())
    tok = plain.tokenizer(["good movie", "the plot was very boring"], padding=True, return_tensors="pt")
    plain.eval(), lora.eval()
    assert torch.equal(plain(dict(tok)), lora(dict(tok)))


@pytest.mark.parametrize("kwargs,field", [
    (dict(n1=3, n2=1), "n1"),
    (dict(n1=1, n2=9), "n2"),
    (dict(n1=-1, n2=2), "n1"),
    (dict(rank=0), "rank"),
    (dict(alpha=0), "alpha"),
    (dict(dropout=1.5), "dropout"),
    (dict(targets=("query", "bogus")), "targets"),
    (dict(name="adapterdrop"), "name"),
    (dict(n1=1.5), "n1"),
])
def test_bad_method_config_names_its_field(tiny_bert, kwargs, field):
    with pytest.raises(ConfigError) as e:
        build(tiny_bert, **kwargs)
    assert e.value.field == field
    assert field in str(e.value) or "method" in str(e.value)


def test_fractional_boundaries_resolve_against_depth():
    plan = MethodConfig(n1=0.25, n2=0.5).resolve(24)
    assert (plan.n1, plan.n2) == (6, 12)
    assert [plan.group(i) for i in (0, 5, 6, 11, 12, 23)] == [1, 1, 2, 2, 3, 3]


def test_unknown_architecture_error_names_it():
    from torch import nn

    from spafit_core.stratify import find_stack

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 3, "model_type": "oddformer"})()
            self.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])

    with pytest.raises(UnsupportedArchitectureError, match="oddformer"):
        find_stack(Odd())


def test_missing_target_role_names_architecture(tiny_dirs):
    from spafit_core.stratify import find_stack, require_roles

    stack = find_stack(build(tiny_dirs("distilbert"), "full").hf.base_model)  # full: unwrapped
    assert stack.layers[0].roles["query"] == "attention.q_lin"
    from dataclasses import replace

    broken = replace(stack, layers=tuple(replace(layer, roles={k: v for k, v in layer.roles.items() if k != "ffn_in"})
                                         for layer in stack.layers))
    with pytest.raises(UnsupportedArchitectureError, match="ffn_in"):
        require_roles(broken, ("ffn_in",))


# ----------------------------------------------------------------------------- models the method does not fit
def _without_biases(path):
    """The tiny BERT classifier with every bias of its layer stack removed (as in ModernBERT / LLaMA blocks)."""
    from torch import nn

    from spafit_core.model import load_hf_classifier

    hf = load_hf_classifier(path, TaskSpec(labels=("a", "b", "c")))
    for m in hf.base_model.encoder.modules():
        if isinstance(m, nn.Linear | nn.LayerNorm) and m.bias is not None:
            m.bias = None
    return hf


@pytest.mark.parametrize("method", [dict(name="bitfit"), dict(name="spafit", n1=1, n2=3)])
def test_bias_only_layers_on_a_model_without_biases_are_refused(tiny_bert, method):
    with pytest.raises(UnsupportedArchitectureError, match=r"have no bias terms.*would train nothing") as e:
        SpafitModel(_without_biases(tiny_bert), MethodConfig(rank=R, **method), TaskSpec(labels=("a", "b", "c")),
                    base_model_name=tiny_bert)
    assert e.value.field == "method" and e.value.detail["layers_without_bias"]


@pytest.mark.parametrize("method", [dict(name="lora"), dict(name="spafit", n1=2, n2=2)])
def test_lora_on_a_model_without_biases_still_trains_its_factors(tiny_bert, method):
    m = SpafitModel(_without_biases(tiny_bert), MethodConfig(rank=R, **method), TaskSpec(labels=("a", "b", "c")),
                    base_model_name=tiny_bert)
    assert m.param_counts()["without_head"] > 0
    assert not any(k.endswith("bias_delta") for k in m.adapter_state_dict())


def test_bitfit_on_a_tiny_modernbert_is_refused():
    from transformers import AutoModelForSequenceClassification, ModernBertConfig

    config = ModernBertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_labels=3, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                              cls_token_id=2, sep_token_id=3)
    hf = AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match="no bias terms"):
        SpafitModel(hf, MethodConfig(name="bitfit"), TaskSpec(labels=("a", "b", "c")), base_model_name="modernbert")


def test_encoder_decoder_models_are_refused_not_half_adapted():
    from transformers import AutoModelForSequenceClassification, BartConfig

    config = BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_labels=3,
                        max_position_embeddings=64)
    hf = AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match="encoder-decoder"):
        SpafitModel(hf, MethodConfig(), TaskSpec(labels=("a", "b", "c")), base_model_name="bart")


# ----------------------------------------------------------------------------- trainable tensors in float32
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["spafit", "lora", "bitfit"])
def test_trainable_tensors_are_float32_on_a_half_precision_base(tiny_bert, dtype, name):
    from spafit_core import TrainConfig
    from spafit_core.train import encode, train
    from tests.tiny import toy_examples

    m = SpafitModel.from_pretrained(tiny_bert, MethodConfig(name=name, rank=R, n1=1, n2=2) if name == "spafit"
                                    else MethodConfig(name=name, rank=R), TaskSpec(labels=("a", "b")), dtype=dtype)
    trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for _, p in trainable), \
        [(n, p.dtype) for n, p in trainable if p.dtype != torch.float32]
    assert m.hf.base_model.embeddings.word_embeddings.weight.dtype == dtype  # the base keeps its dtype
    if dtype == torch.float16:
        return  # fp16 matmuls on CPU are not everywhere; training in fp16 is CUDA's (amp) business
    d = encode(toy_examples(16), m.tokenizer, 32, "single_label_classification")
    before = {k: v.clone() for k, v in m.adapter_state_dict().items()}
    r = train(m, d, TrainConfig(epochs=1, batch_size=8, learning_rate=1e-2, device="cpu"))
    assert all(h["loss"] == h["loss"] for h in r.history)  # finite
    after = m.adapter_state_dict()
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any((before[k] - after[k]).abs().max() > 0 for k in before)


def test_full_fine_tuning_on_a_half_precision_base_trains_in_float32(tiny_bert):
    m = SpafitModel.from_pretrained(tiny_bert, MethodConfig(name="full"), TaskSpec(labels=("a", "b")),
                                    dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("kwargs, field", [
    ({"alpha": 1e308}, "alpha"),  # finite, yet the LoRA scale overflows every forward
    ({"alpha": 4097}, "alpha"),
    ({"alpha": True}, "alpha"),
    ({"group3_bias": "x"}, "group3_bias"),
])
def test_method_config_bounds_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        MethodConfig(**kwargs)
    assert e.value.field == field
