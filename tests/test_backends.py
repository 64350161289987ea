"""Every available backend against the float64 reference on the shared random matrix (tests/cases.py)."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from mb_kernels.dispatch import BACKENDS, available_backends
from tests.cases import DTYPES, HYPERS, SIZE_CASES, assert_matches_truth, random_task_grads, run_steps, truth

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DEVICE_BACKENDS = [(device, name) for device in DEVICES for name in available_backends(device)]
STEPS = 3
NUM_TASKS = [1, 2, 4]


def _matrix():
    """(device, backend, size case, dtype, T, hypers) cases. CPU backends run the full product. The Triton
    interpreter on CPU runs a slice (tests/test_triton.py covers it on its own reduced matrix). CUDA backends run a
    covering design that keeps the GPU tier within its time: every size case with every (dtype, T), and each
    (dtype, T) with the six hyperparameter triples whose index h satisfies h = dtype_index + T_index (mod 3),
    which give all three strategies, both betas and two of the three r values; over the three T of a dtype, and
    over the three dtypes of a T, every triple appears."""
    cases = []
    for device, backend in DEVICE_BACKENDS:
        for size_case, (i, dtype), (j, num_tasks), (h, hypers) in itertools.product(
            SIZE_CASES, enumerate(DTYPES), enumerate(NUM_TASKS), enumerate(HYPERS)
        ):
            if device == "cpu" and backend == "triton" and (size_case in ("many", "one") or num_tasks != 4):
                continue
            if device == "cuda" and h % 3 != (i + j) % 3:
                continue
            strategy, relax_factor, beta = hypers
            dtype_name = str(dtype).removeprefix("torch.")
            case_id = f"{device}-{backend}-{size_case}-{dtype_name}-T{num_tasks}-{strategy}-r{relax_factor}-b{beta}"
            cases.append(pytest.param(device, backend, size_case, dtype, num_tasks, hypers, id=case_id))
    return cases


@pytest.mark.parametrize(("device", "backend", "size_case", "dtype", "num_tasks", "hypers"), _matrix())
def test_backend_matches_reference(device, backend, size_case, dtype, num_tasks, hypers):
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
