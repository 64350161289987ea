"""Triton backend: the whole MetaBalance step of one (device, dtype) bucket in two launches.

The math is :mod:`mb_kernels.backends.reference`'s; the kernels, their work split and why they are race-free
and bitwise reproducible are in :mod:`mb_kernels.backends.triton_kernels`.

Host side. Everything that depends only on the layout, the task count and the dtype is computed once and kept in
a :class:`_LaunchPlan` in ``layout.cache``: the tile (BLOCK), the chunk table (the shared GPU format of
:meth:`~mb_kernels.layout.FlatLayout.chunk_table`), the grid, the scratch buffers and the alignment of the
boundaries. A call then checks its inputs, looks the plan up, and launches the two compiled kernels directly (no
``custom_op`` dispatch, no device context when the tensors are on the current device, no allocation). Under
``torch.compile`` the call goes through the custom op ``mb_kernels::metabalance_triton`` instead, which has a
fake kernel for tracing.

Bytes moved (the bandwidth floor): launch 1 reads T·N·itemsize, launch 2 reads T·N·itemsize and writes
N·itemsize, so 2·T·N·itemsize + N·itemsize in all (plus O(C·T) partials and O(P·T) EMA, negligible).

Alignment: when every tensor boundary, N and both data pointers are multiples of 16 bytes, the kernels
are compiled with ALIGNED=True and alignment hints (16-byte vector loads and stores); otherwise the same
kernels run without hints (correct for any offsets).

Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors: the tests) G is rounded to bfloat16 by
integer arithmetic, because the interpreter's float32 -> bfloat16 cast truncates; compiled code uses the
hardware's round-to-nearest-even conversion.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mb_kernels' Triton backend needs the `triton` package (pip install triton; it ships with CUDA "
        f"builds of PyTorch on Linux): {err}"
    ) from err

from ..layout import FlatLayout
from . import triton_kernels
from .contract import SUPPORTED_DTYPES, Hyperparameters, state_dtype

# Tuning constants. One inner step of a program loads a T_BLOCK x BLOCK tile of _TILE_BYTES (so half-precision
# tiles hold twice the elements); a chunk is at least _CHUNK_BLOCKS blocks and a tensor has at most
# _MAX_CHUNKS_PER_TENSOR chunks (each program of launch 2 sums that many partial rows, R_BLOCK at a time).
_TILE_BYTES = 16384
_MIN_BLOCK = 256
_CHUNK_BLOCKS = 8
_MAX_CHUNKS_PER_TENSOR = 1024
_R_BLOCK = 64
_NUM_WARPS = 4

_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _task_block(num_tasks: int) -> int:
    return max(2, triton.next_power_of_2(num_tasks))


def _block_size(num_tasks: int, itemsize: int) -> int:
    return max(_MIN_BLOCK, _TILE_BYTES // itemsize // _task_block(num_tasks))


def chunk_table(layout: FlatLayout, block: int, device: torch.device) -> torch.Tensor:
    """The Triton kernels' chunk table for ``layout`` and tile ``block`` (cached in the layout)."""
    return layout.chunk_table(_CHUNK_BLOCKS * block, _MAX_CHUNKS_PER_TENSOR, block, device)


@dataclass
class _LaunchPlan:
    """What one (layout, device, task count, dtype) needs per call, built once (see the module docstring)."""

    chunk_table: torch.Tensor
    block: int
    t_block: int
    size_align: int  # the largest power of two <= 16 dividing every tensor size (so every offset)
    partials: torch.Tensor  # [C, T_BLOCK] scratch in the accumulation dtype
    ema_old: torch.Tensor  # [P, T] scratch


# Number of plans built in this process: a test checks that repeated calls on one layout build none.
plan_builds = 0


def _plan(layout: FlatLayout, task_grads: torch.Tensor, norm_ema: torch.Tensor) -> _LaunchPlan:
    global plan_builds
    key = ("triton_plan", task_grads.device, task_grads.shape[0], task_grads.dtype, norm_ema.dtype)
    plan = layout.cache.get(key)
    if plan is None:
        plan_builds += 1
        num_tasks = task_grads.shape[0]
        block = _block_size(num_tasks, task_grads.element_size())
        table = chunk_table(layout, block, task_grads.device)
        t_block = _task_block(num_tasks)
        acc = state_dtype(task_grads.dtype)
        plan = _LaunchPlan(
            chunk_table=table,
            block=block,
            t_block=t_block,
            size_align=math.gcd(math.gcd(*layout.sizes) if layout.sizes else 0, 16),
            partials=torch.empty(table.shape[0], t_block, dtype=acc, device=task_grads.device),
            ema_old=torch.empty_like(norm_ema),
        )
        layout.cache[key] = plan
    return plan


def _launch(
    task_grads: torch.Tensor,
    norm_ema: torch.Tensor,
    out: torch.Tensor,
    chunk_table: torch.Tensor,
    block: int,
    size_align: int,
    partials: torch.Tensor,
    ema_old: torch.Tensor,
    relax_factor: float,
    beta: float,
    strategy: int,
) -> None:
    """Enqueue the two kernels on the current stream of the tensors' device."""
    num_tasks, numel = task_grads.shape
    num_chunks = chunk_table.shape[0]
    if norm_ema.shape[0] == 0 or num_chunks == 0:
        return
    t_block = partials.shape[1]
    vec = 16 // task_grads.element_size()
    aligned = (
        numel > 0
        and size_align % vec == 0
        and numel % vec == 0
        and task_grads.data_ptr() % 16 == 0
        and out.data_ptr() % 16 == 0
    )
    if not aligned:
        vec = 1
    if numel == 0:
        # Only empty chunks: no column is touched, but pointers to 0-byte storage may be null.
        task_grads = task_grads.new_zeros(1)
        out = out.new_zeros(1)
    acc = tl.float64 if partials.dtype == torch.float64 else tl.float32
    soft_bf16 = _INTERPRETING and out.dtype == torch.bfloat16
    grid = (num_chunks,)
    triton_kernels.metabalance_norms_kernel[grid](
        task_grads,
        norm_ema,
        ema_old,
        partials,
        chunk_table,
        numel // vec,
        num_tasks,
        BLOCK=block,
        T_BLOCK=t_block,
        VEC=vec,
        ALIGNED=aligned,
        ACC=acc,
        num_warps=_NUM_WARPS,
    )
    triton_kernels.metabalance_combine_kernel[grid](
        task_grads,
        out,
        norm_ema,
        ema_old,
        partials,
        chunk_table,
        numel // vec,
        num_tasks,
        relax_factor,
        1.0 - relax_factor,
        beta,
        1.0 - beta,
        BLOCK=block,
        T_BLOCK=t_block,
        R_BLOCK=_R_BLOCK,
        VEC=vec,
        ALIGNED=aligned,
        STRATEGY=strategy,
        ACC=acc,
        SOFT_BF16=soft_bf16,
        num_warps=_NUM_WARPS,
    )


def _check_device(device: torch.device) -> None:
    if device.type != "cuda" and not _INTERPRETING:
        raise RuntimeError(
            f"mb_kernels' Triton backend runs on CUDA tensors (got {device}); CPU tensors only under the Triton "
            "interpreter (TRITON_INTERPRET=1)"
        )


@torch.library.custom_op("mb_kernels::metabalance_triton", mutates_args=("norm_ema", "out"))
def metabalance_triton(
    task_grads: torch.Tensor,
    norm_ema: torch.Tensor,
    out: torch.Tensor,
    chunk_table: torch.Tensor,
    block: int,
    size_align: int,
    relax_factor: float,
    beta: float,
    strategy: int,
) -> None:
    """The two launches as one op, for torch.compile (eager calls launch directly). Scratch is allocated per
    call here: a traced graph holds no plan."""
    _check_device(task_grads.device)
    partials = torch.empty(
        chunk_table.shape[0], _task_block(task_grads.shape[0]), dtype=norm_ema.dtype, device=task_grads.device
    )
    ema_old = torch.empty_like(norm_ema)
    with torch.cuda.device(task_grads.device) if task_grads.device.type == "cuda" else contextlib.nullcontext():
        _launch(
            task_grads, norm_ema, out, chunk_table, block, size_align, partials, ema_old, relax_factor, beta, strategy
        )


@metabalance_triton.register_fake
def _(task_grads, norm_ema, out, chunk_table, block, size_align, relax_factor, beta, strategy) -> None:
    # In place on norm_ema and out; nothing to allocate. The checks mirror _check_inputs for traced calls.
    torch._check(task_grads.dim() == 2, lambda: "task_grads must be 2-D [num_tasks, numel]")
    torch._check(norm_ema.dim() == 2 and norm_ema.shape[1] == task_grads.shape[0], lambda: "norm_ema must be [P, T]")
    torch._check(out.shape == (task_grads.shape[1],), lambda: "out must have shape [numel]")
    return None


def _check_inputs(task_grads: torch.Tensor, norm_ema: torch.Tensor, out: torch.Tensor, layout: FlatLayout) -> None:
    if task_grads.dim() != 2 or not task_grads.is_contiguous():
        raise ValueError(
            f"triton backend: task_grads must be a contiguous [T, N] tensor, got {tuple(task_grads.shape)}"
        )
    if task_grads.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton backend: gradient dtype {task_grads.dtype} is not one of {SUPPORTED_DTYPES}")
    num_tasks, numel = task_grads.shape
    if numel != layout.numel:
        raise ValueError(f"triton backend: task_grads has {numel} columns but the layout covers {layout.numel}")
    if out.shape != (numel,) or out.dtype != task_grads.dtype or not out.is_contiguous():
        raise ValueError(
            f"triton backend: out must be a contiguous [{numel}] {task_grads.dtype} tensor, "
            f"got {tuple(out.shape)} {out.dtype}"
        )
    if norm_ema.shape != (layout.num_tensors, num_tasks) or not norm_ema.is_contiguous():
        raise ValueError(
            f"triton backend: norm_ema must be a contiguous [{layout.num_tensors}, {num_tasks}] tensor, "
            f"got {tuple(norm_ema.shape)}"
        )
    if norm_ema.dtype != state_dtype(task_grads.dtype):
        raise TypeError(
            f"triton backend: norm_ema must be {state_dtype(task_grads.dtype)} for {task_grads.dtype} gradients, "
            f"got {norm_ema.dtype}"
        )
    if not (task_grads.device == norm_ema.device == out.device):
        raise ValueError(
            f"triton backend: tensors on different devices: task_grads {task_grads.device}, "
            f"norm_ema {norm_ema.device}, out {out.device}"
        )
    _check_device(task_grads.device)


def balance_triton(
    task_grads: torch.Tensor, norm_ema: torch.Tensor, out: torch.Tensor, layout: FlatLayout, hyper: Hyperparameters
) -> None:
    """Triton backend (:class:`~mb_kernels.backends.contract.BalanceFn`): ``task_grads`` [T, N] (read),
    ``norm_ema`` [P, T] (updated in place), ``out`` [N] (written with G)."""
    strategy = hyper.strategy_code
    _check_inputs(task_grads, norm_ema, out, layout)
    if layout.num_tensors == 0:
        return
    plan = _plan(layout, task_grads, norm_ema)
    if torch.compiler.is_compiling():
        torch.ops.mb_kernels.metabalance_triton(
            task_grads,
            norm_ema,
            out,
            plan.chunk_table,
            plan.block,
            plan.size_align,
            hyper.relax_factor,
            hyper.beta,
            strategy,
        )
        return
    device = task_grads.device
    args = (
        task_grads,
        norm_ema,
        out,
        plan.chunk_table,
        plan.block,
        plan.size_align,
        plan.partials,
        plan.ema_old,
        hyper.relax_factor,
        hyper.beta,
        strategy,
    )
    # Triton launches on the current CUDA device: switch only when the tensors live elsewhere.
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            _launch(*args)
    else:
        _launch(*args)
