"""benchmarks/load.py's py-spy summaries: each server thread's busy share of a core, idle waits left out."""

from __future__ import annotations

from pathlib import Path

from benchmarks.load import PY_SPY_RATE, profile_summary, thread_busy

RAW = """\
thread (11): MainThread;Runner.run (asyncio/runners.py:118) 30
thread (11): MainThread;Runner.run (asyncio/runners.py:118);select (selectors.py:468) 50
thread (12): spafit-batcher;MicroBatcher._run (spafit_core/batching.py:1);Engine.forward (spafit_core/engine/forward.py:9) 100
thread (12): spafit-batcher;Condition.wait (threading.py:320) 40
thread (13): spafit-submit_0;Serving.predict (app/services/serving.py:2) 6
thread (14): spafit-submit_1;Serving.predict (app/services/serving.py:2) 4
thread (15): spafit-cache-listener;Invalidation._listen_postgres (app/services/cache.py:1);Connection.wait (c.py:1) 70
"""


def test_each_thread_s_busy_share_leaves_idle_waits_out_and_pools_numbered_threads(tmp_path: Path) -> None:
    raw = tmp_path / "flooded.raw"
    raw.write_text(RAW)
    seconds = 200 / PY_SPY_RATE  # 200 samples = one core for the record's length
    assert thread_busy(raw, seconds) == {"spafit-batcher": 0.5, "MainThread": 0.15, "spafit-submit_*": 0.05}
    text = profile_summary(raw, "title", seconds=seconds)
    assert "busy samples (all threads, idle waits left out): 140" in text
    assert " 0.500  spafit-batcher" in text and " 0.150  MainThread" in text
    assert "  71.4%  engine forward (batcher thread)" in text  # 100 of 140
    assert "busy share" not in profile_summary(raw, "title")  # without the record's length: shares of samples only
