"""Summarise pytest-benchmark JSON from bench/ into ratio tables (plain text, or Markdown for RESULTS.md).

    python bench/summarize.py bench/results/cpu-*.json [--launches launches.json] [--markdown]

Times are medians. Kernel level: ``fused ×orig`` and ``fused ×ref`` are the speed-ups of the fastest fused
backend over the original-style loop and over the pure-torch reference; GB/s counts 2·T·N·itemsize reads +
N·itemsize writes (over the CUDA-event time per call on CUDA, else the host median); ``% copy`` is that
over the copy bandwidth measured right after the same row (else the run's copy yardstick). End to end:
``fused / vanilla`` is MetaBalance(fused=None)'s step time over Vanilla-Multi's, ``orig / fused`` the
original-style step time over MetaBalance(fused=None)'s. The targets
(bench/RESULTS.md) are checked last.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

FUSED = ("cpu", "cuda", "triton")
KERNEL_COLUMNS = ("original-style", "reference", "cpu", "cuda", "triton", "torch-rechub", "rechub-handover")


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _x(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


class Table:
    def __init__(self, title: str, header: list[str]):
        self.title, self.header, self.rows = title, header, []

    def add(self, row: list) -> None:
        self.rows.append([str(c) for c in row])

    def render(self, markdown: bool) -> str:
        if not self.rows:
            return ""
        if markdown:
            lines = [f"**{self.title}**", "", "| " + " | ".join(self.header) + " |"]
            lines.append("|" + "|".join("---" for _ in self.header) + "|")
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in self.rows]
            return "\n".join(lines) + "\n"
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) for i, h in enumerate(self.header)]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        lines = [self.title, fmt.format(*self.header)] + [fmt.format(*r) for r in self.rows]
        return "\n".join(lines) + "\n"


STAT = "median"  # or "min" (--stat): on a machine shared with other work the minimum is the steadier estimate


def load(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    benchmarks, machines = [], []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:  # a run killed or failed before pytest-benchmark wrote it
            print(f"summarize: skipping {path}: {err}")
            continue
        machines.append({"file": str(path), "datetime": data.get("datetime"), **data.get("machine_info", {})})
        for bench in data.get("benchmarks", []):
            stats = bench.get("stats") or {}
            benchmarks.append({**bench.get("extra_info", {}), "median": stats.get(STAT), "rounds": stats.get("rounds")})
    return benchmarks, machines


def machine_lines(machines: list[dict]) -> list[str]:
    lines = []
    for m in machines:
        info = m.get("mb_kernels", {})
        parts = [
            f"{m.get('datetime', '?')}",
            f"CPU {info.get('cpu_model', '?')} ({info.get('cpu_count', '?')} cores, torch threads "
            f"{info.get('torch_threads', '?')})",
            f"torch {info.get('torch', '?')}",
            f"triton {info.get('triton', '?')}",
        ]
        if info.get("gpu"):
            parts.append(f"GPU {info['gpu']} ({info.get('gpu_memory_gib')} GiB, CUDA {info.get('cuda')})")
        load = info.get("load_average")
        if load:
            parts.append("load " + " ".join(f"{x:.2f}" for x in load))
        parts.append(f"backends {info.get('backends', '?')}")
        parts.append(f"torch-rechub {info.get('torch_rechub', '?')}")
        if info.get("quick"):
            parts.append("QUICK MODE (tiny shapes, one call each: not a measurement)")
        parts.append(f"git {info.get('git', '?')}")
        lines.append(f"{Path(m['file']).name}: " + "; ".join(parts))
    return lines


def bandwidth_seconds(b: dict) -> float:
    """CUDA-event time per call where measured (no host synchronise per call), else the host median."""
    return b.get("device_time_s") or b["median"]


def copy_bandwidth(benchmarks: list[dict]) -> dict[str, float]:
    out = {}
    for b in benchmarks:
        if b.get("kind") == "copy" and b.get("median"):
            out[b["device"]] = b["bytes"] / bandwidth_seconds(b) / 1e9
    return out


def kernel_tables(benchmarks: list[dict], copy_gbps: dict[str, float]) -> tuple[list[Table], dict]:
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for b in benchmarks:
        if b.get("kind") == "kernel" and b.get("median"):
            groups[(b["device"], b["dtype"], b["shape"], b["tasks"])][b["backend"]] = b
    by_table: dict[tuple, list] = defaultdict(list)
    for key in groups:
        by_table[key[:2]].append(key)
    shape_order = {"many-small": 0, "recsys": 1, "large": 2}
    tables, derived = [], {}
    for (device, dtype), keys in sorted(by_table.items()):
        present = [c for c in KERNEL_COLUMNS if any(c in groups[k] for k in keys)]
        header = ["shape", "T", "N", *[f"{c} ms" for c in present]]
        header += ["fused", "fused ×orig", "fused ×ref", "fused GB/s", "% copy"]
        table = Table(f"Kernel level, {device} {dtype} ({STAT} ms per balancing step)", header)
        for key in sorted(keys, key=lambda k: (shape_order.get(k[2], 9), k[3])):
            rows = groups[key]
            any_row = next(iter(rows.values()))
            fused = {n: rows[n]["median"] for n in FUSED if n in rows}
            best = min(fused, key=fused.get) if fused else None
            orig = rows.get("original-style", {}).get("median")
            ref = rows.get("reference", {}).get("median")
            metrics = {}
            for name, seconds in fused.items():
                gbps = rows[name]["bytes"] / bandwidth_seconds(rows[name]) / 1e9
                # The copy measured right after this row when there is one, else the run's copy yardstick.
                yardstick = rows[name].get("copy_gbps_adjacent") or copy_gbps.get(device)
                metrics[name] = {
                    "fused": name,
                    "vs_orig": orig / seconds if orig else None,
                    "vs_ref": ref / seconds if ref else None,
                    "gbps": gbps,
                    "pct_copy": 100 * gbps / yardstick if yardstick else None,
                }
            empty = {"fused": None, "vs_orig": None, "vs_ref": None, "gbps": None, "pct_copy": None}
            entry = metrics[best] if best else empty
            derived[key] = {"best": entry, **metrics}
            gbps, pct = entry["gbps"], entry["pct_copy"]
            table.add(
                [
                    key[2],
                    key[3],
                    f"{any_row['numel']:,}",
                    *[_ms(rows.get(c, {}).get("median")) for c in present],
                    best or "none yet",
                    _x(entry["vs_orig"]),
                    _x(entry["vs_ref"]),
                    _x(gbps),
                    _x(pct),
                ]
            )
        tables.append(table)
    return tables, derived


def rechub_table(benchmarks: list[dict]) -> Table:
    table = Table(
        "Torch-RecHub MetaBalance vs ours on the same inputs (its 1e-5 in the denominator; rescaled target)",
        ["where", "device", "case", "rel L2 diff", "max abs diff / max abs ours", "worst tensor rel L2"],
    )
    for b in benchmarks:
        diff = b.get("rechub_vs_ours")
        if not diff:
            continue
        if b.get("kind") == "kernel":
            case = f"{b['shape']} T={b['tasks']} (synthetic N(0,1)·10^U(-2,0) grads)"
            where = "kernel"
        else:
            case = f"batch {b['batch']}, 3 steps, real model gradients"
            where = "e2e"
        worst = diff.get("worst_param_rel_l2")
        shape = diff.get("worst_param_shape")
        table.add(
            [
                where,
                b["device"],
                case,
                f"{diff['rel_l2']:.2e}",
                f"{diff['max_abs_over_max']:.2e}",
                f"{worst:.2e} {shape}" if worst is not None else "-",
            ]
        )
    return table


E2E_ORDER = ["vanilla", "original-style", "torch-rechub", "fused=None", "fused=None+shared_output"]


def e2e_tables(benchmarks: list[dict]) -> tuple[list[Table], dict]:
    """Tables of the separate rows and of the interleaved runs (both judged against the targets: alternating
    evens out drift in the machine's load but shares the caches between six models)."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    models: dict[str, str] = {}
    for b in benchmarks:
        if b.get("kind") == "e2e" and b.get("median"):
            groups[(b["device"], "separate", b["batch"])][b["variant"]] = b
            models[b["device"]] = b.get("model", "?")
        elif b.get("kind") == "e2e-interleaved" and b.get("interleaved"):
            stat = "min" if STAT == "min" else "median"
            for variant, row in b["interleaved"].items():
                groups[(b["device"], "interleaved", b["batch"])][variant] = {**row, "median": row[stat]}
            models[b["device"]] = b.get("model", "?")
    tables, derived = [], {}
    titles = {
        "separate": "one training step incl. Adam, each variant its own benchmark row",
        "interleaved": "the same steps run in alternation (one of each per round)",
    }
    for device, source in sorted({k[:2] for k in groups}, key=lambda k: (k[0], k[1] != "interleaved")):
        keys = sorted(k for k in groups if k[:2] == (device, source))
        seen = {v for k in keys for v in groups[k]}
        variants = [v for v in E2E_ORDER if v in seen] + sorted(seen - set(E2E_ORDER))
        header = [
            "batch",
            *[f"{v} ms" for v in variants],
            "fused=None uses",
            "fused / vanilla",
            "orig / fused",
            "shared_output / vanilla",
        ]
        table = Table(f"End to end, {device}: {titles[source]} ({STAT} ms); model {models[device]}", header)
        for key in keys:
            rows = groups[key]
            vanilla = rows.get("vanilla", {}).get("median")
            orig = rows.get("original-style", {}).get("median")
            fused_row = rows.get("fused=None", {})
            fused = fused_row.get("median")
            through = rows.get("fused=None+shared_output", {}).get("median")
            entry = {
                "backend": fused_row.get("backend"),
                "source": source,
                "over_vanilla": fused / vanilla if fused and vanilla else None,
                "orig_over_fused": orig / fused if fused and orig else None,
            }
            derived[(device, key[2], source)] = entry
            table.add(
                [
                    key[2],
                    *[_ms(rows.get(v, {}).get("median")) for v in variants],
                    entry["backend"] or "-",
                    _x(entry["over_vanilla"]),
                    _x(entry["orig_over_fused"]),
                    _x(through / vanilla if through and vanilla else None),
                ]
            )
        tables.append(table)
    return tables, derived


def launches_table(path: Path | None) -> tuple[Table, list]:
    table = Table(
        "Device work per balancing call (torch.profiler; one group)", ["backend", "case", "kernels", "memset/memcpy"]
    )
    checks = []
    try:
        rows = json.loads(path.read_text()) if path is not None else []
    except (OSError, ValueError):
        rows = []
    for row in rows:
        table.add([row["backend"], row["case"], row["kernels"], row["memsets"] + row["memcpys"]])
        checks.append(
            (
                f"{row['backend']} on cuda: ≤ 2 kernel launches per group ({row['case']})",
                row["kernels"] <= 2,
                f"{row['kernels']} kernels + {row['memsets'] + row['memcpys']} memset/memcpy",
            )
        )
    return table, checks


def targets(kernel: dict, e2e: dict, launch_checks: list) -> Table:
    table = Table("Targets", ["target", "measured", "verdict"])
    checks = []

    def kernel_check(device, shape, tasks, backend, label, field, threshold, unit):
        found = [v for k, v in kernel.items() if k[0] == device and k[2] == shape and k[3] == tasks]
        if not found:
            return  # not measured in these files (another device, or quick mode's shapes)
        entry = found[0].get(backend)
        if entry is None:
            checks.append((label, None, f"backend {backend} was not available"))
            return
        value = entry[field]
        verdict = None if threshold is None else value is not None and value >= threshold
        checks.append((label, verdict, f"{_x(value)}{unit} ({entry['fused']})"))

    kernel_check("cpu", "many-small", 4, "cpu", "cpu op ≥ 20× original-style, 512×4096, T=4", "vs_orig", 20, "×")
    kernel_check("cpu", "large", 4, "cpu", "cpu op ≥ 60% of copy bandwidth, 16×4M, T=4", "pct_copy", 60, "%")
    kernel_check("cuda", "many-small", 4, "triton", "triton ≥ 50× original-style, 512×4096, T=4", "vs_orig", 50, "×")
    kernel_check("cuda", "large", 4, "triton", "triton ≥ 85% of copy bandwidth, 16×4M, T=4", "pct_copy", 85, "%")
    # The CUDA C++ op has no kernel-level target of its own: its figures for reference.
    kernel_check("cuda", "many-small", 4, "cuda", "cuda op vs original-style, 512×4096, T=4", "vs_orig", None, "×")
    kernel_check("cuda", "large", 4, "cuda", "cuda op % of copy bandwidth, 16×4M, T=4", "pct_copy", None, "%")
    for (device, batch, _), entry in sorted(e2e.items()):
        ratio, speedup = entry["over_vanilla"], entry["orig_over_fused"]
        checks.append(
            (
                f"e2e {device} batch {batch} ({entry['source']}): fused ≤ 1.3× Vanilla-Multi",
                ratio is not None and ratio <= 1.3,
                f"{_x(ratio)}× ({entry['backend']})",
            )
        )
        checks.append(
            (
                f"e2e {device} batch {batch} ({entry['source']}): fused ≥ 2.5× faster than original-style",
                speedup is not None and speedup >= 2.5,
                f"{_x(speedup)}×",
            )
        )
    checks += launch_checks
    for label, ok, measured in checks:
        table.add([label, measured, "n/a" if ok is None else ("PASS" if ok else "MISSED")])
    return table


def tables_table(benchmarks: list[dict]) -> Table:
    """The large-table runs (bench/test_bench_tables.py): medians of the interleaved steps and the ratios that
    matter (MetaBalance over the Vanilla-Multi step with the same kind of embedding gradients)."""
    runs = [b for b in benchmarks if b.get("kind") == "tables-interleaved" and b.get("interleaved")]
    # The variants as the suite ran them (bench/test_bench_tables.py VARIANTS, in its order).
    variants = list(dict.fromkeys(v for b in runs for v in b["interleaved"]))
    header = ["model", "device", "rows", "batch", *[f"{v} ms" for v in variants]]
    header += ["mb / vanilla", "shared_output / vanilla", "mb-sparse / vanilla-sparse"]
    header += ["sparse+shared / vanilla-sparse", "original-style / shared_output"]
    table = Table("Large tables, interleaved rounds (median ms per training step incl. the optimizers)", header)
    for b in runs:
        ms = {v: b["interleaved"].get(v, {}).get("min" if STAT == "min" else "median") for v in variants}

        def ratio(num: str, den: str, ms: dict = ms) -> str:
            return _x(ms[num] / ms[den]) if ms.get(num) and ms.get(den) else "-"

        table.add(
            [
                b.get("model", "ncf"),
                b["device"],
                f"{b['rows']:,}",
                b["batch"],
                *[_ms(ms[v]) for v in variants],
                ratio("mb", "vanilla"),
                ratio("mb+shared_output", "vanilla"),
                ratio("mb-sparse", "vanilla-sparse"),
                ratio("mb-sparse+shared_output", "vanilla-sparse"),
                ratio("original-style", "mb+shared_output"),
            ]
        )
    return table


def bottom_table(benchmarks: list[dict]) -> Table:
    """The shared bottom's two ways (bench/test_bench_tables.py ``test_shared_bottom_ways_interleaved``): a
    ``shared_output`` step with the bottom batched or per task, against Vanilla-Multi with the same tables."""
    runs = [b for b in benchmarks if b.get("kind") == "bottom-interleaved" and b.get("interleaved")]
    header = ["tables", "device", "rows", "batch", "vanilla ms", "batched ms", "per_task ms"]
    header += ["batched / vanilla", "per_task / vanilla", "per_task / batched"]
    table = Table("shared_output's bottom: batched vs per task, interleaved rounds (median ms per step)", header)
    for b in runs:
        ms = {v: b["interleaved"].get(v, {}).get("min" if STAT == "min" else "median") for v in b["interleaved"]}

        def ratio(num: str, den: str, ms: dict = ms) -> str:
            return _x(ms[num] / ms[den]) if ms.get(num) and ms.get(den) else "-"

        table.add(
            [b["tables"], b["device"], f"{b['rows']:,}", b["batch"]]
            + [_ms(ms.get(v)) for v in ("vanilla", "batched", "per_task")]
            + [ratio("batched", "vanilla"), ratio("per_task", "vanilla"), ratio("per_task", "batched")]
        )
    return table


def summarize(paths: list[Path], launches: Path | None = None, markdown: bool = False) -> str:
    benchmarks, machines = load(paths)
    out = []
    lines = machine_lines(machines)
    out.append("\n".join(f"- {line}" for line in lines) + "\n" if markdown else "\n".join(lines) + "\n")
    copy = copy_bandwidth(benchmarks)
    copy_table = Table("Copy yardstick (dst.copy_(src), float32; bytes = read + write)", ["device", "numel", "GB/s"])
    for b in benchmarks:
        if b.get("kind") == "copy" and b.get("median"):
            copy_table.add([b["device"], f"{b['numel']:,}", _x(copy[b["device"]])])
    out.append(copy_table.render(markdown))
    kernel_list, kernel = kernel_tables(benchmarks, copy)
    out += [t.render(markdown) for t in kernel_list]
    out.append(rechub_table(benchmarks).render(markdown))
    e2e_list, e2e = e2e_tables(benchmarks)
    out += [t.render(markdown) for t in e2e_list]
    out.append(tables_table(benchmarks).render(markdown))
    out.append(bottom_table(benchmarks).render(markdown))
    launch_table, launch_checks = launches_table(launches)
    out.append(launch_table.render(markdown))
    if any(m.get("mb_kernels", {}).get("quick") for m in machines):
        out.append("Targets: not judged (quick mode: tiny shapes, one untimed-quality call each)\n")
    else:
        out.append(targets(kernel, e2e, launch_checks).render(markdown))
    return "\n".join(part for part in out if part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("--launches", type=Path, help="JSON written by bench/count_launches.py")
    parser.add_argument("--markdown", action="store_true", help="Markdown tables (for bench/RESULTS.md)")
    parser.add_argument("--stat", choices=("median", "min"), default="median", help="which statistic (default median)")
    args = parser.parse_args()
    global STAT
    STAT = args.stat
    print(summarize([p for p in args.json if p.is_file()], args.launches, args.markdown))


if __name__ == "__main__":
    main()
