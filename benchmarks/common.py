"""Shared helpers for the benchmark scripts: thread setup, interleaved timing, paired ratios, resident
memory (RSS) probes, machine description and output (JSON + markdown).

Import this module before torch. It sets `OMP_WAIT_POLICY=PASSIVE` unless the variable is already set:
on the 2-vCPU benchmark VM, libgomp's default spin-waiting makes every parallel region cost ~8 ms (a
786 KB clone takes 8.8 ms instead of 0.2 ms; `python -m benchmarks.common --omp-check` measures it),
which would turn every small tensor op into noise. Override by exporting the variable yourself.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def setup_threads(threads: int | None = None) -> int:
    """torch.set_num_threads(threads or the core count); returns the count used."""
    import torch

    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: how busy the machine was (other processes included)."""
    return list(os.getloadavg())


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    return info


# ------------------------------------------------------------------------------ timing
def interleave(variants: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1, seed: int = 0,
               log: Callable[[str], None] | None = None, cpu: dict[str, list[float]] | None = None
               ) -> dict[str, list[float]]:
    """Wall seconds per call of each variant, `repeats` rounds; each round runs every variant once, in a
    fresh random order, so slow phases of a noisy machine hit all variants alike. `warmup` rounds are
    discarded. If `cpu` is given, it receives this process's CPU seconds per call (all its threads):
    unlike wall time, that is not inflated when other processes compete for the cores."""
    rng = random.Random(seed)
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu_times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            c0, t0 = time.process_time(), time.perf_counter()
            variants[n]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r >= warmup:
                times[n].append(dt)
                cpu_times[n].append(dc)
        if log is not None:
            tag = "warmup (discarded)" if r < warmup else f"round {r - warmup + 1}/{repeats}"
            log(f"  {tag}: " + ", ".join(f"{n}={v[-1]:.4f}s" for n, v in times.items() if v and r >= warmup))
    if cpu is not None:
        cpu.update(cpu_times)
    return times


class Timing:
    """Per-round wall and CPU seconds of interleaved variants (see `interleave`)."""

    def __init__(self, wall: dict[str, list[float]], cpu: dict[str, list[float]]):
        self.wall, self.cpu = wall, cpu

    @classmethod
    def run(cls, variants: dict[str, Callable[[], Any]], **kwargs) -> Timing:
        cpu: dict[str, list[float]] = {}
        wall = interleave(variants, cpu=cpu, **kwargs)
        return cls(wall, cpu)

    def scale(self, name: str, new_name: str, factor: float) -> None:
        """Rename a variant and divide its times (e.g. a variant that ran 8 batches, per batch)."""
        for d in (self.wall, self.cpu):
            d[new_name] = [t / factor for t in d.pop(name)]

    def ratio(self, num: str, den: str) -> dict[str, dict[str, float]]:
        """num / den per round, by wall and by CPU time."""
        return {"wall": paired_ratio(self.wall[num], self.wall[den]),
                "cpu": paired_ratio(self.cpu[num], self.cpu[den])}

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        return {"wall": {k: summary(v) for k, v in self.wall.items()},
                "cpu": {k: summary(v) for k, v in self.cpu.items()}}

    def to_json(self) -> dict[str, Any]:
        return {"wall_seconds": self.wall, "cpu_seconds": self.cpu, "summary": self.summary()}


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and spread (min, max, interquartile range) of a sample."""
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "p25": q[0], "p75": q[2], "n": len(v)}


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> dict[str, float]:
    """num[i] / den[i] per round (measured side by side in the same round), summarised."""
    return summary([a / b for a, b in zip(num, den, strict=True)])


def fmt_ratio(s: dict[str, float]) -> str:
    return f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"


def fmt_seconds(s: dict[str, float]) -> str:
    m = s["median"]
    return f"{m * 1e3:.1f} ms" if m < 1 else f"{m:.2f} s"


# ------------------------------------------------------------------------------ memory (Linux)
def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    """Current resident set size."""
    return _status("VmRSS")


def peak_rss_bytes() -> int:
    """High-water mark of the resident set since the process started or since `reset_peak_rss()`."""
    return _status("VmHWM")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, `echo 5 > /proc/self/clear_refs`). False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_child(module: str, args: Sequence[str], *, timeout: float | None = None) -> dict[str, Any]:
    """Run `python -m module args` in a fresh interpreter; its last stdout line is a JSON object."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ output
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Write `data` to results/NAME.json; a NAME with a folder in it (`/tmp/try`) is a path of its own."""
    path = (RESULTS / f"{name}.json") if "/" not in name else Path(name).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def shown(path: Path) -> str:
    """`path` relative to the repository where it lies in it (as the committed results are named)."""
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def command_line() -> str:
    return "python -m " + Path(sys.argv[0]).with_suffix("").relative_to(REPO).as_posix().replace("/", ".") + \
        ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ --omp-check
def _omp_probe(threads: int | None = None) -> None:
    import torch

    setup_threads(threads)
    b = torch.randn(32, 16, 384)  # 786 KB: the size of a per-row LoRA factor in a 32-row mixed batch
    x = torch.randn(32, 64, 1536)  # 12.6 MB: an FFN activation of 32 x 64 tokens on MiniLM
    w, a = torch.randn(1024, 1024), torch.randn(4096, 1024)  # a BERT-large-sized GEMM, 8.6 GFLOP
    out = {}
    for name, fn, n in (("clone_786KB", b.clone, 50), ("add_12MB", lambda: x + 1.0, 50),
                        ("gemm_4096x1024x1024", lambda: a @ w, 10)):
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = (time.perf_counter() - t0) / n
    print(json.dumps(out))


def omp_check() -> dict[str, Any]:
    """Median of 5 fresh processes per setting: OMP_WAIT_POLICY unset (libgomp's default) or PASSIVE with
    2 threads, and PASSIVE with 1 thread (how much the second core adds)."""
    res: dict[str, Any] = {}
    for label, policy, threads in (("unset, 2 threads", "", 2), ("PASSIVE, 2 threads", "PASSIVE", 2),
                                   ("PASSIVE, 1 thread", "PASSIVE", 1)):
        env = dict(os.environ, OMP_WAIT_POLICY=policy)  # empty: setdefault keeps it, libgomp treats it as unset
        runs = []
        for _ in range(5):
            p = subprocess.run([sys.executable, "-c", f"import benchmarks.common as c; c._omp_probe({threads})"],
                               cwd=REPO, env=env, capture_output=True, text=True, check=True)
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        res[label] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return res


if __name__ == "__main__":
    if "--omp-check" in sys.argv:
        r = omp_check()
        cols = list(r)
        print(markdown_table(["op", *cols], [[k, *(f"{r[c][k] * 1e3:.3f} ms" for c in cols)]
                                            for k in r[cols[0]]]))
        write_result("omp_check", {"command": command_line(), "machine": machine(), "load_average": load_average(),
                                   "seconds": r})
