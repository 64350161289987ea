"""Shared pieces of the benchmark suites: settings, shapes, inputs, the baselines and the timing helper.

Settings come from the environment so that the same suites serve the CPU run, the GPU check and CI's smoke:

* ``BENCH_QUICK=1``: every benchmark once, on tiny shapes (CI smoke; checks that the suites still run).
* ``BENCH_DEVICES``: comma-separated device types (default: ``cpu``, plus ``cuda`` when present).
* ``BENCH_DTYPES``: comma-separated gradient dtypes for the kernel level (default ``float32``).
* ``BENCH_BUDGET_S``: seconds of timed calls aimed at per benchmark (default 1.5 on CPU, 0.3 on CUDA).
* ``BENCH_THREADS``: torch's intra-op threads (bench/conftest.py). On a machine shared with other work,
  more threads than idle cores makes every parallel region wait for a descheduled thread: seen here, a
  training step took 85 ms on 1 thread and 1,280 ms on 2 while other processes kept both cores busy.

Byte accounting (kernel level): a two-phase balancing step must read every task's gradient twice (once for
the norms, once for the combination: the norms are needed before any output element can be written) and
write the combined gradient once, so ``bytes = 2·T·N·itemsize (reads) + N·itemsize (writes)``; the EMA and
offsets (P·T and P + 1 values) are negligible and not counted. GB/s = bytes / median time. The copy
yardstick counts ``2·numel·itemsize`` (read + write) for ``dst.copy_(src)``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

QUICK = os.environ.get("BENCH_QUICK", "0") not in ("", "0")
BYTES_FORMULA = "2*T*N*itemsize reads + N*itemsize writes"
COPY_FORMULA = "2*numel*itemsize (read + write)"
RELAX_FACTOR, BETA, STRATEGY = 0.7, 0.9, "C"
FUSED_BACKENDS = ("cpu", "cuda", "triton")
# Inputs smaller than this are replicated into several sets that the timed calls rotate through, so that
# repeated calls do not run out of the cache (the GPU's 50-60 MB L2, the CPU's 32 MB L3).
ROTATE_BYTES = 256 * 2**20
MAX_INPUT_SETS = 8


def devices() -> list[str]:
    env = os.environ.get("BENCH_DEVICES")
    if env:
        wanted = [d.strip() for d in env.split(",") if d.strip()]
        return [d for d in wanted if d != "cuda" or torch.cuda.is_available()]
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def dtypes() -> list[torch.dtype]:
    names = os.environ.get("BENCH_DTYPES", "float32").split(",")
    return [getattr(torch, n.strip()) for n in names if n.strip()]


def budget_s(device: str) -> float:
    env = os.environ.get("BENCH_BUDGET_S")
    if env:
        return float(env)
    return 0.3 if device == "cuda" else 1.5


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- shapes ---------------------------------------------------------------------------------------------
def kernel_shapes() -> dict[str, list[int]]:
    """Name -> sizes of the balanced tensors of one bucket."""
    if QUICK:
        return {"many-small": [64] * 8, "recsys": recsys_shared_sizes(), "large": [4096] * 2}
    return {"many-small": [4096] * 512, "recsys": recsys_shared_sizes(), "large": [4 * 2**20] * 16}


def task_counts() -> list[int]:
    return [2, 4, 8]


def copy_numel() -> int:
    return 2**20 if QUICK else 64 * 2**20


def recsys_shared_sizes() -> list[int]:
    """Sizes of the paper network's shared parameters (the model the end-to-end benchmark trains)."""
    from bench.recsys import build_model  # local import: the model module is heavier than this one

    model, _ = build_model("cpu", quick=QUICK, materialize=False)
    return [p.numel() for p in model.shared_parameters()]


# ---- inputs ---------------------------------------------------------------------------------------------
def random_task_grads(sizes: list[int], num_tasks: int, dtype: torch.dtype, device: str, seed: int = 0):
    """[T, N] gradients, never zeros: N(0, 1) scaled per task by 10^U(-2, 0) so that the weights differ."""
    gen = torch.Generator(device=device).manual_seed(seed)
    grads = torch.randn(num_tasks, sum(sizes), dtype=torch.float32, device=device, generator=gen)
    scales = 10.0 ** (torch.rand(num_tasks, 1, device=device, generator=gen) * 2 - 2)
    grads.mul_(scales)
    return grads.to(dtype)


def num_input_sets(set_bytes: int) -> int:
    if QUICK or set_bytes >= ROTATE_BYTES:
        return 1
    return min(MAX_INPUT_SETS, math.ceil(ROTATE_BYTES / max(set_bytes, 1)))


def kernel_bytes(num_tasks: int, numel: int, itemsize: int) -> int:
    return 2 * num_tasks * numel * itemsize + numel * itemsize


# ---- the original-style baseline ----------------------------------------------------------------------
def original_style_step(
    grads: list[list[torch.Tensor]],
    norms: list[list[torch.Tensor]],
    outs: list[torch.Tensor],
    relax_factor: float,
    beta: float,
    strategy: str,
) -> None:
    """How the original MetaBalance computes, on our semantics: Python loops, one small torch op at a time.

    ``grads[p][t]`` is task t's gradient of tensor p, ``norms[p][t]`` a 0-dim float32 (float64 for float64
    gradients) tensor holding the moving average (updated, as the original keeps ``gp.norms``), ``outs[p]``
    receives G_p. Per tensor and task: a norm, the EMA, the weight, scale and add — the original's steps
    (paper Algorithm 2), minus its 1e-5 in the denominator, plus docs/design.md §1's m_t == 0 guard and strategies.
    Device-side conditions (torch.where), no ``.item()``: it is not slowed by host synchronisation either.
    """
    for task_grads, ema, out in zip(grads, norms, outs):
        for t, g in enumerate(task_grads):
            norm = torch.linalg.vector_norm(g, dtype=ema[t].dtype)
            ema[t] = torch.where(torch.isfinite(norm), ema[t] * beta + norm * (1.0 - beta), ema[t])
        total = task_grads[0].clone()
        m0 = ema[0]
        for t in range(1, len(task_grads)):
            mt = ema[t]
            if strategy == "A":
                rescale = (mt > m0) & (mt != 0)
            elif strategy == "B":
                rescale = (mt < m0) & (mt != 0)
            else:
                rescale = mt != 0
            weight = torch.where(rescale, m0 / torch.where(mt != 0, mt, 1.0) * relax_factor + (1.0 - relax_factor), 1.0)
            total += task_grads[t] * weight.to(total.dtype)
        out.copy_(total)


def split_workspace(task_grads: torch.Tensor, out: torch.Tensor, sizes: list[int]):
    """Per-tensor views of a [T, N] workspace and its [N] output: ``grads[p][t]``, ``outs[p]``."""
    rows = [row.split(sizes) for row in task_grads]
    grads = [[rows[t][p] for t in range(task_grads.shape[0])] for p in range(len(sizes))]
    return grads, list(out.split(sizes))


def original_style_backend(task_grads, norm_ema, out, layout, hyper):
    """``original_style_step`` behind the backend contract (for checks; the timed path pre-splits)."""
    relax_factor, beta, strategy = hyper.relax_factor, hyper.beta, hyper.strategy
    grads, outs = split_workspace(task_grads, out, list(layout.sizes))
    norms = [list(row.unbind(0)) for row in norm_ema]
    norms = [[x.clone() for x in row] for row in norms]
    original_style_step(grads, norms, outs, relax_factor, beta, strategy)
    for i, row in enumerate(norms):
        norm_ema[i].copy_(torch.stack(row))


# ---- Torch-RecHub (optional) ------------------------------------------------------------------------------
def load_rechub() -> tuple[type | None, str]:
    """Torch-RecHub's MetaBalance class and where it came from, or None and why not.

    Its package ``__init__`` imports pandas, scikit-learn and tqdm, while the optimizer module needs only
    torch: when the package import fails for a missing dependency, the module is loaded from its file.
    """
    try:
        from torch_rechub.basic.metaoptimizer import MetaBalance

        return MetaBalance, "torch_rechub.basic.metaoptimizer"
    except ImportError as err:
        reason = str(err)
    spec = importlib.util.find_spec("torch_rechub")
    if spec is None or not spec.submodule_search_locations:
        return None, "torch-rechub is not installed (optional benchmark dependency: pip install torch-rechub)"
    path = Path(next(iter(spec.submodule_search_locations))) / "basic" / "metaoptimizer.py"
    if not path.is_file():
        return None, f"torch-rechub is installed but has no {path} ({reason})"
    module_spec = importlib.util.spec_from_file_location("_rechub_metaoptimizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.MetaBalance, f"{path} (package import failed: {reason})"


def rechub_version() -> str:
    try:
        from importlib.metadata import version

        return version("torch-rechub")
    except Exception:
        return "unknown"


def require_rechub(info: dict) -> type:
    """Torch-RecHub's MetaBalance for a benchmark (recording its origin in ``info``), or skip saying why."""
    import pytest

    rechub_cls, origin = load_rechub()
    if rechub_cls is None:
        pytest.skip(origin)
    info["rechub_source"] = origin
    info["rechub_version"] = rechub_version()
    return rechub_cls


class HandOverLoss:
    """Stands in for a task loss at the kernel level: ``backward`` hands the task's prepared gradients to the
    parameters as autograd's AccumulateGrad does (a fresh tensor when ``.grad`` is None, else an add), so that
    Torch-RecHub's ``step(losses)`` — which calls ``loss.backward(retain_graph=True)`` itself — balances them."""

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor]):
        self.params, self.grads = params, grads

    def backward(self, retain_graph: bool = False) -> None:
        del retain_graph
        for p, g in zip(self.params, self.grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)


# ---- timing -----------------------------------------------------------------------------------------------
def run_timed(benchmark, call: Callable[[], None], device: str, min_rounds: int = 3, max_rounds: int = 2000) -> None:
    """Warm up, pick rounds to fill the time budget, time ``call`` followed by a device synchronise.

    Each round is one call plus ``torch.cuda.synchronize()`` on CUDA (iterations=1): pytest-benchmark reads
    the host clock, so the synchronise puts the device work inside the timed region; this is the latency a
    training loop sees. On CUDA the device time is also measured with CUDA events around back-to-back calls
    (no host synchronise in between) and stored as ``extra_info["device_time_s"]`` (mean per call), which
    the summary prefers for GB/s. Quick mode: one call, no warm-up.
    """

    def timed():
        call()
        synchronize(device)

    if QUICK:
        benchmark.pedantic(timed, rounds=1, iterations=1, warmup_rounds=0)
        return
    budget = budget_s(device)
    timed()  # first call: compilation (Triton JIT), allocations, lazy state; never used to size the run
    # Rounds are sized on a warm call: sizing them on the first one (a JIT compile of ~1 s) once left 3 cold-ish
    # rounds of Triton T=2/T=8 in the H100 run, read as a 10-40x "anomaly".
    start = time.perf_counter()
    timed()
    first = time.perf_counter() - start
    rounds = int(min(max_rounds, max(min_rounds, budget / max(first, 1e-7))))
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1 if first < budget / 20 else 0)
    if device == "cuda":
        count = max(1, min(rounds, 100))
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(count):
            call()
        end.record()
        end.synchronize()
        benchmark.extra_info["device_time_s"] = begin.elapsed_time(end) / 1e3 / count
        benchmark.extra_info["device_time_calls"] = count


def run_interleaved(
    benchmark, steps: dict[str, Callable[[], None]], device: str, min_rounds: int, max_rounds: int
) -> dict[str, dict]:
    """Run every step once per round, in a rotating order, so that slow phases of a shared machine hit every variant
    alike; rounds are sized on a warm round (after one warm-up). Returns per-step min and median seconds."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)

    def one_round():
        order.append(order.pop(0))
        for name in order:
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)

    if QUICK:
        benchmark.pedantic(one_round, rounds=1, iterations=1)
    else:
        one_round()  # warm-up: lazy state, allocator, compilation
        start = time.perf_counter()
        one_round()
        per_round = time.perf_counter() - start
        for values in times.values():
            values.clear()
        rounds = int(min(max_rounds, max(min_rounds, 4 * budget_s(device) / per_round)))
        benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    return {
        name: {"min": min(values), "median": statistics.median(values), "steps": len(values)}
        for name, values in times.items()
    }


def median_s(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    inner = getattr(stats, "stats", stats)
    return getattr(inner, "median", None)


_COPY_BUFFERS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def copy_gbps(device: str, repeats: int = 5) -> float:
    """Copy bandwidth right now (best of ``repeats`` copies of ``copy_numel()`` float32, read + write).

    Measured next to each fused kernel row, so that "% of copy bandwidth" compares two measurements taken
    under the same conditions even when other work on the machine comes and goes during the run.
    """
    if device not in _COPY_BUFFERS:
        src = torch.randn(copy_numel(), device=device)
        _COPY_BUFFERS[device] = (src, torch.empty_like(src))
    src, dst = _COPY_BUFFERS[device]
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    if device == "cuda":  # events over back-to-back copies: no host synchronise inside the timing
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(repeats * 4):
            dst.copy_(src)
        end.record()
        end.synchronize()
        best = begin.elapsed_time(end) / 1e3 / (repeats * 4)
    return 2 * src.numel() * src.element_size() / best / 1e9


def record_gbps(benchmark) -> None:
    """``extra_info["gbps"]`` from its ``bytes`` over the CUDA-event time if measured, else the host median."""
    info = benchmark.extra_info
    seconds = info.get("device_time_s") or median_s(benchmark)
    if seconds:
        info["gbps"] = info["bytes"] / seconds / 1e9


def relative_difference(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    """||got - want|| / ||want|| and max|got - want| / max|want|, in float64."""
    got, want = got.detach().double().flatten(), want.detach().double().flatten()
    diff = got - want
    denom = float(want.norm()) or 1.0
    peak = float(want.abs().max()) if want.numel() else 1.0
    return {
        "rel_l2": float(diff.norm()) / denom,
        "max_abs_over_max": float(diff.abs().max()) / (peak or 1.0) if diff.numel() else 0.0,
    }


class OriginalStyleMetaBalance:
    """End-to-end original-style MetaBalance: the original's control flow on our semantics.

    One ``loss.backward(retain_graph=True)`` per task; after each, for every shared tensor: the norm, the
    EMA, the weight, scale and accumulate into a per-tensor sum; ``.grad`` cleared for the next pass. After
    the last task the sums become ``.grad``. Tower parameters accumulate the plain sum across the passes.
    (Clearing ``.grad`` to None rather than zeroing it, as the original does, spares an add per pass.)
    """

    def __init__(self, params, relax_factor: float = RELAX_FACTOR, beta: float = BETA):
        self.params = list(params)
        self.relax_factor, self.beta = relax_factor, beta
        self.norms: list[list[torch.Tensor]] | None = None

    @torch.no_grad()
    def step(self, losses) -> None:
        if self.norms is None:
            self.norms = [[torch.zeros((), device=p.device) for _ in losses] for p in self.params]
        sums: list[torch.Tensor | None] = [None] * len(self.params)
        r = self.relax_factor
        for t, loss in enumerate(losses):
            with torch.enable_grad():
                loss.backward(retain_graph=True)
            for i, p in enumerate(self.params):
                g = p.grad
                if g is None:
                    continue
                ema = self.norms[i]
                norm = torch.linalg.vector_norm(g, dtype=ema[t].dtype)
                ema[t] = torch.where(torch.isfinite(norm), ema[t] * self.beta + norm * (1.0 - self.beta), ema[t])
                if t > 0:
                    mt = ema[t]
                    weight = torch.where(mt != 0, ema[0] / torch.where(mt != 0, mt, 1.0) * r + (1.0 - r), 1.0)
                    g = g * weight.to(g.dtype)
                sums[i] = g if sums[i] is None else sums[i].add_(g)
                p.grad = None
        for p, total in zip(self.params, sums):
            if total is not None:
                p.grad = total
