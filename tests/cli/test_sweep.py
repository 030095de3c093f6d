"""`spafit sweep`: a stratification search from the command line, against the live service and worker."""

from __future__ import annotations

import pytest

from tests.tiny import toy_csv

pytestmark = pytest.mark.slow


def test_sweep_uploads_trains_each_trial_and_prints_the_leaderboard(spafit, live_server, worker, make_key, tmp_path):
    key = make_key("train")
    (tmp_path / "train.csv").write_bytes(toy_csv(32, 3))
    (tmp_path / "val.csv").write_bytes(toy_csv(16, 103))
    r = spafit("sweep", str(tmp_path / "train.csv"), "--validation", str(tmp_path / "val.csv"), "--task", "cli-sweep",
               "--n1", "0,1", "--n2", "2", "--rank", "2", "--epochs", "1", "--batch-size", "8", "--json",
               url=live_server.url, key=key.key)
    assert r.exit_code == 0, (r, worker.tail())
    out = r.json()
    assert out["job"]["kind"] == "sweep" and out["job"]["status"] == "succeeded"
    assert sorted((t["n1"], t["n2"]) for t in out["trials"]) == [(0, 2), (1, 2)]
    best = out["result"]["best"]
    assert (best["n1"], best["n2"]) in {(0, 2), (1, 2)} and out["result"]["adapter_version"] == 1
    shown = spafit("tasks", "show", "cli-sweep", "--json", url=live_server.url, key=key.key).json()
    assert shown["active_version"]["method"]["n1"] == best["n1"]


def test_sweep_with_no_valid_combination_exits_invalid(spafit, live_server, make_key, tmp_path):
    key = make_key("train")
    (tmp_path / "train.csv").write_bytes(toy_csv(16, 4))
    r = spafit("sweep", str(tmp_path / "train.csv"), "--task", "cli-bad", "--n1", "3", "--n2", "1", "--json",
               url=live_server.url, key=key.key)
    assert r.exit_code == 6, r
    assert r.error()["field"] == "method.sweep"
