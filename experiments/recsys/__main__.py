"""The main job: MetaBalance vs Single-Loss vs Vanilla-Multi on a multi-behaviour recommendation data set.

    python -m experiments.recsys                       # embedded synthetic data, about a minute on 2 cores
    python -m experiments.recsys --data ../shared/data/taobao --batch-size 4096 --epoch-size 400000 ...

Protocol: for every MetaBalance strategy with more than one relax factor in ``--relax-grid``, each r is trained
with the first seed and the best validation NDCG@10 wins; then every chosen configuration runs ``--seeds``
seeds (the first reused) and the test metrics are reported as mean ± std.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import data as data_mod
from .train import (
    RunResult,
    TrainConfig,
    evaluate_test,
    fixed_users,
    method_label,
    summarize,
    train,
)

ALL_METHODS = ("mostpop", "single", "vanilla", "mb-A", "mb-B", "mb-C")
METRIC_COLUMNS = ("ndcg@10", "recall@10", "precision@10", "ndcg@20", "recall@20", "precision@20")

# The embedded default: small enough for two minutes on two cores, large enough that the methods differ.
SYNTHETIC_DEFAULTS = dict(epochs=12, patience=3, batch_size=128, seeds=2, relax_grid=[0.7], lr=3e-3)
REAL_DEFAULTS = dict(epochs=20, patience=3, batch_size=256, seeds=3, relax_grid=[0.5, 0.7, 0.9], lr=1e-3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.recsys", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        help="data folder (buy_train/buy_test/<aux>_train) or raw UserBehavior.csv / user_log_format1.csv "
        "(default: embedded synthetic data)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(ALL_METHODS),
        choices=ALL_METHODS,
        metavar="M",
        help=f"methods to run, from {', '.join(ALL_METHODS)} (default: all)",
    )
    p.add_argument(
        "--relax-grid",
        nargs="+",
        type=float,
        help="relax factors tried per MetaBalance strategy on validation "
        "(synthetic default 0.7; real default 0.5 0.7 0.9)",
    )
    p.add_argument("--beta", type=float, default=0.9, help="MetaBalance moving-average factor (default 0.9)")
    p.add_argument("--seeds", type=int, help="seeds per chosen configuration (synthetic default 2, real default 3)")
    p.add_argument(
        "--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed+seeds-1 (default 0)"
    )
    p.add_argument("--epochs", type=int, help="maximum epochs (synthetic default 12, real default 20)")
    p.add_argument("--patience", type=int, help="early-stopping patience in epochs on validation NDCG@10 (default 3)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="positives per task per step, each with --neg-ratio negatives (paper and real default 256; synthetic 128)",
    )
    p.add_argument(
        "--mask",
        choices=("all", "target"),
        default="all",
        help="training positives masked in the ranking: of every task (default) or of the target only",
    )
    p.add_argument("--neg-ratio", type=int, default=1, help="sampled negatives per positive (default 1)")
    p.add_argument("--lr", type=float, help="Adam learning rate (paper and real-data default 1e-3; synthetic 3e-3)")
    p.add_argument(
        "--val-users", type=int, help="validate on a fixed random subsample of this many users (default: all)"
    )
    p.add_argument("--test-users", type=int, help="test on a fixed random subsample of this many users (default: all)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a busy machine more threads can be much slower)",
    )
    p.add_argument(
        "--trace",
        help="record per-task gradient norms (Vanilla-Multi and MetaBalance-C, first seed) into this JSON "
        "file; plot with scripts/plot_gradients.py",
    )
    p.add_argument("--trace-every", type=int, default=10, help="steps between trace records (default 10)")
    p.add_argument("--out", help="write all runs, the grid and the table as JSON here")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    return p.parse_args(argv)


def _progress(quiet: bool):
    if quiet:
        return None
    tty = sys.stderr.isatty()

    def emit(text: str) -> None:
        if text.endswith("\r"):
            if tty:
                sys.stderr.write("\r" + text[:-1])
                sys.stderr.flush()
            return
        sys.stderr.write(("\r" if tty else "") + text)
        sys.stderr.flush()

    return emit


def _config(args: argparse.Namespace, method: str, seed: int, r: float = 0.7, trace: bool = False) -> TrainConfig:
    kind, _, strategy = method.partition("-")
    return TrainConfig(
        method=kind,
        strategy=strategy or "C",
        relax_factor=r,
        beta=args.beta,
        seed=seed,
        epochs=args.epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        lr=args.lr,
        neg_ratio=args.neg_ratio,
        mask=args.mask,
        trace_every=args.trace_every if trace else 0,
    )


def format_table(rows: list[dict]) -> str:
    head = [
        "method",
        *[c.replace("precision", "P").replace("recall", "R").replace("ndcg", "NDCG") for c in METRIC_COLUMNS],
        "epochs",
        "time/run",
    ]
    lines = []
    for row in rows:
        cells = [row["label"]]
        for c in METRIC_COLUMNS:
            mean, std = row["test"][c]
            cells.append(f"{mean:.4f} ± {std:.4f}")
        cells += [row["epochs"], row["time"]]
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(head), sep, *(fmt(cells) for cells in lines)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    defaults = REAL_DEFAULTS if args.data else SYNTHETIC_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(max(1, args.threads))
    progress = _progress(args.quiet)
    t_start = time.perf_counter()
    data = data_mod.load(args.data) if args.data else data_mod.synthetic()
    print(data.summary(), flush=True)
    for note in data.notes:
        print(f"  {note}", flush=True)
    val_users = fixed_users(data, "valid", args.val_users)
    test_users = fixed_users(data, "test", args.test_users)
    print(
        f"methods {' '.join(args.methods)}; relax grid {args.relax_grid}; seeds {args.seeds}; epochs <= {args.epochs} "
        f"(patience {args.patience}); batch {args.batch_size}; mask {args.mask}; "
        f"val users {len(val_users) if val_users is not None else 'all'}; test users "
        f"{len(test_users) if test_users is not None else 'all'}; threads {torch.get_num_threads()}",
        flush=True,
    )

    runs: dict[str, list[RunResult]] = {}
    grid: dict[str, dict[str, float]] = {}
    traces = {}
    # Phase 1: relax factor per MetaBalance strategy, first seed, best validation NDCG@10.
    chosen: dict[str, float] = {}
    for method in args.methods:
        if not method.startswith("mb-"):
            continue
        if len(args.relax_grid) == 1:
            chosen[method] = args.relax_grid[0]
            continue
        candidates = {}
        for r in args.relax_grid:
            trace = bool(args.trace) and method == "mb-C"
            result = train(data, _config(args, method, args.first_seed, r, trace), progress, val_users)
            candidates[r] = result
            print(f"grid {result.config.label}: val NDCG@10 {result.valid['ndcg@10']:.4f}", flush=True)
        r_best = max(candidates, key=lambda r: candidates[r].valid["ndcg@10"])
        chosen[method] = r_best
        grid[method] = {str(r): res.valid["ndcg@10"] for r, res in candidates.items()}
        runs[method] = [candidates[r_best]]
        print(f"chosen {method_label('mb', method[-1], r_best)}", flush=True)
    # Phase 2: every chosen configuration over the seeds, tested.
    for method in args.methods:
        if method == "mostpop":
            runs[method] = [train(data, _config(args, method, 0), progress, val_users)]
            evaluate_test(runs[method][0], data, test_users)
            continue
        done = runs.setdefault(method, [])
        for k, seed in enumerate(range(args.first_seed, args.first_seed + args.seeds)):
            if k < len(done):
                result = done[k]
            else:
                trace = bool(args.trace) and k == 0 and method in ("vanilla", "mb-C")
                result = train(data, _config(args, method, seed, chosen.get(method, 0.7), trace), progress, val_users)
                done.append(result)
            evaluate_test(result, data, test_users)
            print(
                f"done {result.config.label} seed {seed}: best epoch {result.best_epoch}, val NDCG@10 "
                f"{result.valid['ndcg@10']:.4f}, test NDCG@10 {result.test['ndcg@10']:.4f} R@10 "
                f"{result.test['recall@10']:.4f} ({result.train_seconds:.0f}s)",
                flush=True,
            )
            if result.trace is not None:
                traces[result.config.label] = result.trace

    rows = []
    for method in args.methods:
        rs = runs[method]
        rows.append(
            {
                "method": method,
                "label": rs[0].config.label,
                "test": summarize(rs, "test"),
                "valid": summarize(rs, "valid"),
                "epochs": "/".join(str(r.best_epoch) for r in rs),
                "time": f"{np.mean([r.train_seconds for r in rs]):.0f}s",
            }
        )
    elapsed = time.perf_counter() - t_start
    print(
        f"\nTest metrics on {data.name} (target '{data.target}'), mean ± std over {args.seeds} seed(s); "
        f"epochs = best epoch per seed; total {elapsed:.0f}s",
        flush=True,
    )
    print(format_table(rows), flush=True)
    if args.out:
        payload = {
            "data": data.summary(),
            "notes": data.notes,
            "args": vars(args),
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "elapsed_s": elapsed,
            "grid": grid,
            "table": rows,
            "runs": {m: [r.to_json() for r in rs] for m, rs in runs.items()},
        }
        Path(args.out).write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.out}")
    if args.trace:
        Path(args.trace).write_text(json.dumps(traces))
        print(f"wrote gradient trace {args.trace} ({', '.join(traces) or 'nothing: run vanilla or mb-C'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
