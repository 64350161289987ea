"""Triton backend: the whole MetaBalance step of one (device, dtype) bucket in two launches.

The math is :mod:`mb_kernels.backends.reference`'s; the kernels, their work split and why they are race-free
and bitwise reproducible are in :mod:`mb_kernels.backends.triton_kernels`.

Host side. Everything that depends only on the layout, the task count and the dtype is computed once and kept in
a :class:`_LaunchPlan` in ``layout.cache``: the tile (BLOCK), the chunk table (the shared GPU format of
:meth:`~mb_kernels.layout.FlatLayout.chunk_table`), the grid, the scratch buffers and the alignment of the
boundaries. A call then checks its inputs, looks the plan up, and launches the two kernels directly (no
``custom_op`` dispatch, no device context when the tensors are on the current device, no allocation). Under
``torch.compile`` the call goes through the custom op ``mb_kernels::metabalance_triton`` instead, which has a
fake kernel for tracing.

Launch fast path. ``kernel[grid](...)`` re-derives the kernel's specialisation key from every argument on every
call (tens of microseconds, the whole cost of a many-small call on an H100). Everything that key depends on is
fixed per plan except the strategy, the alignment path and the 16-byte alignment of the caller's three tensors,
so the plan keeps the compiled kernel Triton returned for each such combination and later calls hand the
arguments straight to its launcher (the same call Triton itself makes, on the current CUDA stream). The fast path
is off under the interpreter, when Triton launch hooks are installed (profilers), and for Triton versions whose
compiled kernels lack that launcher interface; it is checked bitwise against the standard path on GPU.

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
from dataclasses import dataclass, field

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
# The launch fast path (module docstring); tests switch it off to record every launch through Triton's JIT.
FAST_LAUNCH = not _INTERPRETING


def _launch_hooks_installed() -> bool:
    """Whether Triton has launch hooks to call (then every launch goes through Triton's own path)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        return True
    for name in ("launch_enter_hook", "launch_exit_hook"):
        hook = getattr(knobs.runtime, name, None)
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _run(kernel, grid0: int, args: tuple, constexprs: dict, compiled: dict | None, key: tuple) -> None:
    """Launch ``kernel`` over ``grid0`` programs: through the cached compiled kernel when the fast path has one for
    ``key``, else through Triton's JIT (keeping what it returns for the next call)."""
    cached = compiled.get(key) if compiled is not None else None
    if cached is not None:
        # Triton's launcher takes every parameter in signature order, constexprs included (it skips those).
        stream = torch._C._cuda_getCurrentRawStream(args[0].device.index)
        cached.run(
            grid0, 1, 1, stream, cached.function, cached.packed_metadata, None, None, None, *args, *constexprs.values()
        )
        return
    result = kernel[(grid0,)](*args, **constexprs, num_warps=_NUM_WARPS)
    if (
        compiled is not None
        and FAST_LAUNCH
        and all(hasattr(result, name) for name in ("run", "function", "packed_metadata"))
        and list(kernel.arg_names[len(args) :]) == list(constexprs)  # the order the launcher expects
        and not _launch_hooks_installed()
    ):
        compiled[key] = result


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
    partials: torch.Tensor  # [C, T_BLOCK] float64 scratch: per-chunk squared sums (triton_kernels)
    ema_old: torch.Tensor  # [P, T] scratch
    compiled: dict = field(default_factory=dict)  # fast-path key -> Triton's compiled kernel (module docstring)


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
        plan = _LaunchPlan(
            chunk_table=table,
            block=block,
            t_block=t_block,
            size_align=math.gcd(math.gcd(*layout.sizes) if layout.sizes else 0, 16),
            partials=torch.empty(table.shape[0], t_block, dtype=torch.float64, device=task_grads.device),
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
    compiled: dict | None = None,
) -> None:
    """Enqueue the two kernels on the current stream of the tensors' device (``compiled``: the plan's fast-path
    cache, None for none)."""
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
        compiled = None
    acc = tl.float64 if norm_ema.dtype == torch.float64 else tl.float32
    soft_bf16 = _INTERPRETING and out.dtype == torch.bfloat16
    # What Triton's specialisation key depends on beyond the plan: the constexprs below and the 16-byte
    # alignment of the caller's tensors (the plan's own buffers never change).
    key = (aligned, strategy, task_grads.data_ptr() % 16, out.data_ptr() % 16, norm_ema.data_ptr() % 16)
    _run(
        triton_kernels.metabalance_norms_kernel,
        num_chunks,
        (task_grads, norm_ema, ema_old, partials, chunk_table, numel // vec, num_tasks),
        dict(BLOCK=block, T_BLOCK=t_block, VEC=vec, ALIGNED=aligned, ACC=acc),
        compiled,
        ("norms", *key),
    )
    _run(
        triton_kernels.metabalance_combine_kernel,
        num_chunks,
        (
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
        ),
        dict(
            BLOCK=block,
            T_BLOCK=t_block,
            R_BLOCK=_R_BLOCK,
            VEC=vec,
            ALIGNED=aligned,
            STRATEGY=strategy,
            ACC=acc,
            SOFT_BF16=soft_bf16,
        ),
        compiled,
        ("combine", *key),
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
        chunk_table.shape[0], _task_block(task_grads.shape[0]), dtype=torch.float64, device=task_grads.device
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
    # Triton launches on the current CUDA device: switch only when the tensors live elsewhere.
    switch = device.type == "cuda" and device.index != torch.cuda.current_device()
    with torch.cuda.device(device) if switch else contextlib.nullcontext():
        _launch(
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
            plan.compiled,
        )
