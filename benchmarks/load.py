"""Load test of `POST /v1/tasks/{task}/predict` on a live server process over loopback.

Phase 1 (steady load): `--clients` concurrent clients (default 64) for `--duration` seconds (default 60), each
sending one request after another, every request to one of 8 tasks (round robin from a random start per
client, 1-4 inputs each). Reported: requests, errors (anything but 200, plus timeouts and connection
errors), throughput, latency p50/p90/p99/max, and the server's resident memory sampled every second, with
"flat" meaning the mean of the last 20% of samples is within `--rss-bound` (default 5%) of the mean of the
first 20% (after a warm-up that is not counted).

Phase 2 (queue full): the server restarted with a tiny prediction queue (`SPAFIT_BATCH_MAX_QUEUE`, default 16
rows) under the same clients sending 8 inputs each: the overflow must be answered 503 with Retry-After, fast,
with no timeout and no other error, and the server must answer a normal request afterwards.

The server is `python -m app.cli serve --no-worker` in server mode, on a fresh Postgres database (created
through SPAFIT_TEST_PG_URL, dropped at the end) and the local Redis (SPAFIT_TEST_REDIS_URL, its own key prefix),
serving 8 adapters with random non-zero tensors (4 methods, 2- and 3-class heads) on the packaged MiniLM, or on
a tiny random BERT with `--tiny`. The load generator (httpx, asyncio) runs in this process, on the same machine.

    python -m benchmarks.load --quick            # about 1 minute: 16 clients, 10 s + 5 s, MiniLM
    python -m benchmarks.load                    # the full run: 64 clients, 60 s + 15 s, MiniLM
    python -m benchmarks.load --tiny --quick     # the tiny backbone (what tests/reliability/test_load.py runs)

Noisy neighbour (`--noisy`, instead of the two phases above): two tenants with the same 8 tasks on one server.
First the service's capacity is measured (tenant A, closed loop, `--clients` clients); then, `--rounds` times
(default 5), tenant B alone sends its normal load, open loop (Poisson arrivals at `--b-share` of the capacity,
default 20%), and then, for the same time, tenant A floods open loop at `--flood` times the capacity (default 4x)
while B sends the same arrivals again; `--duration` (default 50 s) is each condition's time over all rounds.
Alternating the conditions makes a drift of a shared machine's speed hit both alike (one window of each, one after
the other, moved the p99 ratio from 0.6 to 6.4 between runs of the same code here: benchmarks/RELIABILITY.md).
A's flood comes from a process of its own over raw keep-alive sockets (httpx would cost that generator a core at
these rates, taken from the server on a 2-core machine); its requests still unanswered 5 s after the last was due
are abandoned. Reported: B's p50/p99 alone and under the flood (target: p99 within 1.5x, zero errors for B), also
per 5 s of each phase with B's slowest requests, and what A got (200s, 429s with Retry-After, anything else).
`--trace` runs the server with SPAFIT_BATCH_TRACE and reports, per phase and tenant, where the time went inside
the batcher (thread hop, waiting to be tokenised, the round robin, its pass, back on the event loop).
`--profile NAME` records the server with py-spy through the first round's two windows into
benchmarks/profiles/NAME_alone.txt and NAME_flooded.txt, each thread's busy share of a core first.

    python -m benchmarks.load --noisy --trace    # about 3 min on MiniLM: 5 s warm-up, 10 s capacity, 5 x (10 + 10 s)

HTTP against the engine (`--vs-engine`, instead of the phases above): two SPAFIT tasks, short inputs (4 to 6
words), one input per request. Per mode (`--mode embedded|server|both`: embedded defaults on SQLite with auth
off; server mode on Postgres with an API key), `--rounds` rounds (default 5), each of the engine alone
(`Engine.predict_mixed` on the same kind of rows, `--engine-batch` rows a call, and its one-row forward; in a child
process that keeps its engine, while the server is idle), then the service at `--clients` clients and at one
client; every duration given is split between the rounds. Reported: requests/s over the engine's rows/s (target
>= 0.7) and the one client's p50 minus the one-row forward (target <= 3 ms), each per round (figures taken seconds
apart: this machine's speed drifts by minutes) and their median; p50/p99 over all rounds. `--profile NAME` records
the server with py-spy during the first round's loaded phase into benchmarks/profiles/NAME_<mode>.txt.

    python -m benchmarks.load --vs-engine --profile after   # about 3 minutes on MiniLM

Results: benchmarks/results/load.json (load_quick.json with --quick, load_tiny*.json with --tiny,
load_noisy*.json with --noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# isort: off
from benchmarks import common  # first: it sets OMP_WAIT_POLICY before torch loads (inherited by the server)
# isort: on

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("SPAFIT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SPAFIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TEXTS = ["a great film with a fun plot", "boring and slow, I left early", "not bad but not great either",
         "the actors were awful", "I loved every minute of it", "a classic", "dull", "superb soundtrack and cast",
         "the plot was very boring and the ending made no sense at all", "ok"]
TASKS = [  # (name, method, labels): 8 tasks of varied methods and heads
    ("sentiment", {"name": "spafit", "n1": 2, "n2": 4, "rank": 8}, ("neg", "pos")),
    ("topic", {"name": "spafit", "n1": 1, "n2": 3, "rank": 4}, ("sport", "art", "food")),
    ("spam", {"name": "lora", "rank": 8}, ("ham", "spam")),
    ("toxicity", {"name": "bitfit"}, ("ok", "toxic")),
    ("intent", {"name": "spafit", "n1": 0, "n2": 3, "rank": 8}, ("ask", "buy", "complain")),
    ("language", {"name": "lora", "rank": 4}, ("en", "other")),
    ("urgency", {"name": "spafit", "n1": 2, "n2": 2, "rank": 8}, ("low", "high")),
    ("stance", {"name": "spafit", "n1": 1, "n2": 2, "rank": 2}, ("for", "against", "neutral")),
]


# ------------------------------------------------------------------------------------------ the load
@dataclass
class Phase:
    """What the clients saw in one phase."""

    latencies_ms: list[float] = field(default_factory=list)  # of 200 answers
    rejected_ms: list[float] = field(default_factory=list)  # of 503 answers
    statuses: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)  # timeouts, connection errors, bad bodies
    retry_after_missing: int = 0
    inputs_ok: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        ok = self.statuses.get(200, 0)
        total = sum(self.statuses.values()) + sum(self.failures.values())
        errors = total - ok - self.statuses.get(503, 0)
        return {
            "requests": total, "ok": ok, "overloaded_503": self.statuses.get(503, 0),
            "errors": errors, "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "failures": dict(self.failures), "retry_after_missing_on_503": self.retry_after_missing,
            "seconds": round(self.seconds, 2), "throughput_rps": round(ok / self.seconds, 1) if self.seconds else 0,
            "inputs_per_s": round(self.inputs_ok / self.seconds, 1) if self.seconds else 0,
            "latency_ms": _percentiles(self.latencies_ms), "rejected_latency_ms": _percentiles(self.rejected_ms),
        }


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    v = sorted(values)

    def pick(q: float) -> float:
        return round(v[min(len(v) - 1, int(q * len(v)))], 1)

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": round(v[-1], 1),
            "mean": round(statistics.fmean(v), 1)}


async def _client(http: Any, tasks: list[str], headers: dict, deadline: float, inputs: tuple[int, int],
                  phase: Phase, rng: random.Random) -> None:
    import httpx

    k = rng.randrange(len(tasks))
    while time.monotonic() < deadline:
        task = tasks[k % len(tasks)]
        k += 1
        batch = [rng.choice(TEXTS) for _ in range(rng.randint(*inputs))]
        start = time.perf_counter()
        try:
            r = await http.post(f"/v1/tasks/{task}/predict", json={"inputs": batch}, headers=headers)
        except httpx.TimeoutException:
            phase.failures["timeout"] += 1
            continue
        except httpx.HTTPError as e:
            phase.failures[type(e).__name__] += 1
            continue
        ms = (time.perf_counter() - start) * 1000
        phase.statuses[r.status_code] += 1
        if r.status_code == 200:
            body = r.json()
            if body.get("task") != task or len(body.get("predictions", [])) != len(batch):
                phase.failures["wrong_body"] += 1
            phase.latencies_ms.append(ms)
            phase.inputs_ok += len(batch)
        elif r.status_code == 503:
            phase.rejected_ms.append(ms)
            if not r.headers.get("retry-after", "").isdigit():
                phase.retry_after_missing += 1


async def run_phase(url: str, headers: dict[str, str], tasks: list[str], *, clients: int, duration: float,
                    inputs: tuple[int, int] = (1, 4), timeout: float = 30.0, seed: int = 0) -> Phase:
    """`clients` concurrent clients against `url` for `duration` seconds, each on its own connection."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        phase = Phase()
        start = time.monotonic()
        end = start + duration
        await asyncio.gather(*(_client(http, tasks, headers, end, inputs, phase, random.Random(seed * 1000 + i))
                               for i in range(clients)))
        phase.seconds = time.monotonic() - start
    return phase


# ------------------------------------------------------------------------------------------ noisy neighbour
@dataclass
class OpenLoop:
    """What one tenant's open-loop requests got."""

    latencies_ms: list[float] = field(default_factory=list)  # of 200 answers
    refused_ms: list[float] = field(default_factory=list)  # of 429 answers
    statuses: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    retry_after_missing: int = 0
    sent: int = 0
    seconds: float = 0.0
    cut: int = 0  # requests still unanswered `grace` seconds after the last was sent, abandoned then
    start: float = 0.0
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (s after start it was due, ms) of 200s

    def summary(self) -> dict[str, Any]:
        ok, refused = self.statuses.get(200, 0), self.statuses.get(429, 0)
        answered = sum(self.statuses.values())
        return {"sent": self.sent, "rate_rps": round(self.sent / self.seconds, 1) if self.seconds else 0,
                "ok": ok, "tenant_queue_full_429": refused, "unanswered_at_end": self.cut, "errors": answered - ok - refused + sum(self.failures.values()),
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())}, "failures": dict(self.failures),
                "retry_after_missing_on_429": self.retry_after_missing, "latency_ms": _percentiles(self.latencies_ms),
                "refused_latency_ms": _percentiles(self.refused_ms),
                "slowest": [[round(t, 2), round(ms, 1)] for t, ms in sorted(self.timeline, key=lambda x: -x[1])[:8]],
                "latency_ms_by_5s": {f"{k * 5}-{k * 5 + 5}s": _percentiles([ms for t, ms in self.timeline
                                                                           if k * 5 <= t < k * 5 + 5])
                                     for k in range(int(self.seconds // 5))}}


async def _open_loop(out: Any, one: Any, rng: random.Random, rate: float, duration: float,
                     inputs: tuple[int, int], tasks: list[str], grace: float | None) -> None:
    """Send requests at Poisson arrival times (`rate` a second, open loop: a slow answer never delays the next
    send) for `duration` seconds through `one(task, batch, due)`; then wait `grace` seconds for the late ones and
    cancel the rest (counted in `out.cut`)."""
    start = out.start = time.perf_counter()
    due = start
    pending: set[asyncio.Task] = set()
    while True:
        due += rng.expovariate(rate)
        if due - start > duration:
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        batch = [rng.choice(TEXTS) for _ in range(rng.randint(*inputs))]
        task = asyncio.create_task(one(rng.choice(tasks), batch, due))
        pending.add(task)
        task.add_done_callback(pending.discard)
        out.sent += 1
    if pending:
        _, late = await asyncio.wait(pending, timeout=grace)
        for task in late:
            task.cancel()
        out.cut = len(late)
        if late:
            await asyncio.wait(late)


async def open_loop(http: Any, tasks: list[str], headers: dict, rate: float, duration: float, rng: random.Random,
                    inputs: tuple[int, int] = (1, 4), grace: float | None = None) -> OpenLoop:
    """Requests at Poisson arrival times of mean `rate` per second for `duration` seconds, each sent when due
    whatever the earlier ones are doing (latency measured from the moment it was due: no coordinated omission).
    With `grace`, the requests still unanswered that long after the last one was due are abandoned (counted as
    `unanswered_at_end`): a flood's backlog need not be drained once what it was meant to disturb is over."""
    import httpx

    out = OpenLoop()

    async def one(task: str, batch: list[str], due: float) -> None:
        try:
            r = await http.post(f"/v1/tasks/{task}/predict", json={"inputs": batch}, headers=headers)
        except httpx.TimeoutException:
            out.failures["timeout"] += 1
            return
        except httpx.HTTPError as e:
            out.failures[type(e).__name__] += 1
            return
        out.statuses[r.status_code] += 1
        if r.status_code == 200:
            out.latencies_ms.append((time.perf_counter() - due) * 1000)
            out.timeline.append((due - out.start, out.latencies_ms[-1]))
            if len(r.json().get("predictions", [])) != len(batch):
                out.failures["wrong_body"] += 1
        elif r.status_code == 429:
            out.refused_ms.append((time.perf_counter() - due) * 1000)
            if not r.headers.get("retry-after", "").isdigit():
                out.retry_after_missing += 1

    await _open_loop(out, one, rng, rate, duration, inputs, tasks, grace)
    out.seconds = duration
    return out


async def raw_open_loop(url: str, tasks: list[str], headers: dict, rate: float, duration: float, rng: random.Random,
                        inputs: tuple[int, int] = (1, 4), grace: float | None = None,
                        connections: int = 1024) -> OpenLoop:
    """`open_loop` over raw keep-alive HTTP/1.1 connections (at most `connections`, reused most recent first): a
    flood of hundreds of requests a second costs its generator a fraction of what httpx costs, so that on a
    machine of 2 cores the server's CPU goes to the server, as it would with the flood coming from elsewhere."""
    import orjson

    host, port = url.split("//", 1)[1].split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    out = OpenLoop()
    free: list[tuple[Any, Any, float]] = []  # idle connections (reader, writer, last used), most recent last
    opened: set = set()
    slots = asyncio.Semaphore(connections)

    async def one(task: str, batch: list[str], due: float) -> None:
        body = orjson.dumps({"inputs": batch})
        request = (f"POST /v1/tasks/{task}/predict HTTP/1.1\r\nHost: {host}\r\n{head}Content-Type: application/json"
                   f"\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        async with slots:
            conn = None
            while free:
                reader, writer, used = free.pop()
                if time.monotonic() - used < 4.0:  # the server closes connections idle 5 s
                    conn = (reader, writer)
                    break
                writer.close()
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, int(port))
                    opened.add(conn[1])
                reader, writer = conn
                writer.write(request)
                status_line = await reader.readline()
                length, retry_after = 0, b""
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name = line[:16].lower()
                    if name.startswith(b"content-length:"):
                        length = int(line[15:])
                    elif name.startswith(b"retry-after:"):
                        retry_after = line[12:].strip()
                data = await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError) as e:
                out.failures[type(e).__name__] += 1
                if conn is not None:
                    conn[1].close()
                return
            if not status_line:
                out.failures["closed"] += 1
                writer.close()
                return
            status = int(status_line.split()[1])
            out.statuses[status] += 1
            if status == 200:
                out.latencies_ms.append((time.perf_counter() - due) * 1000)
                if data.count(b'"scores"') != len(batch):
                    out.failures["wrong_body"] += 1
            elif status == 429:
                out.refused_ms.append((time.perf_counter() - due) * 1000)
                if not retry_after.isdigit():
                    out.retry_after_missing += 1
            free.append((reader, writer, time.monotonic()))

    await _open_loop(out, one, rng, rate, duration, inputs, tasks, grace)
    for writer in opened:
        writer.close()
    out.seconds = duration
    return out


def _ping() -> bool:
    return True


def _flood(url: str, tasks: list[str], headers: dict, rate: float, duration: float) -> dict[str, Any]:
    """Tenant A's open loop, run in a child process; its summary."""

    async def go() -> OpenLoop:
        return await raw_open_loop(url, tasks, headers, rate, duration, random.Random(5), grace=5.0)

    cpu, wall = time.process_time(), time.monotonic()
    out = asyncio.run(go()).summary()
    out["client_cpu_cores_used"] = round((time.process_time() - cpu) / (time.monotonic() - wall), 2)
    return out


def _http(url: str, connections: int, timeout: float = 30.0) -> Any:
    import httpx

    # Idle connections are dropped after 3 s: the server closes them after 5 s (uvicorn's keep-alive timeout), and
    # httpx's default of 5 s races that close (a ReadError on a request sent as the server hung up).
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=3.0)
    return httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (with its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def noisy_phases(url: str, a: tuple[dict, list[str]], b: tuple[dict, list[str]], *, clients: int,
                       warmup: float, capacity_s: float, duration: float, b_share: float,
                       flood: float, server_pid: int, rounds: int = 1, spy_dir: Path | None = None
                       ) -> dict[str, Any]:
    """Capacity (A, closed loop), then `rounds` rounds of B alone followed by A flooding while B sends the same load
    (the same arrivals), `duration / rounds` seconds each; one server, one run. Alternating the two conditions
    puts a drift of the machine's speed into both alike, which one window of each, one after the other, does not.
    With `spy_dir`, py-spy records the server through the first round's two windows (alone.raw, flooded.raw)."""
    await run_phase(url, a[0], a[1], clients=clients, duration=warmup)  # every adapter of A loaded
    await run_phase(url, b[0], b[1], clients=4, duration=min(warmup, 3.0))  # ... and of B
    cap = (await run_phase(url, a[0], a[1], clients=clients, duration=capacity_s, seed=3)).summary()
    capacity = cap["throughput_rps"]
    b_rate, a_rate = b_share * capacity, flood * capacity
    per = duration / rounds
    common.log(f"capacity {capacity} req/s ({cap['inputs_per_s']} inputs/s); B at {b_rate:.1f} req/s, "
               f"A floods at {a_rate:.1f} req/s; {rounds} round(s) of {per:g} s alone + {per:g} s flooded")
    windows: dict[str, list[list[float]]] = {"b_alone": [], "b_with_flood": []}
    loops: dict[str, list[OpenLoop]] = {"b_alone": [], "b_with_flood": []}
    floods: list[dict[str, Any]] = []
    server = {"b_alone": [0.0, 0.0], "with_flood": [0.0, 0.0]}  # server CPU-s, wall s
    b_cpu = [0.0, 0.0]
    # A floods from a process of its own: in this one its requests would delay B's on the client side.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_ping).result()  # the child is up before the clock starts
        async with _http(url, 64) as hb:
            for i in range(rounds):
                spy = py_spy(server_pid, per, spy_dir / "alone.raw") if spy_dir is not None and i == 0 else None
                cpu, t0 = cpu_seconds(server_pid), time.monotonic()
                loops["b_alone"].append(await open_loop(hb, b[1], b[0], b_rate, per, random.Random(4 + i)))
                windows["b_alone"].append([t0, time.monotonic()])
                if spy is not None:
                    await asyncio.to_thread(spy.wait, 60)
                server["b_alone"][0] += cpu_seconds(server_pid) - cpu
                server["b_alone"][1] += time.monotonic() - t0
                spy = py_spy(server_pid, per, spy_dir / "flooded.raw") if spy_dir is not None and i == 0 else None
                cpu, t0, c0 = cpu_seconds(server_pid), time.monotonic(), time.process_time()
                flood_future = asyncio.wrap_future(pool.submit(_flood, url, a[1], a[0], a_rate, per))
                loops["b_with_flood"].append(await open_loop(hb, b[1], b[0], b_rate, per, random.Random(4 + i)))
                windows["b_with_flood"].append([t0, time.monotonic()])
                b_cpu[0] += time.process_time() - c0
                b_cpu[1] += time.monotonic() - t0
                floods.append(await flood_future)  # A's late requests abandoned: its backlog leaves the queue
                if spy is not None:
                    await asyncio.to_thread(spy.wait, 60)
                server["with_flood"][0] += cpu_seconds(server_pid) - cpu
                server["with_flood"][1] += time.monotonic() - t0
                await asyncio.sleep(1.0)  # the abandoned requests' rows are dropped before B's next window
    alone, flooded = _merge(loops["b_alone"]), _merge(loops["b_with_flood"])
    b_alone, b_flooded = alone.summary(), flooded.summary()
    p99_ratio = (b_flooded["latency_ms"]["p99"] / b_alone["latency_ms"]["p99"]
                 if b_alone["latency_ms"] and b_flooded["latency_ms"] else None)
    p50_ratio = (b_flooded["latency_ms"]["p50"] / b_alone["latency_ms"]["p50"]
                 if b_alone["latency_ms"] and b_flooded["latency_ms"] else None)
    by_round = [{"b_alone_p99_ms": (_percentiles(x.latencies_ms) or {}).get("p99"),
                 "b_with_flood_p99_ms": (_percentiles(y.latencies_ms) or {}).get("p99")}
                for x, y in zip(loops["b_alone"], loops["b_with_flood"], strict=True)]
    return {"capacity": {"clients": clients, "seconds": capacity_s, **{k: cap[k] for k in (
                "requests", "errors", "throughput_rps", "inputs_per_s", "latency_ms")}},
            "b_rate_rps": round(b_rate, 2), "a_rate_rps": round(a_rate, 2), "duration_s": duration, "rounds": rounds,
            "b_alone": b_alone, "b_with_flood": b_flooded, "a_flood": _merge_floods(floods), "by_round": by_round,
            "b_p50_ratio": round(p50_ratio, 2) if p50_ratio else None,
            "b_p99_ratio": round(p99_ratio, 2) if p99_ratio else None,
            "target": {"b_p99_ratio_at_most": 1.5, "b_errors": 0},
            "server_cpu_cores_used": {k: round(c / w, 2) for k, (c, w) in server.items()},
            "loadavg_at_end": _loadavg(), "windows": windows,
            # the clients run on the same machine: what they took of its cores while A flooded
            "client_cpu_cores_used": {"a_flood": round(statistics.mean(f["client_cpu_cores_used"] for f in floods), 2),
                                      "b": round(b_cpu[0] / b_cpu[1], 2)},
            "met": bool(p99_ratio is not None and p99_ratio <= 1.5 and b_flooded["errors"] == 0
                        and b_alone["errors"] == 0)}


def _merge(loops: list[OpenLoop]) -> OpenLoop:
    """The rounds of one condition as one open loop (its timeline continues round after round)."""
    out = OpenLoop()
    for x in loops:
        out.timeline += [(t + out.seconds, ms) for t, ms in x.timeline]
        out.latencies_ms += x.latencies_ms
        out.refused_ms += x.refused_ms
        out.statuses.update(x.statuses)
        out.failures.update(x.failures)
        out.retry_after_missing += x.retry_after_missing
        out.sent += x.sent
        out.cut += x.cut
        out.seconds += x.seconds
    return out


def _merge_floods(floods: list[dict[str, Any]]) -> dict[str, Any]:
    """A's rounds: the counts added up, each round's latencies as it reported them."""
    if len(floods) == 1:
        return floods[0]
    total: dict[str, Any] = {k: sum(f[k] for f in floods) for k in (
        "sent", "ok", "tenant_queue_full_429", "unanswered_at_end", "errors", "retry_after_missing_on_429")}
    statuses: Counter = Counter()
    failures: Counter = Counter()
    for f in floods:
        statuses.update(f["statuses"])
        failures.update(f["failures"])
    total.update(statuses=dict(statuses), failures=dict(failures), rounds=floods)
    return total


def run_noisy(args: argparse.Namespace, base: str, tmp: Path, prefix: str, result: dict[str, Any], name: str) -> None:
    clients = args.clients or 16
    duration = args.duration or 50.0
    settings = dict(args.set or [])
    result.update(clients=clients, server_settings=settings)
    with fresh_database() as db_url:
        common.log(f"registering {len(TASKS)} tasks for tenants A and B on {base} ...")
        made: dict[int, tuple[dict, bytes]] = {}  # the same adapters for both tenants: made once
        a = register_tasks(db_url, "tenant-a", base, made)
        b = register_tasks(db_url, "tenant-b", base, made)
        env = server_env(db_url, REDIS_URL, prefix, base, tmp / "data", **settings)
        trace = tmp / "trace.jsonl"
        if args.trace:
            env["SPAFIT_BATCH_TRACE"] = str(trace)
        server = Server(env, tmp / "server-noisy.log").start()
        try:
            result["noisy"] = asyncio.run(noisy_phases(server.url, a, b, clients=clients, warmup=args.warmup,
                                                       capacity_s=args.capacity_duration, duration=duration,
                                                       b_share=args.b_share, flood=args.flood, rounds=args.rounds,
                                                       server_pid=server.proc.pid,
                                                       spy_dir=tmp if args.profile else None))
            result["noisy"]["after"] = _health_after(server.url, b[0], b[1][0])
            log_text = server.log_path.read_text(errors="replace")
            result["noisy"]["server_log_errors"] = log_text.count("Exception in ASGI application") + \
                log_text.count("Traceback")
        finally:
            server.stop()
        if args.profile:
            noisy_profiles(args.profile, tmp, result["noisy"], args.duration or 50.0)
        if args.trace:
            result["noisy"]["stages_ms"] = trace_stages(trace, result["noisy"]["windows"], b_tenant_id(db_url))
    result["loadavg_after"] = _loadavg()
    path = common.write_result(name, result)
    n = result["noisy"]
    ba, bf, af = n["b_alone"], n["b_with_flood"], n["a_flood"]
    common.log(f"B alone: {ba['ok']} ok, {ba['errors']} errors, p50 {ba['latency_ms']['p50']} ms, "
               f"p99 {ba['latency_ms']['p99']} ms")
    common.log(f"B with A flooding: {bf['ok']} ok, {bf['errors']} errors, p50 {bf['latency_ms']['p50']} ms, "
               f"p99 {bf['latency_ms']['p99']} ms (p99 x{n['b_p99_ratio']}; target 1.5: "
               f"{'met' if n['met'] else 'NOT met'})")
    common.log("B's p99 by round, alone / flooded (ms): " + ", ".join(
        f"{r['b_alone_p99_ms']} / {r['b_with_flood_p99_ms']}" for r in n["by_round"]))
    common.log("B with A flooding, p50/p99 by 5 s: " + ", ".join(
        f"{k} {v['p50']}/{v['p99']}" for k, v in bf["latency_ms_by_5s"].items() if v) + f"; slowest {bf['slowest'][:4]}")
    for key, st in n.get("stages_ms", {}).items():
        common.log(f"{key}: " + ", ".join(f"{k} {v['p50']}/{v['p99']}" for k, v in st.items()
                                          if isinstance(v, dict)) + " (p50/p99)")
    common.log(f"A flooding: {af['sent']} sent, {af['ok']} ok, {af['tenant_queue_full_429']} x 429, "
               f"{af['errors']} errors, failures {af['failures']}")
    common.log(f"cores used while A flooded: server {n['server_cpu_cores_used']['with_flood']}, A's client "
               f"{n['client_cpu_cores_used']['a_flood']}, B's client {n['client_cpu_cores_used']['b']} "
               f"(of {os.cpu_count()}); B alone: server {n['server_cpu_cores_used']['b_alone']}")
    common.log(f"wrote {path}")


STAGES = [  # (name, from mark, to mark) of the batcher's trace (spafit_core.batching, debug mode); ms
    ("to_submit", "t", "submit"),  # predict called -> the submitter thread queued it (thread hop, adapter lookup)
    ("to_tokenised", "submit", "queued"),  # waiting for the worker to tokenise it (it does between passes)
    ("round_robin", "queued", "taken"),  # in its tenant's queue until the round robin takes it
    ("to_forward", "taken", "forward"),  # taken -> its pass starts (passes before it in the same take)
    ("forward", "forward", "forward_end"),  # its own pass
    ("to_resolved", "forward_end", "resolved"),  # the rest of its pass's rows' postprocessing / its other rows
    ("to_returned", "resolved", "returned"),  # the event loop gets back to it
    ("in_predict", "t", "returned"),  # all of the above: the batcher's share of the request's latency
]


def trace_stages(path: Path, windows: dict[str, list[list[float]]], tenant: str) -> dict[str, Any]:
    """Per phase (B alone, B with the flood): percentiles of each stage of B's requests inside the batcher, the
    rows and tenants of B's forward passes, and the same stages for A during the flood."""
    import json

    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    out: dict[str, Any] = {}
    for phase, spans in windows.items():
        for who in ("b", "a"):
            rows = [x for x in lines if any(lo <= x["t"] <= hi for lo, hi in spans)
                    and (x["tenant"] == tenant) == (who == "b")]
            if not rows:
                continue
            entry: dict[str, Any] = {"requests": len(rows)}
            for name, frm, to in STAGES:
                vals = [(x[to] if to != "t" else 0) - (x[frm] if frm != "t" else 0) for x in rows
                        if (frm == "t" or frm in x) and to in x]
                entry[name] = _percentiles(vals)
            entry["batch_rows"] = _percentiles([x["batch_rows"] for x in rows if "batch_rows" in x])
            entry["batch_tenants"] = _percentiles([x["batch_tenants"] for x in rows if "batch_tenants" in x])
            out[f"{who}_{phase.removeprefix('b_')}"] = entry
    return out


def b_tenant_id(database_url: str) -> str:
    from sqlalchemy import select

    from app.db import Database
    from app.models import Tenant

    db = Database.from_url(database_url)
    try:
        with db.session() as s:
            return str(s.scalar(select(Tenant.id).where(Tenant.name == "tenant-b")))
    finally:
        db.dispose()


# ------------------------------------------------------------------------------------------ memory
class RssSampler(threading.Thread):
    """The resident memory of process `pid`, every `interval` seconds, from /proc."""

    def __init__(self, pid: int, interval: float = 1.0):
        super().__init__(daemon=True, name="rss-sampler")
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._stop_evt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self._stop_evt.is_set():
            self.samples.append((round(time.monotonic() - start, 2), rss_of(self.pid)))
            self._stop_evt.wait(self.interval)

    def stop(self) -> list[tuple[float, int]]:
        self._stop_evt.set()
        self.join()
        return self.samples


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_flatness(samples: list[tuple[float, int]], bound: float) -> dict[str, Any]:
    values = [v for _, v in samples]
    n = max(1, len(values) // 5)
    first, last = statistics.fmean(values[:n]), statistics.fmean(values[-n:])
    growth = (last - first) / first
    return {"samples": len(values), "first_20pct_mib": round(first / 2**20, 1), "last_20pct_mib": round(last / 2**20, 1),
            "max_mib": round(max(values) / 2**20, 1), "growth": round(growth, 4), "bound": bound,
            "flat": abs(growth) <= bound}


# ------------------------------------------------------------------------------------------ the service
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(database_url: str, redis_url: str, prefix: str, base_model: str, data_dir: Path,
               **settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPAFIT_") or k.startswith("SPAFIT_TEST_")}
    env.update({"SPAFIT_MODE": "server", "SPAFIT_DATABASE_URL": database_url, "SPAFIT_BROKER_URL": redis_url,
                "SPAFIT_BROKER_KEY_PREFIX": prefix, "SPAFIT_DEFAULT_BASE_MODEL": base_model,
                "SPAFIT_ALLOWED_BASE_MODELS": base_model, "SPAFIT_DATA_DIR": str(data_dir),
                "SPAFIT_ENGINE_DEVICE": "cpu", "SPAFIT_PRELOAD_BASE_MODEL": "true", "SPAFIT_LOG_LEVEL": "WARNING",
                "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    env.update({f"SPAFIT_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class Server:
    """`python -m app.cli serve --no-worker` on a free port; `start()` waits for /readyz (backbone loaded)."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env, self.log_path = env, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> Server:
        import httpx

        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--no-worker", "--host", "127.0.0.1",
                                      "--port", str(self.port)], cwd=REPO, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the server was not ready in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def random_adapter(base_model: str, method: dict, labels: tuple[str, ...], seed: int) -> tuple[dict, bytes]:
    """(config, weights) of an adapter whose every trainable tensor is random and non-zero."""
    import torch

    from spafit_core import MethodConfig, TaskSpec
    from spafit_core.adapter import serialize
    from spafit_core.model import SpafitModel
    from spafit_core.train import set_seed

    set_seed(seed)
    model = SpafitModel.from_pretrained(base_model, MethodConfig(**method), TaskSpec(labels=labels))
    with torch.no_grad():
        for t in model.adapter_state_dict().values():
            t.copy_(torch.randn_like(t) * 0.02)
    from spafit_core.adapter import backbone_limits

    most = backbone_limits(base_model)["max_seq_length"]  # the tiny backbone has 64 positions
    return serialize(model, max_seq_length=min(128, most or 128))


def register_tasks(database_url: str, tenant_name: str, base_model: str,
                   made: dict[int, tuple[dict, bytes]] | None = None) -> tuple[dict[str, str], list[str]]:
    """A tenant, a predict key and the 8 tasks, registered as a worker registers them. (headers, task names)
    `made`: adapters made for an earlier tenant, by task index (filled on the way), reused."""
    from app.db import Database
    from app.services import keys, registry

    made = {} if made is None else made
    db = Database.from_url(database_url)
    try:
        with db.session() as s:
            tenant = keys.create_tenant(s, tenant_name)
            _, plaintext = keys.create_key(s, tenant.id, "load", ["predict"])
            for i, (name, method, labels) in enumerate(TASKS):
                if i not in made:
                    made[i] = random_adapter(base_model, method, labels, seed=i)
                cfg, weights = made[i]
                registry.register_version(s, tenant.id, name, cfg, weights)
            s.commit()
    finally:
        db.dispose()
    return {"Authorization": f"Bearer {plaintext}"}, [name for name, _, _ in TASKS]


@contextmanager
def fresh_database():
    from sqlalchemy import create_engine, make_url, text

    from app.services import migrate
    from app.settings import normalize_database_url

    base = make_url(normalize_database_url(PG_ADMIN_URL))
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    name = f"spafit_load_{secrets.token_hex(4)}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.set(database=name).render_as_string(hide_password=False)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def tiny_backbone(folder: Path) -> str:
    from transformers import AutoModel, BertConfig, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w for t in TEXTS for w in t.replace(",", "").split()})
    folder.mkdir(parents=True, exist_ok=True)
    cfg = BertConfig(vocab_size=len(words), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=160, pad_token_id=0)
    import torch

    torch.manual_seed(0)
    AutoModel.from_config(cfg).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    return str(folder)


def _health_after(url: str, headers: dict[str, str], task: str) -> dict[str, Any]:
    import httpx

    r = httpx.post(f"{url}/v1/tasks/{task}/predict", json={"inputs": ["a great film"]}, headers=headers, timeout=30)
    return {"healthz": httpx.get(f"{url}/healthz", timeout=5).status_code, "predict": r.status_code}


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_ticks(pid: int) -> dict[str, int] | None:
    """CPU ticks so far (Linux /proc; None elsewhere): the server's event-loop thread (its main thread), its other
    threads together (the batcher, torch's workers, the rest), this process (the load generator) and the
    machine's idle time over all cores."""
    try:
        loop = others = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # a thread that ended meanwhile
                continue
            ticks = int(fields[11]) + int(fields[12])
            if int(task) == pid:
                loop = ticks
            else:
                others += ticks
        with open("/proc/stat") as f:
            idle = int(f.readline().split()[4])
    except (OSError, ValueError, IndexError):
        return None
    own = os.times()
    return {"event_loop": loop, "other_threads": others, "load_generator": round((own.user + own.system) *
            os.sysconf("SC_CLK_TCK")), "machine_idle": idle}


def _cores(before: dict[str, int] | None, after: dict[str, int] | None, seconds: float) -> dict[str, float] | None:
    """`_cpu_ticks` differences as cores used over `seconds` (the machine's idle time as idle cores)."""
    if before is None or after is None or seconds <= 0:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return {k: round((after[k] - before[k]) / hz / seconds, 3) for k in before}


# ------------------------------------------------------------------------------------------ HTTP vs the engine
SHORT_TEXTS = ["a great film with a fun plot", "boring and slow, I left early", "not bad but not great",
               "the actors were truly awful", "I loved every minute of it", "superb soundtrack and great cast",
               "dull story and flat jokes", "a classic worth seeing twice"]  # 4 to 6 words each
VS_TASKS = [t for t in TASKS if t[1]["name"] == "spafit"][:2]  # two SPAFIT tasks


_CHILD_ENGINES: dict[tuple, Any] = {}  # in the engine's child process: loaded once, measured round after round


def engine_figures(base_model: str, adapters: list[tuple[str, dict, bytes]], batch: int, seconds: float,
                   one_row: int) -> dict[str, Any]:
    """In a child process (its own torch threads, the server idle meanwhile): `Engine.predict_mixed` on the
    requests the clients send (one short input each, tasks alternating), `batch` rows a call, for `seconds`;
    and the one-row forward (`predict_mixed` of one row) `one_row` times. The engine is loaded on the first call
    and kept for the next rounds."""
    from spafit_core.engine import Engine

    key = (base_model, tuple(name for name, _, _ in adapters))
    if key not in _CHILD_ENGINES:
        engine = Engine(device="cpu", default_base_model=base_model)
        for name, cfg, weights in adapters:
            engine.load(name, cfg, weights)
        _CHILD_ENGINES[key] = engine
    engine = _CHILD_ENGINES[key]
    names = [name for name, _, _ in adapters]
    rng = random.Random(3)
    make = lambda n: [(names[i % len(names)], rng.choice(SHORT_TEXTS)) for i in range(n)]  # noqa: E731
    for _ in range(3):
        engine.predict_mixed(make(batch))
    rows, start, cpu = 0, time.perf_counter(), os.times()
    while time.perf_counter() - start < seconds:
        rows += len(engine.predict_mixed(make(batch)))
    wall, used = time.perf_counter() - start, os.times()
    rows_s = rows / wall
    cores = (used.user + used.system - cpu.user - cpu.system) / wall  # every thread of the child: the forward's
    one = []
    for _ in range(one_row):
        req = make(1)
        t = time.perf_counter()
        engine.predict_mixed(req)
        one.append((time.perf_counter() - t) * 1000)
    return {"batch": batch, "rows_per_s": round(rows_s, 1), "cores": round(cores, 3), "one_row_ms": _percentiles(one),
            "one_row_values_ms": one}


PY_SPY_RATE = 100  # samples per second


def py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    """`py-spy record` of the server for `seconds` (raw collapsed stacks, every thread), or None without it."""
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists():
        return None
    return subprocess.Popen([str(exe), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(PY_SPY_RATE), "-t",
                             "--format", "raw", "-o", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def noisy_profiles(name: str, tmp: Path, noisy: dict[str, Any], duration: float) -> None:
    """benchmarks/profiles/NAME_alone.txt and NAME_flooded.txt from the first round's py-spy records; the busy
    share of a core of each server thread in both windows goes into the results (`profile`)."""
    profiles = REPO / "benchmarks" / "profiles"
    profiles.mkdir(exist_ok=True)
    per = duration / noisy["rounds"]
    noisy["profile"] = {}
    for window in ("alone", "flooded"):
        raw = tmp / f"{window}.raw"
        if not raw.exists():
            continue
        title = (f"py-spy record of the API process through the first {window} window of `--noisy` ({per:g} s, "
                 f"{PY_SPY_RATE} samples/s; B at {noisy['b_rate_rps']} req/s"
                 + (f", A flooding at {noisy['a_rate_rps']} req/s" if window == "flooded" else "")
                 + f"); {common.command_line()}")
        path = profiles / f"{name}_{window}.txt"
        path.write_text(profile_summary(raw, title, seconds=per))
        noisy["profile"][window] = {"file": str(path.relative_to(REPO)),
                                    "thread_busy_cores": thread_busy(raw, per)}


def thread_busy(raw: Path, seconds: float) -> dict[str, float]:
    """Each thread's busy samples (idle waits left out, as in `profile_summary`) as a share of one core."""
    busy: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit() and not _idle(stack):
            busy[_thread_name(stack)] += int(count)
    return {t: round(n / (PY_SPY_RATE * seconds), 3) for t, n in busy.most_common()}


def _thread_name(stack: str) -> str:
    """`thread (1234): spafit-batcher` -> spafit-batcher; the submit pool's threads as one."""
    name = stack.split(";", 1)[0].partition(": ")[2] or stack.split(";", 1)[0]
    return re.sub(r"_\d+$", "_*", name)


_IDLE_LEAVES = ("wait (threading.py", "Condition.wait (threading.py", "select (selectors.py",
                "_worker (concurrent/futures/thread.py", "poll (", "_run_once (asyncio/base_events.py")


def _idle(stack: str) -> bool:
    leaf = stack.rsplit(";", 1)[-1]
    return any(leaf.startswith(i) for i in _IDLE_LEAVES) or "_listen_postgres" in stack  # the cache's LISTEN


def _area(stack: str) -> str:
    """Where a sample's time goes, in the terms of the request path."""
    if "psycopg" in stack or "sqlalchemy" in stack or "sqlite3" in stack:
        return "database (a query and its wait, in any thread)"
    if "Engine.forward" in stack or "MicroBatcher._run" in stack:
        return "engine forward (batcher thread)"
    if "tokeniz" in stack or "Engine.encode" in stack:
        return "tokenising"
    if "MainThread" in stack.split(";", 1)[0]:
        return "event loop: HTTP, routing, validation, serialisation"
    return "other threads (thread pool hops, batcher bookkeeping)"


def profile_summary(raw: Path, title: str, top: int = 30, seconds: float | None = None) -> str:
    """Top frames of a collapsed-stack file: by own samples and by inclusive samples (a frame counted once
    per stack), each as a share of the samples of all threads that were not idle; with `seconds` (the record's
    length), each thread's busy share of one core first."""
    own: Counter = Counter()
    inclusive: Counter = Counter()
    areas: Counter = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or _idle(stack):
            continue
        frames = stack.split(";")
        leaf = frames[-1]
        n = int(count)
        total += n
        own[leaf] += n
        areas[_area(stack)] += n
        for f in set(frames[1:]):  # frames[0] is the thread
            inclusive[f] += n
    lines = [title, f"busy samples (all threads, idle waits left out): {total}", ""]
    if seconds:
        lines += ["busy share of one core, by thread:"]
        lines += [f"{share:6.3f}  {thread}" for thread, share in thread_busy(raw, seconds).items()] + [""]
    lines += ["by area:"]
    lines += [f"{100 * n / max(total, 1):6.1f}%  {area}" for area, n in areas.most_common()]
    lines += ["", "by own time:"]
    lines += [f"{100 * n / max(total, 1):6.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive (the frame or anything it called):"]
    lines += [f"{100 * n / max(total, 1):6.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"


async def _raw_client(host: str, port: int, tasks: list[str], headers: dict, deadline: float, phase: Phase,
                      rng: random.Random) -> None:
    """One keep-alive HTTP/1.1 connection sending prebuilt requests: far less client CPU per request than
    httpx, so that on a machine of 2 cores the figure is the server's, not the load generator's."""
    import orjson

    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    reader, writer = await asyncio.open_connection(host, port)
    k = rng.randrange(len(tasks))
    try:
        while time.monotonic() < deadline:
            task = tasks[k % len(tasks)]
            k += 1
            body = orjson.dumps({"inputs": [rng.choice(SHORT_TEXTS)]})
            start = time.perf_counter()
            writer.write(f"POST /v1/tasks/{task}/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}Content-Type: "
                         f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            data = await reader.readexactly(length)
            ms = (time.perf_counter() - start) * 1000
            status = int(status_line.split()[1]) if status_line else 0
            if not status:
                phase.failures["closed"] += 1
                return
            phase.statuses[status] += 1
            if status == 200:
                got = orjson.loads(data)
                if got.get("task") != task or len(got.get("predictions", [])) != 1:
                    phase.failures["wrong_body"] += 1
                phase.latencies_ms.append(ms)
                phase.inputs_ok += 1
    finally:
        writer.close()


async def _raw_phase(url: str, headers: dict, tasks: list[str], clients: int, duration: float, seed: int) -> Phase:
    host, port = url.split("//", 1)[1].split(":")
    phase = Phase()
    start = time.monotonic()
    await asyncio.gather(*(_raw_client(host, int(port), tasks, headers, start + duration, phase,
                                       random.Random(seed * 1000 + i)) for i in range(clients)))
    phase.seconds = time.monotonic() - start
    return phase


def _one_input_phase(url: str, headers: dict, tasks: list[str], clients: int, duration: float, seed: int,
                     raw: bool = False) -> Phase:
    if raw:
        return asyncio.run(_raw_phase(url, headers, tasks, clients, duration, seed))
    global TEXTS
    saved, TEXTS = TEXTS, SHORT_TEXTS
    try:
        return asyncio.run(run_phase(url, headers, tasks, clients=clients, duration=duration, inputs=(1, 1),
                                     seed=seed))
    finally:
        TEXTS = saved


def run_vs_engine(args: argparse.Namespace, base: str, tmp: Path, prefix: str, result: dict[str, Any],
                  name: str) -> None:
    """Per mode (embedded defaults; server mode with keys), `--rounds` rounds, each: the engine's rows/s and
    one-row forward (a child process that keeps its engine between rounds, while the server is idle), then the
    service at `--clients` clients and at one client, one input per request. Each round's ratio compares figures
    taken within seconds of each other (the machine's speed drifts by minutes); the headline is their median."""
    profiles = REPO / "benchmarks" / "profiles"
    clients = args.clients or 64
    duration = args.duration or 20.0
    rounds = max(1, args.rounds)
    modes = ["embedded", "server"] if args.mode == "both" else [args.mode]
    adapters = [(n, *random_adapter(base, m, lab, seed=i)) for i, (n, m, lab) in enumerate(VS_TASKS)]
    result["vs_engine"] = {}
    for mode in modes:
        with (fresh_database() if mode == "server" else _embedded_database(tmp / mode)) as db_url, \
                ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            headers, tasks = register_vs_tasks(db_url, mode, adapters)
            token = secrets.token_hex(16)
            env = server_env(db_url, REDIS_URL, prefix, base, tmp / mode, metrics_token=token,
                             **dict(args.set or []))
            if mode == "embedded":
                env = {k: v for k, v in env.items() if k not in ("SPAFIT_MODE", "SPAFIT_BROKER_URL",
                                                                   "SPAFIT_BROKER_KEY_PREFIX")}
                env["SPAFIT_MODE"] = "embedded"

            def measure_engine() -> dict[str, Any]:
                return pool.submit(engine_figures, base, adapters, args.engine_batch, args.engine_seconds / rounds,
                                   max(1, args.one_row // rounds)).result()

            measure_engine()  # the child loads its engine (and warms up) before anything is timed
            server = Server(env, tmp / f"server-{mode}.log").start()
            engines, manys, ones, per_round = [], [], [], []
            try:
                raw = args.client == "raw"
                _one_input_phase(server.url, headers, tasks, clients, args.warmup, seed=0, raw=raw)  # warm-up
                load_before = _loadavg()
                rows = batches = 0.0
                for i in range(rounds):
                    engine = measure_engine()
                    spy = py_spy(server.proc.pid, duration / rounds, tmp / f"{mode}.raw") \
                        if args.profile and i == 0 else None
                    before, ticks = _batches(server.url, token), _cpu_ticks(server.proc.pid)
                    many = _one_input_phase(server.url, headers, tasks, clients, duration / rounds, seed=1 + 2 * i,
                                            raw=raw)
                    cores = _cores(ticks, _cpu_ticks(server.proc.pid), many.seconds)
                    after = _batches(server.url, token)
                    rows, batches = rows + after[0] - before[0], batches + after[1] - before[1]
                    if spy is not None:
                        spy.wait(timeout=60)
                    one = _one_input_phase(server.url, headers, tasks, 1, args.one_duration / rounds, seed=2 + 2 * i,
                                           raw=raw)
                    m, o = many.summary(), one.summary()
                    per_round.append({
                        "engine_rows_per_s": engine["rows_per_s"], "engine_cores": engine["cores"],
                        "http_rps": m["throughput_rps"],
                        "ratio": round(m["throughput_rps"] / engine["rows_per_s"], 3),
                        "engine_one_row_p50_ms": engine["one_row_ms"]["p50"],
                        "one_client_p50_ms": o["latency_ms"]["p50"] if o["latency_ms"] else None,
                        "one_client_minus_one_row_ms": round(o["latency_ms"]["p50"] - engine["one_row_ms"]["p50"], 1)
                        if o["latency_ms"] else None,
                        "cores_at_64_clients": cores})
                    common.log(f"{mode} round {i + 1}/{rounds}: {per_round[-1]}")
                    engines.append(engine), manys.append(many), ones.append(one)
                load_after = _loadavg()
            finally:
                server.stop()
        many, one = _merged(manys), _merged(ones)
        m, o = many.summary(), one.summary()
        engine_rows = [e["rows_per_s"] for e in engines]
        one_row = _percentiles([v for e in engines for v in e["one_row_values_ms"]])
        ratios = [r["ratio"] for r in per_round]
        gaps = [r["one_client_minus_one_row_ms"] for r in per_round if r["one_client_minus_one_row_ms"] is not None]
        cores = [r["cores_at_64_clients"] for r in per_round if r["cores_at_64_clients"]]
        entry = {"rounds": per_round,
                 "cores_at_64_clients": {k: round(statistics.mean(c[k] for c in cores), 3) for k in cores[0]}
                 if cores else None,
                 "engine": {"batch": args.engine_batch, "rows_per_s": round(statistics.mean(engine_rows), 1),
                            "cores": round(statistics.mean(e["cores"] for e in engines), 3),
                            "rows_per_s_by_round": engine_rows, "one_row_ms": one_row},
                 f"http_{clients}_clients": m, "http_1_client": o,
                 "server_mean_batch_rows": round(rows / batches, 1) if batches else None,
                 "settings": dict(args.set or []), "client": args.client,
                 "ratio_rps_to_engine": round(statistics.median(ratios), 3),
                 "ratio_range": [min(ratios), max(ratios)],
                 "ratio_pooled": round(m["throughput_rps"] / statistics.mean(engine_rows), 3),
                 "one_client_p50_minus_one_row_ms": round(statistics.median(gaps), 1) if gaps else None,
                 "one_client_gap_range_ms": [min(gaps), max(gaps)] if gaps else None,
                 "loadavg": [load_before, load_after]}
        result["vs_engine"][mode] = entry
        if args.profile and (tmp / f"{mode}.raw").exists():
            profiles.mkdir(exist_ok=True)
            title = (f"py-spy record of the API process, {mode} mode, {clients} clients, one input per request, "
                     f"{duration / rounds:g}s (the first round; {m['throughput_rps']} req/s over all rounds; loadavg "
                     f"{load_before}); {common.command_line()}")
            path = profiles / f"{args.profile}_{mode}.txt"
            path.write_text(profile_summary(tmp / f"{mode}.raw", title, seconds=duration / rounds))
            entry["profile"] = str(path.relative_to(REPO))
        common.log(f"{mode}: {m['throughput_rps']} req/s at {clients} clients; median of {rounds} rounds "
                   f"{entry['ratio_rps_to_engine']}x the engine (rounds {min(ratios)}-{max(ratios)}; pooled "
                   f"{entry['ratio_pooled']}x); p50 {m['latency_ms']['p50']} ms p99 {m['latency_ms']['p99']} ms; one "
                   f"client p50 {o['latency_ms']['p50']} ms ({entry['one_client_p50_minus_one_row_ms']:+} ms vs the "
                   f"one-row forward, median of rounds); cores at 64 clients {entry['cores_at_64_clients']}; mean "
                   f"batch {entry['server_mean_batch_rows']} rows; errors "
                   f"{m['errors']}/{o['errors']}; loadavg {load_before} -> {load_after}")
    result["loadavg_after"] = _loadavg()
    common.log(f"wrote {common.write_result(name, result)}")


def _merged(phases: list[Phase]) -> Phase:
    """The rounds of one phase as one: counts and latencies added up, seconds summed."""
    total = Phase()
    for p in phases:
        total.latencies_ms += p.latencies_ms
        total.rejected_ms += p.rejected_ms
        total.statuses.update(p.statuses)
        total.failures.update(p.failures)
        total.retry_after_missing += p.retry_after_missing
        total.inputs_ok += p.inputs_ok
        total.seconds += p.seconds
    return total


def _batches(url: str, token: str) -> tuple[float, float]:
    """(rows, forward passes) the server has batched so far, from its /metrics."""
    import httpx

    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10).text
    pick = lambda name: sum(float(line.split()[-1]) for line in text.splitlines()  # noqa: E731
                            if line.startswith(name + " ") or line.startswith(name + "{"))
    return pick("spafit_engine_batch_size_sum"), pick("spafit_engine_batch_size_count")


@contextmanager
def _embedded_database(folder: Path):
    from app.services import migrate

    folder.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{folder / 'spafit.db'}"
    migrate.upgrade(url)
    yield url


def register_vs_tasks(database_url: str, mode: str, adapters: list) -> tuple[dict[str, str], list[str]]:
    """The tasks of `adapters` under the local tenant (embedded, no key) or a new tenant with a predict key."""
    from app.db import Database
    from app.services import keys, registry

    db = Database.from_url(database_url)
    try:
        with db.session() as s:
            if mode == "embedded":
                tenant, headers = keys.ensure_local_tenant(s), {}
            else:
                tenant = keys.create_tenant(s, "load")
                _, plaintext = keys.create_key(s, tenant.id, "load", ["predict"])
                headers = {"Authorization": f"Bearer {plaintext}"}
            for name, cfg, weights in adapters:
                registry.register_version(s, tenant.id, name, cfg, weights)
            s.commit()
    finally:
        db.dispose()
    return headers, [name for name, _, _ in adapters]


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="16 clients, 10 s steady + 5 s queue-full")
    p.add_argument("--tiny", action="store_true", help="a tiny random BERT instead of the packaged MiniLM")
    p.add_argument("--clients", type=int, default=None)
    p.add_argument("--duration", type=float, default=None, help="seconds of steady load (after warm-up)")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--queue-duration", type=float, default=None)
    p.add_argument("--queue-rows", type=int, default=16, help="SPAFIT_BATCH_MAX_QUEUE of the queue-full phase")
    p.add_argument("--rss-bound", type=float, default=0.05)
    p.add_argument("--out", default=None, help="result name under benchmarks/results (default: by mode)")
    p.add_argument("--noisy", action="store_true", help="the noisy-neighbour run instead (see above)")
    p.add_argument("--flood", type=float, default=4.0, help="--noisy: A's rate, in multiples of the capacity")
    p.add_argument("--rounds", type=int, default=5,
                   help="--noisy: rounds of B alone then B under the flood, --duration / rounds seconds each; "
                   "--vs-engine: rounds of the engine then the service, each a share of the seconds given")
    p.add_argument("--b-share", type=float, default=0.2, help="--noisy: B's rate, as a share of the capacity")
    p.add_argument("--capacity-duration", type=float, default=10.0, help="--noisy: seconds measuring capacity")
    p.add_argument("--trace", action="store_true",
                   help="--noisy: the batcher's debug trace (SPAFIT_BATCH_TRACE): where B's latency goes, by stage")
    p.add_argument("--set", nargs=2, action="append", metavar=("SETTING", "VALUE"),
                   help="a server setting, e.g. --set batch_max_size 8 (repeatable)")
    p.add_argument("--vs-engine", action="store_true", help="requests/s against the engine's rows/s (see above)")
    p.add_argument("--mode", choices=["embedded", "server", "both"], default="both", help="--vs-engine: which modes")
    p.add_argument("--engine-batch", type=int, default=32, help="--vs-engine: rows per predict_mixed call")
    p.add_argument("--engine-seconds", type=float, default=10.0, help="--vs-engine: seconds of engine throughput")
    p.add_argument("--one-row", type=int, default=100, help="--vs-engine: one-row forwards timed")
    p.add_argument("--client", choices=["raw", "httpx"], default="raw",
                   help="--vs-engine: the load generator's HTTP client (raw: prebuilt requests on keep-alive sockets)")
    p.add_argument("--one-duration", type=float, default=10.0, help="--vs-engine: seconds of the one-client run")
    p.add_argument("--profile", default=None, metavar="NAME",
                   help="--vs-engine: py-spy the server at full load into benchmarks/profiles/NAME_<mode>.txt; "
                        "--noisy: through the first round's windows, into NAME_alone.txt and NAME_flooded.txt")
    args = p.parse_args(argv)
    clients = args.clients or (16 if args.quick else 64)
    duration = args.duration or (10.0 if args.quick else 60.0)
    queue_duration = args.queue_duration or (5.0 if args.quick else 15.0)
    name = args.out or "load" + ("_noisy" if args.noisy else "") + ("_tiny" if args.tiny else "") + \
        ("_quick" if args.quick else "")

    tmp = Path(tempfile.mkdtemp(prefix="spafit-load-"))
    base = tiny_backbone(tmp / "tiny") if args.tiny else "sentence-transformers/all-MiniLM-L6-v2"
    prefix = f"spafit_load_{secrets.token_hex(4)}:"
    result: dict[str, Any] = {"command": common.command_line(), "machine": common.machine(),
                              "base_model": "tiny random BERT (hidden 64, 4 layers)" if args.tiny else base,
                              "tasks": [{"name": n, "method": m["name"], "labels": len(lab)} for n, m, lab in TASKS],
                              "clients": clients, "loadavg_before": _loadavg()}
    if args.vs_engine:
        return run_vs_engine(args, base, tmp, prefix, result, args.out or "load_vs_engine" + ("_tiny" if args.tiny else ""))
    if args.noisy:
        return run_noisy(args, base, tmp, prefix, result, name)
    with fresh_database() as db_url:
        common.log(f"registering {len(TASKS)} tasks on {base} ...")
        headers, tasks = register_tasks(db_url, "load", base)

        # Phase 1: steady load.
        server = Server(server_env(db_url, REDIS_URL, prefix, base, tmp / "data"), tmp / "server.log").start()
        try:
            common.log(f"steady: {clients} clients, {args.warmup:g}s warm-up + {duration:g}s")
            sampler = RssSampler(server.proc.pid)

            async def steady() -> Phase:
                # Warm-up (not counted): every adapter loaded, caches and connections hot.
                await run_phase(server.url, headers, tasks, clients=clients, duration=args.warmup)
                sampler.start()
                return await run_phase(server.url, headers, tasks, clients=clients, duration=duration, seed=1)

            phase = asyncio.run(steady())
            samples = sampler.stop()
            result["steady"] = {"duration_s": duration, "warmup_s": args.warmup, "inputs_per_request": [1, 4],
                                **phase.summary(), "rss": rss_flatness(samples, args.rss_bound),
                                "rss_samples_mib": [round(v / 2**20, 1) for _, v in samples],
                                "after": _health_after(server.url, headers, tasks[0])}
        finally:
            server.stop()

        # Phase 2: the queue full.
        env = server_env(db_url, REDIS_URL, prefix, base, tmp / "data", batch_max_queue=args.queue_rows)
        server = Server(env, tmp / "server-queue.log").start()
        try:
            common.log(f"queue full: {clients} clients x 8 inputs, queue {args.queue_rows} rows, {queue_duration:g}s")
            phase = asyncio.run(run_phase(server.url, headers, tasks, clients=clients, duration=queue_duration,
                                          inputs=(8, 8), seed=2))
            result["queue_full"] = {"duration_s": queue_duration, "batch_max_queue": args.queue_rows,
                                    "inputs_per_request": 8, **phase.summary(),
                                    "after": _health_after(server.url, headers, tasks[0])}
        finally:
            server.stop()
    result["loadavg_after"] = _loadavg()
    path = common.write_result(name, result)
    s, q = result["steady"], result["queue_full"]
    common.log(f"steady: {s['requests']} requests, {s['errors']} errors, {s['throughput_rps']} req/s, "
               f"p50 {s['latency_ms']['p50']} ms, p99 {s['latency_ms']['p99']} ms, RSS growth "
               f"{s['rss']['growth']:+.1%} ({'flat' if s['rss']['flat'] else 'NOT flat'})")
    common.log(f"queue full: {q['ok']} ok, {q['overloaded_503']} x 503 (Retry-After missing on "
               f"{q['retry_after_missing_on_503']}), {q['errors']} errors, failures {q['failures']}")
    common.log(f"wrote {path}")


if __name__ == "__main__":
    main()
