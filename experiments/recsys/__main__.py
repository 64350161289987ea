"""The main job: MetaBalance vs its paper's baselines on a multi-behaviour recommendation data set.

    python -m experiments.recsys                       # embedded synthetic data, about two minutes on 2 cores
    python -m experiments.recsys --data ../shared/data/taobao --methods vanilla mb-C pcgrad ...

Protocol: every method with more than one value in its hyperparameter grid (MetaBalance's relax factor r,
Weights-Tuning's w, GradNorm's alpha, DWA's T) trains each value with the selection seed and keeps the best
validation NDCG@10; then every chosen configuration runs the seeds, early-stopped on validation NDCG@10, and the
test metrics are reported as mean ± std with paired tests (t-test and exact Wilcoxon over seeds) of test
NDCG@10 against Vanilla-Multi and MetaBalance-C.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .methods import DEFAULT_METHODS, METHODS, method_help

METRIC_COLUMNS = ("ndcg@10", "recall@10", "precision@10", "ndcg@20", "recall@20", "precision@20")
REFERENCES = ("vanilla", "mb-C")
"""The methods every other one is tested against (paired over seeds)."""

# The embedded default: small enough for two minutes on two cores, large enough that the methods differ.
SYNTHETIC_DEFAULTS = dict(epochs=12, patience=3, batch_size=128, seeds=2, relax_grid=[0.7], lr=3e-3)
REAL_DEFAULTS = dict(epochs=20, patience=5, batch_size=256, seeds=5, relax_grid=[0.5, 0.7, 0.9], lr=1e-3)


# ---- argument checking (in argparse, before any data is loaded) ------------------------------------------------
def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float, high_open: bool = False, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if value != value or too_low or too_high:
            raise argparse.ArgumentTypeError(
                f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}, got {text}"
            )
        return value

    return parse


def _grid_item(text: str) -> tuple[str, list[float]]:
    name, sep, values = text.partition("=")
    info = METHODS.get(name)
    if not sep or info is None or info.hyper is None or name.startswith("mb-"):
        tunable = [m.name for m in METHODS.values() if m.hyper is not None and not m.name.startswith("mb-")]
        raise argparse.ArgumentTypeError(
            f"expected METHOD=V1,V2,... with METHOD one of {', '.join(tunable)} (MetaBalance: --relax-grid), "
            f"got {text!r}"
        )
    try:
        grid = [float(v) for v in values.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: values must be numbers, got {values!r}") from None
    if not grid or any(v != v or v < 0 or (name == "dwa" and v == 0) for v in grid):
        raise argparse.ArgumentTypeError(f"{name}: values must be >= 0{' (> 0 for dwa)' if name == 'dwa' else ''}")
    return name, grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.recsys",
        description=__doc__.split("\n\n")[0],
        epilog="methods (--methods):\n" + method_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        help="data folder (buy_train/buy_test/<aux>_train) or raw UserBehavior.csv / user_log_format1.csv "
        "(default: embedded synthetic data)",
    )
    p.add_argument(
        "--max-users",
        type=_int_at_least(2),
        help="restrict the data to this many random users (all their interactions; every item stays a candidate) "
        "for CPU budgets (default: all users)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        choices=list(METHODS),
        metavar="M",
        help=f"methods to run, listed below (default: {' '.join(DEFAULT_METHODS)}); 'all' is not a name: "
        "spell them out",
    )
    p.add_argument(
        "--relax-grid",
        nargs="+",
        type=_float_in(0.0, 1.0),
        help="relax factors in [0, 1] tried per MetaBalance strategy on validation "
        "(synthetic default 0.7; real default 0.5 0.7 0.9)",
    )
    p.add_argument(
        "--grid",
        nargs="+",
        type=_grid_item,
        default=[],
        metavar="METHOD=V1,V2",
        help="a baseline's hyperparameter values tried on validation: weights=w (auxiliary loss weight), "
        "gradnorm=alpha, dwa=T (defaults on real data: weights=0.1,0.3,0.5 gradnorm=0.5,1.5 dwa=2; synthetic: "
        "weights=0.3 gradnorm=1.5 dwa=2)",
    )
    p.add_argument(
        "--beta",
        type=_float_in(0.0, 1.0, high_open=True),
        default=0.9,
        help="MetaBalance moving-average factor in [0, 1) (default 0.9)",
    )
    p.add_argument(
        "--seeds", type=_int_at_least(1), help="seeds per chosen configuration (synthetic default 2, real default 5)"
    )
    p.add_argument(
        "--first-seed",
        type=_int_at_least(0),
        default=0,
        help="seeds run are first-seed .. first-seed+seeds-1 (default 0)",
    )
    p.add_argument(
        "--select-seed",
        type=_int_at_least(0),
        help="seed of the hyperparameter-selection runs (default: the first seed, whose run is then reused; "
        "another seed keeps selection out of the reported runs)",
    )
    p.add_argument("--epochs", type=_int_at_least(1), help="maximum epochs (synthetic default 12, real default 20)")
    p.add_argument(
        "--patience",
        type=_int_at_least(1),
        help="early-stopping patience in epochs on validation NDCG@10 (synthetic default 3, real default 5)",
    )
    p.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        help="positives per task per step, each with --neg-ratio negatives (paper and real default 256; synthetic 128)",
    )
    p.add_argument(
        "--mask",
        choices=("all", "target"),
        default="all",
        help="training positives masked in the ranking: of every task (default) or of the target only",
    )
    p.add_argument("--neg-ratio", type=_int_at_least(1), default=1, help="sampled negatives per positive (default 1)")
    p.add_argument(
        "--lr",
        type=_float_in(0.0, 10.0, low_open=True),
        help="Adam learning rate (paper and real-data default 1e-3; synthetic 3e-3)",
    )
    p.add_argument(
        "--val-users",
        type=_int_at_least(1),
        help="validate on a fixed random subsample of this many users (default: all)",
    )
    p.add_argument(
        "--test-users", type=_int_at_least(1), help="test on a fixed random subsample of this many users (default: all)"
    )
    p.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=1,
        help="torch CPU threads for training (default 1: on a busy machine more threads can be much slower)",
    )
    p.add_argument(
        "--eval-workers",
        type=_int_at_least(1),
        help="CPU threads scoring user blocks in evaluation (default: the cores this process may use)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument(
        "--shared-output",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="MetaBalance methods: step(losses, shared_output=h), towers backpropagated once and one batched walk "
        "of the shared bottom instead of one full backward per task (the same gradients; 1.2x instead of "
        "1.6x a Vanilla-Multi step on the paper network on CPU, bench/RESULTS.md); --no-shared-output for the plain "
        "step(losses) (default: on)",
    )
    p.add_argument(
        "--trace",
        help="record per-task gradient norms (Vanilla-Multi and MetaBalance-C, first seed) into this JSON "
        "file; plot with scripts/plot_gradients.py",
    )
    p.add_argument("--trace-every", type=_int_at_least(1), default=10, help="steps between trace records (default 10)")
    p.add_argument("--out", help="write all runs, the grid and the table as JSON here")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; every error is reported by argparse before anything is loaded."""
    p = build_parser()
    args = p.parse_args(argv)
    dupes = sorted({m for m in args.methods if args.methods.count(m) > 1})
    if dupes:
        p.error(f"argument --methods: listed more than once: {' '.join(dupes)}")
    grids = dict(args.grid)
    if len(grids) != len(args.grid):
        p.error("argument --grid: a method is given more than once")
    unused = sorted(set(grids) - set(args.methods))
    if unused:
        p.error(f"argument --grid: {' '.join(unused)} not in --methods")
    args.grid = grids
    if args.relax_grid is not None and not any(m.startswith("mb-") for m in args.methods):
        p.error("argument --relax-grid: no MetaBalance method (mb-A/mb-B/mb-C) in --methods")
    if args.trace and not {"vanilla", "mb-C"} & set(args.methods):
        p.error("argument --trace: traces Vanilla-Multi and MetaBalance-C; add vanilla or mb-C to --methods")
    if args.data and not Path(args.data).exists():
        p.error(f"argument --data: {args.data} does not exist")
    if args.relax_grid is not None and len(set(args.relax_grid)) != len(args.relax_grid):
        p.error("argument --relax-grid: a value is listed more than once")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        p.error(f"argument --device: expected cpu or cuda[:N], got {args.device!r}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error(f"argument --device: {args.device} requested but torch sees no CUDA device")
    defaults = REAL_DEFAULTS if args.data else SYNTHETIC_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for m in args.methods:
        info = METHODS[m]
        if info.hyper is not None and not m.startswith("mb-") and m not in args.grid:
            args.grid[m] = list(info.real_grid if args.data else info.synthetic_grid)
    return args


# ---- output -------------------------------------------------------------------------------------------------------
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


def _fmt_p(p: float) -> str:
    if p != p:
        return "–"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.0e}"


def format_table(rows: list[dict]) -> str:
    """Markdown table: test metrics mean ± std, paired tests of NDCG@10 vs the references, best epochs, time."""
    head = [
        "method",
        *[c.replace("precision", "P").replace("recall", "R").replace("ndcg", "NDCG") for c in METRIC_COLUMNS],
        *[f"ΔNDCG@10 vs {ref} (p t / W)" for ref in REFERENCES],
        "epochs",
        "time/run",
    ]
    lines = []
    for row in rows:
        cells = [row["label"]]
        for c in METRIC_COLUMNS:
            mean, std = row["test"][c]
            cells.append(f"{mean:.4f} ± {std:.4f}")
        for ref in REFERENCES:
            cmp = row.get("paired", {}).get(ref)
            if cmp is None:
                cells.append("–")
            else:
                cells.append(f"{cmp['diff_mean']:+.4f} ({_fmt_p(cmp['p_t'])} / {_fmt_p(cmp['p_wilcoxon'])})")
        cells += [row["epochs"], row["time"]]
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(head), sep, *(fmt(cells) for cells in lines)])


def paired_comparison(runs: dict[str, list], method: str, ref: str, metric: str = "ndcg@10") -> dict | None:
    """Paired (by seed) tests of ``method`` minus ``ref`` on the test ``metric``; None when not comparable."""
    from .stats import paired_t, wilcoxon_exact

    if method == ref or ref not in runs or method == "mostpop" or ref == "mostpop":
        return None
    mine = {r.config.seed: r.test[metric] for r in runs[method]}
    theirs = {r.config.seed: r.test[metric] for r in runs[ref]}
    seeds = sorted(set(mine) & set(theirs))
    if len(seeds) < 2:
        return None
    a, b = [mine[s] for s in seeds], [theirs[s] for s in seeds]
    t, p_t = paired_t(a, b)
    w, p_w = wilcoxon_exact(a, b)
    diffs = [x - y for x, y in zip(a, b)]
    return {
        "seeds": seeds,
        "diff_mean": sum(diffs) / len(diffs),
        "wins": sum(d > 0 for d in diffs),
        "t": t,
        "p_t": p_t,
        "wilcoxon_w_plus": w,
        "p_wilcoxon": p_w,
    }


# ---- the job --------------------------------------------------------------------------------------------------------
def _config(args: argparse.Namespace, method: str, seed: int, value: float | None = None, trace: bool = False):
    from .train import TrainConfig

    info = METHODS[method]
    cfg = TrainConfig(
        method=info.kind,
        strategy=info.strategy,
        beta=args.beta,
        seed=seed,
        epochs=args.epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        lr=args.lr,
        neg_ratio=args.neg_ratio,
        mask=args.mask,
        trace_every=args.trace_every if trace else 0,
        device=args.device,
        shared_output=args.shared_output,
        eval_workers=args.eval_workers,
    )
    if info.hyper is not None and value is not None:
        setattr(cfg, info.hyper, value)
    return cfg


def _grid(args: argparse.Namespace, method: str) -> list[float]:
    if method.startswith("mb-"):
        return list(args.relax_grid)
    return list(args.grid.get(method, []))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Heavy imports only now: --help and argument errors stay instant.
    import json
    import platform

    import numpy as np
    import torch

    from . import data as data_mod
    from .train import evaluate_test, fixed_users, summarize, train

    torch.set_num_threads(max(1, args.threads))
    progress = _progress(args.quiet)
    t_start = time.perf_counter()
    data = data_mod.load(args.data) if args.data else data_mod.synthetic()
    if args.max_users:
        data = data_mod.subsample_users(data, args.max_users)
    print(data.summary(), flush=True)
    for note in data.notes:
        print(f"  {note}", flush=True)
    val_users = fixed_users(data, "valid", args.val_users)
    test_users = fixed_users(data, "test", args.test_users)
    select_seed = args.first_seed if args.select_seed is None else args.select_seed
    grids_text = "; ".join(f"{m} {_grid(args, m)}" for m in args.methods if len(_grid(args, m)) > 1)
    print(
        f"methods {' '.join(args.methods)}; grids {grids_text or 'none'} (selection seed {select_seed}); seeds "
        f"{args.seeds} from {args.first_seed}; epochs <= {args.epochs} (patience {args.patience}); batch "
        f"{args.batch_size}; mask {args.mask}; val users {len(val_users) if val_users is not None else 'all'}; "
        f"test users {len(test_users) if test_users is not None else 'all'}; device {args.device}; threads "
        f"{torch.get_num_threads()}",
        flush=True,
    )

    def run(method: str, seed: int, value: float | None, trace: bool = False):
        return train(data, _config(args, method, seed, value, trace), progress, val_users)

    runs: dict[str, list] = {}
    grid: dict[str, dict[str, float]] = {}
    traces = {}
    chosen: dict[str, float | None] = {}

    def payload(rows: list[dict] | None = None) -> dict:
        return {
            "data": data.summary(),
            "notes": data.notes,
            "args": vars(args),
            "command": " ".join(sys.argv),
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor(),
                "cpus": len(os.sched_getaffinity(0)),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            },
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "elapsed_s": time.perf_counter() - t_start,
            "chosen": chosen,
            "grid": grid,
            "table": rows,
            "runs": {m: [r.to_json() for r in rs if r.test is not None] for m, rs in runs.items()},
        }

    def checkpoint() -> None:
        """Partial results after every tested run, so an interrupted job still leaves what it finished."""
        if args.out:
            Path(args.out).write_text(json.dumps(payload(), indent=1, default=float))
        if args.trace and traces:
            Path(args.trace).write_text(json.dumps(traces))

    # Phase 1: each hyperparameter grid on validation with the selection seed.
    for method in args.methods:
        values = _grid(args, method)
        if len(values) <= 1:
            chosen[method] = values[0] if values else None
            continue
        candidates = {}
        for v in values:
            trace = bool(args.trace) and method == "mb-C" and select_seed == args.first_seed
            result = run(method, select_seed, v, trace)
            candidates[v] = result
            print(f"grid {result.config.label}: val NDCG@10 {result.valid['ndcg@10']:.4f}", flush=True)
        best = max(candidates, key=lambda v: candidates[v].valid["ndcg@10"])
        chosen[method] = best
        grid[method] = {str(v): res.valid["ndcg@10"] for v, res in candidates.items()}
        if select_seed == args.first_seed:
            runs[method] = [candidates[best]]
        print(f"chosen {candidates[best].config.label}", flush=True)
    # Phase 2: every chosen configuration over the seeds, tested.
    for method in args.methods:
        if method == "mostpop":
            runs[method] = [run(method, 0, None)]
            evaluate_test(runs[method][0], data, test_users)
            checkpoint()
            continue
        done = runs.setdefault(method, [])
        for k, seed in enumerate(range(args.first_seed, args.first_seed + args.seeds)):
            if k < len(done):
                result = done[k]
            else:
                trace = bool(args.trace) and k == 0 and method in ("vanilla", "mb-C")
                result = run(method, seed, chosen.get(method), trace)
                done.append(result)
            evaluate_test(result, data, test_users)
            if result.trace is not None:
                traces[result.config.label] = result.trace
            checkpoint()
            print(
                f"done {result.config.label} seed {seed}: best epoch {result.best_epoch}, val NDCG@10 "
                f"{result.valid['ndcg@10']:.4f} (se {result.valid.get('ndcg@10_se', 0):.4f}), test NDCG@10 "
                f"{result.test['ndcg@10']:.4f} R@10 {result.test['recall@10']:.4f} ({result.train_seconds:.0f}s)",
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
                "test_per_seed": {str(r.config.seed): r.test for r in rs},
                "paired": {ref: cmp for ref in REFERENCES if (cmp := paired_comparison(runs, method, ref))},
                "epochs": "/".join(str(r.best_epoch) for r in rs),
                "time": f"{np.mean([r.train_seconds for r in rs]):.0f}s",
            }
        )
    elapsed = time.perf_counter() - t_start
    se = [r.valid.get("ndcg@10_se") for rs in runs.values() for r in rs if r.valid.get("ndcg@10_se")]
    print(
        f"\nTest metrics on {data.name} (target '{data.target}'), mean ± std over {args.seeds} seed(s); "
        f"ΔNDCG@10 = paired mean difference (p: paired t-test / exact Wilcoxon, two-sided, over seeds); "
        f"epochs = best epoch per seed; validation NDCG@10 standard error ~{np.median(se) if se else 0:.4f}; "
        f"total {elapsed:.0f}s",
        flush=True,
    )
    print(format_table(rows), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(payload(rows), indent=1, default=float))
        print(f"wrote {args.out}")
    if args.trace:
        Path(args.trace).write_text(json.dumps(traces))
        print(f"wrote gradient trace {args.trace} ({', '.join(traces)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
