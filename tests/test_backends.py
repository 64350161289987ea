"""Every available backend against the float64 reference on the shared random matrix (tests/cases.py)."""

from __future__ import annotations

import zlib

import pytest
import torch

from mb_kernels.dispatch import BACKENDS, available_backends
from tests.cases import DTYPES, HYPERS, SIZE_CASES, assert_matches_truth, random_task_grads, run_steps, truth

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DEVICE_BACKENDS = [(device, name) for device in DEVICES for name in available_backends(device)]
STEPS = 3


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS, ids=lambda x: str(x))
@pytest.mark.parametrize("size_case", list(SIZE_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tasks", [1, 2, 4])
@pytest.mark.parametrize("hypers", HYPERS, ids=lambda h: f"{h[0]}-r{h[1]}-b{h[2]}")
def test_backend_matches_reference(device, backend, size_case, dtype, num_tasks, hypers):
    if backend == "triton" and device == "cpu" and (size_case in ("many", "one") or num_tasks != 4):
        pytest.skip("the Triton interpreter is slow; tests/test_triton.py covers it on a reduced matrix")
    strategy, relax_factor, beta = hypers
    sizes = SIZE_CASES[size_case]
    seed = zlib.crc32(repr((size_case, str(dtype), num_tasks, hypers)).encode()) % 10_000
    grads = [random_task_grads(seed + step, sizes, num_tasks, dtype, device) for step in range(STEPS)]
    fn = BACKENDS[backend].loader()
    outs, ema = run_steps(fn, grads, sizes, relax_factor, beta, strategy)
    assert_matches_truth(outs, ema, truth(grads, sizes, relax_factor, beta, strategy), num_tasks, label=backend)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_backend_is_bitwise_reproducible(device, backend, dtype):
    """Run-to-run bitwise reproducibility is a property of every backend (there is no non-deterministic path):
    the same inputs give the same bits, also on fresh layouts (no state carried between the runs)."""
    sizes = SIZE_CASES["odd-mix"] + [70_001]
    grads = [random_task_grads(11 + s, sizes, 4, dtype, device) for s in range(3)]
    fn = BACKENDS[backend].loader()
    first = run_steps(fn, grads, sizes, 0.7, 0.9, "C")
    second = run_steps(fn, grads, sizes, 0.7, 0.9, "C")
    for a, b in zip(first[0], second[0]):
        assert torch.equal(a, b)
    assert torch.equal(first[1], second[1])
