"""The compiled op ``torch.ops.mb_kernels.metabalance_``: its fake kernel and the CPU/CUDA backends built on it.

The schema lives in csrc/metabalance.cpp (one contract for every device)::

    metabalance_(Tensor task_grads, Tensor offsets, Tensor? chunks, Tensor(a!) norm_ema, Tensor(b!) out,
                 float relax_factor, float beta, int strategy) -> ()

``chunks`` is the CUDA kernels' work table (:meth:`mb_kernels.layout.FlatLayout.chunk_table`, built once per
layout); the CPU kernel plans its work from ``offsets`` and takes ``None``.

Importing this module loads ``mb_kernels._C`` when it was built (which registers the op) and registers the fake
kernel; nothing else happens at import. :func:`compiled_backend` raises ImportError/RuntimeError with the reason
when a backend is unavailable.
"""

from __future__ import annotations

import torch

from ..layout import FlatLayout
from .contract import BalanceFn, Hyperparameters

try:
    from .. import _C  # noqa: F401  (loading the library registers the op)
except ImportError as err:  # pure-Python install, or a build for another torch
    _IMPORT_ERROR: str | None = (
        f"the compiled extension mb_kernels._C is not built (pure-Python install, or it failed to load: {err})"
    )
else:
    _IMPORT_ERROR = None

OP_NAME = "mb_kernels::metabalance_"

# CUDA chunks (one thread block's span in both launches): at least CUDA_CHUNK elements, at most CUDA_MAX_CHUNKS per
# tensor (the per-block reduction of a tensor's partial sums reads that many values). A granule of 1024 keeps
# every chunk's start at the tensor's alignment phase.
CUDA_CHUNK = 16384
CUDA_MAX_CHUNKS = 2048
CUDA_GRANULE = 1024

if _IMPORT_ERROR is None:

    @torch.library.register_fake(OP_NAME)
    def _metabalance_fake(task_grads, offsets, chunks, norm_ema, out, relax_factor, beta, strategy):
        # In place: mutates norm_ema and out, returns nothing. Shape checks mirror the kernels' messages.
        torch._check(task_grads.dim() == 2, lambda: "task_grads must be 2-D [num_tasks, numel]")
        torch._check(
            tuple(norm_ema.shape) == (offsets.shape[0] - 1, task_grads.shape[0]),
            lambda: "norm_ema must have shape [num_tensors, num_tasks]",
        )
        torch._check(tuple(out.shape) == (task_grads.shape[1],), lambda: "out must have shape [numel]")
        return None


def cuda_chunk_table(layout: FlatLayout, device: torch.device | str) -> torch.Tensor:
    """The CUDA kernels' chunk table for ``layout`` (cached in the layout)."""
    return layout.chunk_table(CUDA_CHUNK, CUDA_MAX_CHUNKS, CUDA_GRANULE, device)


def balance_cpu(
    task_grads: torch.Tensor, norm_ema: torch.Tensor, out: torch.Tensor, layout: FlatLayout, hyper: Hyperparameters
) -> None:
    """Fused CPU backend (bitwise reproducible whatever the thread count)."""
    torch.ops.mb_kernels.metabalance_(
        task_grads, layout.offsets, None, norm_ema, out, hyper.relax_factor, hyper.beta, hyper.strategy_code
    )


def balance_cuda(
    task_grads: torch.Tensor, norm_ema: torch.Tensor, out: torch.Tensor, layout: FlatLayout, hyper: Hyperparameters
) -> None:
    """Fused CUDA backend: two launches per call; per-chunk partials and fixed-order reductions (no atomics)."""
    # The chunk table is built from the layout alone: a layout wider than task_grads would read and write past
    # the tensors (the CPU op checks the offsets themselves; here the check is on host integers, no sync).
    if task_grads.dim() != 2 or layout.numel != task_grads.shape[1]:
        raise ValueError(
            f"cuda backend: task_grads of shape {tuple(task_grads.shape)} does not match the layout, which covers "
            f"{layout.numel} columns"
        )
    chunks = cuda_chunk_table(layout, task_grads.device)
    torch.ops.mb_kernels.metabalance_(
        task_grads, layout.offsets, chunks, norm_ema, out, hyper.relax_factor, hyper.beta, hyper.strategy_code
    )


def compiled_backend(device_type: str) -> BalanceFn:
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
