"""`spafit quickstart` end to end, as a user runs it: a child `spafit serve` in embedded mode (SQLite, the
local broker, auth off) on a free port, the bundled sample, SPAFIT on the packaged MiniLM, predictions,
and the service stopped and its temporary folder removed afterwards. About a minute on a CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.client.conftest import subprocess_env

pytestmark = pytest.mark.slow


def test_quickstart_trains_predicts_and_cleans_up(tmp_path):
    """Slow: the whole quickstart as a user runs it: a service process, MiniLM loaded and trained on CPU."""
    env = subprocess_env({k: v for k, v in os.environ.items() if not k.startswith("SPAFIT_")},
                         TMPDIR=str(tmp_path), OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-m", "app.cli", "quickstart", "--epochs", "1", "--json"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-6000:]}"
    summary = json.loads(r.stdout)
    assert summary["job"]["status"] == "succeeded" and summary["adapter_version"] == 1
    assert summary["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert summary["job"]["hyperparameters"]["epochs"] == 1 and summary["job"]["hyperparameters"]["batch_size"] == 8
    assert {"accuracy", "f1"} <= set(summary["metrics"])
    assert len(summary["predictions"]) == 4
    assert all(p["label"] in ("positive", "negative") and 0 < p["score"] <= 1 for p in summary["predictions"])
    assert any("/v1/tasks/sentiment/predict" in c for c in summary["curl"])
    assert "100% [" in r.stderr  # the progress bar
    assert not Path(summary["data_dir"]).exists()  # the temporary folder is gone
    port = int(summary["url"].rsplit(":", 1)[1])
    with socket.socket() as s:  # and so is the service
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert processes_in(summary["data_dir"]) == []  # nor its worker


def processes_in(folder: str) -> list[int]:
    """Processes whose working directory is `folder` (the service and its worker run there)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc / "cwd").removesuffix(" (deleted)") == folder:
                found.append(int(proc.name))
        except OSError:
            pass
    return found
