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
from typing import Any, NamedTuple

import torch

from .backends.contract import state_dtype
from .layout import FlatLayout
from .tables import RowBucket


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


def leaf_edges(roots: Sequence[torch.Tensor]):
    """Every (node, leaf) pair of the autograd graph below ``roots`` where ``node`` passes gradient into the leaf
    tensor's AccumulateGrad (each node visited once; no tensor values read)."""
    seen: set = set()
    stack = [root.grad_fn for root in roots if root.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None:
                yield node, variable
            else:
                stack.append(child)


def sparse_gradient_params(losses: Sequence[torch.Tensor], candidates: set[int]) -> set[int]:
    """Ids of the ``candidates`` (leaf tensors) that a backward from ``losses`` gives sparse gradients: the tables
    of ``nn.Embedding``/``nn.EmbeddingBag`` lookups with ``sparse=True``."""
    return {
        id(leaf)
        for node, leaf in leaf_edges(losses)
        if id(leaf) in candidates and getattr(node, "_saved_sparse", False) is True
    }


def _collect_tables(tables: Sequence[RowBucket], task: int) -> None:
    """Keep this pass's sparse gradients of the tables as (ids, rows) of task ``task``; reset ``.grad``."""
    for bucket in tables:
        for i, p in enumerate(bucket.params):
            g = p.grad
            if g is None:
                continue
            if g.layout == torch.strided:
                raise TypeError(
                    f"MetaBalance: the table of shape {tuple(p.shape)} received a dense gradient after sparse ones; a "
                    "table must get sparse gradients only (sparse=True in every lookup, no other use)"
                )
            bucket.add_task_rows(i, task, g._indices()[0], g._values())
            p.grad = None


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


class GraphWalk(NamedTuple):
    """What :func:`walk_graph` found."""

    leaves: list[torch.Tensor]
    """The leaf tensors (AccumulateGrad nodes), each once."""
    reached_cut: list[bool]
    """Which of the ``cut_at`` tensors were reached (a root that is one of them counts)."""
    nodes: set
    """The autograd nodes visited."""
    cut_consumers: list[tuple[Any, int, int]]
    """``(node, input index, cut index)`` for every edge from a visited node into a ``cut_at`` tensor."""


def walk_graph(roots: Sequence[torch.Tensor], cut_at: Sequence[torch.Tensor] = ()) -> GraphWalk:
    """Walk the autograd graph from ``roots`` without crossing the edges into the tensors ``cut_at``. Reads no
    values."""
    cut = {_edge(h): i for i, h in enumerate(cut_at)}
    reached_cut = [False] * len(cut_at)
    consumers = []
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
        for index, (child, output_nr) in enumerate(node.next_functions):
            if child is None:
                continue
            if (child, output_nr) in cut:
                reached_cut[cut[(child, output_nr)]] = True
                consumers.append((node, index, cut[(child, output_nr)]))
            else:
                stack.append(child)
    return GraphWalk(list(leaves.values()), reached_cut, seen, consumers)


def reached_leaves(losses: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The leaf tensors whose ``.grad`` a backward pass from ``losses`` accumulates into, each once."""
    return walk_graph(losses).leaves


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

    def __init__(
        self, buckets: Sequence[Bucket], others: Sequence[torch.Tensor], tables: Sequence[RowBucket] = ()
    ) -> None:
        self.buckets = list(buckets)
        self.tables = [p for bucket in tables for p in bucket.params]
        self.tables_saved = [p.grad for p in self.tables]
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
        for p, g in zip(self.tables, self.tables_saved):
            p.grad = g

    def commit(self, combined: Sequence[torch.Tensor], table_grads: Sequence[torch.Tensor | None] = ()) -> None:
        """Accumulate each bucket's balanced gradient (flat ``[N]``), each table's (in the order of the row
        buckets' params; None: not reached) and the towers' sums onto the set-aside ``.grad``; a parameter no task
        reached keeps its ``.grad`` (None stays None)."""
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
        for p, had, g in zip(self.tables, self.tables_saved, table_grads):
            if g is None or had is None:
                p.grad = had if g is None else g
            elif had.layout == torch.strided and g.layout == torch.strided:
                p.grad = had.add_(g)  # in place, as autograd accumulates a dense gradient
            else:
                p.grad = had + g


def capture_task_grads(
    losses: Sequence[torch.Tensor], buckets: Sequence[Bucket], tables: Sequence[RowBucket] = ()
) -> Capture:
    """Run one backward per task, filling every bucket's workspace (see the module docstring).

    On return the balanced params' ``.grad`` are None and the towers' hold this step's sums, until
    :meth:`Capture.commit` or :meth:`Capture.abort`; on error every ``.grad`` is restored before the exception
    propagates.
    """
    balanced = {id(p) for bucket in [*buckets, *tables] for p in bucket.params}
    capture = Capture(buckets, [leaf for leaf in reached_leaves(losses) if id(leaf) not in balanced], tables)
    for p in capture.others:
        p.grad = None
    for p in capture.tables:
        p.grad = None
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
