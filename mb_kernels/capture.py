"""Per-task gradient capture into flat ``[T, N]`` workspaces, one per (param group, device, dtype), and the whole
``.grad`` lifecycle of every parameter the step touches.

One backward pass per task. Before the passes the ``.grad`` of every leaf the losses reach is set aside and set
to None: for balanced parameters autograd then hands each pass's gradient over without an accumulate (after pass
t it is copied into row t of the workspace and ``.grad`` reset to None); the other leaves (task towers) collect
the plain sum over the passes, as ``sum(losses).backward()`` would give them. After balancing,
:meth:`Capture.commit` accumulates both onto the set-aside gradients (in place, as autograd does; a fresh
gradient gets the parameter's own strides, as autograd gives it); on any failure, :meth:`Capture.abort` puts
every set-aside gradient back unchanged, so a caller who catches the error sees the ``.grad`` of before the step.

Leak-free graph release: autograd frees a node's saved tensors only when a non-retaining pass executes
it. Passes 0..T-2 retain the graph, so the last pass runs from *all* losses, with a zero gradient for
losses 0..T-2 and one for loss T-1: every node executes once more without retain and its buffers are
freed, even if the caller keeps the loss tensors. Adding exact zeros leaves every gradient bitwise
unchanged (the only exception: a saved activation that is itself Inf/NaN turns 0 * Inf into NaN, which
marks that step non-finite; its forward was non-finite already).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.graph import GradientEdge

from .backends.contract import state_dtype
from .layout import FlatLayout


class Bucket:
    """Balanced tensors of one param group on one (device, dtype), with their flat workspace and EMA."""

    def __init__(self, params: list[torch.Tensor], num_tasks: int, norm_ema_rows: list[torch.Tensor | None]):
        self.params = params
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.layout = FlatLayout.from_sizes([p.numel() for p in params], self.device)
        self.num_tasks = num_tasks
        # Workspace: row t holds task t's gradient of every tensor; allocated once, reused every step.
        self.task_grads = torch.empty(num_tasks, self.layout.numel, dtype=self.dtype, device=self.device)
        self.task_grad_views = [
            [seg.view(p.shape) for seg, p in zip(row.split(self.layout.sizes), params)] for row in self.task_grads
        ]
        # EMA of the norms, [P, T]; the optimizer state of each parameter holds a view of its row.
        self.norm_ema = torch.zeros(len(params), num_tasks, dtype=state_dtype(self.dtype), device=self.device)
        for i, row in enumerate(norm_ema_rows):
            if row is not None:
                self.norm_ema[i].copy_(row)

    def norm_ema_views(self) -> list[torch.Tensor]:
        return list(self.norm_ema.unbind(0))

    def combined_views(self, out: torch.Tensor) -> list[torch.Tensor]:
        return [seg.view(p.shape) for seg, p in zip(out.split(self.layout.sizes), self.params)]


class SparseTable:
    """A balanced embedding table whose gradients come sparse (``nn.Embedding``/``nn.EmbeddingBag`` with
    ``sparse=True``): each task's gradient is kept as a coalesced sparse tensor (duplicate rows summed) instead of a
    dense ``[V, d]`` workspace row, so a step costs O(T·B·d) plus a sort of the ids, never O(T·V·d)."""

    def __init__(self, param: torch.Tensor, num_tasks: int, norm_ema_row: torch.Tensor | None):
        self.param = param
        self.num_tasks = num_tasks
        self.norm_ema = torch.zeros(num_tasks, dtype=state_dtype(param.dtype), device=param.device)
        if norm_ema_row is not None:
            self.norm_ema.copy_(norm_ema_row)
        self.task_grads: list[torch.Tensor | None] = [None] * num_tasks


def sparse_gradient_params(losses: Sequence[torch.Tensor], candidates: set[int]) -> set[int]:
    """Ids of the ``candidates`` (leaf tensors) that a backward from ``losses`` gives sparse gradients: the tables
    of ``nn.Embedding``/``nn.EmbeddingBag`` lookups with ``sparse=True`` (found by a walk of the graph)."""
    found: set[int] = set()
    seen: set = set()
    stack = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        sparse = getattr(node, "_saved_sparse", False) is True
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None:
                if sparse and id(variable) in candidates:
                    found.add(id(variable))
            else:
                stack.append(child)
    return found


def _collect_tables(tables: Sequence[SparseTable], task: int) -> None:
    """Keep this pass's sparse gradients of the tables, coalesced; reset ``.grad``."""
    for table in tables:
        g = table.param.grad
        if g is not None and g.layout == torch.strided:
            raise TypeError(
                f"MetaBalance: the table of shape {tuple(table.param.shape)} received a dense gradient after sparse "
                "ones; a table must get sparse gradients only (sparse=True in every lookup, no other use)"
            )
        table.task_grads[task] = None if g is None else g.coalesce()
        table.param.grad = None


def _collect_pass(buckets: Sequence[Bucket], task: int, reached: list[list[bool]]) -> None:
    """Move this pass's gradients of the balanced params into workspace row ``task``; reset ``.grad``."""
    for bucket, bucket_reached in zip(buckets, reached):
        grads = [p.grad for p in bucket.params]
        rows = bucket.task_grad_views[task]
        hit = [g is not None for g in grads]
        for g, p in zip(grads, bucket.params):
            if g is not None and g.layout != torch.strided:
                raise TypeError(
                    f"MetaBalance: a balanced parameter of shape {tuple(p.shape)} received a {g.layout} gradient "
                    "where its first step had a dense one; keep each table sparse or dense for the whole training"
                )
        if all(hit):
            torch._foreach_copy_(rows, grads)
        else:
            for g, row in zip(grads, rows):
                if g is None:
                    row.zero_()
                else:
                    row.copy_(g)
        for i, p in enumerate(bucket.params):
            p.grad = None
            bucket_reached[i] = bucket_reached[i] or hit[i]


def _edge(tensor: torch.Tensor) -> tuple:
    return (tensor.grad_fn, tensor.output_nr)


def _walk(roots: Sequence[torch.Tensor], cut_at: Sequence[torch.Tensor] = ()) -> tuple[list[torch.Tensor], list[bool]]:
    """Walk the autograd graph from ``roots`` without crossing the edges into the tensors ``cut_at``: the leaf
    tensors found (AccumulateGrad nodes; each once), and which of ``cut_at`` were reached. Reads no values."""
    cut = {_edge(h): i for i, h in enumerate(cut_at)}
    reached_cut = [False] * len(cut_at)
    seen: set = set()
    leaves: dict[int, torch.Tensor] = {}
    stack = []
    for root in roots:
        if _edge(root) in cut:
            reached_cut[cut[_edge(root)]] = True
        elif root.grad_fn is not None:
            stack.append(root.grad_fn)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.setdefault(id(variable), variable)
            continue
        for child, output_nr in node.next_functions:
            if child is None:
                continue
            if (child, output_nr) in cut:
                reached_cut[cut[(child, output_nr)]] = True
            else:
                stack.append(child)
    return list(leaves.values()), reached_cut


def reached_leaves(losses: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The leaf tensors whose ``.grad`` a backward pass from ``losses`` accumulates into, each once."""
    return _walk(losses)[0]


def _autograd_layout(p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` with the strides autograd gives a fresh gradient of ``p``: the parameter's own when it is dense
    and non-overlapping (channels_last, transposed), else contiguous. Fused optimizers (Adam(fused=True)) pair
    a parameter's and its gradient's memory element by element, so the layouts must agree."""
    if grad.stride() == p.stride() or p.numel() <= 1:
        return grad
    fresh = torch.empty_like(p, memory_format=torch.preserve_format)
    if fresh.stride() == grad.stride():
        return grad
    return fresh.copy_(grad)


class Capture:
    """The per-task gradients of one step, captured into the buckets' workspaces, and the ``.grad`` from before
    the step of every leaf the losses reach (set aside while the passes run)."""

    def __init__(self, buckets: Sequence[Bucket], others: Sequence[torch.Tensor], tables: Sequence[SparseTable] = ()):
        self.buckets = list(buckets)
        self.tables = list(tables)
        self.tables_saved = [table.param.grad for table in self.tables]
        self.saved = [[p.grad for p in bucket.params] for bucket in self.buckets]
        # Per bucket, which params any task reached (the others keep their .grad untouched, None included).
        self.reached = [[False] * len(bucket.params) for bucket in self.buckets]
        self.others = list(others)
        self.others_saved = [p.grad for p in self.others]

    def abort(self) -> None:
        """Put every ``.grad`` the step touched back as it was before the step."""
        for bucket, grads in zip(self.buckets, self.saved):
            for p, g in zip(bucket.params, grads):
                p.grad = g
        for p, g in zip(self.others, self.others_saved):
            p.grad = g
        for table, g in zip(self.tables, self.tables_saved):
            table.param.grad = g

    def commit(self, combined: Sequence[torch.Tensor], table_grads: Sequence[torch.Tensor | None] = ()) -> None:
        """Accumulate each bucket's balanced gradient (flat ``[N]``) and the towers' sums onto the set-aside
        ``.grad``; a parameter no task reached keeps its ``.grad`` (None stays None)."""
        accumulate_into, accumulate_from = [], []
        fresh: list[tuple[torch.Tensor, torch.Tensor]] = []
        for bucket, out, prior, reached in zip(self.buckets, combined, self.saved, self.reached):
            for p, view, had, hit in zip(bucket.params, bucket.combined_views(out), prior, reached):
                if not hit:
                    p.grad = had
                elif had is None:
                    fresh.append((p, _autograd_layout(p, view)))
                else:
                    accumulate_into.append(had)
                    accumulate_from.append(view)
                    p.grad = had
        for p, had in zip(self.others, self.others_saved):
            new = p.grad
            if had is not None:
                if new is not None:
                    accumulate_into.append(had)
                    accumulate_from.append(new)
                p.grad = had
        if accumulate_into:
            torch._foreach_add_(accumulate_into, accumulate_from)
        for p, g in fresh:
            p.grad = g
        for table, had, g in zip(self.tables, self.tables_saved, table_grads):
            table.param.grad = had if g is None else (g if had is None else had + g)


def capture_task_grads(
    losses: Sequence[torch.Tensor], buckets: Sequence[Bucket], tables: Sequence[SparseTable] = ()
) -> Capture:
    """Run one backward per task, filling every bucket's workspace (see the module docstring).

    On return the balanced params' ``.grad`` are None and the towers' hold this step's sums, until
    :meth:`Capture.commit` or :meth:`Capture.abort`; on error every ``.grad`` is restored before the exception
    propagates.
    """
    balanced = {id(p) for bucket in buckets for p in bucket.params} | {id(table.param) for table in tables}
    capture = Capture(buckets, [leaf for leaf in reached_leaves(losses) if id(leaf) not in balanced], tables)
    for p in capture.others:
        p.grad = None
    for table in tables:
        table.param.grad = None
    for bucket in buckets:
        for p in bucket.params:
            p.grad = None
    try:
        last = len(losses) - 1
        for task, loss in enumerate(losses):
            if task < last:
                torch.autograd.backward(loss, retain_graph=True)
            elif last == 0:
                torch.autograd.backward(loss)
            else:
                # Final pass from every root (zero seeds for the earlier tasks) frees the whole graph.
                seeds = [torch.zeros_like(other) for other in losses[:-1]] + [torch.ones_like(loss)]
                torch.autograd.backward(list(losses), grad_tensors=seeds)
            _collect_pass(buckets, task, capture.reached)
            _collect_tables(tables, task)
    except BaseException:
        capture.abort()
        raise
    return capture


# ---- capture through a shared representation -------------------------------------------------------------------
def _embedding_lookups(shared: Sequence[torch.Tensor], balanced_ids: set[int]) -> dict[int, list]:
    """Embedding lookups of balanced tables below ``shared`` whose table the bottom reaches through lookups only:
    ``{id(table): [EmbeddingBackward node, ...]}``. The batched backward then stops at each lookup's output (a
    ``[T, rows, d]`` gradient of the looked-up rows) instead of running the dense ``[V, d]`` embedding backward
    once per task; the rows are added into the workspace by index (dense tables) or kept as a sparse gradient
    (sparse tables). ``scale_grad_by_freq`` lookups are left to autograd."""
    lookups: dict[int, list] = {}
    other_parents: set[int] = set()
    seen: set = set()
    stack = [h.grad_fn for h in shared if h.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        is_lookup = type(node).__name__ == "EmbeddingBackward0" and not node._saved_scale_grad_by_freq
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None and id(variable) in balanced_ids:
                if is_lookup and variable.dim() == 2:
                    lookups.setdefault(id(variable), []).append(node)
                else:
                    other_parents.add(id(variable))
            stack.append(child)
    return {key: nodes for key, nodes in lookups.items() if key not in other_parents}


def _rows_to_sparse(table: torch.Tensor, nodes: list, row_grads: dict, task: int) -> torch.Tensor | None:
    """Task ``task``'s gradient of ``table`` from its lookups' row gradients: a coalesced sparse tensor (duplicate
    ids summed, the padding row left out, as the sparse embedding backward does), or None if no lookup got one."""
    indices, values = [], []
    for node in nodes:
        g = row_grads[node]
        if g is None:
            continue
        rows = node._saved_indices.reshape(-1)
        g = g[task].reshape(-1, table.shape[1])
        if node._saved_padding_idx >= 0:
            keep = rows != node._saved_padding_idx
            rows, g = rows[keep], g[keep]
        indices.append(rows)
        values.append(g)
    if not indices:
        return None
    index = torch.cat(indices)[None, :]
    grad = torch.sparse_coo_tensor(index, torch.cat(values), table.shape, check_invariants=False)
    return grad.coalesce()


def capture_task_grads_through(
    losses: Sequence[torch.Tensor],
    buckets: Sequence[Bucket],
    shared: Sequence[torch.Tensor],
    tables: Sequence[SparseTable] = (),
) -> Capture:
    """Per-task gradients of the balanced parameters through the shared representation ``shared`` (tensors
    through which every path from every loss to every balanced parameter passes).

    Each loss is backpropagated through its own tower only, down to ``shared`` (the towers' parameters collect
    the plain sum, as in :func:`capture_task_grads`); then one batched backward (``is_grads_batched``: vmap over
    the task dimension) carries the T cotangents at ``shared`` through the shared bottom into every balanced
    parameter's per-task gradient. Exact per-task gradients, no subtraction. The last tower pass runs from all
    losses (zero seeds but the last) without retaining, and the bottom pass does not retain either, so no graph
    survives the step. Everything checkable is checked before the first backward.
    """
    balanced = [p for bucket in buckets for p in bucket.params]
    balanced_ids = {id(p) for p in balanced} | {id(table.param) for table in tables}
    for i, h in enumerate(shared):
        if not isinstance(h, torch.Tensor) or not h.requires_grad or h.grad_fn is None:
            raise ValueError(
                f"MetaBalance.step: shared_output[{i}] must be a tensor computed from the balanced parameters "
                "(the shared bottom's output), with its graph (not detached, not a leaf)"
            )
    above, reached_shared = _walk(losses, shared)
    towers = [leaf for leaf in above if id(leaf) not in balanced_ids]
    leaking = [leaf for leaf in above if id(leaf) in balanced_ids]
    if leaking:
        shapes = ", ".join(str(tuple(p.shape)) for p in leaking[:5])
        raise ValueError(
            f"MetaBalance.step: a loss reaches balanced parameter(s) of shape {shapes} without passing through "
            "shared_output; pass every tensor the towers take from the shared bottom (a sequence is accepted), "
            "or call step(losses) without shared_output"
        )
    if not any(reached_shared):
        raise ValueError("MetaBalance.step: no loss depends on shared_output; pass the shared bottom's output")
    below = reached_leaves(shared)
    if not any(id(leaf) in balanced_ids for leaf in below):
        raise ValueError("MetaBalance.step: shared_output does not depend on any balanced parameter")
    bottom_others = [leaf for leaf in below if id(leaf) not in balanced_ids]
    lookups = _embedding_lookups(shared, balanced_ids)
    for table in tables:
        if id(table.param) not in lookups:
            raise ValueError(
                f"MetaBalance.step: the sparse table of shape {tuple(table.param.shape)} is reached other than by "
                "nn.Embedding lookups (e.g. nn.EmbeddingBag); with shared_output, sparse tables must be nn.Embedding "
                "lookups only. Call step(losses) without shared_output for this model."
            )
    capture = Capture(buckets, towers + [p for p in bottom_others if id(p) not in {id(t) for t in towers}], tables)
    for p in capture.others:
        p.grad = None
    for table in tables:
        table.param.grad = None
    for p in balanced:
        p.grad = None
    try:
        tower_inputs = [*shared, *towers]
        last = len(losses) - 1
        per_task_h: list[list[torch.Tensor | None]] = []
        tower_sums: list[torch.Tensor | None] = [None] * len(towers)
        for task, loss in enumerate(losses):
            if task < last:
                grads = torch.autograd.grad(loss, tower_inputs, retain_graph=True, allow_unused=True)
            else:
                # From every root, zero seeds but the last: every tower node runs once more without retain.
                seeds = [torch.zeros_like(other) for other in losses[:-1]] + [torch.ones_like(loss)]
                grads = torch.autograd.grad(list(losses), tower_inputs, grad_outputs=seeds, allow_unused=True)
            per_task_h.append(list(grads[: len(shared)]))
            for j, g in enumerate(grads[len(shared) :]):
                if g is not None:
                    tower_sums[j] = g if tower_sums[j] is None else tower_sums[j] + g
        cotangents = [
            torch.stack([g if g is not None else torch.zeros_like(h) for g in (row[i] for row in per_task_h)])
            for i, h in enumerate(shared)
        ]
        dense = [p for p in balanced if id(p) not in lookups]
        table_params = [table.param for table in tables]
        lookup_nodes = [node for p in [*balanced, *table_params] for node in lookups.get(id(p), [])]
        edges = [GradientEdge(node, 0) for node in lookup_nodes]
        bottom_inputs = [*dense, *bottom_others, *edges]
        try:
            results = torch.autograd.grad(
                list(shared), bottom_inputs, grad_outputs=cotangents, is_grads_batched=True, allow_unused=True
            )
        except RuntimeError as err:
            raise RuntimeError(
                "MetaBalance.step(shared_output=...): the batched backward through the shared bottom failed (an "
                "operation without a vmap rule, e.g. a custom autograd.Function?); call step(losses) without "
                f"shared_output for this model. Cause: {err}"
            ) from err
        dense_grads = dict(zip((id(p) for p in dense), results[: len(dense)]))
        row_grads = dict(zip(lookup_nodes, results[len(dense) + len(bottom_others) :]))
        num_tasks = len(losses)
        with torch.no_grad():
            for bucket, hit in zip(buckets, capture.reached):
                start = 0
                for i, (p, size) in enumerate(zip(bucket.params, bucket.layout.sizes)):
                    block = bucket.task_grads[:, start : start + size]  # tensor i's T rows
                    start += size
                    if id(p) in lookups:
                        block.zero_()
                        table = block.view(num_tasks, p.shape[0], p.shape[1])
                        for node in lookups[id(p)]:
                            g = row_grads[node]
                            if g is None:
                                continue
                            rows = node._saved_indices.reshape(-1)
                            g = g.reshape(num_tasks, -1, p.shape[1])
                            if node._saved_padding_idx >= 0:  # the padding row gets no gradient, as in autograd
                                g = g * (rows != node._saved_padding_idx).to(g.dtype)[None, :, None]
                            table.index_add_(1, rows, g.to(table.dtype))
                            hit[i] = True
                        continue
                    g = dense_grads[id(p)]
                    if g is None:
                        block.zero_()
                    else:
                        block.copy_(g.reshape(num_tasks, size))  # one strided copy of T rows
                    hit[i] = g is not None
            for table in tables:
                nodes = lookups[id(table.param)]
                table.task_grads = [_rows_to_sparse(table.param, nodes, row_grads, t) for t in range(num_tasks)]
            for p, g in zip(towers, tower_sums):
                p.grad = g
            for p, g in zip(bottom_others, results[len(dense) : len(dense) + len(bottom_others)]):
                if g is not None:
                    total = g.sum(0)
                    p.grad = total if p.grad is None else p.grad + total
    except BaseException:
        capture.abort()
        raise
    return capture
