"""Shared random inputs and derived tolerances: every backend runs on these against the reference.

The ground truth is the reference backend run on the same values upcast to float64 (EMA in float64),
so a backend is judged only on its own rounding:

* EMA / norms: float32 accumulation of n squares has a relative error of at most ~log2(n)·eps32 for a
  blocked/pairwise sum and ~sqrt(n)·eps32 in practice for a sequential one; RTOL_NORM = 2e-5 covers
  1M-element tensors (eps32 = 1.2e-7). Every backend now sums the squares in float64 (docs/design.md §5), which is
  well inside this bound (the norm is then off by about one float32 rounding); the bound is kept as derived, for
  the reference's scaled float32 fallback and as the contract's allowance.
* Combined gradient: each element is a sum of T terms w_t·g_t. Its float32 evaluation errs by at most
  ~(T + 1)·eps32·Σ|w_t g_t| plus the weights' relative error (that of the norms) times the same sum; the
  result is then rounded once into the gradient dtype (half an ulp: 2^-11 for fp16, 2^-8 for bf16,
  2^-24 for fp32 of |G|; an absolute half-spacing below the smallest normal). The bound is
  elementwise and scales with Σ|w_t g_t|, not |G|, so it stays valid where terms cancel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from mb_kernels.backends.contract import Hyperparameters
from mb_kernels.backends.reference import balance_torch, balance_weights
from mb_kernels.layout import FlatLayout

SIZE_CASES = {
    "empty": [0],
    "one": [1],
    "odd-mix": [3, 0, 1, 4097, 130, 5],
    "many": [int(x) for x in torch.randint(0, 300, (1000,), generator=torch.Generator().manual_seed(7))],
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL_NORM = 2e-5
OUTPUT_ROUNDING = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 2.0**-53}
# Half the spacing of subnormals: below the smallest normal the rounding error is absolute.
SUBNORMAL_ROUNDING = {torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134, torch.float32: 2.0**-150, torch.float64: 0.0}
# float32 state holds nothing below its smallest normal accurately (reached only with extreme beta).
EMA_FLOOR = 2.0**-126
HYPERS = [(s, r, b) for s in "ABC" for r in (0.0, 0.5, 1.0) for b in (0.0, 0.9)]


def random_task_grads(
    seed: int, sizes: list[int], num_tasks: int, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """[T, N] gradients: per (task, tensor) scales spanning 1e-2..1e2 so weights matter, and some
    (task, tensor) segments exactly zero (a task that does not reach a tensor: the m == 0 guard)."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    grads = torch.randn(num_tasks, n, generator=gen, dtype=torch.float64)
    start = 0
    for size in sizes:
        scales = 10.0 ** (torch.rand(num_tasks, 1, generator=gen, dtype=torch.float64) * 4 - 2)
        zero = torch.rand(num_tasks, 1, generator=gen) < 0.15
        grads[:, start : start + size] *= torch.where(zero, torch.zeros_like(scales), scales)
        start += size
    return grads.to(dtype).to(device)


def run_steps(backend_fn, grads_per_step, sizes, relax_factor, beta, strategy, state_dtype=None):
    """Run a backend over several steps on a fresh EMA; returns (outputs per step, final EMA)."""
    first = grads_per_step[0]
    num_tasks = first.shape[0]
    ema_dtype = state_dtype or (torch.float64 if first.dtype == torch.float64 else torch.float32)
    layout = FlatLayout.from_sizes(sizes, first.device)
    norm_ema = torch.zeros(len(sizes), num_tasks, dtype=ema_dtype, device=first.device)
    outs = []
    for grads in grads_per_step:
        out = torch.full((grads.shape[1],), float("nan"), dtype=grads.dtype, device=grads.device)  # poison
        backend_fn(grads, norm_ema, out, layout, Hyperparameters(relax_factor, beta, strategy))
        outs.append(out)
    return outs, norm_ema


def truth(grads_per_step, sizes, relax_factor, beta, strategy):
    """The reference on float64 copies: outputs, final EMA, and per-step Σ_t |w_t g_t| (the error scale)."""
    grads64 = [g.detach().cpu().double() for g in grads_per_step]
    layout = FlatLayout.from_sizes(sizes, "cpu")
    norm_ema = torch.zeros(len(sizes), grads64[0].shape[0], dtype=torch.float64)
    outs, scales = [], []
    size_tensor = torch.tensor(sizes, dtype=torch.int64)
    for grads in grads64:
        out = torch.empty(grads.shape[1], dtype=torch.float64)
        balance_torch(grads, norm_ema, out, layout, Hyperparameters(relax_factor, beta, strategy))
        weights = balance_weights(norm_ema, relax_factor, strategy)
        per_element = weights.t().repeat_interleave(size_tensor, dim=1, output_size=grads.shape[1])
        scales.append((per_element * grads).abs().sum(0))
        outs.append(out)
    return outs, norm_ema, scales


def assert_matches_truth(outs, norm_ema, expected, num_tasks, label=""):
    """Elementwise check with the bound derived in this module's docstring; reports the worst elements."""
    ref_outs, ref_ema, scales = expected
    torch.testing.assert_close(
        norm_ema.detach().cpu().double(), ref_ema, rtol=RTOL_NORM, atol=EMA_FLOOR, msg=lambda m: f"{label} EMA: {m}"
    )
    for step, (out, ref, scale) in enumerate(zip(outs, ref_outs, scales)):
        got = out.detach().cpu().double()
        assert not torch.isnan(got).any() or torch.isnan(ref).any(), f"{label} step {step}: unwritten/NaN output"
        bound = (RTOL_NORM + (num_tasks + 1) * 2.0**-24) * scale + OUTPUT_ROUNDING[out.dtype] * ref.abs()
        bound = bound + SUBNORMAL_ROUNDING[out.dtype]
        bound = bound * 1.01 + 1e-300
        err = (got - ref).abs()
        bad = err > bound
        if bad.any():
            idx = bad.nonzero().flatten()[:5].tolist()
            detail = ", ".join(f"[{i}] got {got[i]:.6g} want {ref[i]:.6g} bound {bound[i]:.3g}" for i in idx)
            raise AssertionError(f"{label} step {step}: {int(bad.sum())} elements out of bound: {detail}")


def run_without_avx2(script: str) -> None:
    """Run ``script`` in a fresh Python process with ``MB_KERNELS_NO_AVX2=1`` (the C++ op reads the switch once, at
    load), so that it exercises the portable loops non-AVX2 CPUs get; the script prints "baseline ok" on success."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MB_KERNELS_NO_AVX2": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "baseline ok" in result.stdout, result.stderr[-3000:]
