r"""Triton backend: the whole MetaBalance step of one (device, dtype) bucket in two launches.

Math (DESIGN §1, paper Algorithm 2), per tensor p and task t, t = 0 the target:

.. math::
    n_{p,t} = \lVert g_{p,t} \rVert_2,\quad
    m_{p,t} \leftarrow \beta m_{p,t} + (1-\beta) n_{p,t} \text{ (if } n_{p,t} \text{ finite)},\quad
    w_{p,t} = r\, m_{p,0}/m_{p,t} + (1-r) \text{ (if rescaled and } m_{p,t} \ne 0 \text{, else 1)},\quad
    G_p = g_{p,0} + \textstyle\sum_{t \ge 1} w_{p,t}\, g_{p,t}

accumulated in float32 (float64 for float64 gradients), G rounded once into the gradient dtype.

Design. The flat ``[T, N]`` workspace is cut into *chunks*, each a run of whole BLOCKs of one tensor (its
last chunk ends at the tensor's end; an empty tensor gets one empty chunk). The chunk table is built once
per (layout, BLOCK) on the host and cached in ``layout.cache``; a tensor is given about
``min(blocks, 8·sqrt(blocks), 1024)`` chunks, which bounds the partial rows each program of launch 2 reads
(≤ 1024, a few percent of the bucket's bytes, from L2) while keeping thousands of programs on big tensors.

* Launch 1 (``metabalance_norms_kernel``, one program per chunk): ``partials[c, t] = Σ g_t²`` over the
  chunk, into a ``[C, T]`` buffer (no atomics). Each tensor's first chunk also copies its EMA row into a
  scratch ``ema_old``.
* Launch 2 (``metabalance_combine_kernel``, one program per chunk): sums its tensor's partial rows in a
  fixed order, takes the square root, updates the EMA, evaluates the strategy and the weights in-kernel
  (strategy is a compile-time constant; no host sync on tensor values), and writes G for its chunk.

Bytes moved (the bandwidth floor): launch 1 reads T·N·itemsize, launch 2 reads T·N·itemsize and writes
N·itemsize, so 2·T·N·itemsize + N·itemsize in all (plus O(C·T) partials and O(P·T) EMA, negligible).

Why it is race-free and deterministic.
  1. Launch 2 needs the pre-step EMA in every program of a tensor but only one program may write the new
     one. If programs read ``norm_ema`` itself, the first chunk's write could land before a later chunk's
     read (programs of a grid run in any order), which would apply the EMA twice. So in launch 2
     ``norm_ema`` is *write-only* (row p written by exactly one program, the first chunk of p; every tensor
     has one, so every row is written) and the pre-step values are read from ``ema_old``, which launch 1
     wrote (row p by exactly one program) and launch 2 only reads. Kernel launches on one stream are
     ordered, so every read of ``ema_old`` and of ``partials`` in launch 2 sees launch 1's complete writes.
  2. ``partials`` row c and ``out[start_c:stop_c]`` are written by program c only; chunks do not overlap.
  3. No atomics: the norms are a fixed-order sum of fixed partials, identical in every program of a tensor
     and in every run, so the output is bitwise reproducible; one path serves ``deterministic`` both ways.
  4. Scratch buffers are allocated per call through the caching allocator (stream-safe), not cached.

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

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mb_kernels' Triton backend needs the `triton` package (pip install triton; it ships with CUDA "
        f"builds of PyTorch on Linux): {err}"
    ) from err

from . import triton_kernels
from ._types import SUPPORTED_DTYPES, FlatLayout, strategy_index

# Tuning constants (see the module docstring); the tile of one inner step is T_BLOCK x BLOCK elements.
_TILE_ELEMENTS = 4096
_MIN_BLOCK = 256
_MAX_CHUNKS_PER_TENSOR = 1024
_CHUNKS_PER_SQRT_BLOCK = 8
_R_BLOCK = 64
_NUM_WARPS = 4


def _task_block(num_tasks: int) -> int:
    return max(2, triton.next_power_of_2(num_tasks))


def _block_size(num_tasks: int) -> int:
    return max(_MIN_BLOCK, _TILE_ELEMENTS // _task_block(num_tasks))


def _chunk_counts(size: int, block: int) -> tuple[int, int]:
    """(blocks per chunk, number of chunks) for one tensor of ``size`` elements; an empty tensor has one."""
    blocks = -(-size // block)
    if blocks == 0:
        return 1, 1
    target = max(1, min(blocks, _MAX_CHUNKS_PER_TENSOR, math.ceil(_CHUNKS_PER_SQRT_BLOCK * math.sqrt(blocks))))
    per_chunk = -(-blocks // target)
    return per_chunk, -(-blocks // per_chunk)


def chunk_tables(layout: FlatLayout, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(chunk_table [C, 3], first_chunk [P + 1], size_align)`` for ``layout`` and ``block``, cached in
    ``layout.cache`` (built on the host from ``layout.sizes`` once, copied to ``device`` once).

    ``size_align`` is the largest power of two <= 16 dividing every tensor size (so every offset)."""
    key = ("triton", block, device)
    cached = layout.cache.get(key)
    if cached is not None:
        return cached
    rows: list[tuple[int, int, int]] = []
    first = [0]
    offset = 0
    for p, size in enumerate(layout.sizes):
        per_chunk, count = _chunk_counts(size, block)
        span = per_chunk * block
        for k in range(count):
            start = offset + k * span
            rows.append((p, start, min(start + span, offset + size)))
        first.append(len(rows))
        offset += size
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3).to(device)
    first_chunk = torch.tensor(first, dtype=torch.int64).to(device)
    size_align = math.gcd(math.gcd(*layout.sizes) if layout.sizes else 0, 16)
    cached = (table, first_chunk, size_align)
    layout.cache[key] = cached
    return cached


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@torch.library.custom_op("mb_kernels::metabalance_triton", mutates_args=("norm_ema", "out"))
def metabalance_triton(
    task_grads: torch.Tensor,
    norm_ema: torch.Tensor,
    out: torch.Tensor,
    chunk_table: torch.Tensor,
    first_chunk: torch.Tensor,
    block: int,
    size_align: int,
    relax_factor: float,
    beta: float,
    strategy: int,
) -> None:
    """The two launches. Arguments as :func:`balance_triton`, with the layout replaced by its chunk tables."""
    if task_grads.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"mb_kernels::metabalance_triton runs on CUDA tensors (got {task_grads.device}); CPU tensors only "
            "under the Triton interpreter (TRITON_INTERPRET=1)"
        )
    num_tasks, numel = task_grads.shape
    num_chunks = chunk_table.shape[0]
    if norm_ema.shape[0] == 0 or num_chunks == 0:
        return
    acc_dtype = torch.float64 if task_grads.dtype == torch.float64 else torch.float32
    t_block = _task_block(num_tasks)
    vec = 16 // task_grads.element_size()
    aligned = (
        size_align % vec == 0
        and numel % vec == 0
        and task_grads.data_ptr() % 16 == 0
        and out.data_ptr() % 16 == 0
        and numel > 0
    )
    if not aligned:
        vec = 1
    if numel == 0:
        # Only empty chunks: no column is touched, but pointers to 0-byte storage may be null.
        task_grads = task_grads.new_zeros(1)
        out = out.new_zeros(1)
    device = task_grads.device
    partials = torch.empty(num_chunks, t_block, dtype=acc_dtype, device=device)
    ema_old = torch.empty_like(norm_ema)
    tl_acc = tl.float64 if acc_dtype == torch.float64 else tl.float32
    grid = (num_chunks,)
    soft_bf16 = out.dtype == torch.bfloat16 and _interpreting()
    # Triton launches on the current CUDA device: make it the tensors' device.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        triton_kernels.metabalance_norms_kernel[grid](
            task_grads,
            norm_ema,
            ema_old,
            partials,
            chunk_table,
            first_chunk,
            numel // vec,
            num_tasks,
            BLOCK=block,
            T_BLOCK=t_block,
            VEC=vec,
            ALIGNED=aligned,
            ACC=tl_acc,
            num_warps=_NUM_WARPS,
        )
        triton_kernels.metabalance_combine_kernel[grid](
            task_grads,
            out,
            norm_ema,
            ema_old,
            partials,
            chunk_table,
            first_chunk,
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
            ACC=tl_acc,
            SOFT_BF16=soft_bf16,
            num_warps=_NUM_WARPS,
        )


@metabalance_triton.register_fake
def _(task_grads, norm_ema, out, chunk_table, first_chunk, block, size_align, relax_factor, beta, strategy) -> None:
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
    if norm_ema.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"triton backend: norm_ema must be float32 or float64, got {norm_ema.dtype}")
    if not (task_grads.device == norm_ema.device == out.device):
        raise ValueError(
            f"triton backend: tensors on different devices: task_grads {task_grads.device}, "
            f"norm_ema {norm_ema.device}, out {out.device}"
        )


def balance_triton(
    task_grads: torch.Tensor,
    norm_ema: torch.Tensor,
    out: torch.Tensor,
    layout: FlatLayout,
    relax_factor: float,
    beta: float,
    strategy: str,
    deterministic: bool = False,
) -> None:
    """Triton backend with :func:`mb_kernels.reference.balance_torch`'s contract: ``task_grads`` [T, N]
    (read), ``norm_ema`` [P, T] (updated in place), ``out`` [N] (written with G).

    ``deterministic`` is accepted for the common signature: the only path has no atomics and is bitwise
    reproducible run to run.
    """
    del deterministic
    strategy_code = strategy_index(strategy)
    _check_inputs(task_grads, norm_ema, out, layout)
    if layout.num_tensors == 0:
        return
    block = _block_size(task_grads.shape[0])
    chunk_table, first_chunk, size_align = chunk_tables(layout, block, task_grads.device)
    torch.ops.mb_kernels.metabalance_triton(
        task_grads,
        norm_ema,
        out,
        chunk_table,
        first_chunk,
        block,
        size_align,
        float(relax_factor),
        float(beta),
        strategy_code,
    )
