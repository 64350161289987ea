"""Embedding tables balanced through their looked-up rows, never a dense ``[T, V, d]`` workspace.

Two kinds of balanced table take this path:

* tables with sparse gradients (``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True``): each backward pass
  hands over a sparse gradient (row ids and row values), and the balanced gradient is a sparse tensor over the
  union of touched rows, which ``torch.optim.SparseAdam``, ``Adagrad`` and ``SGD`` accept;
* dense tables reached through lookups only (``nn.Embedding``; ``nn.EmbeddingBag`` in sum or mean mode): each
  backward stops at the lookups' outputs, whose gradients give the looked-up rows', and the balanced gradient is
  written densely (as autograd would give it).

The math is the dense tensor's (:mod:`mb_kernels.backends.reference`): task t's gradient of a table is the
dense-equivalent one (duplicate ids summed), so its norm is the norm of the summed rows and the weights follow.
Each step, the rows of every task of every table in a :class:`RowBucket` (tables of one param group, device, dtype
and row width) are grouped by one sort of their ids into a ``[T, K, d]`` block, K being the number of ids looked up
(slots past a table's distinct ids stay zero, so the shapes do not depend on the ids and no host synchronisation is
needed), and the block goes through the same fused backend as a dense bucket whose tensors are the tables' row
blocks: norms, moving averages, weights and weighted sum in one call. Work is O(T·K·d) plus one sort of K ids,
never O(V·d) (except a dense result itself).

A part names its rows without materialising them (:class:`TableRows`): an ``nn.EmbeddingBag`` id's row is its
bag's gradient times a weight, so the grouping reads each bag's gradient once per id (one ``embedding_bag`` per
task and table over the ids in sorted order) instead of first writing a ``[T, ids, d]`` copy of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .backends.contract import BalanceFn, Hyperparameters, state_dtype
from .layout import FlatLayout, autograd_layout

# Per bucket, the layouts of recent (padded) id counts: bounded, as counts may vary.
_PLAN_CACHE_SIZE = 16


def padded_count(k: int) -> int:
    """``k`` ids rounded up to one of 8 steps per power of two (at most 12.5% more; exact up to 16 and for the
    usual batch multiples of powers of two): id counts that vary from batch to batch (variable-length bags) then
    share a few plans, instead of building one per step (a plan build copies host values to the device: a
    synchronisation on GPU). The padding ids are "no row" ids, whose values are ignored."""
    if k <= 16:
        return k
    step = 1 << (k.bit_length() - 4)
    return -(-k // step) * step


class TableRows(NamedTuple):
    """One part of a table's gradient this step, one row per looked-up id: task t's row of id ``ids[j]`` is
    ``source[t][rows[j]] * weight[j]`` (``rows`` None: ``source[t][j]``; ``weight`` None: 1), zero where
    ``source[t]`` is None (a task that does not reach this part). An embedding bag's ids share their bag's row of
    ``source[t]`` (its output gradient), weighted by the per-sample weight or 1 / bag size; a lookup's or a sparse
    gradient's rows are ``source[t]`` itself."""

    ids: torch.Tensor
    """``[k]`` row ids; the table's row count means "no row" (its values are ignored)."""
    source: torch.Tensor | Sequence[torch.Tensor | None]
    """Per task, ``[m, d]`` or None: a ``[T, m, d]`` tensor (one batched backward), or each pass's own tensor."""
    rows: torch.Tensor | None
    weight: torch.Tensor | None
    """Any floating dtype: the rows are weighted and summed in the accumulation dtype."""

    def values(self, num_tasks: int) -> torch.Tensor:
        """The rows ``[T, k, d]`` themselves (in the accumulation dtype when weighted)."""
        present = first_present(self.source)
        blocks = []
        for task in range(num_tasks):
            source = self.source[task]
            source = torch.zeros_like(present) if source is None else source
            blocks.append(source if self.rows is None else source.index_select(0, self.rows))
        values = torch.stack(blocks)
        return values if self.weight is None else values * self.weight[:, None]


def first_present(per_task: torch.Tensor | Sequence[torch.Tensor | None]) -> torch.Tensor:
    """A task's tensor from ``per_task`` (a ``[T, ...]`` tensor, or one tensor or None per task): the first one
    present (indexed, not iterated: iterating a tensor unbinds all of it)."""
    return per_task[0] if isinstance(per_task, torch.Tensor) else next(x for x in per_task if x is not None)


def sorted_runs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sorted ids, order, run)``: the ids stably sorted, where each came from, and per sorted position the
    number of its run of equal ids (1, 2, ...). Static shapes: no host read."""
    sorted_ids, order = torch.sort(ids, stable=True)  # equal ids keep their input order
    first_of_run = torch.ones_like(sorted_ids, dtype=torch.bool)
    first_of_run[1:] = sorted_ids[1:] != sorted_ids[:-1]
    return sorted_ids, order, torch.cumsum(first_of_run, 0)


@dataclass
class _GroupPlan:
    """What depends only on the id count of each table: the flat layout of the row blocks and, per sorted
    position (= slot), the start of its table's block, the id offset of its table, its table and its place in the
    table's block."""

    layout: FlatLayout
    starts: list[int]
    counts: list[int]
    start_of_position: torch.Tensor
    offset_of_position: torch.Tensor
    table_of_position: torch.Tensor
    position_in_table: torch.Tensor
    rows_of_position: torch.Tensor
    """Per slot, its table's row count."""
    slots: torch.Tensor
    """``arange(K)``: every slot (and every sorted position)."""
    end_of_position: torch.Tensor
    """Per slot, the end of its table's block."""
    filled: torch.Tensor
    """Indices of the tables with at least one id, and for each: the sorted position of its last id, the start of
    its block and its row count (its "no row" id)."""
    last: torch.Tensor
    first: torch.Tensor
    rows: torch.Tensor


class RowBucket:
    """Balanced 2-D tables of one param group, device, dtype and row width, balanced by their rows.

    ``sparse_output[i]``: table i's balanced gradient is a coalesced sparse tensor (tables with ``sparse=True``),
    else a dense ``[V, d]`` tensor. The moving averages are ``norm_ema`` ``[P, T]``, one row per table (its
    optimizer state holds a view of the row), as in a dense bucket.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        num_tasks: int,
        norm_ema_rows: list[torch.Tensor | None],
        sparse_output: list[bool],
    ):
        self.params = params
        self.num_tasks = num_tasks
        self.sparse_output = sparse_output
        self.device, self.dtype, self.width = params[0].device, params[0].dtype, params[0].shape[1]
        self.norm_ema = norm_ema_from_rows(norm_ema_rows, num_tasks, self.dtype, self.device)
        # Table i's ids live in [offset_i, offset_i + V_i] of one id space; offset_i + V_i is its "no row" id.
        bounds = [0]
        for p in params:
            bounds.append(bounds[-1] + p.shape[0] + 1)
        self.id_offsets = bounds[:-1]
        self.parts: list[list[TableRows]] = [[] for _ in params]
        self._plans: dict[tuple[int, ...], _GroupPlan] = {}  # least recently used first
        # The [T, K, d] accumulation buffer, grown to the largest K seen and kept between steps (nothing outside
        # the step refers to it): zeroing mapped memory is much cheaper than a fresh allocation of this size on CPU.
        self._buffer = torch.zeros(0, dtype=state_dtype(self.dtype), device=self.device)

    def add_task_rows(self, table: int, task: int, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Rows ``values [k, d]`` of task ``task`` only (one task's sparse gradient)."""
        source: list[torch.Tensor | None] = [None] * self.num_tasks
        source[task] = values.reshape(-1, self.width)
        self.parts[table].append(TableRows(ids.reshape(-1), source, None, None))

    def add_shared_rows(
        self,
        table: int,
        ids: torch.Tensor,
        source: torch.Tensor,
        rows: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> None:
        """Rows looked up once for every task (:class:`TableRows`): ``source`` is ``[T, m, d]``."""
        self.add_part(table, TableRows(ids.reshape(-1), source.reshape(self.num_tasks, -1, self.width), rows, weight))

    def add_part(self, table: int, part: TableRows) -> None:
        self.parts[table].append(part)

    def rows_of(self, table: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Table ``table``'s parts of this step as one ``(ids [k], values [T, k, d])`` in the table's dtype: what
        DDP gathers across ranks."""
        parts = self.parts[table]
        if not parts:
            empty = torch.zeros(self.num_tasks, 0, self.width, dtype=self.dtype, device=self.device)
            return torch.zeros(0, dtype=torch.int64, device=self.device), empty
        ids = torch.cat([part.ids.to(torch.int64) for part in parts])
        return ids, torch.cat([part.values(self.num_tasks).to(self.dtype) for part in parts], dim=1)

    def clear(self) -> None:
        self.parts = [[] for _ in self.params]

    def _plan(self, counts: tuple[int, ...]) -> _GroupPlan:
        plan = self._plans.pop(counts, None)
        if plan is not None:
            self._plans[counts] = plan  # most recently used
        else:
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.pop(next(iter(self._plans)))
            starts = [0]
            for k in counts:
                starts.append(starts[-1] + k)
            repeats = torch.tensor(counts, dtype=torch.int64)
            filled = [i for i, k in enumerate(counts) if k > 0]

            def on_device(values: list[int]) -> torch.Tensor:
                return torch.tensor(values, dtype=torch.int64).to(self.device)

            def per_slot(per_table: list[int]) -> torch.Tensor:
                return torch.repeat_interleave(torch.tensor(per_table, dtype=torch.int64), repeats).to(self.device)

            slots = torch.arange(starts[-1]).to(self.device)
            start_of_position = per_slot(starts[:-1])
            plan = self._plans[counts] = _GroupPlan(
                layout=FlatLayout.from_sizes([k * self.width for k in counts], self.device),
                starts=starts[:-1],
                counts=list(counts),
                start_of_position=start_of_position,
                offset_of_position=per_slot(self.id_offsets),
                table_of_position=per_slot(list(range(len(counts)))),
                slots=slots,
                rows_of_position=per_slot([p.shape[0] for p in self.params]),
                end_of_position=per_slot(starts[1:]),
                position_in_table=slots - start_of_position,
                filled=on_device(filled),
                last=on_device([starts[i] + counts[i] - 1 for i in filled]),
                first=on_device([starts[i] for i in filled]),
                rows=on_device([self.params[i].shape[0] for i in filled]),
            )
        return plan

    def balance(self, balance_fn: BalanceFn, hyper: Hyperparameters) -> list[torch.Tensor | None]:
        """Update the moving averages (always, as for a dense tensor: a task that did not reach a table has norm
        0) and return each table's balanced gradient, None for a table no task reached."""
        counts = [sum(part.ids.numel() for part in parts) for parts in self.parts]
        plan = self._plan(tuple(padded_count(k) for k in counts))
        ids, block, distinct = self._group_rows(plan, counts)
        combined = torch.empty(block.shape[1], dtype=self.dtype, device=self.device)
        balance_fn(block, self.norm_ema, combined, plan.layout, hyper)
        # The sizes of the sparse results: one host read (a synchronisation on GPU), none without sparse tables.
        counts_on_host = distinct.tolist() if any(self.sparse_output) else []
        rows = combined.view(-1, self.width)
        if not all(self.sparse_output):
            # Slots past a table's distinct ids (zeros, or the "no row" id) go to a row past the table's, dropped:
            # whatever the kernel writes there never reaches a real row (cheaper than masking the [K, d] rows).
            used = plan.position_in_table < distinct[plan.table_of_position]
            dense_ids = torch.where(used, ids, plan.rows_of_position)
        results: list[torch.Tensor | None] = []
        for i, p in enumerate(self.params):
            if not self.parts[i]:
                results.append(None)
                continue
            begin, k = plan.starts[i], plan.counts[i]
            if self.sparse_output[i]:
                count = counts_on_host[i]
                sparse = torch.sparse_coo_tensor(
                    ids[None, begin : begin + count],
                    rows[begin : begin + count],
                    p.shape,
                    is_coalesced=True,
                    check_invariants=False,
                )
                results.append(sparse)
                continue
            dense = torch.zeros(p.shape[0] + 1, self.width, dtype=self.dtype, device=self.device)
            dense = dense.index_add_(0, dense_ids[begin : begin + k], rows[begin : begin + k])[:-1]
            results.append(autograd_layout(p, dense))
        return results

    def _group_rows(self, plan: _GroupPlan, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sum each task's rows per distinct id: ``(ids [K], block [T, K·d], distinct [P])``; table i has
        ``counts[i]`` ids, padded to ``plan.counts[i]`` with "no row" ids (:func:`padded_count`).

        Table i owns slots ``starts[i] : starts[i] + counts[i]``; its slot ``starts[i] + j`` for j < ``distinct[i]``
        holds its j-th smallest distinct id and, in row t of ``block``, task t's summed gradient of that row; its
        other slots are zero. An id equal to the table's row count means "no row" (a padding lookup): it is not
        counted and its values are ignored. The sums are ``embedding_bag`` sums over the sorted ids (one bag per
        slot, empty past the distinct ids): duplicates added in a fixed order on every device (no atomics), in the
        accumulation dtype (float32 for half tables) and rounded once to the table's dtype (as autograd's dense
        embedding backward does on CUDA; on CPU it sums half tables' duplicates in their own dtype, so this is the
        more accurate of the two).
        """
        acc = state_dtype(self.dtype)
        total = sum(plan.counts)
        num_tables = len(self.params)
        size = self.num_tasks * total * self.width
        if self._buffer.numel() < size:
            self._buffer = torch.empty(size, dtype=acc, device=self.device)
        grouped = self._buffer[:size].view(self.num_tasks, total, self.width)
        if total == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            distinct = torch.zeros(num_tables, dtype=torch.int64, device=self.device)
            return empty, grouped.view(self.num_tasks, 0).to(self.dtype), distinct
        # Table i's ids occupy positions starts[i] : starts[i] + counts[i] in input order as in sorted order (its id
        # range is its own), so the per-slot table offsets apply to the input positions too. cat promotes int32 ids.
        pieces = []
        for i, (parts, k) in enumerate(zip(self.parts, counts)):
            pieces += [part.ids for part in parts]
            if plan.counts[i] > k:
                pieces.append(torch.full((plan.counts[i] - k,), self.params[i].shape[0], device=self.device))
        all_ids = torch.cat(pieces) + plan.offset_of_position
        sorted_ids, order, run = sorted_runs(all_ids)  # duplicates summed in input order
        # Each slot is one bag of the sorted ids: it starts at its first id's sorted position;
        # a slot past the table's distinct ids starts at the table's end (an empty bag).
        slot_sorted = run - run[plan.start_of_position] + plan.start_of_position
        bag_starts = plan.end_of_position.clone().scatter_reduce_(0, slot_sorted, plan.slots, "amin")
        # Both within each table: the position of each sorted id among its table's ids, the start of each bag.
        order_in_table = order - plan.start_of_position
        bag_starts -= plan.start_of_position
        sums = []  # [T][tables]: in the block's order
        for i, parts in enumerate(self.parts):
            begin, k = plan.starts[i], plan.counts[i]
            if k == 0:
                continue
            sorted_positions = order_in_table[begin : begin + k]
            if k > counts[i]:  # padding ids read a real row: they sort into the "no row" slot, which is zeroed
                sorted_positions = sorted_positions.clamp(max=counts[i] - 1)
            offsets = bag_starts[begin : begin + k]
            table_sums = []
            in_sorted_order = {}  # per pattern of which parts a task has (mostly all): its rows and weights, once
            for t in range(self.num_tasks):
                sources = [part.source[t] for part in parts]
                present = tuple(source is not None for source in sources)
                if not any(present):  # no part of this table is this task's
                    table_sums.append(torch.zeros(k, self.width, dtype=acc, device=self.device))
                    continue
                if present not in in_sorted_order:
                    rows, weight = _table_index(parts, present, acc)
                    in_sorted_order[present] = (
                        sorted_positions if rows is None else rows[sorted_positions],
                        None if weight is None else weight[sorted_positions],
                    )
                source_rows, weights = in_sorted_order[present]
                source = _task_source(sources, acc)
                table_sums.append(F.embedding_bag(source_rows, source, offsets, mode="sum", per_sample_weights=weights))
            sums.append(table_sums)
        torch.cat(
            [table_sums[t] for t in range(self.num_tasks) for table_sums in sums], out=grouped.view(-1, self.width)
        )
        local_ids = sorted_ids - plan.offset_of_position
        distinct_ids = torch.zeros(total, dtype=torch.int64, device=self.device).scatter_(0, slot_sorted, local_ids)
        # A table's "no row" id sorts last among its ids: its slot, if it has one, is that of its last id. The values
        # there are not gradient (autograd gives the padding row none): zeroed before they reach the norms.
        no_row = local_ids[plan.last] == plan.rows
        last_slots = slot_sorted[plan.last]
        zero = torch.zeros((), dtype=acc, device=self.device)
        grouped[:, last_slots] = torch.where(no_row[None, :, None], zero, grouped[:, last_slots])
        no_row = no_row.to(torch.int64)
        distinct = torch.zeros(num_tables, dtype=torch.int64, device=self.device)
        distinct[plan.filled] = slot_sorted[plan.last] - plan.first + 1 - no_row
        return distinct_ids, grouped.view(self.num_tasks, -1).to(self.dtype), distinct


def _task_source(sources: Sequence[torch.Tensor | None], acc: torch.dtype) -> torch.Tensor:
    """One task's source rows of a table's parts as one ``[m, d]`` in the accumulation dtype: the parts it has, in
    order, then one zero row if it lacks some (:func:`_table_index` points their ids there). No copy for a single
    part in that dtype."""
    own = [source.to(acc) for source in sources if source is not None]
    if len(own) == len(sources) == 1:
        return own[0]
    if len(own) < len(sources):
        own.append(own[0].new_zeros(1, own[0].shape[1]))
    return torch.cat(own)


def _table_index(
    parts: Sequence[TableRows], present: tuple[bool, ...], acc: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(rows, weight)`` of a table's ids (in the order of its parts) into :func:`_task_source`'s rows, for a task
    that has the parts marked in ``present``: None where they are the identity / all ones."""
    if len(parts) == 1:
        weight = parts[0].weight
        return parts[0].rows, None if weight is None else weight.to(acc)
    device = parts[0].ids.device
    rows = weight = None
    if not all(present) or any(part.rows is not None for part in parts):
        sizes = [first_present(part.source).shape[0] if has else 0 for part, has in zip(parts, present)]
        zero_row = sum(sizes)
        rows, start = [], 0
        for part, has, size in zip(parts, present, sizes):
            k = part.ids.numel()
            if not has:
                rows.append(torch.full((k,), zero_row, dtype=torch.int64, device=device))
                continue
            mine = part.rows if part.rows is not None else torch.arange(k, device=device)
            rows.append(mine + start)
            start += size
        rows = torch.cat(rows)
    if any(part.weight is not None for part in parts):
        weight = torch.cat(
            [
                torch.ones(part.ids.numel(), dtype=acc, device=device) if part.weight is None else part.weight.to(acc)
                for part in parts
            ]
        )
    return rows, weight


def norm_ema_from_rows(
    rows: Sequence[torch.Tensor | None], num_tasks: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A bucket's moving averages ``[P, T]`` in the state dtype of ``dtype``: zeros, or the saved row of each
    tensor that has one (a restored or rebuilt bucket keeps its averages)."""
    norm_ema = torch.zeros(len(rows), num_tasks, dtype=state_dtype(dtype), device=device)
    for i, row in enumerate(rows):
        if row is not None:
            norm_ema[i].copy_(row)
    return norm_ema


def row_buckets(tables: Sequence[tuple[torch.Tensor, torch.Tensor | None, bool]], num_tasks: int) -> list[RowBucket]:
    """``(param, saved norm_ema row or None, sparse_output)`` of one param group, in buckets per (device, dtype,
    row width), in order of first appearance."""
    by_key: dict[tuple, list] = {}
    for p, row, sparse in tables:
        by_key.setdefault((p.device, p.dtype, p.shape[1]), []).append((p, row, sparse))
    return [
        RowBucket([p for p, _, _ in items], num_tasks, [r for _, r, _ in items], [s for _, _, s in items])
        for items in by_key.values()
    ]
