"""PEFT interop, tested against PEFT itself: our adapters load with `PeftModel.from_pretrained` onto the
stock classifier with the same logits, and PEFT LoRA adapters import into ours with PEFT's logits."""

from __future__ import annotations

import json

import pytest
import torch

from spafit_core import AdapterError, MethodConfig, TaskSpec, TrainConfig
from spafit_core.adapter import load_adapter, save_adapter
from spafit_core.model import SpafitModel
from spafit_core.peft_interop import EXPORT_INFO, PEFT_CONFIG, PEFT_WEIGHTS, from_peft, to_peft
from spafit_core.train import encode, set_seed, train
from tests.tiny import toy_examples

peft = pytest.importorskip("peft")
LABELS = ("neg", "pos", "meh")
TOL = 1e-5


def trained(path, **method):
    set_seed(0)
    m = SpafitModel.from_pretrained(path, MethodConfig(rank=2, alpha=4.0, **method), TaskSpec(labels=LABELS))
    ex = toy_examples(24)
    ex.labels = [(y + i) % 3 for i, y in enumerate(ex.labels)]
    d = encode(ex, m.tokenizer, 32, "single_label_classification")
    train(m, d, TrainConfig(epochs=1, batch_size=8, learning_rate=2e-2, seed=1))
    m.eval()
    return m


def batch(tokenizer):
    return dict(tokenizer(["good movie", "the plot was very boring and bad", "ok"], padding=True,
                          return_tensors="pt"))


def write(files: dict[str, bytes], folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def stock(path, labels=LABELS):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels),
                                                              id2label=dict(enumerate(labels)))


@pytest.mark.parametrize("method", [dict(name="spafit", n1=1, n2=2), dict(name="spafit", n1=1, n2=3,
                                                                            targets=("query", "ffn_out")),
                                    dict(name="lora")])
def test_export_loads_in_peft_with_our_logits(tiny_bert, tmp_path, method):
    m = trained(tiny_bert, **method)
    assert any(p.abs().sum() > 0 for n, p in m.adapter_state_dict().items() if n.endswith("lora_B"))
    folder = write(to_peft(m), tmp_path / "peft")
    cfg = json.loads((folder / PEFT_CONFIG).read_text())
    assert cfg["layers_to_transform"] == list(range(m.plan.n2, 4))
    pm = peft.PeftModel.from_pretrained(stock(tiny_bert), folder).eval()
    # PEFT put LoRA exactly on the modules we adapt, and nowhere else
    wrapped = sorted(n.removeprefix("base_model.model.") for n, mod in pm.named_modules()
                     if isinstance(mod, peft.tuners.lora.LoraLayer))
    assert wrapped == sorted(cfg["target_modules"])
    b = batch(m.tokenizer)
    with torch.no_grad():
        ours, theirs = m(b), pm(**b).logits
    assert (ours - theirs).abs().max() < TOL
    # and the head / biases really came from the file (a stock model differs)
    with torch.no_grad():
        assert (stock(tiny_bert)(**b).logits - ours).abs().max() > 1e-3


def test_export_round_trips_through_our_peft_import(tiny_bert, tmp_path):
    m = trained(tiny_bert, name="spafit", n1=1, n2=2)
    back = from_peft(to_peft(m), tiny_bert)
    assert back.task.labels == LABELS and back.plan.n2 == 2 and back.plan.n1 == 1
    b = batch(m.tokenizer)
    with torch.no_grad():
        assert (m(b) - back(b)).abs().max() < TOL


def test_export_refuses_an_adapter_without_lora(tiny_bert):
    m = SpafitModel.from_pretrained(tiny_bert, MethodConfig(name="bitfit"), TaskSpec(labels=LABELS))
    with pytest.raises(AdapterError, match="no LoRA"):
        to_peft(m)


def peft_trained(path, tmp_path, **lora_kw):
    """A LoRA adapter trained with PEFT itself (a few steps) on the stock tiny classifier, saved by PEFT."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = stock(path)
    cfg = peft.LoraConfig(task_type="SEQ_CLS", **{"r": 4, "lora_alpha": 8,
                                                   "target_modules": ["query", "value"], **lora_kw})
    pm = peft.get_peft_model(model, cfg)
    tok = AutoTokenizer.from_pretrained(path)
    ex = toy_examples(16)
    enc = tok(ex.texts, padding=True, return_tensors="pt")
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    pm.train()
    for _ in range(5):
        out = pm(**enc, labels=torch.tensor(ex.labels))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    return pm, tmp_path / "peft", tok


def folder_files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("lora_kw", [{}, {"layers_to_transform": [2, 3], "layers_pattern": "layer"},
                                     {"bias": "lora_only", "use_rslora": True}])
def test_peft_trained_adapter_imports_with_peft_logits(tiny_bert, tmp_path, lora_kw):
    pm, folder, tok = peft_trained(tiny_bert, tmp_path, **lora_kw)
    ours = from_peft(folder_files(folder), tiny_bert, labels=list(LABELS))
    b = batch(tok)
    with torch.no_grad():
        assert (pm(**b).logits - ours(b)).abs().max() < TOL
    # and it survives our own format (what the registry stores)
    save_adapter(ours, tmp_path / "ours")
    again = load_adapter(tmp_path / "ours")
    with torch.no_grad():
        assert (pm(**b).logits - again(b)).abs().max() < TOL


@pytest.mark.parametrize("lora_kw, match", [
    ({"layers_to_transform": [0, 1], "layers_pattern": "layer"}, "top range"),
    ({"use_dora": True}, "use_dora"),
    ({"target_modules": ["query", "word_embeddings"]}, "outside the encoder layers"),
])
def test_peft_import_refuses_what_it_cannot_represent(tiny_bert, tmp_path, lora_kw, match):
    _, folder, _ = peft_trained(tiny_bert, tmp_path, **lora_kw)
    with pytest.raises(AdapterError, match=match):
        from_peft(folder_files(folder), tiny_bert, labels=list(LABELS))


def test_peft_import_without_a_head_is_refused(tiny_bert, tmp_path):
    from safetensors.torch import load, save

    _, folder, _ = peft_trained(tiny_bert, tmp_path)
    files = folder_files(folder)
    files[PEFT_WEIGHTS] = save({k: v for k, v in load(files[PEFT_WEIGHTS]).items() if "classifier" not in k})
    with pytest.raises(AdapterError, match="no classifier head"):
        from_peft(files, tiny_bert, labels=list(LABELS))


def test_peft_import_refuses_pickled_weights(tiny_bert, tmp_path):
    _, folder, _ = peft_trained(tiny_bert, tmp_path)
    files = folder_files(folder)
    files["adapter_model.bin"] = files.pop(PEFT_WEIGHTS)
    with pytest.raises(AdapterError, match="pickled"):
        from_peft(files, tiny_bert)


def test_our_folder_is_no_peft_folder(tiny_bert, tmp_path):
    """PEFT pointed at one of our adapter folders fails plainly (no adapter_config.json there), never loads
    our schema as if it were its own; the export info alone names the labels."""
    m = trained(tiny_bert, name="spafit", n1=1, n2=2)
    save_adapter(m, tmp_path / "ours")
    assert not (tmp_path / "ours" / PEFT_CONFIG).exists()
    with pytest.raises(ValueError, match="adapter_config.json"):
        peft.PeftModel.from_pretrained(stock(tiny_bert), tmp_path / "ours")
    info = json.loads(to_peft(m)[EXPORT_INFO])
    assert info["task"]["labels"] == list(LABELS)


@pytest.mark.parametrize("arch", ["roberta", "distilbert", "electra", "deberta-v2"])
def test_export_and_import_on_other_encoders(tiny_dirs, tmp_path, arch):
    path = tiny_dirs(arch)
    m = trained(path, name="spafit", n1=1, n2=2)
    files = to_peft(m)
    pm = peft.PeftModel.from_pretrained(stock(path), write(files, tmp_path / "peft")).eval()
    b = batch(m.tokenizer)
    with torch.no_grad():
        assert (m(b) - pm(**b).logits).abs().max() < TOL
        assert (m(b) - from_peft(files, path)(b)).abs().max() < TOL
