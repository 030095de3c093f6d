"""The adapter format: only trained tensors, verified on load, exact round trip, merged export."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch

from spafit_core import AdapterError, AdapterMismatchError, MethodConfig, TaskSpec, TrainConfig
from spafit_core.adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_adapter,
    pack,
    read_adapter,
    save_adapter,
    serialize,
    unpack,
    verify,
)
from spafit_core.model import SpafitModel
from spafit_core.train import encode, set_seed, train
from tests.tiny import make_tiny_model, toy_examples

ARCHS = ["bert", "roberta", "distilbert", "electra", "deberta-v2"]


def trained(path, name="spafit", **kw):
    set_seed(0)
    m = SpafitModel.from_pretrained(path, MethodConfig(name=name, rank=2, **kw), TaskSpec(labels=("neg", "pos")))
    d = encode(toy_examples(24), m.tokenizer, 32, "single_label_classification")
    train(m, d, TrainConfig(epochs=1, batch_size=8, learning_rate=1e-2, seed=1))
    m.eval()
    return m


def batch(m):
    return dict(m.tokenizer(["good movie", "the plot was very boring and bad", "ok"], padding=True,
                            return_tensors="pt"))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["spafit", "lora", "bitfit"])
def test_save_then_load_on_a_fresh_backbone_reproduces_logits_exactly(tiny_dirs, tmp_path, arch, method):
    m = trained(tiny_dirs(arch), method, n1=1, n2=2) if method == "spafit" else trained(tiny_dirs(arch), method)
    save_adapter(m, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    loaded = load_adapter(tmp_path / "a")
    assert torch.equal(m(batch(m)), loaded(batch(loaded)))


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_export_reproduces_logits(tiny_dirs, tmp_path, arch):
    from transformers import AutoModelForSequenceClassification

    m = trained(tiny_dirs(arch), n1=1, n2=2)
    m.save_merged(tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    b = batch(m)
    with torch.no_grad():
        want = m(b)
        got = plain(**m.model_inputs(b)).logits
    assert (want - got).abs().max().item() <= 1e-5
    assert plain.config.id2label == {0: "neg", 1: "pos"}
    assert not any(k for k in plain.state_dict() if "lora" in k or "bias_delta" in k)


def test_adapter_holds_only_trained_tensors_and_is_small(tiny_bert, tmp_path):
    m = trained(tiny_bert, n1=1, n2=2)
    cfg = save_adapter(m, tmp_path / "a", metrics={"accuracy": 0.5})
    _, tensors = read_adapter(tmp_path / "a")
    assert sum(t.numel() for t in tensors.values()) == m.param_counts()["total"]
    assert cfg["task"] == {"task_type": "single_label_classification", "labels": ["neg", "pos"]}
    assert cfg["base_model"]["fingerprint"].startswith("sha256:")
    assert cfg["method"]["n1"] == 1 and cfg["stratification"]["layer_groups"] == [1, 2, 3, 3]
    assert cfg["weights"]["size_bytes"] == (tmp_path / "a" / WEIGHTS_FILE).stat().st_size


def test_tampered_weights_are_refused(tiny_bert, tmp_path):
    m = trained(tiny_bert)
    save_adapter(m, tmp_path / "a")
    w = tmp_path / "a" / WEIGHTS_FILE
    raw = bytearray(w.read_bytes())
    raw[-1] ^= 0x01
    w.write_bytes(bytes(raw))
    with pytest.raises(AdapterError, match="sha256"):
        read_adapter(tmp_path / "a")


def test_foreign_base_model_is_refused(tiny_bert, tmp_path):
    m = trained(tiny_bert)
    save_adapter(m, tmp_path / "a")
    other = make_tiny_model(tmp_path / "other", "bert", seed=1)  # same shapes, other weights
    with pytest.raises(AdapterMismatchError, match="base model"):
        load_adapter(tmp_path / "a", base_model=str(other))


def test_wrong_shapes_are_refused_naming_the_tensor(tiny_bert):
    m = trained(tiny_bert, n1=1, n2=2)
    cfg, weights = serialize(m)
    wider = SpafitModel.from_pretrained(tiny_bert, MethodConfig(n1=1, n2=2, rank=4), TaskSpec(labels=("a", "b")))
    with pytest.raises(AdapterMismatchError, match="lora_A"):
        verify(cfg, weights, fingerprint=wider.base_fingerprint, expected_shapes=wider.expected_shapes())


def test_pack_unpack_round_trip_and_refuses_pickles(tiny_bert):
    m = trained(tiny_bert)
    cfg, weights = serialize(m)
    blob = pack(cfg, weights)
    assert pack(cfg, weights) == blob  # deterministic
    cfg2, weights2 = unpack(blob)
    assert weights2 == weights and cfg2 == json.loads(json.dumps(cfg))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(CONFIG_FILE, json.dumps(cfg))
        z.writestr("adapter_model.bin", b"\x80\x04\x95 pickle payload")
    with pytest.raises(AdapterError, match="pickle"):
        unpack(buf.getvalue())
    with pytest.raises(AdapterError, match="not a zip"):
        unpack(b"not a zip at all")


def test_config_that_is_not_ours_is_refused(tiny_bert, tmp_path):
    m = trained(tiny_bert)
    save_adapter(m, tmp_path / "a")
    (tmp_path / "a" / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(AdapterError, match="not a SPAFIT adapter"):
        read_adapter(tmp_path / "a")


def test_non_finite_values_are_refused(tiny_bert):
    m = trained(tiny_bert)
    with torch.no_grad():
        next(iter(m.adapter_state_dict().values())).fill_(float("nan"))
    cfg, weights = serialize(m)
    with pytest.raises(AdapterError, match="NaN"):
        verify(cfg, weights, fingerprint=m.base_fingerprint, expected_shapes=None)


def test_finite_values_too_large_to_serve_are_refused(tiny_bert):
    """LoRA factors scaled by 1e30 are finite, yet every forward through them overflows to NaN scores."""
    m = trained(tiny_bert)
    with torch.no_grad():
        next(iter(m.adapter_state_dict().values())).fill_(1e30)
    cfg, weights = serialize(m)
    with pytest.raises(AdapterError, match="beyond"):
        verify(cfg, weights, fingerprint=m.base_fingerprint, expected_shapes=None)


def test_adapters_saved_under_the_old_config_name_still_load(tiny_bert, tmp_path):
    """Older versions wrote adapter_config.json (PEFT's file name); folders and archives in that layout,
    as the registry and users hold them, still load; new ones never use PEFT's name."""
    from spafit_core.adapter import LEGACY_CONFIG_FILE

    m = trained(tiny_bert)
    save_adapter(m, tmp_path / "a")
    assert CONFIG_FILE == "spafit_adapter.json" and not (tmp_path / "a" / LEGACY_CONFIG_FILE).exists()
    (tmp_path / "a" / CONFIG_FILE).rename(tmp_path / "a" / LEGACY_CONFIG_FILE)
    assert torch.equal(load_adapter(tmp_path / "a")(batch(m)), m(batch(m)))
    cfg, weights = serialize(m)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(LEGACY_CONFIG_FILE, json.dumps(cfg))
        z.writestr(WEIGHTS_FILE, weights)
    assert unpack(buf.getvalue())[1] == weights


def test_a_peft_archive_given_as_ours_is_refused_with_a_pointer(tiny_bert):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("adapter_config.json", json.dumps({"peft_type": "LORA", "r": 8}))
        z.writestr("adapter_model.safetensors", b"x")
    with pytest.raises(AdapterError, match="PEFT adapter.*format peft"):
        unpack(buf.getvalue())
