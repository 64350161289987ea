"""Tables balanced by their looked-up rows (:mod:`mb_kernels.tables`) on every backend, against the float64
reference run on the dense-equivalent ``[T, V·d]`` gradient (tests/cases.py bounds).

Each step mixes per-task parts (what a sparse backward pass hands over) and shared parts (the ``[T, k, d]`` rows of
one lookup with ``shared_output``), with duplicate ids, rows only some tasks touch, padding ids ("no row") and, on
some steps, an empty lookup or no lookup at all."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from mb_kernels.backends.contract import Hyperparameters, state_dtype
from mb_kernels.dispatch import BACKENDS, available_backends
from mb_kernels.tables import RowTable
from tests.cases import DTYPES, HYPERS, assert_matches_truth, truth

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DEVICE_BACKENDS = [(device, name) for device in DEVICES for name in available_backends(device)]
ROWS, WIDTH, STEPS = 37, 5, 4


def _step_parts(seed: int, step: int, num_tasks: int, dtype: torch.dtype, device: str):
    """This step's parts. Step 2 has one empty lookup only; step 3 with seed % 3 == 0 reaches nothing."""
    gen = torch.Generator().manual_seed(seed * 31 + step)
    if step == 3 and seed % 3 == 0:
        return []
    if step == 2:
        return [(None, torch.zeros(0, dtype=torch.int64), torch.zeros(num_tasks, 0, WIDTH))]
    parts = []
    for task in range(num_tasks):
        if task == 1 and num_tasks > 2:
            continue  # a task that reaches the table through the shared lookup only
        k = int(torch.randint(0, 9, (), generator=gen))
        ids = torch.randint(0, 12, (k,), generator=gen)  # few rows: many duplicates
        scale = 10.0 ** float(torch.rand((), generator=gen) * 4 - 2)
        parts.append((task, ids, torch.randn(k, WIDTH, generator=gen, dtype=torch.float64) * scale))
    ids = torch.randint(0, ROWS + 1, (23,), generator=gen)  # ROWS is the "no row" id of a padding lookup
    values = torch.randn(num_tasks, 23, WIDTH, generator=gen, dtype=torch.float64)
    values *= 10.0 ** (torch.rand(num_tasks, 1, 1, generator=gen, dtype=torch.float64) * 4 - 2)
    values[:, ids == ROWS] = 0.0
    parts.append((None, ids, values))
    return [(task, ids.to(device), values.to(dtype).to(device)) for task, ids, values in parts]


def _dense_equivalent(parts, num_tasks: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, V·d] in ``dtype``: each task's rows summed per id in the accumulation dtype and rounded once, as
    autograd's dense embedding backward gives a table its gradient."""
    acc = state_dtype(dtype)
    dense = torch.zeros(num_tasks, ROWS + 1, WIDTH, dtype=acc)  # row ROWS collects the (zero) padding rows
    for task, ids, values in parts:
        ids, values = ids.cpu(), values.cpu().to(acc)
        if task is None:
            dense.index_add_(1, ids, values)
        else:
            dense[task].index_add_(0, ids, values)
    return dense[:, :ROWS].reshape(num_tasks, -1).to(dtype)


def _matrix():
    cases = []
    for (device, backend), dtype, num_tasks, (h, hypers), sparse in itertools.product(
        DEVICE_BACKENDS, DTYPES, [1, 3], enumerate(HYPERS), [True, False]
    ):
        if backend == "triton" and device == "cpu" and (h % 3 != 0 or num_tasks == 1):
            continue  # the interpreter is slow: every strategy, r and beta still appear
        strategy, relax, beta = hypers
        name = f"{device}-{backend}-{str(dtype).removeprefix('torch.')}-T{num_tasks}-{strategy}-r{relax}-b{beta}"
        cases.append(pytest.param(device, backend, dtype, num_tasks, hypers, sparse, id=f"{name}-sparse{sparse}"))
    return cases


@pytest.mark.parametrize(("device", "backend", "dtype", "num_tasks", "hypers", "sparse"), _matrix())
def test_row_table_matches_the_dense_reference(device, backend, dtype, num_tasks, hypers, sparse):
    strategy, relax, beta = hypers
    seed = zlib.crc32(repr((str(dtype), num_tasks, hypers, sparse)).encode()) % 10_000
    param = torch.zeros(ROWS, WIDTH, dtype=dtype, device=device, requires_grad=True)
    table = RowTable(param, num_tasks, None, sparse_output=sparse)
    balance = BACKENDS[backend].loader()
    steps = [_step_parts(seed, step, num_tasks, dtype, device) for step in range(STEPS)]
    dense = [_dense_equivalent(parts, num_tasks, dtype) for parts in steps]
    expected = truth(dense, [ROWS * WIDTH], relax, beta, strategy)
    outs = []
    for step, parts in enumerate(steps):
        table.clear()
        for task, ids, values in parts:
            if task is None:
                table.add_shared_rows(ids, values)
            else:
                table.add_task_rows(task, ids, values)
        result = table.balance(balance, Hyperparameters(relax, beta, strategy))
        if not parts:
            assert result is None, "a table no task reached keeps its .grad"
            outs.append(expected[0][step].to(dtype))  # nothing to compare but the averages
            continue
        if sparse:
            assert result.is_sparse and result.is_coalesced()
            touched = torch.cat([ids for _, ids, _ in parts]).cpu().unique()
            assert result._indices()[0].cpu().tolist() == touched[touched < ROWS].tolist()
            result = result.to_dense()
        else:
            assert result.layout == torch.strided and result.stride() == param.stride()
        assert result.dtype == dtype and result.shape == param.shape
        outs.append(result.reshape(-1))
    assert_matches_truth(outs, table.norm_ema, expected, num_tasks, label=backend)
