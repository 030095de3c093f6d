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
