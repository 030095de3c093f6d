"""`spafit export --format peft` and `spafit import --format peft`: folders PEFT itself loads and writes."""

from __future__ import annotations

import pytest
import torch

from app.cli.common import EXIT_INVALID
from spafit_core import MethodConfig, TaskSpec, TrainConfig
from spafit_core.adapter import CONFIG_FILE, load_adapter, save_adapter
from spafit_core.model import SpafitModel
from spafit_core.train import encode, set_seed, train
from tests.tiny import toy_examples

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory):
    set_seed(0)
    m = SpafitModel.from_pretrained(tiny_base, MethodConfig(n1=1, n2=2, rank=2), TaskSpec(labels=("neg", "pos")))
    train(m, encode(toy_examples(24), m.tokenizer, 32, "single_label_classification"),
          TrainConfig(epochs=1, batch_size=8, learning_rate=2e-2))
    folder = tmp_path_factory.mktemp("ours") / "a"
    save_adapter(m, folder)
    return folder


def texts(tokenizer):
    return dict(tokenizer(["good movie", "boring and bad"], padding=True, return_tensors="pt"))


def test_export_peft_then_import_back_keeps_the_logits(spafit, adapter, tiny_base, tmp_path):
    from transformers import AutoModelForSequenceClassification

    r = spafit("export", str(adapter), "--format", "peft", "--out", str(tmp_path / "peft"), "--json")
    assert r.exit_code == 0, r
    assert r.json()["files"] == ["adapter_config.json", "adapter_model.safetensors", "spafit_export.json"]
    ours = load_adapter(adapter)
    stock = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=2)
    pm = peft.PeftModel.from_pretrained(stock, tmp_path / "peft").eval()
    b = texts(ours.tokenizer)
    with torch.no_grad():
        assert (pm(**b).logits - ours(b)).abs().max() < 1e-5

    r = spafit("import", str(tmp_path / "peft"), "--format", "peft", "--out", str(tmp_path / "back"), "--json")
    assert r.exit_code == 0, r
    assert r.json()["task"]["labels"] == ["neg", "pos"] and CONFIG_FILE in r.json()["files"]
    back = load_adapter(tmp_path / "back")
    with torch.no_grad():
        assert (back(b) - ours(b)).abs().max() < 1e-5


def test_import_of_something_that_is_not_peft_fails_in_words(spafit, adapter, tmp_path):
    r = spafit("import", str(adapter), "--out", str(tmp_path / "x"), "--json")
    assert r.exit_code != 0 and "adapter_config.json" in r.error()["message"]


def test_export_merged_is_a_plain_transformers_folder(spafit, adapter, tmp_path):
    from transformers import AutoModelForSequenceClassification

    r = spafit("export", str(adapter), "--format", "merged", "--out", str(tmp_path / "merged"), "--json")
    assert r.exit_code == 0, r
    ours = load_adapter(adapter)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    b = texts(ours.tokenizer)
    with torch.no_grad():
        assert (plain(**b).logits - ours(b)).abs().max() < 1e-5


def test_a_base_model_that_cannot_be_loaded_and_an_out_that_is_a_file_fail_in_words(spafit, adapter, tmp_path,
                                                                                    monkeypatch):
    """Found by an attack: both were tracebacks (transformers' OSError; FileExistsError from mkdir)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id not in the cache fails at once, as on a machine offline
    for base in (str(tmp_path / "no-such-folder"), "nobody-here/no-such-model-xyz"):
        r = spafit("export", str(adapter), "--format", "peft", "--base-model", base, "--out", str(tmp_path / "p"),
                   "--json")
        assert r.exit_code == EXIT_INVALID and isinstance(r.exception, SystemExit), r  # not a crash
        e = r.error()
        assert e["type"] == "base-model-unavailable" and e["field"] == "base_model" and base in e["message"]
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    for command in ("export", "import"):
        r = spafit(command, str(adapter), "--out", str(a_file))
        assert r.exit_code == 2 and "is a file" in r.stderr and isinstance(r.exception, SystemExit), r  # usage
