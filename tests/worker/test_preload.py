"""The worker's parent imports torch and the job code before its pool forks the job children (worker.celery_app.
preload): imports only, never a torch op or a CUDA call, so the children it forks can use both. The worker tests
run every job in such a child."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, os, sys
import torch

calls = []
for name in ("is_available", "device_count", "init", "_lazy_init", "current_device", "set_device",
             "get_device_properties", "get_device_capability", "is_bf16_supported", "synchronize"):
    original = getattr(torch.cuda, name)
    def record(*a, _name=name, _original=original, **k):
        calls.append(_name)
        return _original(*a, **k)
    setattr(torch.cuda, name, record)
before = set(sys.modules)
from worker.celery_app import preload
preload()
loaded = sorted(m for m in ("datasets", "spafit_core.pipeline", "transformers.models.bert.modeling_bert",
                            "worker.batch", "worker.imports", "worker.runner")
                if m in sys.modules and m not in before)
pid = os.fork()  # what the prefork pool does next: the child trains a step on two threads
if pid == 0:
    torch.set_num_threads(2)
    from transformers import BertForSequenceClassification
    from tests.tiny import tiny_config
    model = BertForSequenceClassification(tiny_config())
    loss = model(input_ids=torch.randint(1, 50, (16, 64)), labels=torch.randint(0, 2, (16,))).loss
    loss.backward()
    os._exit(0 if torch.isfinite(loss) else 1)
_, status = os.waitpid(pid, 0)
print(json.dumps({"cuda_calls": calls, "cuda_initialized": torch.cuda.is_initialized(), "loaded": loaded,
                  "child_status": status}))
"""


def _probe(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_preload_imports_the_job_code_without_touching_cuda_and_forked_children_train():
    got = _probe()
    assert got["loaded"] == ["datasets", "spafit_core.pipeline", "transformers.models.bert.modeling_bert",
                             "worker.batch", "worker.imports", "worker.runner"]
    assert got["cuda_calls"] == [] and got["cuda_initialized"] is False
    assert got["child_status"] == 0  # a child forked after the preload ran torch ops on two threads


@pytest.mark.parametrize("off", ["0", "false"])  # read as the SPAFIT_ settings read a boolean
def test_preload_can_be_turned_off(off):
    got = _probe(SPAFIT_WORKER_PRELOAD=off)
    assert got["loaded"] == [] and got["child_status"] == 0
