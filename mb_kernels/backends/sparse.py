"""Balancing of sparse-gradient tables (``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True``), in torch ops.

The semantics are :mod:`mb_kernels.backends.reference`'s, applied to the dense-equivalent gradient: task t's
gradient of the table is a coalesced sparse tensor (duplicate ids summed), its norm is the norm of its values, the
moving averages and weights are computed as for a dense tensor, and the balanced gradient is a sparse tensor over
the union of the rows the tasks touched (rows shared by several tasks summed), which ``torch.optim.SparseAdam``,
``Adagrad`` and ``SGD`` accept. Work is O(T·B·d) plus the coalescing sorts, never O(V·d). There is no fused kernel
for this path yet: a table costs a handful of small torch ops per step.
"""

from __future__ import annotations

import torch

from .contract import Hyperparameters, state_dtype
from .reference import update_and_weigh


def sparse_norms(task_grads: list[torch.Tensor | None], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[T]`` norms of coalesced sparse gradients (0 for a task that did not reach the table), accumulated in
    float64 and rounded once to ``dtype``."""
    norms = [
        torch.zeros((), dtype=torch.float64, device=device)
        if g is None
        else torch.linalg.vector_norm(g._values(), dtype=torch.float64)
        for g in task_grads
    ]
    return torch.stack(norms).to(dtype)


def balance_sparse(
    task_grads: list[torch.Tensor | None], norm_ema: torch.Tensor, hyper: Hyperparameters
) -> torch.Tensor | None:
    """Update ``norm_ema`` (``[T]``, in place) and return the balanced sparse gradient (None if no task reached the
    table). ``task_grads``: one coalesced sparse COO tensor (or None) per task."""
    norms = sparse_norms(task_grads, norm_ema.dtype, norm_ema.device)
    weights = update_and_weigh(norm_ema[None, :], norms[None, :], hyper)[0]
    present = [(t, g) for t, g in enumerate(task_grads) if g is not None]
    if not present:
        return None
    template = present[0][1]
    acc = state_dtype(template.dtype)
    indices = torch.cat([g._indices() for _, g in present], dim=1)
    values = torch.cat([g._values().to(acc) * weights[t].to(acc) for t, g in present])
    # The indices come from valid coalesced tensors of the same shape: no invariant check needed.
    combined = torch.sparse_coo_tensor(indices, values, template.shape, dtype=acc, check_invariants=False).coalesce()
    return combined.to(template.dtype)
