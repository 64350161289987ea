"""Embedding tables balanced through their looked-up rows, never a dense ``[T, V, d]`` workspace.

Two kinds of balanced table take this path:

* tables with sparse gradients (``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True``): each backward pass
  hands over a sparse gradient (row ids and row values), and the balanced gradient is a sparse tensor over the
  union of touched rows, which ``torch.optim.SparseAdam``, ``Adagrad`` and ``SGD`` accept;
* with ``step(losses, shared_output=h)``, dense tables reached through ``nn.Embedding`` lookups only: the batched
  backward stops at the looked-up rows, and the balanced gradient is written densely (as autograd would give it).

The math is the dense tensor's (:mod:`mb_kernels.backends.reference`): task t's gradient of the table is the
dense-equivalent one (duplicate ids summed), so its norm is the norm of the summed rows and the weights follow.
Each step the rows of every task are grouped once by a sort of their ids into a ``[T, K, d]`` block, K being the
number of ids looked up (slots past the number of distinct ids stay zero, so the size does not depend on the ids
and no host synchronisation is needed), and the block goes through the same fused backend as a dense tensor of
K·d elements: norms, moving average, weights and weighted sum in one call. Work is O(T·K·d) plus one sort of K ids,
never O(V·d) (except the dense output itself).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .backends.contract import BalanceFn, Hyperparameters, state_dtype
from .layout import FlatLayout

# Per table, the flat layouts of recent row counts (one per batch shape in practice): bounded, as ids vary.
_LAYOUT_CACHE_SIZE = 8


class RowTable:
    """A balanced 2-D table whose per-task gradients arrive as (row ids, row values) parts.

    ``sparse_output``: the balanced gradient is a coalesced sparse tensor (tables with ``sparse=True``), else a
    dense ``[V, d]`` tensor. The moving averages are ``norm_ema`` ``[1, T]`` (the parameter's state holds its row).
    """

    def __init__(self, param: torch.Tensor, num_tasks: int, norm_ema_row: torch.Tensor | None, sparse_output: bool):
        self.param = param
        self.num_tasks = num_tasks
        self.sparse_output = sparse_output
        self.norm_ema = torch.zeros(1, num_tasks, dtype=state_dtype(param.dtype), device=param.device)
        if norm_ema_row is not None:
            self.norm_ema[0].copy_(norm_ema_row)
        # This step's parts: (task, ids [k], values [k, d]) for one task, or (None, ids [k], values [T, k, d]).
        self.parts: list[tuple[int | None, torch.Tensor, torch.Tensor]] = []
        self._layouts: dict[int, FlatLayout] = {}

    @property
    def reached(self) -> bool:
        """Whether any task's backward reached the table this step (an empty lookup counts, as for autograd)."""
        return bool(self.parts)

    def add_task_rows(self, task: int, ids: torch.Tensor, values: torch.Tensor) -> None:
        self.parts.append((task, ids.reshape(-1), values.reshape(-1, self.param.shape[1])))

    def add_shared_rows(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Rows looked up once for every task: ``values`` is ``[T, k, d]``."""
        self.parts.append((None, ids.reshape(-1), values.reshape(self.num_tasks, -1, self.param.shape[1])))

    def clear(self) -> None:
        self.parts = []

    def _layout(self, numel: int) -> FlatLayout:
        layout = self._layouts.get(numel)
        if layout is None:
            if len(self._layouts) >= _LAYOUT_CACHE_SIZE:
                self._layouts.pop(next(iter(self._layouts)))
            layout = self._layouts[numel] = FlatLayout.from_sizes([numel], self.param.device)
        return layout

    def balance(self, balance_fn: BalanceFn, hyper: Hyperparameters) -> torch.Tensor | None:
        """Update the moving averages (always, as for a dense tensor: a task that did not reach the table has norm
        0) and return the balanced gradient, or None if no task reached the table."""
        ids, block, distinct = group_rows(self.parts, self.num_tasks, self.param)
        combined = torch.empty(block.shape[1], dtype=block.dtype, device=block.device)
        balance_fn(block, self.norm_ema, combined, self._layout(block.shape[1]), hyper)
        if not self.parts:
            return None
        values = combined.view(-1, self.param.shape[1])
        if self.sparse_output:
            count = int(distinct)  # the sparse result's size: one host read (a synchronisation on GPU)
            return torch.sparse_coo_tensor(
                ids[None, :count], values[:count], self.param.shape, is_coalesced=True, check_invariants=False
            )
        # Slots past the distinct ids (zeros, or the "no row" id) add exact zeros into row 0: masked so that even
        # a 0 * Inf weight cannot reach it.
        used = torch.arange(ids.numel(), device=ids.device) < distinct
        values = torch.where(used[:, None], values, torch.zeros((), dtype=values.dtype, device=values.device))
        ids = torch.where(used, ids, 0)
        return torch.zeros_like(self.param, memory_format=torch.preserve_format).index_add_(0, ids, values)


def group_rows(
    parts: Sequence[tuple[int | None, torch.Tensor, torch.Tensor]], num_tasks: int, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum each task's rows per distinct id: ``(ids [K], block [T, K·d], distinct)``.

    K is the number of ids in all parts; slot j < ``distinct`` (a 0-d device tensor) holds the j-th smallest
    distinct id and, in row t of ``block``, task t's summed gradient of that row; the other slots are zero. An id
    equal to the table's row count means "no row" (a padding lookup, whose values are zero): it is not counted.
    Duplicates are summed in the accumulation dtype (float32 for half tables) and rounded once to the table's dtype,
    as autograd's dense embedding backward does.
    """
    width = table.shape[1]
    device = table.device
    ids = torch.cat([part_ids for _, part_ids, _ in parts]) if parts else torch.zeros(0, dtype=torch.int64)
    ids = ids.to(device=device, dtype=torch.int64)
    total = ids.numel()
    acc = state_dtype(table.dtype)
    grouped = torch.zeros(num_tasks, total, width, dtype=acc, device=device)
    if total == 0:
        return ids, grouped.view(num_tasks, 0).to(table.dtype), torch.zeros((), dtype=torch.int64, device=device)
    sorted_ids, order = torch.sort(ids)
    first_of_run = torch.ones(total, dtype=torch.bool, device=device)
    first_of_run[1:] = sorted_ids[1:] != sorted_ids[:-1]
    slot_sorted = torch.cumsum(first_of_run, 0) - 1
    slot = torch.empty_like(slot_sorted).index_copy_(0, order, slot_sorted)  # slot of each id in input order
    start = 0
    for task, part_ids, values in parts:
        k = part_ids.numel()
        where = slot[start : start + k]
        start += k
        if task is None:
            grouped.index_add_(1, where, values.to(acc))
        else:
            grouped[task].index_add_(0, where, values.to(acc))
    distinct_ids = torch.zeros(total, dtype=torch.int64, device=device).scatter_(0, slot_sorted, sorted_ids)
    distinct = slot_sorted[-1] + 1 - (sorted_ids[-1] == table.shape[0]).to(torch.int64)
    return distinct_ids, grouped.view(num_tasks, -1).to(table.dtype), distinct
