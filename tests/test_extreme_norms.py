"""Norms of extreme but finite gradients (issue 13, item 5), on every backend available here.

A float32 sum of squares overflows for a norm above ~1.8e19 and underflows for elements below ~1e-19; a task was then
treated as a NaN/Inf task (average kept) or as a zero one (w = 1), silently, with a finite combined gradient. The
contract (docs/design.md §1) now accumulates the squares of float32/float16/bfloat16 gradients in float64, so every
finite gradient whose norm fits in float32 gets its norm. Checked here at element magnitudes 1e+30 and 1e-30 (and at
float32's largest value) against the reference evaluated in float64, with tests/cases.py's derived tolerances,
through the backend functions and through ``MetaBalance.step``; the C++ kernel also on its baseline (non-AVX2) loops
and across thread counts.
"""

from __future__ import annotations

import pytest
import torch

from mb_kernels import MetaBalance
from mb_kernels.backends.reference import tensor_norms

try:
    from mb_kernels.backends.reference import _scaled_norms
except ImportError:
    _scaled_norms = tensor_norms
from mb_kernels.dispatch import BACKENDS, available_backends
from mb_kernels.layout import FlatLayout
from tests.cases import RTOL_NORM, assert_matches_truth, run_steps, run_without_avx2, truth

BACKEND_NAMES = available_backends("cpu")
# (device, backend) pairs for the two matrix tests: CUDA backends too where a GPU is present (the GPU tier).
DEVICE_BACKENDS = [pytest.param("cpu", b, id=f"cpu-{b}") for b in BACKEND_NAMES] + (
    [pytest.param("cuda", b, id=f"cuda-{b}") for b in available_backends("cuda")] if torch.cuda.is_available() else []
)
# One small tensor (the C++ kernel's one-pass bundles, one Triton chunk) and one of several C++ spans and Triton
# chunks (70,001 elements: the three-pass path, partial sums added across spans/chunks).
SIZES = [1, 5, 33, 4097, 70_001]
NUM_TASKS = 3
# Per task, the magnitude of every element (times a per-(task, tensor) factor in 10^U(-2, 2)): every norm is far
# outside what a float32 sum of squares holds, while every weight m_0/m_t stays inside float32's range.
MAGNITUDES = {
    "huge": (1e30, 1.0, 3e29),  # task 0's squares overflow float32; task 2's too
    "tiny": (1e-30, 2e-30, 5e-31),  # every square underflows float32: all norms were 0, all weights 1
    "tiny-aux": (1.0, 1e-30, 1e-29),  # the auxiliaries' squares underflow: they were treated as absent (w = 1)
}
DTYPES = [torch.float32, torch.bfloat16]  # float16 cannot hold 1e+-30: its own extremes are checked below


def extreme_grads(seed: int, sizes: list[int], magnitudes, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(len(magnitudes), sum(sizes), generator=gen, dtype=torch.float64)
    factors = 10.0 ** (torch.rand(len(magnitudes), len(sizes), generator=gen, dtype=torch.float64) * 4 - 2)
    factors *= torch.tensor(magnitudes, dtype=torch.float64)[:, None]
    grads *= factors.repeat_interleave(torch.tensor(sizes), dim=1, output_size=sum(sizes))
    out = grads.to(dtype)
    assert torch.isfinite(out).all()
    return out


def check_backend(name: str, dtype: torch.dtype, case: str, device: str = "cpu") -> None:
    """The backend over two steps (beta = 0.5) against the float64 reference: averages and combined gradient."""
    fn = BACKENDS[name].loader()
    grads = [extreme_grads(step, SIZES, MAGNITUDES[case], dtype).to(device) for step in range(2)]
    outs, ema = run_steps(fn, grads, SIZES, 0.7, 0.5, "C")
    expected = truth(grads, SIZES, 0.7, 0.5, "C")
    assert torch.isfinite(ema).all() and (ema > 0).all(), f"{name} {dtype} {case}: averages {ema}"
    assert_matches_truth(outs, ema, expected, NUM_TASKS, label=f"{name} {dtype} {case}")


@pytest.mark.parametrize("case", sorted(MAGNITUDES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_backend_matches_float64_truth(device, backend, dtype, case):
    check_backend(backend, dtype, case, device)


# Not below 1e-36: bfloat16 subnormals (< 1.2e-38) are misread by the Triton interpreter's bfloat16 loads (Triton 3.9:
# 1e-39 reads as 4.4e-39), whatever the norms; compiled code converts them exactly.
@pytest.mark.parametrize("exponents", [(-36, -18), (-30, 0), (-5, 30)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_mixed_magnitudes_within_tensors(device, backend, dtype, exponents):
    """Elements of magnitude 10^U(lo, hi) side by side: sums whose float32 evaluation would underflow in part or in
    whole (-36..-18), lose only negligible tiny squares (-30..0: the C++ kernel keeps its float32 sum there), or
    overflow (-5..30)."""
    fn = BACKENDS[backend].loader()
    lo, hi = exponents
    gen = torch.Generator().manual_seed(lo * 100 + hi)
    grads = []
    for _ in range(2):
        magnitude = 10.0 ** (torch.rand(NUM_TASKS, sum(SIZES), generator=gen, dtype=torch.float64) * (hi - lo) + lo)
        sign = torch.randint(0, 2, (NUM_TASKS, sum(SIZES)), generator=gen).double() * 2 - 1
        grads.append((magnitude * sign).to(dtype).to(device))
    outs, ema = run_steps(fn, grads, SIZES, 0.7, 0.5, "C")
    label = f"{device} {backend} {dtype} 1e{lo}..1e{hi}"
    assert_matches_truth(outs, ema, truth(grads, SIZES, 0.7, 0.5, "C"), NUM_TASKS, label=label)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_float32_limits(backend):
    """Float32's largest finite value (norm 3.4e38, one element) and a 100-element tensor of 1e37 (norm 1e38): the
    norms fit in float32 and are exact to rounding; and float16's extremes (65504, the smallest subnormal)."""
    fn = BACKENDS[backend].loader()
    big = torch.finfo(torch.float32).max
    sizes = [1, 100]
    # Opposite signs: with r = 1, G = g_0 + (m_0/m_1) g_1 cancels instead of overflowing.
    grads = torch.tensor([[big] + [1e37] * 100, [-1.0] + [-2.0] * 100], dtype=torch.float32)
    outs, ema = run_steps(fn, [grads], sizes, 1.0, 0.0, "C")
    want = torch.tensor([[big, 1.0], [1e38, 20.0]], dtype=torch.float64)
    torch.testing.assert_close(ema.double(), want, rtol=2e-7, atol=0.0)
    assert_matches_truth(outs, ema, truth([grads], sizes, 1.0, 0.0, "C"), 2, label=f"{backend} float32 limits")

    tiny16 = 2.0**-24
    half = torch.tensor([[65504.0] * 7 + [tiny16] * 9, [tiny16] * 7 + [65504.0] * 9], dtype=torch.float16)
    outs, ema = run_steps(fn, [half], [7, 9], 0.5, 0.0, "A")
    assert_matches_truth(outs, ema, truth([half], [7, 9], 0.5, 0.0, "A"), 2, label=f"{backend} float16 limits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_reference_norms(dtype):
    """The reference's norms, and its scaled float32 fallback (devices without float64), against float64 norms."""
    limit = 1e4 if dtype == torch.float16 else 1e30
    values = [limit, 1.0, 1.0 / limit]
    sizes = [3, 4097, 0, 70_001]
    grads = torch.cat([torch.randn(3, sum(sizes)) * v for v in values]).to(dtype)
    layout = FlatLayout.from_sizes(sizes, "cpu")
    want = torch.stack([s.double().norm(dim=1) for s in grads.split(sizes, dim=1)])
    # float64 accumulation: the float64 norm rounded once (half an ulp); the scaled float32 sum: RTOL_NORM.
    for got, rtol in ((tensor_norms(grads, layout), 2.0**-23), (_scaled_norms(grads, layout), RTOL_NORM)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0.0)


def _step_grad(backend: str, dtype: torch.dtype, target: float, aux: float) -> torch.Tensor:
    w = torch.nn.Parameter(torch.ones(1000, dtype=dtype))
    mb = MetaBalance([w], relax_factor=1.0, beta=0.0, backend=backend)
    mb.step([(w * target).sum(), (w * aux).sum()])
    return w.grad


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_issue_example(backend):
    """The issue's example: with r = 1 the auxiliary gets the target's magnitude, so G = 1 + 1 = 2 (it gave 1e19)."""
    grad = _step_grad(backend, torch.float32, 1.0, 1e19)
    torch.testing.assert_close(grad, torch.full_like(grad, 2.0), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("target", "aux"), [(1e30, 1.0), (1e-30, 1.0), (1.0, 1e-30), (1.0, 1e30), (1e-30, 1e-29)])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_step_rescales_extreme_tasks(backend, dtype, target, aux):
    """Through MetaBalance.step: g_0 = target, g_1 = aux everywhere, r = 1, beta = 0, so G = 2 target."""
    grad = _step_grad(backend, dtype, target, aux)
    want = torch.full_like(grad, 2.0 * float(torch.tensor(target, dtype=dtype)))
    rtol = 2e-6 if dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(grad, want, rtol=rtol, atol=0.0)


@pytest.mark.skipif("cpu" not in BACKEND_NAMES, reason="compiled CPU op unavailable")
def test_cpu_kernel_bitwise_across_thread_counts():
    fn = BACKENDS["cpu"].loader()
    grads = [extreme_grads(10 + step, SIZES, MAGNITUDES["huge"], torch.float32) for step in range(2)]
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run_steps(fn, grads, SIZES, 0.7, 0.9, "C"))
    finally:
        torch.set_num_threads(previous)
    (outs_1, ema_1), (outs_2, ema_2) = results
    assert torch.equal(ema_1, ema_2)
    assert all(torch.equal(a, b) for a, b in zip(outs_1, outs_2))


_BASELINE_SCRIPT = """
import torch
from tests.test_extreme_norms import MAGNITUDES, check_backend
for dtype in (torch.float32, torch.bfloat16):
    for case in MAGNITUDES:
        check_backend("cpu", dtype, case)
print("baseline ok")
"""


@pytest.mark.skipif("cpu" not in BACKEND_NAMES, reason="compiled CPU op unavailable")
def test_cpu_baseline_loops():
    """MB_KERNELS_NO_AVX2=1: the portable loops (a fresh process: the switch is read once)."""
    run_without_avx2(_BASELINE_SCRIPT)
