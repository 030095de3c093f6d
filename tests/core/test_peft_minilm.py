"""PEFT interop on the packaged MiniLM (slow): an adapter trained here, exported to PEFT, loads with
`PeftModel.from_pretrained` onto the stock MiniLM classifier with our logits (within 1e-5), and comes back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spafit_core import MethodConfig, TrainConfig, finetune
from spafit_core.peft_interop import from_peft, to_peft

peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "app/sample_data/sentiment_train.csv"
PROBES = ["An absolute delight from start to finish.", "Broke after two days, total waste of money.",
          "It was fine, I suppose.", "The acting was wooden and the story made no sense."]


@pytest.mark.slow
def test_minilm_adapter_exports_to_peft_with_our_logits(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from spafit_core.backbone import resolve_model_path

    result = finetune(TRAIN, None, base_model="minilm", method=MethodConfig(n1=2, n2=4),
                      train_config=TrainConfig(epochs=1, batch_size=16, seed=0))
    ours = result.model.eval()
    files = to_peft(ours)
    (tmp_path / "peft").mkdir()
    for name, data in files.items():
        (tmp_path / "peft" / name).write_bytes(data)
    labels = ours.task.labels
    stock = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path("minilm"), num_labels=len(labels), id2label=dict(enumerate(labels)))
    pm = peft.PeftModel.from_pretrained(stock, tmp_path / "peft").eval()
    b = dict(ours.tokenizer(PROBES, padding=True, return_tensors="pt"))
    with torch.no_grad():
        mine, theirs = ours(b), pm(**b).logits
        back = from_peft(files, "minilm")(b)
    diff = (mine - theirs).abs().max().item()
    print(f"MiniLM: max |ours - PEFT| logit = {diff:.3g}; round trip {(mine - back).abs().max().item():.3g}")
    assert diff < 1e-5
    assert (mine - back).abs().max() < 1e-5
