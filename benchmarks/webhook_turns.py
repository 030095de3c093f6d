"""What a tenant's waiting webhook deliveries cost the workers: the checks (`worker.webhooks.deliver` calls) made
while N deliveries of one tenant wait for its turn, with the deliveries in line (`_place_in_line`, this code) and
as before it (every waiting delivery put off to the same moment), side by side in one run.

One process, the embedded SQLite database, the worker's own `deliver`; the broker is simulated in the process (each
deferral's countdown is a timer, each timer calls `deliver`), and every attempt goes to a receiver that never
answers (a listening socket), so the tenant's turn stays taken: the workers' time its receivers hold is what the
share bounds. Counted: the calls that found no turn and were put off again, per simulated second, and the attempts
made. No torch, no model.

    python -m benchmarks.webhook_turns                  # 40 waiting deliveries, 20 s per variant
    python -m benchmarks.webhook_turns --deliveries 200 --seconds 30 --out webhook_turns_200
    python -m benchmarks.webhook_turns --quick          # smoke test, 10 s
"""

from __future__ import annotations

import argparse
import heapq
import json
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks import common


def run_variant(lined: bool, deliveries: int, seconds: float) -> dict[str, Any]:
    from app.db import Database
    from app.models import Dataset, Job, Tenant, WebhookDelivery
    from app.services import events, keys, migrate
    from app.settings import Settings
    from worker import webhooks as worker_webhooks

    hangs = socket.socket()
    hangs.bind(("127.0.0.1", 0))
    hangs.listen(256)
    url = f"http://127.0.0.1:{hangs.getsockname()[1]}/hook"
    folder = Path(tempfile.mkdtemp(prefix="webhook-turns-"))
    db_url = f"sqlite:///{folder / 'spafit.db'}"
    migrate.upgrade(db_url)
    db = Database.from_url(db_url)
    settings = Settings(_env_file=None, mode="embedded", database_url=db_url, data_dir=folder,
                        webhook_timeout_s=0.5, webhook_max_attempts=50, webhook_tenant_share=0.25,
                        webhook_tenant_burst_s=1.0)
    with db.session() as s:
        tenant_id = keys.create_tenant(s, f"bench-{uuid.uuid4().hex[:8]}").id
    ids = []
    with db.transaction() as s:
        ds = Dataset(tenant_id=tenant_id, name="d", format="csv", rows=1, columns=["text", "label"],
                     text_fields=["text"], label_field="label", report={}, source="upload")
        s.add(ds)
        s.flush()
        for _ in range(deliveries):  # each job's end writes its delivery (the final status event)
            job = Job(tenant_id=tenant_id, task_name="t", base_model="x", train_dataset_id=ds.id,
                      text_fields=["text"], label_field="label", method={}, hyperparameters={}, status="failed",
                      webhook_url=url)
            s.add(job)
            s.flush()
            events.append_in(s, job.id, "status", {"status": "failed"})
    with db.session() as s:
        ids = [d.id for d in s.query(WebhookDelivery).filter(WebhookDelivery.tenant_id == tenant_id)]
    original = worker_webhooks._place_in_line
    if not lined:  # as before: every waiting delivery put off to the moment its tenant's turn comes back
        worker_webhooks._place_in_line = lambda s, d, now, wait: wait
    timers: list[tuple[float, int, uuid.UUID]] = []
    lock, seq = threading.Lock(), [0]

    def send(delivery_id, countdown=None):
        with lock:
            seq[0] += 1
            heapq.heappush(timers, (time.monotonic() + (countdown or 0.0), seq[0], uuid.UUID(str(delivery_id))))

    outcomes: dict[str, int] = {}
    start = time.monotonic()
    try:
        for d in ids:  # every job ended at once: all messages due now
            send(d)
        while time.monotonic() - start < seconds:
            with lock:
                due = timers[0][0] if timers else None
            if due is None or due > time.monotonic():
                time.sleep(0.005)
                continue
            with lock:
                _, _, delivery_id = heapq.heappop(timers)
            out = worker_webhooks.deliver(db, delivery_id, settings, send)
            outcomes[out] = outcomes.get(out, 0) + 1
            if out == "retrying":  # its retry is due later: the simulated broker sends it then
                with db.session() as s:
                    row = s.get(WebhookDelivery, delivery_id)
                    wait = (row.next_attempt_at - worker_webhooks.utcnow()).total_seconds()
                send(delivery_id, max(0.0, wait))
    finally:
        worker_webhooks._place_in_line = original
        hangs.close()
        with db.session() as s:
            busy = s.get(Tenant, tenant_id).webhook_busy_until
        db.dispose()
    elapsed = time.monotonic() - start
    attempts = outcomes.get("retrying", 0) + outcomes.get("delivered", 0) + outcomes.get("failed", 0)
    return {"lined": lined, "deliveries": deliveries, "seconds": round(elapsed, 2), "outcomes": outcomes,
            "attempts": attempts, "deferrals": outcomes.get("deferred", 0),
            "deferrals_per_s": round(outcomes.get("deferred", 0) / elapsed, 2),
            "checks_per_attempt": round(sum(outcomes.values()) / max(attempts, 1), 1),
            "tenant_clock_ahead_s": round((busy - worker_webhooks.utcnow()).total_seconds(), 1) if busy else None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deliveries", type=int, default=40)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--out", default="webhook_turns")
    p.add_argument("--quick", action="store_true", help="smoke test: 20 deliveries, 5 s per variant")
    args = p.parse_args(argv)
    if args.quick:
        args.deliveries, args.seconds, args.out = 20, 5.0, "webhook_turns_quick"
    load_start = common.load_average()
    runs = [run_variant(lined, args.deliveries, args.seconds) for lined in (False, True)]
    before, after = runs
    ratio = before["deferrals"] / max(after["deferrals"], 1)
    print("| variant | attempts | deferrals (checks that found no turn) | per second | checks per attempt |")
    print("|---|---|---|---|---|")
    for r in runs:
        name = "in line (this code)" if r["lined"] else "all at once (before)"
        print(f"| {name} | {r['attempts']} | {r['deferrals']} | {r['deferrals_per_s']} | {r['checks_per_attempt']} |")
    print(f"\nbefore / in line, deferrals: {ratio:.1f}x ({args.deliveries} waiting deliveries, {args.seconds:g} s each)")
    out = {"command": "python -m benchmarks.webhook_turns " + " ".join(argv or []), "machine": common.machine(),
           "load_average": [load_start, common.load_average()], "runs": runs,
           "deferrals_before_over_lined": round(ratio, 2)}
    path = common.RESULTS / f"{args.out}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"raw: {path}")


if __name__ == "__main__":
    main()
