#!/usr/bin/env python3
"""Draw MetaBalance's Fig. 1/2-style curves from a gradient trace recorded by the experiment.

    python -m experiments.recsys --methods vanilla mb-C --trace trace.json
    python scripts/plot_gradients.py trace.json --out gradients.png

The trace holds, per traced run (Vanilla-Multi, MetaBalance-C), every ``--trace-every`` steps and for every shared
tensor p: the moving-average gradient norm m_{p,t} of each task t and the weight w_{p,t} MetaBalance applied.
The plot shows, over training, the magnitude of each task's gradient on the whole shared bottom

    before balancing: sqrt(sum_p m_{p,t}^2)          after balancing: sqrt(sum_p (w_{p,t} m_{p,t})^2)

(Vanilla-Multi's weights are all 1, so its two panels coincide: its trace is the imbalance MetaBalance corrects),
plus the ratio of each auxiliary to the target. Without matplotlib it prints the same numbers as a table.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path


def magnitudes(run: dict) -> dict[str, list[list[float]]]:
    """Per record: per task, the shared-bottom gradient magnitude before and after balancing."""
    before, after = [], []
    for norms, weights in zip(run["norm_ema"], run["weights"]):
        tasks = range(len(norms[0]))
        before.append([math.sqrt(sum(p[t] ** 2 for p in norms)) for t in tasks])
        after.append([math.sqrt(sum((p[t] * w[t]) ** 2 for p, w in zip(norms, weights))) for t in tasks])
    return {"before": before, "after": after}


def print_table(trace: dict) -> None:
    for label, run in trace.items():
        mags = magnitudes(run)
        tasks = run["tasks"]
        print(f"\n{label}: shared-bottom gradient magnitude per task (before -> after balancing)")
        print("step".rjust(8) + "".join(f"{t:>24}" for t in tasks))
        n = len(run["step"])
        for k in sorted({0, n // 4, n // 2, 3 * n // 4, n - 1}) if n else []:
            cells = "".join(f"{b:>11.4g} -> {a:<9.4g}" for b, a in zip(mags["before"][k], mags["after"][k]))
            print(f"{run['step'][k]:>8}{cells}")


def plot(trace: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(trace)
    fig, axes = plt.subplots(len(labels), 3, figsize=(15, 3.8 * len(labels)), squeeze=False)
    for row, label in enumerate(labels):
        run = trace[label]
        mags = magnitudes(run)
        steps = run["step"]
        for col, (key, title) in enumerate((("before", "before balancing"), ("after", "after balancing"))):
            ax = axes[row][col]
            for t, task in enumerate(run["tasks"]):
                style = "-" if t == 0 else "--"
                ax.plot(steps, [m[t] for m in mags[key]], style, label=f"{task}{' (target)' if t == 0 else ''}")
            ax.set_yscale("log")
            ax.set_title(f"{label}: {title}")
            ax.set_xlabel("training step")
            ax.set_ylabel("||grad|| on shared bottom (EMA)")
            ax.legend()
        ax = axes[row][2]
        for t, task in enumerate(run["tasks"][1:], 1):
            ratio = [m[t] / m[0] if m[0] else float("nan") for m in mags["before"]]
            ax.plot(steps, ratio, "--", label=f"{task} / target, before")
            ratio = [m[t] / m[0] if m[0] else float("nan") for m in mags["after"]]
            ax.plot(steps, ratio, "-", label=f"{task} / target, after")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{label}: auxiliary / target magnitude")
        ax.set_xlabel("training step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def plot_runs(paths: list[str], out: Path, seed: int = 0) -> None:
    """Per method (seed ``seed``): validation NDCG@10 per epoch, and the per-task weights the method used per epoch
    (Weights-Tuning, Uncertainty, GradNorm, DWA, MGDA; GradSim: the fraction of steps each task was used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, tasks = {}, []
    for path in paths:
        payload = json.loads(Path(path).read_text())
        tasks = tasks or re.findall(r"(\w+)_train=", payload.get("data", ""))
        for method, items in payload["runs"].items():
            for item in items:
                if item["config"]["seed"] == seed and item["history"]:
                    runs[method] = item
    weighted = [m for m, r in runs.items() if "task_weights" in r["history"][0]]
    cols = 4
    rows = -(-(1 + len(weighted)) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    panels = [ax for row in axes for ax in row]
    ax = panels[0]
    for method, run in runs.items():
        ax.plot([h["epoch"] for h in run["history"]], [h["valid"]["ndcg@10"] for h in run["history"]], label=method)
    ax.set_title(f"validation NDCG@10 per epoch (seed {seed})")
    ax.set_xlabel("epoch")
    ax.legend(fontsize=6, ncol=2)
    for ax, method in zip(panels[1:], weighted):
        run = runs[method]
        epochs = [h["epoch"] for h in run["history"]]
        weights = [h["task_weights"] for h in run["history"]]
        for t in range(len(weights[0])):
            name = tasks[t] if t < len(tasks) else f"task {t}"
            label = name + (" (target)" if t == 0 else "")
            ax.plot(epochs, [w[t] for w in weights], "-" if t == 0 else "--", label=label)
        what = "fraction of steps used" if method == "gradsim" else "task weights"
        ax.set_title(f"{run['label']}: {what}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    for ax in panels[1 + len(weighted) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "trace", nargs="+", help="JSON trace(s) written by `python -m experiments.recsys --trace FILE` (merged)"
    )
    parser.add_argument("--out", default="gradients.png", help="PNG to write (default gradients.png)")
    parser.add_argument(
        "--runs",
        nargs="+",
        help="also plot, from these --out JSON files, validation curves and per-task weights per epoch",
    )
    parser.add_argument("--runs-out", default="runs.png", help="PNG for --runs (default runs.png)")
    args = parser.parse_args(argv)
    trace = {}
    for path in args.trace:
        try:
            trace.update(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            print(f"cannot read trace {path}: {err}", file=sys.stderr)
            return 2
    if not trace:
        print(f"{args.trace} holds no traced run; run the experiment with vanilla or mb-C and --trace", file=sys.stderr)
        return 2
    print_table(trace)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "\nmatplotlib is not installed, so no PNG was written (the table above has the same numbers). "
            "Install it with `pip install matplotlib` (it is not a dependency of mb_kernels) and rerun.",
            file=sys.stderr,
        )
        return 1
    plot(trace, Path(args.out))
    if args.runs:
        plot_runs(args.runs, Path(args.runs_out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
