"""One batch prediction job over several tasks (the engine's fan-out path) against one job per task, on the same rows
in the same process and run.

- `fan-out`: one real job (`tasks: [t1, ..., tK]`) run by `worker.runner.run_job`: each forward batch through
  `Engine.fan_out_many` (the layers below the adapters' first trained layer once per row, then one branch per task).
- `apart`: K real one-task jobs, one after another, over the same rows.

Each variant's wall time and CPU time (`time.process_time`: this process, all its threads; fairer on a shared
machine) from the job's start to its end, claim, backbone load (once per job) and final write included; and its
prediction phase alone (rows / the job's own `rows_per_s`, from its first row read). The fan-out job's labels
are checked against the one-task jobs' (row for row). The database is SQLite in a temporary folder, the backbone
the packaged MiniLM, the adapters random SPAFIT ones with the method's default layer groups (n1 = L/3). Rounds
interleave the variants (a fresh random order each round); the figures are medians of per-round ratios.

    python -m benchmarks.batch_fanout                 # 4,000 rows, 2 tasks, 2 rounds
    python -m benchmarks.batch_fanout --quick         # 500 rows, 1 round
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.batch import rows_csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    n = args.rows or (500 if args.quick else 4000)
    rounds = args.rounds or (1 if args.quick else 2)
    threads = common.setup_threads(args.threads)

    from sqlalchemy import select

    from app.db import Database
    from app.models import BatchChunk, Job
    from app.services import batch as batch_service
    from app.services import datasets, keys, migrate, registry
    from app.settings import Settings
    from tests.api.adapters import random_adapter
    from worker.runner import run_job

    tmp = Path(tempfile.mkdtemp(prefix="spafit-bench-fanout-"))
    url = f"sqlite:///{tmp / 'bench.db'}"
    migrate.upgrade(url)
    settings = Settings(_env_file=None, mode="embedded", database_url=url, engine_device="cpu",
                        data_dir=str(tmp), batch_max_rows_per_job=max(n * args.tasks, 1))
    db = Database.from_settings(settings)
    base = settings.default_base_model
    names = [f"task{i}" for i in range(args.tasks)]
    content = rows_csv(n)
    with db.session() as s:
        tenant = keys.create_tenant(s, "bench")
        for i, name in enumerate(names):
            cfg, weights = random_adapter(base, {"name": "spafit"}, seed=i)
            registry.register_version(s, tenant.id, name, cfg, weights)
        ds = datasets.create_from_bytes(s, tenant.id, content, filename="rows.csv", text_fields=["text"],
                                        label_field="label")
        s.commit()
        tenant_id, ds_id = tenant.id, ds.id
    common.log(f"{n} rows, {args.tasks} tasks, {rounds} round(s), {threads} threads, base {base}")

    def job(body: dict) -> tuple[uuid.UUID, float, float, float]:
        with db.session() as s:
            j, _ = batch_service.create_prediction(s, tenant_id, batch_service.BatchPredictionCreate(
                dataset=ds_id, **body), settings)
            job_id = j.id
        w0, c0 = time.perf_counter(), time.process_time()
        outcome = run_job(db, job_id, settings)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        with db.session() as s:
            done = s.get(Job, job_id)
            assert outcome == "succeeded" and done.status == "succeeded", (outcome, done.error_message)
            predict_s = n / done.metrics["rows_per_s"]  # its prediction phase: after the backbone loaded
        return job_id, wall, cpu, predict_s

    def labels(job_id: uuid.UUID) -> list[Any]:
        with db.session() as s:
            data = b"".join(s.scalars(select(BatchChunk.data).where(BatchChunk.job_id == job_id)
                                      .order_by(BatchChunk.chunk)))
        return [json.loads(line) for line in data.decode().splitlines()]

    def fan_out() -> dict[str, Any]:
        job_id, wall, cpu, predict_s = job({"tasks": names})
        return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "predict_s": round(predict_s, 2), "job": job_id}

    def apart() -> dict[str, Any]:
        runs = [job({"task": name}) for name in names]
        return {"wall_s": round(sum(r[1] for r in runs), 2), "cpu_s": round(sum(r[2] for r in runs), 2),
                "predict_s": round(sum(r[3] for r in runs), 2), "jobs": [r[0] for r in runs]}

    out: dict[str, list] = {"fan_out": [], "apart": []}
    rng = random.Random(0)
    for r in range(rounds):
        order = ["fan_out", "apart"]
        rng.shuffle(order)
        for name in order:
            out[name].append(fan_out() if name == "fan_out" else apart())
        common.log(f"  round {r + 1}/{rounds}: fan-out {out['fan_out'][-1]['wall_s']} s wall, "
                   f"{out['fan_out'][-1]['cpu_s']} s cpu; apart {out['apart'][-1]['wall_s']} s wall, "
                   f"{out['apart'][-1]['cpu_s']} s cpu")
    many = labels(out["fan_out"][0]["job"])
    for name, job_id in zip(names, out["apart"][0]["jobs"], strict=True):
        one = labels(job_id)
        same = sum(a["results"][name]["label"] == b["label"] for a, b in zip(many, one, strict=True))
        assert same == n, f"{name}: {n - same} of {n} labels differ between the fan-out job and its own job"
    wall = [a["wall_s"] / f["wall_s"] for a, f in zip(out["apart"], out["fan_out"], strict=True)]
    cpu = [a["cpu_s"] / f["cpu_s"] for a, f in zip(out["apart"], out["fan_out"], strict=True)]
    pred = [a["predict_s"] / f["predict_s"] for a, f in zip(out["apart"], out["fan_out"], strict=True)]
    for runs in out.values():
        for run in runs:
            run.pop("job", None)
            run.pop("jobs", None)
    result = {"command": common.command_line(), "machine": common.machine(), "rows": n, "tasks": args.tasks,
              "rounds": rounds, "threads": threads, "runs": out, "labels_equal": True,
              "speedup_wall": {"median": statistics.median(wall), "min": min(wall), "max": max(wall)},
              "speedup_cpu": {"median": statistics.median(cpu), "min": min(cpu), "max": max(cpu)},
              "speedup_predict_phase_wall": {"median": statistics.median(pred), "min": min(pred), "max": max(pred)},
              "load_average_end": common.load_average(), "id": str(uuid.uuid4())}
    path = common.write_result("batch_fanout" + ("_quick" if args.quick else ""), result)
    print(common.markdown_table(
        ["rows", "tasks", "fan-out job wall / cpu (s)", "one job per task wall / cpu (s)",
         "apart / fan-out, wall", "apart / fan-out, cpu", "apart / fan-out, prediction phase (wall)"],
        [[n, args.tasks, "; ".join(f"{f['wall_s']} / {f['cpu_s']}" for f in out["fan_out"]),
          "; ".join(f"{a['wall_s']} / {a['cpu_s']}" for a in out["apart"]),
          f"{statistics.median(wall):.3f} [{min(wall):.3f}-{max(wall):.3f}]",
          f"{statistics.median(cpu):.3f} [{min(cpu):.3f}-{max(cpu):.3f}]",
          f"{statistics.median(pred):.3f} [{min(pred):.3f}-{max(pred):.3f}]"]]))
    common.log(f"wrote {path}")


if __name__ == "__main__":
    main()
