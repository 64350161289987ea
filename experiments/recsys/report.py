"""Merge the JSON outputs (``--out``) of several runs of the experiment into one table with paired tests.

    python -m experiments.recsys.report part1.json part2.json [--markdown out.md]

Useful when the methods of one comparison ran in separate processes (same data, same seeds): runs are grouped
by method, paired by seed, and tested against Vanilla-Multi and MetaBalance-C as in the CLI's own table.
Partial files (a job cut short) contribute the runs they finished.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .__main__ import METRIC_COLUMNS, REFERENCES, format_table, paired_comparison
from .methods import METHODS


def load_runs(paths: list[str]) -> tuple[dict[str, list[SimpleNamespace]], list[dict]]:
    """``{method: [run]}`` (runs with a test result; each has ``.config.seed``, ``.test``, ``.label`` ...)."""
    runs: dict[str, list[SimpleNamespace]] = {}
    payloads = []
    for path in paths:
        payload = json.loads(Path(path).read_text())
        payloads.append(payload)
        for method, items in payload["runs"].items():
            for item in items:
                if not item.get("test"):
                    continue
                cfg = item["config"]
                runs.setdefault(method, []).append(
                    SimpleNamespace(
                        config=SimpleNamespace(seed=cfg["seed"], label=item["label"]),
                        test=item["test"],
                        valid=item["valid"],
                        best_epoch=item["best_epoch"],
                        train_seconds=item["train_seconds"],
                        history=item["history"],
                    )
                )
    for rs in runs.values():
        rs.sort(key=lambda r: r.config.seed)
    return runs, payloads


def table_rows(runs: dict[str, list[SimpleNamespace]], order: list[str] | None = None) -> list[dict]:
    rows = []
    for method in order or list(runs):
        rs = runs.get(method)
        if not rs:
            continue
        test = {}
        for c in (*METRIC_COLUMNS, "ndcg@10_se"):
            values = np.array([r.test[c] for r in rs if c in r.test])
            if len(values):
                test[c] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
        rows.append(
            {
                "method": method,
                "label": rs[0].config.label,
                "seeds": [r.config.seed for r in rs],
                "test": test,
                "test_ndcg10_per_seed": [r.test["ndcg@10"] for r in rs],
                "paired": {ref: cmp for ref in REFERENCES if (cmp := paired_comparison(runs, method, ref))},
                "epochs": "/".join(str(r.best_epoch) for r in rs),
                "time": f"{np.mean([r.train_seconds for r in rs]):.0f}s",
            }
        )
    return rows


def scipy_check(runs: dict[str, list[SimpleNamespace]]) -> None:
    """Our p-values next to scipy's (ttest_rel; wilcoxon exact), as an independent check of ``stats``."""
    try:
        from scipy import stats as ss
    except ImportError:
        print("scipy not installed: no cross-check")
        return
    for ref in REFERENCES:
        for method in runs:
            cmp = paired_comparison(runs, method, ref)
            if cmp is None:
                continue
            a = [next(r.test["ndcg@10"] for r in runs[method] if r.config.seed == s) for s in cmp["seeds"]]
            b = [next(r.test["ndcg@10"] for r in runs[ref] if r.config.seed == s) for s in cmp["seeds"]]
            p_t = ss.ttest_rel(a, b).pvalue
            try:
                p_w = ss.wilcoxon(a, b, method="exact").pvalue
            except ValueError as err:
                p_w = f"n/a ({err})"
            print(f"{method} vs {ref}: ours t {cmp['p_t']:.6f} W {cmp['p_wilcoxon']:.6f} | scipy t {p_t:.6f} W {p_w}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.recsys.report", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="--out JSON files of the experiment")
    p.add_argument("--json", help="write the merged table here")
    p.add_argument(
        "--scipy-check", action="store_true", help="also print scipy's p-values for the same pairs (if installed)"
    )
    args = p.parse_args(argv)
    runs, payloads = load_runs(args.files)
    listed = {m for payload in payloads for m in payload["args"]["methods"]}
    order = [m for m in METHODS if m in listed]  # the registry's order, whatever the order of the files
    rows = table_rows(runs, order)
    print(f"{payloads[0]['data']}\n")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.scipy_check:
        scipy_check(runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
