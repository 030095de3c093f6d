"""The user story on the real packaged MiniLM: CSV in, metric out, a small adapter that another process
loads and predicts with identically. (Loads a 90 MB pretrained model: about half a minute on 2 cores.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spafit_core import MethodConfig, TrainConfig, finetune
from spafit_core.adapter import WEIGHTS_FILE, load_adapter

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "app/sample_data/sentiment_train.csv"
VALID = ROOT / "app/sample_data/sentiment_validation.csv"
PROBES = ["An absolute delight from start to finish.", "Broke after two days, total waste of money.",
          "It was fine, I suppose.", "The acting was wooden and the story made no sense."]

PREDICT = """
import json, sys, torch
from spafit_core.adapter import load_adapter
m = load_adapter(sys.argv[1])
enc = m.tokenizer(json.loads(sys.argv[2]), padding=True, return_tensors="pt")
with torch.no_grad():
    print(json.dumps(m(dict(enc)).tolist()))
"""


@pytest.mark.slow
def test_train_spafit_from_csv_on_minilm_and_predict_in_another_process(tmp_path):
    """The sample CSV to a SPAFIT adapter on MiniLM, then the same logits in a fresh process.

    Slow: three epochs of the real 22M-parameter MiniLM on CPU, and a second process that loads it again.
    """
    result = finetune(TRAIN, VALID, base_model="minilm", method=MethodConfig(n1=2, n2=4),
                      train_config=TrainConfig(epochs=3, batch_size=8, seed=0))
    assert result.metrics["accuracy"] >= 0.85, result.metrics
    counts = result.model.param_counts()
    assert counts["per_group"]["1"] == 0 and counts["total"] < 0.01 * counts["base_model"]

    cfg = result.save(tmp_path / "adapter")
    size = (tmp_path / "adapter" / WEIGHTS_FILE).stat().st_size
    assert 50_000 < size < 500_000, size  # a few hundred KB
    assert cfg["task"]["labels"] == ["negative", "positive"]
    assert cfg["metrics"]["accuracy"] == result.metrics["accuracy"]

    enc = result.model.tokenizer(PROBES, padding=True, return_tensors="pt")
    with torch.no_grad():
        here = result.model(dict(enc))
    out = subprocess.run([sys.executable, "-c", PREDICT, str(tmp_path / "adapter"), json.dumps(PROBES)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    there = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    assert torch.equal(here, there)
    assert load_adapter(tmp_path / "adapter").max_seq_length == 128
