"""The compiled op ``mb_kernels::metabalance_`` on CPU and, when a GPU and the CUDA build are present, on CUDA.

Checks: torch.library.opcheck (schema, fake kernel, mutation annotations); the op against the float64 reference on
edge sizes (0, 1, 3, 4097, 1M+1 elements, >= 1000 tensors in one group, misaligned storage) with the tolerances
derived in tests/cases.py; bitwise determinism (CPU: across thread counts); non-finite gradients; clear errors on
bad inputs that leave the state untouched.
"""

from __future__ import annotations

import pytest
import torch

from mb_kernels.backends.contract import Hyperparameters
from mb_kernels.backends.reference import balance_torch
from mb_kernels.layout import FlatLayout
from tests.cases import assert_matches_truth, random_task_grads, run_steps, run_without_avx2, truth

ops = pytest.importorskip("mb_kernels.backends.compiled")
try:
    ops.compiled_backend("cpu")
except (ImportError, RuntimeError) as err:  # pure-Python install
    pytest.skip(f"compiled CPU op unavailable: {err}", allow_module_level=True)


def _cuda_available() -> bool:
    try:
        ops.compiled_backend("cuda")
    except (ImportError, RuntimeError):
        return False
    return True


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _cuda_available(), reason="no CUDA build/GPU"))]
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
STEPS = 3


def _chunks(sizes, device):
    if torch.device(device).type != "cuda":
        return None
    return ops.cuda_chunk_table(FlatLayout.from_sizes(sizes, device), device)


def _op_args(sizes, num_tasks, dtype, device, seed=0):
    grads = random_task_grads(seed, sizes, num_tasks, dtype, device)
    layout = FlatLayout.from_sizes(sizes, device)
    ema_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    norm_ema = torch.rand(len(sizes), num_tasks, dtype=ema_dtype, device=device)
    out = torch.empty(sum(sizes), dtype=dtype, device=device)
    return grads, layout.offsets, _chunks(sizes, device), norm_ema, out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "sizes,num_tasks,dtype",
    [
        ([3, 0, 17], 3, torch.float32),
        ([5], 1, torch.float16),
        ([40000, 2], 2, torch.bfloat16),
        ([7, 9], 4, torch.float64),
    ],
    ids=str,
)
def test_opcheck(device, sizes, num_tasks, dtype):
    grads, offsets, chunks, norm_ema, out = _op_args(sizes, num_tasks, dtype, device)
    torch.library.opcheck(
        torch.ops.mb_kernels.metabalance_.default, (grads, offsets, chunks, norm_ema, out, 0.7, 0.9, 2)
    )


EDGE_SIZES = {
    "0": [0],
    "1": [1],
    "3": [3],
    "4097": [4097],
    "1M+1": [1_000_001],
    # >= 1000 tensors, small ones bundled around large ones (CPU: bundles and spans in one call).
    "1200-mixed": [int(x) for x in torch.randint(0, 600, (1200,), generator=torch.Generator().manual_seed(3))]
    + [70_001, 0, 5, 16_384, 16_385, 33, 100_000],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size_case", list(EDGE_SIZES))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("strategy,relax_factor,beta", [("C", 0.7, 0.9), ("A", 1.0, 0.0), ("B", 0.5, 0.9)])
def test_matches_reference_on_edge_sizes(device, size_case, dtype, strategy, relax_factor, beta):
    sizes = EDGE_SIZES[size_case]
    num_tasks = 4
    grads = [random_task_grads(100 + step, sizes, num_tasks, dtype, device) for step in range(STEPS)]
    fn = ops.compiled_backend(device)
    outs, ema = run_steps(fn, grads, sizes, relax_factor, beta, strategy)
    expected = truth(grads, sizes, relax_factor, beta, strategy)
    assert_matches_truth(outs, ema, expected, num_tasks, label=f"{device} {size_case}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_misaligned_storage(device, dtype):
    """Rows whose starts are not 16-byte aligned, and an out buffer of another alignment: the kernels' scalar
    head/fallback paths."""
    sizes = [5, 1000, 3, 20_001]
    num_tasks = 3
    n = sum(sizes)
    grads = []
    for step in range(STEPS):
        storage = torch.empty(num_tasks * n + 1, dtype=dtype, device=device)
        view = storage[1:].view(num_tasks, n)
        view.copy_(random_task_grads(step, sizes, num_tasks, dtype, device))
        grads.append(view)
    fn = ops.compiled_backend(device)
    layout = FlatLayout.from_sizes(sizes, device)
    norm_ema = torch.zeros(len(sizes), num_tasks, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    norm_ema = norm_ema.to(device)
    outs = []
    for step_grads in grads:
        out = torch.full((n + 3,), float("nan"), dtype=dtype, device=device)[3:]
        fn(step_grads, norm_ema, out, layout, Hyperparameters(0.7, 0.9, "C"))
        outs.append(out)
    assert_matches_truth(outs, norm_ema, truth(grads, sizes, 0.7, 0.9, "C"), num_tasks, label=f"{device} misaligned")


def _run_twice(fn, device, sizes, num_threads=None):
    grads = [random_task_grads(21 + step, sizes, 4, torch.float32, device) for step in range(STEPS)]
    results = []
    for threads in num_threads or (None, None):
        previous = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            results.append(run_steps(fn, grads, sizes, 0.7, 0.9, "C"))
        finally:
            torch.set_num_threads(previous)
    return results


@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_deterministic(device):
    sizes = EDGE_SIZES["1200-mixed"] + [1_000_001]
    fn = ops.compiled_backend(device)
    first, second = _run_twice(fn, device, sizes, num_threads=(1, 2) if device == "cpu" else None)
    for a, b in zip(first[0], second[0]):
        assert torch.equal(a, b)
    assert torch.equal(first[1], second[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_nonfinite_gradient_keeps_ema_and_poisons_output(device, dtype):
    sizes = [4, 20_000, 7]
    num_tasks = 3
    grads = random_task_grads(5, sizes, num_tasks, dtype, device)
    grads[1, 6] = float("nan")  # task 1, tensor 1
    grads[2, 20_005] = float("inf")  # task 2, tensor 2
    layout = FlatLayout.from_sizes(sizes, device)
    start = torch.rand(len(sizes), num_tasks, device=device) + 0.5
    ema, ref_ema = start.clone(), start.clone()
    out = torch.empty(sum(sizes), dtype=dtype, device=device)
    ref_out = torch.empty_like(out)
    ops.compiled_backend(device)(grads, ema, out, layout, Hyperparameters(0.7, 0.9, "C"))
    balance_torch(grads, ref_ema, ref_out, layout, Hyperparameters(0.7, 0.9, "C"))
    assert ema[1, 1] == start[1, 1] and ema[2, 2] == start[2, 2]
    torch.testing.assert_close(ema, ref_ema, rtol=2e-5, atol=0)
    assert torch.equal(out.isfinite(), ref_out.isfinite())
    assert not out[4:20_004].isfinite().all() and not out[20_004:].isfinite().all()


BAD_INPUTS = {
    "grads dtype": (lambda a: {**a, "grads": a["grads"].to(torch.int32)}, "task_grads must be float16"),
    "grads 1-D": (lambda a: {**a, "grads": a["grads"][0]}, "task_grads must be 2-D"),
    "grads non-contiguous": (lambda a: {**a, "grads": a["grads"].t().contiguous().t()}, "must be contiguous"),
    "ema dtype": (lambda a: {**a, "ema": a["ema"].double()}, "norm_ema must be Float for Float gradients"),
    "ema shape": (lambda a: {**a, "ema": a["ema"][:, :2]}, r"norm_ema must have shape \[num_tensors, num_tasks\]"),
    "out dtype": (lambda a: {**a, "out": a["out"].half()}, "out must have the gradients' dtype"),
    "out shape": (lambda a: {**a, "out": a["out"][1:]}, r"out must have shape \[numel\]"),
    "offsets dtype": (lambda a: {**a, "offsets": a["offsets"].int()}, "offsets must be a 1-D int64 tensor"),
    "strategy": (lambda a: {**a, "strategy": 3}, "strategy must be 0"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_and_leave_state_untouched(device, case):
    sizes = [3, 50]
    grads, offsets, chunks, ema, out = _op_args(sizes, 3, torch.float32, device)
    args = {"grads": grads, "offsets": offsets, "ema": ema, "out": out, "strategy": 2}
    make_bad, message = BAD_INPUTS[case]
    bad = make_bad(args)
    before = bad["ema"].clone()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.mb_kernels.metabalance_(
            bad["grads"], bad["offsets"], chunks, bad["ema"], bad["out"], 0.7, 0.9, bad["strategy"]
        )
    assert torch.equal(bad["ema"], before)


def test_cpu_rejects_inconsistent_offsets():
    grads, offsets, _, ema, out = _op_args([3, 50], 2, torch.float32, "cpu")
    before = ema.clone()
    with pytest.raises(RuntimeError, match=r"offsets\[-1\] = 52 must equal task_grads.size\(1\) = 53"):
        torch.ops.mb_kernels.metabalance_(grads, offsets + torch.tensor([0, 0, -1]), None, ema, out, 0.7, 0.9, 2)
    with pytest.raises(RuntimeError, match="offsets must be non-decreasing"):
        torch.ops.mb_kernels.metabalance_(grads, torch.tensor([0, 60, 53]), None, ema, out, 0.7, 0.9, 2)
    assert torch.equal(ema, before)


def test_unknown_strategy_name_raises_value_error():
    grads, _, _, ema, out = _op_args([3], 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="unknown strategy 'D'"):
        ops.compiled_backend("cpu")(grads, ema, out, FlatLayout.from_sizes([3], "cpu"), Hyperparameters(0.7, 0.9, "D"))


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="no CUDA build/GPU")
def test_cuda_requires_chunk_table():
    grads, offsets, _, ema, out = _op_args([3, 50], 2, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="CUDA tensors need the chunk table"):
        torch.ops.mb_kernels.metabalance_(grads, offsets, None, ema, out, 0.7, 0.9, 2)


def test_cuda_chunk_table_covers_every_tensor():
    sizes = (0, 5, 16_384, 16_385, 40_000_000)
    table = ops.cuda_chunk_table(FlatLayout.from_sizes(sizes, "cpu"), "cpu")
    assert table.shape[1] == 5
    tensors, begins, _, _, counts = table.unbind(1)
    assert tensors.unique().tolist() == list(range(len(sizes)))
    bounds = FlatLayout.from_sizes(sizes, "cpu").offsets
    for p in range(len(sizes)):
        rows = table[tensors == p]
        assert rows[0, 1] == bounds[p] and rows[-1, 2] == bounds[p + 1]
        assert torch.equal(rows[1:, 1], rows[:-1, 2])  # contiguous spans
        assert (rows[:, 3] == (tensors == p).nonzero()[0, 0]).all() and (rows[:, 4] == len(rows)).all()
    assert (counts <= ops.CUDA_MAX_CHUNKS).all()
    assert ((begins - bounds[tensors]) % ops.CUDA_GRANULE == 0).all()


_BASELINE_SCRIPT = """
import torch
from mb_kernels.backends.compiled import compiled_backend
from tests.cases import assert_matches_truth, random_task_grads, run_steps, truth
fn = compiled_backend("cpu")
sizes = [0, 1, 3, 31, 33, 4097, 70_001]
for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
    grads = [random_task_grads(step, sizes, 3, dtype) for step in range(2)]
    outs, ema = run_steps(fn, grads, sizes, 0.7, 0.9, "C")
    assert_matches_truth(outs, ema, truth(grads, sizes, 0.7, 0.9, "C"), 3, label=f"baseline {dtype}")
print("baseline ok")
"""


def test_cpu_baseline_loops_without_avx2():
    """MB_KERNELS_NO_AVX2=1 runs the portable loops that non-AVX2 CPUs get (a fresh process: read once)."""
    run_without_avx2(_BASELINE_SCRIPT)
