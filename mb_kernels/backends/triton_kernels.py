r"""The two Triton kernels of the MetaBalance step; the launcher is :mod:`mb_kernels.backends.triton`, the math
is stated once in :mod:`mb_kernels.backends.reference`.

Both kernels take one *chunk* per program: a run of columns ``[start, stop)`` of the flat ``[T, N]``
workspace that lies inside one tensor p. The chunk table (``chunk_ptr``, int64 ``[C, 5]`` rows: p, start, stop,
first chunk of p, number of chunks of p; :meth:`mb_kernels.layout.FlatLayout.chunk_table`) is built once per
layout. Every tensor owns at least one chunk, even an empty one (start == stop).

* Launch 1 (``metabalance_norms_kernel``, one program per chunk): ``partials[c, t] = Σ g_t²`` over the
  chunk, in float64, into a ``[C, T]`` buffer (no atomics). Each tensor's first chunk also copies its EMA row
  into a scratch ``ema_old``.
* Launch 2 (``metabalance_combine_kernel``, one program per chunk): sums its tensor's partial rows in a
  fixed order (float64), takes the square root (float64, rounded once to the state dtype), updates the EMA,
  evaluates the strategy and the weights in-kernel (strategy is a compile-time constant; no host sync on
  tensor values), and writes G for its chunk.

Squares are summed in float64 for every gradient dtype: the square of a finite float32/float16/bfloat16 value is
exact in float64 and within its range, so every finite gradient whose norm fits in float32 gets its norm (a float32
sum overflows above a norm of ~1.8e19 and drops elements below ~1e-19; docs/design.md §1).

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
     and in every run, so the output is bitwise reproducible.
  4. The scratch buffers are reused across calls of one layout: calls are ordered on the stream, and the next
     call's launch 1 is enqueued after this call's launch 2.

Importing this module needs Triton; :mod:`mb_kernels.backends.triton` turns its absence into a clear error.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


# Reductions call tl.reduce with tl.sum's own combine function (a private name, present since Triton 2.1;
# _add otherwise): compiled code is the same as tl.sum, but the interpreter then sums with numpy without
# entering tl.sum, a JIT function whose every call re-patches triton.language (~5 ms each).
_SUM = getattr(tl.standard, "_sum_combine", _add)


@triton.jit
def _round_to_bf16_bits(x):
    """float32 -> bfloat16, round to nearest even, by integer arithmetic on the bits. Only for the Triton
    interpreter, whose float32 -> bfloat16 cast truncates (Triton 3.9); compiled code uses the native cvt.rn."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN (its mantissa could carry into the sign)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _chunk_row(chunk_ptr, c, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    """Row c of the chunk table: (tensor, first column, end column, tensor's first chunk, its chunk count), with
    the alignment hint on the aligned path."""
    row = chunk_ptr + c * 5
    p = tl.load(row)
    start = tl.load(row + 1)
    stop = tl.load(row + 2)
    if ALIGNED:  # the host checked that every boundary is a multiple of VEC elements (16 bytes)
        start = tl.multiple_of(start, VEC)
        stop = tl.multiple_of(stop, VEC)
    return p, start, stop, tl.load(row + 3), tl.load(row + 4)


@triton.jit
def metabalance_norms_kernel(
    grads_ptr,  # [T, N] task gradients, row-major (read)
    ema_ptr,  # [P, T] moving averages before this step (read: each tensor's first chunk copies its row)
    ema_old_ptr,  # [P, T] scratch: launch 2 reads the pre-step averages from here (written here, once per row)
    partials_ptr,  # [C, T_BLOCK] float64 per-chunk, per-task sums of squares (written: row c by program c only)
    chunk_ptr,  # [C, 5] int64 chunk table: tensor, start column, stop column, first chunk, chunk count
    row_units,  # N // VEC: row t starts at t * row_units * VEC (a product the compiler knows is VEC-aligned)
    num_tasks,  # T
    BLOCK: tl.constexpr,  # columns per inner step
    T_BLOCK: tl.constexpr,  # T rounded up to a power of two (rows >= T are masked)
    VEC: tl.constexpr,  # elements per 16 bytes on the aligned path, 1 otherwise
    ALIGNED: tl.constexpr,
    ACC: tl.constexpr,  # state dtype: float32, or float64 for float64 gradients (squares: float64 always)
):
    """Launch 1: partials[c, t] = sum over chunk c's columns of g_t^2 (the norms ||g_t||, squared), in float64."""
    c = tl.program_id(0)
    p, start, stop, first, _ = _chunk_row(chunk_ptr, c, VEC, ALIGNED)
    tasks = tl.arange(0, T_BLOCK)
    task_mask = tasks < num_tasks
    # Snapshot of the pre-step EMA for launch 2 (see the note on races above): one program per tensor.
    # (A vector compare, not `task_mask & scalar_bool`: the interpreter of Triton 3.9 turns that into int32.)
    row_mask = tasks < tl.where(first == c, num_tasks, 0)
    old = tl.load(ema_ptr + p * num_tasks + tasks, mask=row_mask, other=0.0)
    tl.store(ema_old_ptr + p * num_tasks + tasks, old, mask=row_mask)

    rows = tasks.to(tl.int64) * row_units * VEC
    acc = tl.full([T_BLOCK, BLOCK], 0.0, tl.float64)
    for i in range(0, (stop - start + BLOCK - 1) // BLOCK):
        cols = start + i * BLOCK + tl.arange(0, BLOCK)
        if ALIGNED:
            cols = tl.max_contiguous(tl.multiple_of(cols, VEC), BLOCK)
        mask = task_mask[:, None] & (cols < stop)[None, :]
        g = tl.load(grads_ptr + rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float64)
        acc += g * g
    # Rows t >= T sum masked zeros: the whole padded row is stored, so launch 2 reads no garbage.
    tl.store(partials_ptr + c * T_BLOCK + tl.arange(0, T_BLOCK), tl.reduce(acc, 1, _SUM))


@triton.jit
def metabalance_combine_kernel(
    grads_ptr,  # [T, N] task gradients (read)
    out_ptr,  # [N] combined gradient G in the gradient dtype (written: chunk c's columns by program c only)
    ema_ptr,  # [P, T] moving averages (written only: row p by the first chunk of tensor p)
    ema_old_ptr,  # [P, T] pre-step moving averages from launch 1 (read only)
    partials_ptr,  # [C, T_BLOCK] float64 per-chunk sums of squares from launch 1 (read only)
    chunk_ptr,  # [C, 5] int64 chunk table: tensor, start column, stop column, first chunk, chunk count
    row_units,  # N // VEC
    num_tasks,  # T
    relax,  # r
    one_minus_relax,  # 1 - r, rounded once on the host
    beta,  # EMA factor
    one_minus_beta,  # 1 - beta, rounded once on the host
    BLOCK: tl.constexpr,
    T_BLOCK: tl.constexpr,
    R_BLOCK: tl.constexpr,  # partial rows summed per step
    VEC: tl.constexpr,
    ALIGNED: tl.constexpr,
    STRATEGY: tl.constexpr,  # index into contract.STRATEGIES: 0 = "A", 1 = "B", 2 = "C"
    ACC: tl.constexpr,
    SOFT_BF16: tl.constexpr,  # round to bfloat16 by integer arithmetic (interpreter only, see _round_to_bf16_bits)
):
    """Launch 2: n = sqrt(sum of the tensor's partials), EMA update, weights, and G for chunk c."""
    c = tl.program_id(0)
    p, start, stop, first, count = _chunk_row(chunk_ptr, c, VEC, ALIGNED)
    last = first + count
    tasks = tl.arange(0, T_BLOCK)
    task_mask = tasks < num_tasks

    # 1. n[p, t]: every program of tensor p sums the same partial rows in the same order, so all of them
    #    (and every run) get bitwise the same norms and weights. Sum and square root in float64 (tl.sqrt on
    #    float64 is the IEEE sqrt.rn.f64: PTX has no approximate one), rounded once into the state dtype.
    sq = tl.full([R_BLOCK, T_BLOCK], 0.0, tl.float64)
    for j0 in range(first, last, R_BLOCK):
        js = j0 + tl.arange(0, R_BLOCK)
        sq += tl.load(partials_ptr + js[:, None] * T_BLOCK + tasks[None, :], mask=(js < last)[:, None], other=0.0)
    norms = tl.sqrt(tl.reduce(sq, 0, _SUM)).to(ACC)

    # 2. m <- beta m + (1 - beta) n, only where n is finite (n >= 0, so `n < inf` is false exactly for Inf/NaN).
    old = tl.load(ema_old_ptr + p * num_tasks + tasks, mask=task_mask, other=0.0).to(ACC)
    ema = tl.where(norms < float("inf"), old * beta + norms * one_minus_beta, old)
    tl.store(
        ema_ptr + p * num_tasks + tasks,
        ema.to(ema_ptr.dtype.element_ty),
        mask=tasks < tl.where(c == first, num_tasks, 0),
    )

    # 3. w_t = r m_0/m_t + (1 - r) where the strategy rescales t and m_t != 0, else 1 (w_0 = 1).
    target = tl.reduce(tl.where(tasks == 0, ema, 0.0), 0, _SUM)
    if STRATEGY == 0:
        rescale = ema > target
    elif STRATEGY == 1:
        rescale = ema < target
    else:
        rescale = tasks >= 0
    rescale = rescale & (ema != 0.0) & (tasks > 0) & task_mask
    safe = tl.where(ema != 0.0, ema, 1.0)
    if ACC == tl.float32:
        ratio = tl.math.div_rn(tl.full([T_BLOCK], 0.0, ACC) + target, safe)
        largest = tl.full([T_BLOCK], 3.4028234663852886e38, ACC)
    else:
        ratio = target / safe
        largest = tl.full([T_BLOCK], 1.7976931348623157e308, ACC)
    # m_0/m_t capped at the largest finite value (it overflows for a subnormal m_t): r = 0 still gives w = 1.
    ratio = tl.where(ratio < largest, ratio, largest)
    weights = tl.where(rescale, ratio * relax + one_minus_relax, 1.0)

    # 4. G = g_0 + sum_t w_t g_t in ACC, rounded once into the gradient dtype. A non-finite g_t stays
    #    non-finite (w_t is finite), so GradScaler sees the overflow.
    rows = tasks.to(tl.int64) * row_units * VEC
    for i in range(0, (stop - start + BLOCK - 1) // BLOCK):
        cols = start + i * BLOCK + tl.arange(0, BLOCK)
        if ALIGNED:
            cols = tl.max_contiguous(tl.multiple_of(cols, VEC), BLOCK)
        col_mask = cols < stop
        g = tl.load(grads_ptr + rows[:, None] + cols[None, :], mask=task_mask[:, None] & col_mask[None, :], other=0.0)
        combined = tl.reduce(g.to(ACC) * weights[:, None], 0, _SUM)
        if SOFT_BF16:
            rounded = _round_to_bf16_bits(combined)
        else:
            rounded = combined.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + cols, rounded, mask=col_mask)
