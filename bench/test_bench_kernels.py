"""Kernel level: one balancing step on prepared [T, N] gradients (no backward), every backend present.

Groups are ``kernel <device> <dtype> <shape> T=<T>``: the rows of a group ran on the same inputs and are
comparable. Rows: ``original-style`` (per-tensor Python loop, bench.common.original_style_step), ``reference``
(mb_kernels' pure-torch backend), the fused backends available here (``cpu``, ``cuda``, ``triton``),
``torch-rechub`` (Torch-RecHub's MetaBalance, optional) and ``rechub-handover`` (only the gradient hand-over
that the Torch-RecHub row includes because its ``step`` runs the backward passes itself; subtract it to
compare balancing alone). The ``copy <device>`` group holds the bandwidth yardstick. Byte formula and GB/s:
see bench/common.py.
"""

from __future__ import annotations

import gc
import itertools

import pytest
import torch

from bench import common
from mb_kernels.backends.contract import Hyperparameters, state_dtype
from mb_kernels.dispatch import BACKENDS, available_backends
from mb_kernels.layout import FlatLayout
from tests import cases as test_cases
from tests.naive import naive_metabalance_step

BASELINES = ("original-style", "reference")
RECHUB_ROWS = ("torch-rechub", "rechub-handover")


def kernel_backends(device: str) -> list[str]:
    fused = [
        name
        for name in available_backends(device)
        # The Triton interpreter (TRITON_INTERPRET=1 on CPU tensors) is a test vehicle, not a fast path.
        if name in common.FUSED_BACKENDS and not (device == "cpu" and name == "triton")
    ]
    return [*BASELINES, *fused, *RECHUB_ROWS]


def _cases():
    cases = []
    for device in common.devices():
        backends = kernel_backends(device)
        for dtype, shape, num_tasks in itertools.product(common.dtypes(), common.kernel_shapes(), common.task_counts()):
            for backend in backends:  # innermost: the rows of a group reuse one set of inputs
                cases.append(
                    pytest.param(
                        device,
                        dtype,
                        shape,
                        num_tasks,
                        backend,
                        id=f"{device}-{str(dtype).removeprefix('torch.')}-{shape}-T{num_tasks}-{backend}",
                    )
                )
    return cases


_INPUTS: dict[tuple, tuple] = {}


def _inputs(device: str, dtype: torch.dtype, shape: str, num_tasks: int):
    """(sizes, [T, N] gradient sets, output sets) for one group; only the latest group is kept in memory."""
    key = (device, dtype, shape, num_tasks)
    if key not in _INPUTS:
        _INPUTS.clear()
        gc.collect()
        sizes = common.kernel_shapes()[shape]
        base = common.random_task_grads(sizes, num_tasks, dtype, device, seed=num_tasks)
        numel = base.shape[1]
        count = common.num_input_sets((num_tasks + 1) * numel * base.element_size())
        grad_sets = [base] + [base.clone() for _ in range(count - 1)]
        out_sets = [torch.empty(numel, dtype=dtype, device=device) for _ in range(count)]
        _INPUTS[key] = (sizes, grad_sets, out_sets)
    return _INPUTS[key]


def _rotating(count: int):
    counter = itertools.count()
    return lambda: next(counter) % count


def _rechub_setup(rechub_cls, grads: torch.Tensor, sizes: list[int]):
    params = [torch.zeros(n, dtype=grads.dtype, device=grads.device, requires_grad=True) for n in sizes]
    optimizer = rechub_cls(params, relax_factor=common.RELAX_FACTOR, beta=common.BETA)
    losses = [common.HandOverLoss(params, list(row.split(sizes))) for row in grads]
    return params, optimizer, losses


def _rechub_vs_ours(rechub_cls, grads: torch.Tensor, sizes: list[int], steps: int = 3) -> dict[str, float]:
    """Run Torch-RecHub and our reference for a few steps on the same gradients; compare the last outputs."""
    params, optimizer, _ = _rechub_setup(rechub_cls, grads, sizes)
    layout = FlatLayout.from_sizes(sizes, grads.device)
    ema = torch.zeros(len(sizes), grads.shape[0], dtype=state_dtype(grads.dtype), device=grads.device)
    ours = torch.empty(grads.shape[1], dtype=grads.dtype, device=grads.device)
    for step in range(steps):
        # Vary the task magnitudes between steps so that the moving averages matter.
        factors = 1.0 + 0.5 * step * torch.arange(grads.shape[0], device=grads.device) / grads.shape[0]
        step_grads = (grads * factors[:, None].to(grads.dtype)).contiguous()
        for p in params:
            p.grad = None
        optimizer.step([common.HandOverLoss(params, list(row.split(sizes))) for row in step_grads])
        hyper = Hyperparameters(common.RELAX_FACTOR, common.BETA, common.STRATEGY)
        BACKENDS["torch"].loader()(step_grads, ema, ours, layout, hyper)
        del step_grads
    theirs = torch.cat([p.grad.flatten() for p in params])
    return common.relative_difference(theirs, ours)


def test_original_style_matches_naive():
    """The original-style baseline computes MetaBalance: it agrees with tests/naive.py in float64."""
    sizes = [3, 0, 1, 257, 130, 5]
    for strategy, beta in (("A", 0.9), ("B", 0.0), ("C", 0.9)):
        steps = [test_cases.random_task_grads(40 + s, sizes, 3, torch.float64) for s in range(3)]
        naive_ema = [[0.0] * 3 for _ in sizes]
        ours_ema = torch.zeros(len(sizes), 3, dtype=torch.float64)
        layout = FlatLayout.from_sizes(sizes, "cpu")
        for grads in steps:
            per_task = [list(row.split(sizes)) for row in grads]
            want = naive_metabalance_step(per_task, naive_ema, 0.7, beta, strategy)
            got = torch.empty(grads.shape[1], dtype=torch.float64)
            common.original_style_backend(grads, ours_ema, got, layout, Hyperparameters(0.7, beta, strategy))
            torch.testing.assert_close(got, torch.cat([w.flatten() for w in want]), rtol=1e-12, atol=1e-300)
        torch.testing.assert_close(ours_ema, torch.tensor(naive_ema, dtype=torch.float64), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("device", common.devices())
def test_copy_bandwidth(benchmark, device):
    """The yardstick: dst.copy_(src) on a large float32 tensor, in the same run as the kernels."""
    numel = common.copy_numel()
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)

    benchmark.group = f"copy {device}"
    benchmark.extra_info.update(
        kind="copy", device=device, numel=numel, dtype="float32", bytes=2 * numel * 4, bytes_formula=common.COPY_FORMULA
    )
    common.run_timed(benchmark, copy, device, min_rounds=5)
    common.record_gbps(benchmark)


@pytest.mark.parametrize(("device", "dtype", "shape", "num_tasks", "backend"), _cases())
def test_kernel(benchmark, device, dtype, shape, num_tasks, backend):
    sizes, grad_sets, out_sets = _inputs(device, dtype, shape, num_tasks)
    numel, itemsize, count = grad_sets[0].shape[1], grad_sets[0].element_size(), len(grad_sets)
    dtype_name = str(dtype).removeprefix("torch.")
    benchmark.group = f"kernel {device} {dtype_name} {shape} T={num_tasks}"
    info = benchmark.extra_info
    info.update(
        kind="kernel",
        device=device,
        dtype=dtype_name,
        shape=shape,
        num_tensors=len(sizes),
        numel=numel,
        tasks=num_tasks,
        backend=backend,
        fused=backend in common.FUSED_BACKENDS,
        input_sets=count,
        bytes=common.kernel_bytes(num_tasks, numel, itemsize),
        bytes_formula=common.BYTES_FORMULA,
        threads=torch.get_num_threads(),
    )
    acc = state_dtype(dtype)
    which = _rotating(count)
    r, beta, strategy = common.RELAX_FACTOR, common.BETA, common.STRATEGY

    if backend == "original-style":
        prepared = [common.split_workspace(g, o, sizes) for g, o in zip(grad_sets, out_sets)]
        norms = [
            [[torch.zeros((), dtype=acc, device=device) for _ in range(num_tasks)] for _ in sizes] for _ in prepared
        ]

        def step():
            k = which()
            grads, outs = prepared[k]
            common.original_style_step(grads, norms[k], outs, r, beta, strategy)

    elif backend in RECHUB_ROWS:
        rechub_cls = common.require_rechub(info)
        setups = [_rechub_setup(rechub_cls, g, sizes) for g in grad_sets]
        if backend == "torch-rechub":
            info["rechub_vs_ours"] = _rechub_vs_ours(rechub_cls, grad_sets[0], sizes)
            info["note"] = "includes the gradient hand-over (see rechub-handover); adds 1e-5 to the denominator"

            def step():
                params, optimizer, losses = setups[which()]
                for p in params:
                    p.grad = None
                optimizer.step(losses)

        else:
            info["note"] = "gradient hand-over only: what torch-rechub's row spends outside balancing"

            def step():
                params, _, losses = setups[which()]
                for p in params:
                    p.grad = None
                for loss in losses:
                    loss.backward(retain_graph=True)

    else:
        fn = BACKENDS["torch" if backend == "reference" else backend].loader()
        # One layout, as one optimizer bucket has: what a backend derives from it is built once, not per round.
        layout = FlatLayout.from_sizes(sizes, device)
        emas = [torch.zeros(len(sizes), num_tasks, dtype=acc, device=device) for _ in grad_sets]
        hyper = Hyperparameters(r, beta, strategy)

        def step():
            k = which()
            fn(grad_sets[k], emas[k], out_sets[k], layout, hyper)

    common.run_timed(benchmark, step, device)
    common.record_gbps(benchmark)
    if backend in common.FUSED_BACKENDS:
        info["copy_gbps_adjacent"] = common.copy_gbps(device)
