"""Tables balanced by their looked-up rows (:mod:`mb_kernels.tables`) on every backend, against the float64
reference run on the dense-equivalent ``[T, V·d]`` gradient (tests/cases.py bounds).

Three tables of different sizes in one bucket, sparse, dense or mixed results. Each step mixes per-task parts (what a
sparse backward pass hands over), shared parts (the ``[T, k, d]`` rows of one lookup) and bag parts (an embedding
bag's ids, each with its bag's ``[T, d]`` gradient times a weight), with duplicate ids, rows only some tasks touch,
padding ids ("no row") and, on some steps, an empty lookup, a table no task reaches, or no table reached at all."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from mb_kernels.backends.contract import Hyperparameters, state_dtype
from mb_kernels.dispatch import BACKENDS, available_backends
from mb_kernels.tables import RowBucket
from tests.cases import DTYPES, HYPERS, assert_matches_truth, truth

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DEVICE_BACKENDS = [(device, name) for device in DEVICES for name in available_backends(device)]
TABLE_ROWS, WIDTH, STEPS = (37, 11, 20), 5, 4
OUTPUTS = {"sparse": (True, True, True), "dense": (False, False, False), "mixed": (True, False, True)}


def _table_parts(gen: torch.Generator, rows: int, num_tasks: int, reached: bool, empty: bool):
    """One table's parts of one step, ``(task, ids, values, bag of each id, weight of each id)``: per-task parts
    (task 1 of 3 has none: it reaches the table only through the lookups), one shared lookup with duplicates and "no
    row" ids (== rows; their values must be ignored) and, on some steps, a bag lookup (values: the bags' gradients;
    bag and weight per id) before or after it."""
    if not reached:
        return []
    if empty:
        return [(None, torch.zeros(0, dtype=torch.int64), torch.zeros(num_tasks, 0, WIDTH, dtype=torch.float64))]
    parts = []
    for task in range(num_tasks):
        if task == 1 and num_tasks > 2:
            continue
        k = int(torch.randint(0, 9, (), generator=gen))
        ids = torch.randint(0, min(rows, 12), (k,), generator=gen)  # few rows: many duplicates
        scale = 10.0 ** float(torch.rand((), generator=gen) * 4 - 2)
        parts.append((task, ids, torch.randn(k, WIDTH, generator=gen, dtype=torch.float64) * scale))
    ids = torch.randint(0, rows + 1, (23,), generator=gen)
    values = torch.randn(num_tasks, 23, WIDTH, generator=gen, dtype=torch.float64)
    values *= 10.0 ** (torch.rand(num_tasks, 1, 1, generator=gen, dtype=torch.float64) * 4 - 2)
    parts.append((None, ids, values))
    kind = int(torch.randint(0, 3, (), generator=gen))
    if kind > 0:  # an embedding bag: 17 ids in 6 bags (one bag gets none), one weight per id
        ids = torch.randint(0, rows + 1, (17,), generator=gen)
        bags = torch.randint(0, 5, (17,), generator=gen)
        # Powers of two: each weighted row is exact, so the sums round as the reference's (same order: input order;
        # a fused multiply-add would otherwise differ from it in the last bit, and cancellation magnifies that).
        weights = 2.0 ** torch.randint(-2, 3, (17,), generator=gen).double()
        bag_grads = torch.randn(num_tasks, 6, WIDTH, generator=gen, dtype=torch.float64)
        bag_part = (None, ids, bag_grads, bags, weights)
        parts.insert(len(parts) if kind == 1 else 0, bag_part)
    return parts


def _values(part) -> torch.Tensor:
    """The rows of a part: a bag part's ids get their bag's gradient times their weight."""
    values = part[2]
    if len(part) == 5:
        values = values[:, part[3]] * part[4][:, None].to(values.dtype)
    return values


def _step_parts(seed: int, step: int, num_tasks: int, dtype: torch.dtype, device: str):
    """Per table, this step's parts. Table 1 gets one empty lookup at step 2; table 2 is not reached at step 1;
    at step 3, for seed % 3 == 0, no table is reached."""
    gen = torch.Generator().manual_seed(seed * 31 + step)
    nothing = step == 3 and seed % 3 == 0
    tables = [
        _table_parts(
            gen, rows, num_tasks, reached=not nothing and not (i == 2 and step == 1), empty=i == 1 and step == 2
        )
        for i, rows in enumerate(TABLE_ROWS)
    ]
    acc = state_dtype(dtype)
    return [
        [
            (
                part[0],
                part[1].to(device),
                part[2].to(dtype).to(device),
                *(x.to(device) for x in part[3:4]),
                *(x.to(acc).to(device) for x in part[4:]),
            )
            for part in parts
        ]
        for parts in tables
    ]


def _dense_equivalent(tables, num_tasks: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, sum V·d] in ``dtype``: each task's rows summed per id in the accumulation dtype and rounded once, as
    autograd's dense embedding backward gives a table its gradient."""
    acc = state_dtype(dtype)
    blocks = []
    for parts, rows in zip(tables, TABLE_ROWS):
        dense = torch.zeros(num_tasks, rows + 1, WIDTH, dtype=acc)  # row `rows` collects the "no row" values (dropped)
        for task, ids, *rest in parts:
            ids = ids.cpu()
            values = _values([task, ids, *(x.cpu().to(acc) if x.is_floating_point() else x.cpu() for x in rest)])
            if task is None:
                dense.index_add_(1, ids, values)
            else:
                dense[task].index_add_(0, ids, values)
        blocks.append(dense[:, :rows].reshape(num_tasks, -1))
    return torch.cat(blocks, dim=1).to(dtype)


def _balance_step(bucket: RowBucket, tables, balance, hyper: Hyperparameters):
    """Hand one step's parts of every table to the bucket and balance them."""
    bucket.clear()
    for i, parts in enumerate(tables):
        for task, ids, values, *bag in parts:
            if task is None:
                bucket.add_shared_rows(i, ids, values, *bag)
            else:
                bucket.add_task_rows(i, task, ids, values)
    return bucket.balance(balance, hyper)


def _matrix():
    cases = []
    for (device, backend), (i, dtype), (j, num_tasks), (h, hypers), outputs in itertools.product(
        DEVICE_BACKENDS, enumerate(DTYPES), enumerate([1, 3]), enumerate(HYPERS), OUTPUTS
    ):
        if backend == "triton" and device == "cpu" and (h % 3 != 0 or num_tasks == 1):
            continue  # the interpreter is slow: every strategy, r and beta still appear
        if device == "cuda" and h % 3 != (i + j) % 3:
            continue  # the GPU tier's covering design, as in tests/test_backends.py
        strategy, relax, beta = hypers
        name = f"{device}-{backend}-{str(dtype).removeprefix('torch.')}-T{num_tasks}-{strategy}-r{relax}-b{beta}"
        cases.append(pytest.param(device, backend, dtype, num_tasks, hypers, outputs, id=f"{name}-{outputs}"))
    return cases


@pytest.mark.parametrize(("device", "backend", "dtype", "num_tasks", "hypers", "outputs"), _matrix())
def test_row_bucket_matches_the_dense_reference(device, backend, dtype, num_tasks, hypers, outputs):
    strategy, relax, beta = hypers
    seed = zlib.crc32(repr((str(dtype), num_tasks, hypers, outputs)).encode()) % 10_000
    params = [torch.zeros(rows, WIDTH, dtype=dtype, device=device, requires_grad=True) for rows in TABLE_ROWS]
    bucket = RowBucket(params, num_tasks, [None] * len(params), list(OUTPUTS[outputs]))
    balance = BACKENDS[backend].loader()
    steps = [_step_parts(seed, step, num_tasks, dtype, device) for step in range(STEPS)]
    dense = [_dense_equivalent(tables, num_tasks, dtype) for tables in steps]
    sizes = [rows * WIDTH for rows in TABLE_ROWS]
    expected = truth(dense, sizes, relax, beta, strategy)
    outs = []
    for step, tables in enumerate(steps):
        results = _balance_step(bucket, tables, balance, Hyperparameters(relax, beta, strategy))
        flat = []
        for i, (parts, result, param, sparse) in enumerate(zip(tables, results, params, OUTPUTS[outputs])):
            if not parts:
                assert result is None, f"step {step}: table {i} no task reached keeps its .grad"
                flat.append(expected[0][step][sum(sizes[:i]) : sum(sizes[: i + 1])].to(dtype))  # nothing to compare
                continue
            if sparse:
                assert result.is_sparse and result.is_coalesced()
                touched = torch.cat([part[1] for part in parts]).cpu().unique()
                assert result._indices()[0].cpu().tolist() == touched[touched < TABLE_ROWS[i]].tolist()
                result = result.to_dense()
            else:
                assert result.layout == torch.strided and result.stride() == param.stride()
            assert result.dtype == dtype and result.shape == param.shape
            flat.append(result.reshape(-1))
        outs.append(torch.cat(flat))
    assert_matches_truth(outs, bucket.norm_ema, expected, num_tasks, label=backend)


@pytest.mark.parametrize("device", DEVICES)
def test_row_bucket_is_bitwise_reproducible(device):
    """Duplicate ids are summed in a fixed order on every device (no atomics): the same inputs give the same bits."""
    dtype, num_tasks = torch.float32, 3
    steps = [_step_parts(5, step, num_tasks, dtype, device) for step in range(STEPS)]
    backend = available_backends(device)[-1]
    runs = []
    for _ in range(2):
        params = [torch.zeros(rows, WIDTH, dtype=dtype, device=device, requires_grad=True) for rows in TABLE_ROWS]
        bucket = RowBucket(params, num_tasks, [None] * len(params), [True, False, False])
        outs = []
        for tables in steps:
            results = _balance_step(bucket, tables, BACKENDS[backend].loader(), Hyperparameters(0.7, 0.9, "C"))
            outs += [r.to_dense() if r is not None and r.is_sparse else r for r in results]
        runs.append((outs, bucket.norm_ema.clone()))
    (first, ema_first), (second, ema_second) = runs
    assert torch.equal(ema_first, ema_second)
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_slots_past_the_distinct_ids_never_reach_a_row(device):
    """The block's slots past a table's distinct ids (duplicates, "no row" ids) hold no row: whatever the kernel
    writes there (NaN here) must not reach any row of a dense result, row 0 included."""
    params = [torch.zeros(rows, WIDTH, dtype=torch.float64, device=device) for rows in TABLE_ROWS]
    bucket = RowBucket(params, 2, [None] * len(params), [False, False, True])
    real = BACKENDS["torch"].loader()

    def poisoned(grads, norm_ema, out, layout, hyper):
        real(grads, norm_ema, out, layout, hyper)
        out[(grads == 0).all(0)] = float("nan")  # the empty slots (random rows are never exactly zero)

    ids = [torch.tensor([3, 3, 5, 37, 3]), torch.tensor([0, 10, 11, 0]), torch.tensor([1, 1, 20])]
    for i, table_ids in enumerate(ids):
        values = torch.randn(2, table_ids.numel(), WIDTH, dtype=torch.float64)
        bucket.add_shared_rows(i, table_ids.to(device), values.to(device))
    results = bucket.balance(poisoned, Hyperparameters(0.5, 0.0, "C"))
    for result, table_ids, rows in zip(results, ids, TABLE_ROWS):
        dense = result.to_dense() if result.is_sparse else result
        touched = torch.zeros(rows, dtype=torch.bool)
        touched[table_ids[table_ids < rows]] = True
        assert torch.isfinite(dense).all()
        assert (dense.cpu()[~touched] == 0).all() and (dense.cpu()[touched] != 0).all()
