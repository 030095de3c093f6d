"""The accuracy benchmark's figure: the task's main test metric against trainable parameters (log scale),
one point per method and SPAFIT split with the spread over seeds as error bars, the floors as lines.

    python -m benchmarks.accuracy_plot benchmarks/results/accuracy_drugreview.json \\
        --extra benchmarks/results/accuracy_drugreview_bitfit_lr1e-2.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MARKERS = {"spafit": "o", "lora": "s", "bitfit": "^", "full": "D"}
COLORS = {"lora": "tab:orange", "bitfit": "tab:green", "full": "tab:red"}
SPAFIT_COLORS = ("tab:blue", "tab:purple", "tab:cyan", "tab:olive", "tab:brown", "tab:pink")


NAMES = {"lora": "LoRA", "bitfit": "BitFit", "full": "full fine-tuning"}


def plot(data: dict, out: Path, extras: tuple[dict, ...] = ()) -> Path:
    """`extras`: results files of the same data under other settings (e.g. another learning rate), drawn as
    hollow markers labelled with their learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = data["dataset"]["metrics"][0]
    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=150)
    spafit_i = 0
    for r in data["summary"]:
        mean, std = r[f"test_{metric}"]
        if r["method"] == "spafit":
            color = SPAFIT_COLORS[spafit_i % len(SPAFIT_COLORS)]
            label = f"SPAFIT (n1, n2) = ({r['n1']}, {r['n2']})" + (", service default" if r["label"] ==
                                                                  "spafit default" else "")
            spafit_i += 1
        else:
            color = COLORS[r["method"]]
            label = NAMES[r["method"]]
        ax.errorbar(r["params"]["total"], mean, yerr=std, fmt=MARKERS[r["method"]], color=color, ms=7,
                    capsize=4, elinewidth=1.2, label=label)
        if r["method"] == "spafit":
            ax.annotate(f"({r['n1']},{r['n2']})", (r["params"]["total"], mean), textcoords="offset points",
                        xytext=(6, 4), fontsize=7, color=color)
    for extra in extras:
        for r in extra["summary"]:
            mean, std = r[f"test_{metric}"]
            name = f"SPAFIT ({r['n1']}, {r['n2']})" if r["method"] == "spafit" else NAMES[r["method"]]
            lr = extra["settings"]["learning_rates"][r["method"]]
            variant = extra.get("variant") or (f"lr {lr:g}" if not isinstance(lr, dict) else "variant")
            ax.errorbar(r["params"]["total"], mean, yerr=std, fmt=MARKERS[r["method"]], color=COLORS.get(r["method"], "0.3"),
                        mfc="none", ms=7, capsize=4, elinewidth=1.2, label=f"{name}, {variant}")
    for name, f in data.get("floors", {}).items():
        ax.axhline(f["test"][metric], color="0.35", ls=":" if name == "majority" else "--", lw=1.2,
                   label=f["title"])
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters, classifier head included (log scale)")
    ax.set_ylabel(f"test {metric.replace('_', '-')}")
    seeds = sorted({len(r["seeds"]) for r in data["summary"]})
    ds = data["dataset"]
    ax.set_title(f"{ds['name']}: {data['settings']['base_model']} ({ds['rows']['train']} train / "
                 f"{ds['rows']['test']} test rows), mean ± std over {'/'.join(map(str, seeds))} seed(s)",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="best", framealpha=0.9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="a results JSON written by benchmarks/accuracy.py")
    p.add_argument("-o", "--out", type=Path, default=None,
                   help="PNG path (default: benchmarks/figures/<results name>.png)")
    p.add_argument("--extra", type=Path, action="append", default=[],
                   help="another results JSON on the same data (other settings), drawn with hollow markers")
    args = p.parse_args(argv)
    out = args.out or Path(__file__).resolve().parent / "figures" / f"{args.results.stem}.png"
    extras = tuple(json.loads(e.read_text()) for e in args.extra)
    print(plot(json.loads(args.results.read_text()), out, extras))


if __name__ == "__main__":
    main()
