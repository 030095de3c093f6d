"""A batch prediction job against the engine's own rows/s on the same rows, in the same process and run.

- `engine`: `Engine.predict` over the rows, `batch_forward_rows` at a time (the engine alone: no database).
- `job`: a real batch prediction job (kind `predict`) run by `worker.runner.run_job`, the worker's code path:
  claim, fenced chunk writes, the dataset streamed from the database in 1 MiB pieces. Its rows/s is over its
  prediction phase (the job's own `rows_per_s`: from the first row read, after its engine loaded the backbone);
  the end-to-end time (claim + backbone load + rows + final write) is reported too.

The database is SQLite in a temporary folder (migrated to head), the backbone the packaged MiniLM, the adapter a
random SPAFIT one. Rounds interleave the two variants (a fresh random order each round); the figure is the median
of the per-round ratio job / engine. Memory: this process's RSS sampled every 50 ms while each job runs.

    python -m benchmarks.batch            # 20,000 rows, 3 rounds
    python -m benchmarks.batch --quick    # 2,000 rows, 1 round
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks import common

WORDS = ("the service was quick and friendly but the food arrived cold and the bill was wrong again "
         "great value would order again terrible packaging lovely staff slow delivery fresh bread").split()


def rows_csv(n: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "text", "label"])
    for i in range(n):
        w.writerow([f"r{i}", " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 24))), rng.choice("ab")])
    return buf.getvalue().encode()


class RssSampler(threading.Thread):
    def __init__(self, every: float = 0.05):
        super().__init__(daemon=True)
        self.every, self.samples, self._halt = every, [], threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.every):
            self.samples.append(common.rss_bytes())

    def stop(self) -> list[int]:
        self._halt.set()
        self.join()
        return self.samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    n = args.rows or (2000 if args.quick else 20000)
    rounds = args.rounds or (1 if args.quick else 3)
    threads = common.setup_threads(args.threads)

    from app.models import Job
    from app.services import batch as batch_service
    from app.services import datasets, keys, migrate, registry
    from app.settings import Settings
    from spafit_core.engine import Engine
    from tests.api.adapters import SPAFIT, random_adapter
    from worker.runner import run_job

    tmp = Path(tempfile.mkdtemp(prefix="spafit-bench-batch-"))
    url = f"sqlite:///{tmp / 'bench.db'}"
    migrate.upgrade(url)
    settings = Settings(_env_file=None, mode="embedded", database_url=url, engine_device="cpu",
                        data_dir=str(tmp), batch_max_rows_per_job=max(n, 1))
    from app.db import Database

    db = Database.from_settings(settings)
    base = settings.default_base_model
    cfg, weights = random_adapter(base, SPAFIT)
    content = rows_csv(n)
    with db.session() as s:
        tenant = keys.create_tenant(s, "bench")
        registry.register_version(s, tenant.id, "bench", cfg, weights)
        ds = datasets.create_from_bytes(s, tenant.id, content, filename="rows.csv", text_fields=["text"],
                                        label_field="label")
        s.commit()
        tenant_id, ds_id = tenant.id, ds.id
    texts = [r["text"] for r in csv.DictReader(io.StringIO(content.decode()))]
    common.log(f"{n} rows ({len(content) / 1e6:.1f} MB csv), {rounds} round(s), {threads} threads, base {base}")

    engine = Engine(device="cpu", default_base_model=base)
    engine.load("bench", cfg, weights)
    step = settings.batch_forward_rows

    def run_engine() -> float:
        t0 = time.perf_counter()
        for i in range(0, n, step):
            engine.predict("bench", texts[i: i + step])
        return n / (time.perf_counter() - t0)

    def run_batch_job() -> dict[str, Any]:
        body = batch_service.BatchPredictionCreate(task="bench", dataset=ds_id)
        with db.session() as s:
            job, _ = batch_service.create_prediction(s, tenant_id, body, settings)
            job_id = job.id
        sampler = RssSampler()
        sampler.start()
        t0 = time.perf_counter()
        outcome = run_job(db, job_id, settings)
        wall = time.perf_counter() - t0
        rss = sampler.stop()
        with db.session() as s:
            done = s.get(Job, job_id)
        assert outcome == "succeeded" and done.status == "succeeded", (outcome, done.status, done.error_message)
        q = max(1, len(rss) // 4)
        return {"rows_per_s": done.metrics["rows_per_s"], "end_to_end_rows_per_s": round(n / wall, 2),
                "wall_s": round(wall, 2), "rss_mb_first_quarter_max": round(max(rss[:q]) / 2**20, 1) if rss else None,
                "rss_mb_last_quarter_max": round(max(rss[-q:]) / 2**20, 1) if rss else None,
                "rss_mb_peak": round(max(rss) / 2**20, 1) if rss else None, "job": str(job_id)}

    run_engine()  # warm-up (discarded)
    out: dict[str, list] = {"engine": [], "job": []}
    rng = random.Random(0)
    for r in range(rounds):
        order = ["engine", "job"]
        rng.shuffle(order)
        for name in order:
            out[name].append(run_engine() if name == "engine" else run_batch_job())
        common.log(f"  round {r + 1}/{rounds}: engine {out['engine'][-1]:.1f} rows/s, job "
                   f"{out['job'][-1]['rows_per_s']:.1f} rows/s ({out['job'][-1]['end_to_end_rows_per_s']:.1f} "
                   f"end to end), rss {out['job'][-1]['rss_mb_first_quarter_max']} -> "
                   f"{out['job'][-1]['rss_mb_last_quarter_max']} MB")
    ratios = [j["rows_per_s"] / e for j, e in zip(out["job"], out["engine"], strict=True)]
    e2e = [j["end_to_end_rows_per_s"] / e for j, e in zip(out["job"], out["engine"], strict=True)]
    result = {"command": common.command_line(), "machine": common.machine(), "rows": n, "rounds": rounds,
              "threads": threads, "engine_rows_per_s": out["engine"], "jobs": out["job"],
              "ratio_job_over_engine": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
              "ratio_end_to_end_over_engine": {"median": statistics.median(e2e), "min": min(e2e), "max": max(e2e)},
              "load_average_end": common.load_average(), "id": str(uuid.uuid4())}
    path = common.write_result("batch" + ("_quick" if args.quick else ""), result)
    print(common.markdown_table(
        ["rows", "engine rows/s (median)", "job rows/s (median)", "job / engine", "job end to end / engine",
         "RSS first quarter -> last quarter (MB)"],
        [[n, f"{statistics.median(out['engine']):.1f}", f"{statistics.median(j['rows_per_s'] for j in out['job']):.1f}",
          f"{statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]",
          f"{statistics.median(e2e):.3f} [{min(e2e):.3f}-{max(e2e):.3f}]",
          "; ".join(f"{j['rss_mb_first_quarter_max']} -> {j['rss_mb_last_quarter_max']}" for j in out["job"])]]))
    common.log(f"wrote {path}")


if __name__ == "__main__":
    main()
