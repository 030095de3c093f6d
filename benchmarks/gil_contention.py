"""How much a busy Python thread in the same process slows a serving forward (benchmarks/RELIABILITY.md, noisy
neighbour): the packaged MiniLM, one 4-row forward of short inputs, alone and beside a thread that runs pure
Python (what the API's event loop does while it refuses a flooding tenant's requests), at three GIL switch
intervals. Variants interleaved round by round; median wall ms per forward and the ratio to alone.

    python -m benchmarks.gil_contention            # writes benchmarks/results/gil_contention.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
from collections.abc import Callable

from benchmarks import common  # sets OMP_WAIT_POLICY; torch is imported in main(), after it


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores)")
    args = p.parse_args(argv)
    threads = common.setup_threads(args.threads)

    import torch
    from transformers import AutoModel, AutoTokenizer

    from spafit_core.model import resolve_model_path

    path = resolve_model_path("minilm")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    batch = tok(["a fine movie with good actors"] * 4, return_tensors="pt", padding=True)

    def forward() -> None:
        with torch.inference_mode():
            model(**batch)

    def beside_a_busy_thread(interval_s: float) -> Callable[[], None]:
        def run() -> None:
            stop = threading.Event()

            def spin() -> None:
                while not stop.is_set():
                    {i: str(i) for i in range(200)}

            old = sys.getswitchinterval()
            sys.setswitchinterval(interval_s)
            t = threading.Thread(target=spin, daemon=True)
            t.start()
            try:
                forward()
            finally:
                stop.set()
                t.join()
                sys.setswitchinterval(old)
        return run

    variants = {"alone": forward, "busy thread, 5 ms switch": beside_a_busy_thread(0.005),
                "busy thread, 1 ms switch": beside_a_busy_thread(0.001),
                "busy thread, 0.2 ms switch": beside_a_busy_thread(0.0002)}
    times = common.interleave(variants, repeats=args.repeats, warmup=2)
    alone = statistics.median(times["alone"])
    rows = {n: {"median_ms": round(statistics.median(v) * 1000, 1), "x_alone": round(statistics.median(v) / alone, 2)}
            for n, v in times.items()}
    for n, r in rows.items():
        common.log(f"{n}: {r['median_ms']} ms ({r['x_alone']}x alone)")
    out = common.write_result("gil_contention", {"command": common.command_line(), "machine": common.machine(),
                                                  "torch_threads": threads, "rows": 4, "repeats": args.repeats,
                                                  "forward": rows})
    common.log(f"wrote {out}")


if __name__ == "__main__":
    main()
