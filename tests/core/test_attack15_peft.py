"""PEFT import attacks (issue 15): a folder whose config and weights disagree, and a damaged zip, are refused
in words, never served as a model PEFT would not compute nor crashed on."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch

from spafit_core import AdapterError
from spafit_core.peft_interop import PEFT_CONFIG, PEFT_WEIGHTS, from_peft, unpack_peft
from tests.core.test_peft_interop import LABELS, TOL, batch, folder_files, peft_trained, stock, write

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("change", [{"target_modules": ["dense"]},
                                    {"layers_to_transform": [0, 1], "layers_pattern": "layer"},
                                    {"exclude_modules": ["query"]}])
def test_weights_that_the_config_does_not_select_are_refused(tiny_bert, tmp_path, change):
    """PEFT loads a LoRA factor only where its config puts LoRA: served as is, the folder would give other
    outputs than PEFT's own from the same files."""
    _, folder, tok = peft_trained(tiny_bert, tmp_path)
    files = folder_files(folder)
    cfg = json.loads(files[PEFT_CONFIG])
    files[PEFT_CONFIG] = json.dumps({**cfg, **change}).encode()
    pm = peft.PeftModel.from_pretrained(stock(tiny_bert), write(files, tmp_path / "edited")).eval()
    with torch.no_grad():  # PEFT itself dropped (some of) the factors
        assert (pm(**batch(tok)).logits - from_peft(folder_files(folder), tiny_bert, labels=list(LABELS))(
            batch(tok))).abs().max() > TOL
    with pytest.raises(AdapterError, match="do not select") as e:
        from_peft(files, tiny_bert, labels=list(LABELS))
    assert e.value.field == "target_modules"


def test_a_damaged_peft_zip_is_refused_in_words(tiny_bert, tmp_path):
    _, folder, _ = peft_trained(tiny_bert, tmp_path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in folder_files(folder).items():
            z.writestr(name, data)
    raw = bytearray(buf.getvalue())
    start = raw.find(b"PK\x03\x04", raw.find(PEFT_WEIGHTS.encode()) - 40)  # a byte inside the weights' data
    raw[start + 30 + len(PEFT_WEIGHTS) + 10] ^= 0xFF
    with pytest.raises(AdapterError, match="damaged"):
        unpack_peft(bytes(raw))


def test_a_peft_folder_with_nan_weights_is_refused_before_anything_is_written(tiny_bert, tmp_path):
    """`spafit import` writes what from_peft returns: a NaN factor must be refused there, not at serving time."""
    from safetensors.torch import load, save

    _, folder, _ = peft_trained(tiny_bert, tmp_path)
    files = folder_files(folder)
    tensors = load(files[PEFT_WEIGHTS])
    name = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[name][0, 0] = float("nan")
    files[PEFT_WEIGHTS] = save(tensors)
    with pytest.raises(AdapterError, match="NaN") as e:
        from_peft(files, tiny_bert, labels=list(LABELS))
    assert name in str(e.value)


@pytest.mark.parametrize("source", ["export_info", "head", "labels"])
def test_a_label_count_beyond_any_adapters_is_refused_before_a_head_is_built(tiny_bert, tmp_path, source,
                                                                            monkeypatch):
    """A few MB of labels (in spafit_export.json, or a zero bias that compresses to nothing) made the import
    build a head of millions of rows: gigabytes and minutes before the shape check refused it."""
    from safetensors.torch import load, save

    import spafit_core.model
    from spafit_core.adapter_schema import MAX_LABELS

    _, folder, _ = peft_trained(tiny_bert, tmp_path)
    files, labels = folder_files(folder), None
    many = [f"l{i}" for i in range(MAX_LABELS + 1)]
    if source == "export_info":
        files["spafit_export.json"] = json.dumps({"task": {"labels": many}}).encode()
    elif source == "head":
        tensors = load(files[PEFT_WEIGHTS])
        tensors["base_model.model.classifier.bias"] = torch.zeros(MAX_LABELS + 1)
        files[PEFT_WEIGHTS] = save(tensors)
    else:
        labels = many

    def never(*a, **kw):
        raise AssertionError("a head was built")

    monkeypatch.setattr(spafit_core.model, "load_hf_classifier", never)
    with pytest.raises(AdapterError, match=f"at most {MAX_LABELS}") as e:
        from_peft(files, tiny_bert, labels=labels)
    assert e.value.field == "labels"


def test_a_peft_adapter_of_an_encoder_decoder_is_refused_as_such(tmp_path):
    """BART's encoder LoRA was refused as 'outside the encoder layers ... (embedding LoRA)': name the reason."""
    from transformers import AutoModelForSequenceClassification, BartConfig

    from spafit_core.errors import UnsupportedArchitectureError

    config = BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_labels=2,
                        max_position_embeddings=64)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "bart")
    pm = peft.get_peft_model(AutoModelForSequenceClassification.from_pretrained(tmp_path / "bart", num_labels=2),
                             peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "peft")
    with pytest.raises(UnsupportedArchitectureError, match="encoder-decoder"):
        from_peft(folder_files(tmp_path / "peft"), str(tmp_path / "bart"), labels=["a", "b"])
