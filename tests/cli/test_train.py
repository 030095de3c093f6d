"""`spafit train`: a CSV in, an adapter folder out, on the tiny backbone, without a service; and that folder
imported into a live service and predicted with through the CLI."""

from __future__ import annotations

import json

import pytest

from tests.tiny import toy_csv

METHOD = ["--n1", "1", "--n2", "2", "--rank", "4", "--alpha", "8", "--epochs", "2", "--batch-size", "8",
          "--lr", "5e-3", "--seed", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    (root / "train.csv").write_bytes(toy_csv(48, 0))
    (root / "val.csv").write_bytes(toy_csv(16, 100))
    return root


@pytest.fixture(scope="module")
def local_adapter(data, tiny_base, tmp_path_factory):
    """One `spafit train --json` run, shared by the tests that read its output."""
    from click.testing import CliRunner

    from app.cli import main

    out = tmp_path_factory.mktemp("adapter") / "toy-adapter"
    r = CliRunner().invoke(main, ["train", str(data / "train.csv"), "--validation", str(data / "val.csv"),
                                  "--base-model", tiny_base, "--out", str(out), *METHOD, "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    return out, json.loads(r.stdout), r.stderr


def test_train_writes_an_adapter_folder_and_reports_metrics_as_json(local_adapter, tiny_base):
    out, summary, stderr = local_adapter
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "spafit_adapter.json"]
    assert summary["out"] == str(out) and summary["files"] == ["adapter.safetensors", "spafit_adapter.json"]
    assert {"accuracy", "f1"} <= set(summary["metrics"]) and summary["main_metric"] in summary["metrics"]
    assert [h["epoch"] for h in summary["history"]] == [1, 2] and summary["steps"] == 12
    assert summary["method"]["n1"] == 1 and summary["method"]["n2"] == 2 and summary["method"]["rank"] == 4
    assert summary["task"]["labels"] == ["negative", "positive"]
    assert summary["param_counts"]["total"] > 0 and summary["base_model"] == tiny_base
    config = json.loads((out / "spafit_adapter.json").read_text())
    assert config["method"]["alpha"] == 8
    assert "100% [" in stderr and "12/12" in stderr  # the progress bar, on stderr only


def test_train_prints_a_metrics_table(spafit, data, tiny_base, tmp_path):
    r = spafit("train", str(data / "train.csv"), "--base-model", tiny_base, "--out", str(tmp_path / "a"),
               "--validation", str(data / "val.csv"), *METHOD, "--method", "lora", "--no-progress")
    assert r.exit_code == 0, r
    header, *rows = r.stdout.split("\n\n")[0].splitlines()
    assert header.split() == ["epoch", "loss", "accuracy", "f1", "best"]
    assert [row.split()[0] for row in rows] == ["1", "2"] and sum("*" in row for row in rows) == 1
    assert "trainable parameters:" in r.stdout and str(tmp_path / "a") in r.stdout
    assert "%" not in r.stderr  # --no-progress


def test_train_on_unusable_data_exits_6(spafit, tiny_base, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nonly one class,a\nstill one,a\n")
    r = spafit("train", str(bad), "--base-model", tiny_base, "--out", str(tmp_path / "x"), "--json")
    assert r.exit_code == 6, r
    assert r.error()["exit_code"] == 6 and r.error()["type"] in ("invalid-dataset", "invalid-config")
    r = spafit("train", str(bad), "--base-model", tiny_base, "--label-field", "nope")
    assert r.exit_code == 6, r


@pytest.mark.slow
def test_a_locally_trained_adapter_imports_into_a_service_and_predicts(spafit, local_adapter, live_server, make_key):
    out, summary, _ = local_adapter
    key = make_key("train", "predict")
    r = spafit("tasks", "import", "local-toy", str(out), "--json", url=live_server.url, key=key.key)
    assert r.exit_code == 0, r
    version = r.json()
    assert version["version"] == 1 and version["active"] and version["job_id"] is None
    assert version["metrics"] == summary["metrics"]
    r = spafit("predict", "local-toy", "good fun", "bad awful", "--json", url=live_server.url, key=key.key)
    assert r.exit_code == 0, r
    predictions = r.json()["predictions"]
    assert len(predictions) == 2 and {p["label"] for p in predictions} <= {"positive", "negative"}


def test_train_takes_per_part_learning_rates_and_the_validation_share(spafit, data, tiny_base, tmp_path):
    """The job API's head/bias/LoRA learning rates and validation_fraction, here too (an attack found them missing)."""
    base = ["--base-model", tiny_base, "--n1", "1", "--n2", "2", "--epochs", "2", "--batch-size", "8", "--json",
            "--no-progress"]
    r = spafit("train", str(data / "train.csv"), "--out", str(tmp_path / "none"), "--validation-fraction", "0", *base)
    assert r.exit_code == 0, r
    held_none = r.json()
    assert held_none["steps"] == 12 and held_none["metrics"] == {}  # all 48 rows train, nothing is scored
    assert held_none["learning_rates"] == {"head": 1e-3, "bias": 1e-3, "lora": 1e-3}
    r = spafit("train", str(data / "train.csv"), "--out", str(tmp_path / "quarter"), "--validation-fraction", "0.25",
               "--head-lr", "3e-3", "--bias-lr", "2e-3", "--lora-lr", "5e-3", *base)
    assert r.exit_code == 0, r
    held = r.json()
    assert held["steps"] == 10 and set(held["metrics"]) == {"accuracy", "f1"}  # 36 rows train, 12 are scored
    assert held["learning_rates"] == {"head": 3e-3, "bias": 2e-3, "lora": 5e-3}
    r = spafit("train", str(data / "train.csv"), "--out", str(tmp_path / "x"), "--validation-fraction", "0.9", *base)
    assert r.exit_code == 2 and "0.9" in r.stderr  # a usage error, before anything loads
