"""The compiled op ``torch.ops.mb_kernels.metabalance_``: its fake kernel and the CPU/CUDA backends built on it.

The schema lives in csrc/metabalance.cpp (one contract for every device)::

    metabalance_(Tensor task_grads, Tensor offsets, Tensor? chunks, Tensor(a!) norm_ema, Tensor(b!) out,
                 float relax_factor, float beta, int strategy, bool deterministic) -> ()

``chunks`` is the CUDA kernels' work table (:func:`cuda_chunk_table`, built once per layout and cached in
``layout.cache``); the CPU kernel plans its work from ``offsets`` and takes ``None``.

Importing this module loads ``mb_kernels._C`` when it was built (which registers the op) and registers the fake
kernel; nothing else happens at import. :func:`compiled_backend` raises ImportError/RuntimeError with the reason
when a backend is unavailable.
"""

from __future__ import annotations

import torch

from ._types import FlatLayout, strategy_index

try:
    from . import _C  # noqa: F401  (loading the library registers the op)
except ImportError as err:  # pure-Python install, or a build for another torch
    _IMPORT_ERROR: str | None = (
        f"the compiled extension mb_kernels._C is not built (pure-Python install, or it failed to load: {err})"
    )
else:
    _IMPORT_ERROR = None

OP_NAME = "mb_kernels::metabalance_"

# Elements per CUDA chunk (one thread block's span in both launches) for tensors of up to CUDA_MAX_CHUNKS chunks;
# larger tensors get proportionally longer chunks, so the per-block reduction of a tensor's partial sums reads at
# most CUDA_MAX_CHUNKS values. A multiple of 1024 keeps every chunk's start at the tensor's alignment phase.
CUDA_CHUNK = 16384
CUDA_MAX_CHUNKS = 2048

if _IMPORT_ERROR is None:

    @torch.library.register_fake(OP_NAME)
    def _metabalance_fake(task_grads, offsets, chunks, norm_ema, out, relax_factor, beta, strategy, deterministic):
        # In place: mutates norm_ema and out, returns nothing. Shape checks mirror the kernels' messages.
        torch._check(task_grads.dim() == 2, lambda: "task_grads must be 2-D [num_tasks, numel]")
        torch._check(
            tuple(norm_ema.shape) == (offsets.shape[0] - 1, task_grads.shape[0]),
            lambda: "norm_ema must have shape [num_tensors, num_tasks]",
        )
        torch._check(tuple(out.shape) == (task_grads.shape[1],), lambda: "out must have shape [numel]")
        return None


def cuda_chunk_table(sizes: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """Work table of the CUDA kernels: int64 [num_chunks, 5] rows (tensor, column begin, column end, first chunk of
    that tensor, number of chunks of that tensor). Every tensor, even an empty one, has at least one chunk, so
    that its moving average is updated by some thread block."""
    rows = []
    begin = 0
    for p, size in enumerate(sizes):
        chunk = max(CUDA_CHUNK, -(-size // CUDA_MAX_CHUNKS))
        chunk = -(-chunk // 1024) * 1024
        count = max(1, -(-size // chunk))
        first = len(rows)
        for k in range(count):
            start = begin + k * chunk
            rows.append((p, start, min(start + chunk, begin + size), first, count))
        begin += size
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 5).to(device)


def _run_op(task_grads, norm_ema, out, layout, chunks, relax_factor, beta, strategy, deterministic) -> None:
    torch.ops.mb_kernels.metabalance_(
        task_grads,
        layout.offsets,
        chunks,
        norm_ema,
        out,
        float(relax_factor),
        float(beta),
        strategy_index(strategy),
        bool(deterministic),
    )


def balance_cpu(
    task_grads: torch.Tensor,
    norm_ema: torch.Tensor,
    out: torch.Tensor,
    layout: FlatLayout,
    relax_factor: float,
    beta: float,
    strategy: str,
    deterministic: bool = False,
) -> None:
    """Fused CPU backend (always bitwise deterministic, whatever the thread count)."""
    _run_op(task_grads, norm_ema, out, layout, None, relax_factor, beta, strategy, deterministic)


def balance_cuda(
    task_grads: torch.Tensor,
    norm_ema: torch.Tensor,
    out: torch.Tensor,
    layout: FlatLayout,
    relax_factor: float,
    beta: float,
    strategy: str,
    deterministic: bool = False,
) -> None:
    """Fused CUDA backend: two launches per call; per-chunk partials and fixed-order reductions (no atomics), so
    it is always bitwise deterministic."""
    key = ("cuda_chunks", task_grads.device)
    chunks = layout.cache.get(key)
    if chunks is None:
        chunks = layout.cache[key] = cuda_chunk_table(layout.sizes, task_grads.device)
    _run_op(task_grads, norm_ema, out, layout, chunks, relax_factor, beta, strategy, deterministic)


def compiled_backend(device_type: str):
    """The backend function for ``device_type`` ("cpu" or "cuda"); raises ImportError/RuntimeError with the reason
    when it is unavailable here."""
    if _IMPORT_ERROR is not None:
        raise ImportError(_IMPORT_ERROR)
    if device_type == "cpu":
        return balance_cpu
    if device_type == "cuda":
        if not torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CUDA"):
            raise RuntimeError(
                "mb_kernels._C was built without CUDA (torch without CUDA, no CUDA toolkit at build time, or "
                "MB_KERNELS_PURE_PYTHON); rebuild on a CUDA machine or with FORCE_CUDA=1"
            )
        if not torch.cuda.is_available():
            raise RuntimeError("mb_kernels._C has CUDA kernels but no CUDA device is available")
        return balance_cuda
    raise RuntimeError(f"mb_kernels._C has no kernel for device type {device_type!r}")
