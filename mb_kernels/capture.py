"""Per-task gradient capture into flat ``[T, N]`` workspaces, one per (param group, device, dtype), and into row
buckets for embedding tables, and the whole ``.grad`` lifecycle of every parameter the step touches.

One backward pass per task (``autograd.grad``, so nothing accumulates into ``.grad`` while the passes run): the
balanced dense parameters' gradients are copied into row t of their workspace; the tables reached by lookups only
(``nn.Embedding``; sum/mean ``nn.EmbeddingBag``) have their gradient taken at the lookups' outputs
(``GradientEdge``: the looked-up rows, never the dense ``[V, d]`` embedding backward) and handed to their row
bucket, as are the sparse gradients of the other sparse tables; the other leaves the losses reach (task towers)
collect the plain sum over the passes, as ``sum(losses).backward()`` would give them. Before the passes the
``.grad`` of every leaf the losses reach is set aside; after balancing, :meth:`Capture.commit` accumulates the
results onto it (in place, as autograd does; a fresh gradient gets the parameter's own strides, as autograd gives
it); on any failure, :meth:`Capture.abort` puts every set-aside gradient back unchanged, so a caller who catches the
error sees the ``.grad`` of before the step.

Leak-free graph release: autograd frees a node's saved tensors only when a non-retaining pass executes
it. Passes 0..T-2 retain the graph, so the last pass runs from *all* losses, with a zero gradient for
losses 0..T-2 and one for loss T-1: every node executes once more without retain and its buffers are
freed, even if the caller keeps the loss tensors. Adding exact zeros leaves every gradient bitwise
unchanged (the only exception: a saved activation that is itself Inf/NaN turns 0 * Inf into NaN, which
marks that step non-finite; its forward was non-finite already). The one exception are the cut lookups: their
nodes never run, so the ids they saved (the caller's own batch ids) live as long as the caller keeps a loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch.autograd.graph import GradientEdge

from .backends.contract import state_dtype
from .layout import FlatLayout, autograd_layout, fresh_grad_strides
from .tables import RowBucket, TableRows, first_present, norm_ema_from_rows, sorted_runs


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
        self.norm_ema = norm_ema_from_rows(norm_ema_rows, num_tasks, self.dtype, self.device)

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


def sparse_gradient_params(edges: Sequence[tuple], candidates: set[int]) -> set[int]:
    """Ids of the ``candidates`` (leaf tensors) that a backward through ``edges`` (:func:`leaf_edges`) gives sparse
    gradients: the tables of ``nn.Embedding``/``nn.EmbeddingBag`` lookups with ``sparse=True``. ValueError (before
    any backward) for a table that is also used otherwise: autograd would sum the uses into a dense gradient."""
    sparse, other = {}, set()
    for node, leaf in edges:
        if id(leaf) in candidates:
            if getattr(node, "_saved_sparse", False) is True:
                sparse[id(leaf)] = leaf
            else:
                other.add(id(leaf))
    for key in sparse.keys() & other:  # the first one found
        raise ValueError(
            f"MetaBalance.step: the table of shape {tuple(sparse[key].shape)} is looked up with sparse=True and also "
            "used otherwise (e.g. tied to an output layer, indexed directly, or looked up with sparse=False), so "
            "autograd would give it a dense gradient. Use sparse=False for that table (MetaBalance still balances "
            "it by rows where it can), or use it through sparse lookups only."
        )
    return set(sparse)


_BAG_SUM, _BAG_MEAN = 0, 1  # ATen's embedding_bag modes
_LOOKUP_NODES = ("EmbeddingBackward0", "EmbeddingBagBackward0")


def _is_cut_lookup(node) -> bool:
    """Whether the gradient of a table at this node's output gives the table's rows exactly: an ``nn.Embedding``
    lookup, or an ``nn.EmbeddingBag`` in sum or mean mode whose per-sample weights (if any) need no gradient. Not
    max mode (each feature goes to a different row), nor ``scale_grad_by_freq`` with sparse gradients (which
    autograd refuses, so the step leaves it to autograd's error)."""
    name = type(node).__name__
    if name not in _LOOKUP_NODES:
        return False
    if node._saved_scale_grad_by_freq and node._saved_sparse:
        return False
    if name == "EmbeddingBackward0":
        return True
    weights_need_grad = len(node.next_functions) > 1 and node.next_functions[1][0] is not None
    return node._saved_mode in (_BAG_SUM, _BAG_MEAN) and not weights_need_grad


def lookup_only_tables(
    edges: Sequence[tuple], balanced_ids: set[int], row_tables_before: frozenset[int] = frozenset()
) -> dict[int, list]:
    """``{id(table): [lookup node, ...]}`` for the balanced 2-D tables that the graph of ``edges``
    (:func:`leaf_edges`) reaches through lookups only (``nn.Embedding``; ``nn.EmbeddingBag`` in sum or mean mode:
    :func:`_is_cut_lookup`). Their gradients are then taken at the lookups' outputs (``GradientEdge``), as rows,
    instead of the dense ``[V, d]`` embedding backward.

    A dense table whose lookups this step take more ids than it has rows (a small table, a large batch) is left
    out: its rows would cost more than its ``[T, V, d]`` workspace. The count is a shape: no host read. A table
    that is a row table already (``row_tables_before``) stays one up to twice as many ids, so that counts around
    the row count do not rebuild the buckets step after step. Sparse tables are always in: their per-task
    gradients have a row per id either way."""
    lookups: dict[int, list] = {}
    other_parents: set[int] = set()
    leaves: dict[int, torch.Tensor] = {}
    for node, leaf in edges:
        if id(leaf) not in balanced_ids:
            continue
        if _is_cut_lookup(node) and leaf.dim() == 2:
            lookups.setdefault(id(leaf), []).append(node)
            leaves[id(leaf)] = leaf
        else:
            other_parents.add(id(leaf))

    def cheaper_by_rows(key: int) -> bool:
        nodes = lookups[key]
        ids = sum(node._saved_indices.numel() for node in nodes)
        limit = leaves[key].shape[0] * (2 if key in row_tables_before else 1)
        return ids <= limit or any(node._saved_sparse for node in nodes)

    return {key: nodes for key, nodes in lookups.items() if key not in other_parents and cheaper_by_rows(key)}


# A table this large balanced through the [T, N] workspace is worth a warning (T full-size gradients per step).
WORKSPACE_WARNING_ELEMENTS = 1 << 20
TABLE_ASPECT = 8
COMPILED_REGION = "a torch.compile'd region"


def is_compiled_region(node) -> bool:
    """Whether an autograd node is a ``torch.compile``'d region (one node to the step, whatever it holds)."""
    return type(node).__name__.startswith("CompiledFunctionBackward")


def tables_kept_dense(edges: Sequence[tuple], balanced_ids: set[int], lookups: dict[int, list]) -> list[tuple]:
    """``(table, reason)`` for the balanced dense 2-D tables of at least :data:`WORKSPACE_WARNING_ELEMENTS` that
    the graph of ``edges`` looks up but that cannot be balanced by rows (so each task's full ``[V, d]`` gradient
    goes through the workspace): also used otherwise, or looked up in a way whose rows the step cannot take. A
    table left dense because a step looks up more ids than it has rows is not listed (the workspace is the cheaper
    there). A table-shaped tensor (at least :data:`TABLE_ASPECT` times as many rows as columns) that a
    ``torch.compile``'d region takes is listed with the reason :data:`COMPILED_REGION`: the region is one autograd
    node to the step, so any lookup inside it is out of sight."""
    looked_up: dict[int, torch.Tensor] = {}
    reasons: dict[int, set[str]] = {}
    for node, leaf in edges:
        key = id(leaf)
        if key not in balanced_ids or key in lookups or leaf.dim() != 2 or leaf.numel() < WORKSPACE_WARNING_ELEMENTS:
            continue
        if is_compiled_region(node):
            if leaf.shape[0] >= TABLE_ASPECT * leaf.shape[1]:
                looked_up[key] = leaf
                reasons.setdefault(key, set()).add(COMPILED_REGION)
        elif type(node).__name__ in _LOOKUP_NODES:
            looked_up[key] = leaf
            if getattr(node, "_saved_sparse", False):
                continue  # a sparse table: balanced by rows, or refused with an error of its own
            if not _is_cut_lookup(node):
                reasons.setdefault(key, set()).add(f"a {type(node).__name__} lookup whose rows the step cannot take")
        else:
            reasons.setdefault(key, set()).add(f"{type(node).__name__}")
    return [(leaf, sorted(reasons[key])) for key, leaf in looked_up.items() if key in reasons]


def lookup_rows(node, grads: torch.Tensor | Sequence[torch.Tensor | None], table: torch.Tensor) -> TableRows:
    """A lookup's rows from ``grads``, each task's gradient at its output (a ``[T, *output shape]`` tensor, or one
    tensor or None per task): ids ``[k]`` and each task's ``[k, d]`` rows (:class:`~mb_kernels.tables.TableRows`).
    Ids of the padding row become the table's row count ("no row": :class:`~mb_kernels.tables.RowBucket` ignores
    their values, as autograd gives the padding row no gradient); marking instead of removing keeps the shapes
    independent of the ids (no host sync)."""
    if type(node).__name__ == "EmbeddingBagBackward0":
        return _bag_rows(node, grads, table)
    ids = node._saved_indices.reshape(-1)
    weight = None
    if node._saved_scale_grad_by_freq:
        present = first_present(grads)
        weight = _inverse_frequency(ids, state_dtype(present.dtype))
    if node._saved_padding_idx >= 0:
        ids = ids.masked_fill(ids == node._saved_padding_idx, table.shape[0])
    return TableRows(ids, _per_task_rows(grads, table.shape[1]), None, weight)


def _inverse_frequency(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per id, 1 / how often it occurs in ``ids`` (all of a lookup's ids, padding included, as autograd counts
    them): what ``scale_grad_by_freq`` scales each looked-up row's gradient by. Counted with a sort and run
    lengths, so no shape depends on the ids."""
    _, order, run = sorted_runs(ids)
    # Run numbers start at 1. Integers: exact in any order.
    lengths = torch.zeros(ids.numel() + 1, dtype=ids.dtype, device=ids.device).index_add_(0, run, torch.ones_like(ids))
    return torch.empty_like(ids).scatter_(0, order, lengths[run]).to(dtype).reciprocal()


def _per_task_rows(grads: torch.Tensor | Sequence[torch.Tensor | None], width: int):
    """``grads`` as rows of ``width``: ``[T, m, d]`` for a tensor, else a list of ``[m, d]`` or None."""
    if isinstance(grads, torch.Tensor):
        return grads.reshape(grads.shape[0], -1, width)
    return [None if g is None else g.reshape(-1, width) for g in grads]


def _bag_rows(node, grads: torch.Tensor | Sequence[torch.Tensor | None], table: torch.Tensor) -> TableRows:
    """:func:`lookup_rows` of an ``nn.EmbeddingBag`` (sum or mean): every looked-up id gets its bag's gradient,
    times its per-sample weight (sum) or over its bag's size (mean), as autograd's embedding-bag backward gives it:
    with the bag of each id and the bag sizes the forward saved where it saved them (ATen's ``offset2bag`` and
    ``bag_size``; for ids after the closing offset of ``include_last_offset`` they differ between modes and
    devices), else from the offsets. Padding ids and ids in no bag are "no row". No shape depends on the ids.
    Where ATen's own backward is undefined (ids after the closing offset in CPU's fast sum path, which reads out
    of bounds; zero bags with ids), those ids get no gradient, as they contributed nothing to the forward."""
    ids = node._saved_indices.reshape(-1)
    present = first_present(grads)  # one task's gradient at the bags' output
    bags = present.shape[-2]
    source = _per_task_rows(grads, table.shape[1])
    if bags == 0:  # nothing to gather from: every id is "no row"
        no_rows = torch.full_like(ids, table.shape[0])
        zero = [present.new_zeros(1, table.shape[1])] * len(grads)
        return TableRows(no_rows, zero, torch.zeros_like(ids), None)
    offset2bag, bag_size = node._saved_result1, node._saved_result2
    if offset2bag.numel() == ids.numel():
        bag = offset2bag.to(torch.int64)
        valid = torch.ones_like(ids, dtype=torch.bool)
    else:  # CPU sum mode saves none: an id belongs to the last bag starting at or before it, up to the closing one
        all_offsets = node._saved_offsets
        offsets = all_offsets[:bags]  # include_last_offset: one offset more than bags
        positions = torch.arange(ids.numel(), dtype=offsets.dtype, device=ids.device)
        bag = torch.searchsorted(offsets, positions, right=True) - 1
        valid = bag >= 0
        if all_offsets.numel() > bags:
            valid &= positions < all_offsets[bags]
        bag = bag.clamp_min(0)
    if node._saved_padding_idx >= 0:
        valid &= ids != node._saved_padding_idx
    # Weights in the accumulation dtype (float32 for half tables; the rows are summed in it anyway), as is the count.
    acc = state_dtype(present.dtype)
    weight = None
    if node._saved_mode == _BAG_MEAN:
        if bag_size.numel() < bags:  # not saved: count each bag's non-padding ids
            bag_size = torch.zeros(bags, dtype=acc, device=ids.device).index_add_(0, bag, valid.to(acc))
        # CUDA saves one size per offset: with include_last_offset, one more than bags (the first ones are theirs).
        weight = bag_size[:bags].to(acc).clamp_min(1).reciprocal()[bag]
    elif node._saved_per_sample_weights is not None:
        weight = node._saved_per_sample_weights.to(acc).reshape(-1)
    if node._saved_scale_grad_by_freq:
        frequency = _inverse_frequency(ids, acc)
        weight = frequency if weight is None else weight * frequency
    return TableRows(torch.where(valid, ids, table.shape[0]), source, bag, weight)


def collect_dense(
    buckets: Sequence[Bucket], grads: Sequence[torch.Tensor | None], task: int, reached: list[list[bool]]
) -> None:
    """Copy this pass's gradients of the buckets' params (in bucket order) into workspace row ``task``."""
    start = 0
    for bucket, bucket_reached in zip(buckets, reached):
        bucket_grads = grads[start : start + len(bucket.params)]
        start += len(bucket.params)
        rows = bucket.task_grad_views[task]
        for g, p in zip(bucket_grads, bucket.params):
            if g is not None and g.layout != torch.strided:
                raise ValueError(
                    f"MetaBalance.step: the balanced parameter of shape {tuple(p.shape)} received a {g.layout} "
                    "gradient through a computation (e.g. F.embedding(ids, w * 1, sparse=True) or a cast of the "
                    "table): MetaBalance takes sparse gradients from lookups of the parameter itself. Look the "
                    "parameter up directly, or use sparse=False."
                )
        if all(g is not None for g in bucket_grads):
            torch._foreach_copy_(rows, list(bucket_grads))
        else:
            for g, row in zip(bucket_grads, rows):
                if g is None:
                    row.zero_()
                else:
                    row.copy_(g)
        for i, g in enumerate(bucket_grads):
            bucket_reached[i] = bucket_reached[i] or g is not None


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


class GradientSum:
    """The plain sum of a non-balanced leaf's gradients over the passes, handed to ``.grad`` as autograd's
    AccumulateGrad would: a tensor of the parameter's own (owned, dense) layout (:func:`set_summed_grads`)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.owned = False

    def add(self, g: torch.Tensor | None) -> None:
        if g is None:
            return
        if self.total is None:
            self.total = g
        else:
            self.total, self.owned = self.total + g, True  # the order autograd accumulates in


def set_summed_grads(params: Sequence[torch.Tensor], sums: Sequence[GradientSum]) -> None:
    """Set each parameter's ``.grad`` to its sum (None: no gradient). A gradient ``autograd.grad`` returned and
    nothing was added to may be shared with another leaf, expanded (stride 0), a view into a larger buffer or held
    by a custom Function, so it is copied; those copies go, per device and dtype, into one buffer of the step's own
    with one ``_foreach_copy_`` (two operations instead of two per tower parameter: the ``.grad`` are views of
    that buffer, as with DDP's ``gradient_as_bucket_view``)."""
    to_copy: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for p, total in zip(params, sums):
        if total.total is None:
            p.grad = None
        elif total.total.layout != torch.strided:  # a sparse gradient (a tower's sparse=True lookup): as autograd
            p.grad = total.total if total.owned else total.total.clone()
        elif total.owned:
            p.grad = autograd_layout(p, total.total)
        else:
            to_copy.setdefault((p.device, p.dtype), []).append((p, total.total))
    for (device, dtype), pairs in to_copy.items():
        buffer = torch.empty(sum(p.numel() for p, _ in pairs), dtype=dtype, device=device)
        views, start = [], 0
        for p, _ in pairs:
            views.append(buffer[start : start + p.numel()].as_strided(p.shape, fresh_grad_strides(p), start))
            start += p.numel()
        torch._foreach_copy_(views, [g for _, g in pairs])
        for (p, _), view in zip(pairs, views):
            p.grad = view


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
                    fresh.append((p, autograd_layout(p, view)))
                else:
                    accumulate_into.append(had)
                    accumulate_from.append(view)
                    p.grad = had
        for p, had in zip(self.others, self.others_saved):
            new = p.grad
            if had is not None:
                if new is not None and had.layout == new.layout == torch.strided:
                    accumulate_into.append(had)
                    accumulate_from.append(new)
                elif new is not None:
                    had = _accumulated(had, new)
                p.grad = had
        if accumulate_into:
            torch._foreach_add_(accumulate_into, accumulate_from)
        for p, g in fresh:
            p.grad = g
        for p, had, g in zip(self.tables, self.tables_saved, table_grads):
            p.grad = had if g is None else (g if had is None else _accumulated(had, g))


def _accumulated(had: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``had + g`` for a ``.grad`` from before the step and this step's gradient ``g`` (ours), either of them sparse."""
    if had.layout == torch.strided:
        return had.add_(g)  # in place, as autograd accumulates into a dense gradient
    if g.layout == torch.strided:
        return g.add_(had)  # a sparse gradient from before plus this step's dense one (ours to modify)
    return had + g


def task_passes(losses: Sequence[torch.Tensor], inputs: Sequence) -> Iterator[tuple[int, tuple]]:
    """``(task, gradients of loss[task] at inputs)`` for each task, one ``autograd.grad`` each: passes 0..T-2 retain
    the graph, the last runs from every root with zero seeds for the others, so that every node runs once without
    retain and the graph is freed (module docstring)."""
    last = len(losses) - 1
    for task, loss in enumerate(losses):
        if task < last:
            yield task, torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        else:
            seeds = [torch.zeros_like(other) for other in losses[:-1]] + [torch.ones_like(loss)]
            yield task, torch.autograd.grad(list(losses), inputs, grad_outputs=seeds, allow_unused=True)


def capture_task_grads(
    losses: Sequence[torch.Tensor],
    buckets: Sequence[Bucket],
    tables: Sequence[RowBucket],
    leaves: dict[int, torch.Tensor],
    lookups: dict[int, list],
) -> Capture:
    """Run one backward per task (see the module docstring): the buckets' params' gradients go to the workspaces,
    the tables' to their row buckets (at the lookups' outputs for the tables in ``lookups``, else the sparse
    gradients autograd gives), the other ``leaves`` (``{id: leaf}`` of every leaf the losses reach; towers)
    collect the plain sum.

    On return the balanced params' ``.grad`` are None and the others' hold this step's sums, until
    :meth:`Capture.commit` or :meth:`Capture.abort`; on error every ``.grad`` is restored before the exception
    propagates.
    """
    balanced = {id(p) for bucket in [*buckets, *tables] for p in bucket.params}
    capture = Capture(buckets, [leaf for key, leaf in leaves.items() if key not in balanced], tables)
    for p in [*capture.others, *capture.tables]:
        p.grad = None
    for bucket in buckets:
        for p in bucket.params:
            p.grad = None
    # A balanced parameter this step does not reach (one frozen since, say) is no input: it keeps its .grad.
    dense_all = [p for bucket in buckets for p in bucket.params]
    dense = [p for p in dense_all if id(p) in leaves]
    cut = [
        (bucket, i, node) for bucket in tables for i, p in enumerate(bucket.params) for node in lookups.get(id(p), [])
    ]
    uncut = [
        (bucket, i, p)
        for bucket in tables
        for i, p in enumerate(bucket.params)
        if id(p) not in lookups and id(p) in leaves
    ]
    inputs = [*dense, *capture.others, *(p for _, _, p in uncut), *(GradientEdge(node, 0) for _, _, node in cut)]
    sums = [GradientSum() for _ in capture.others]
    cut_grads: list[list[torch.Tensor | None]] = [[None] * len(losses) for _ in cut]
    try:
        for task, grads in task_passes(losses, inputs):
            with torch.no_grad():
                by_param = dict(zip(map(id, dense), grads[: len(dense)]))
                collect_dense(buckets, [by_param.get(id(p)) for p in dense_all], task, capture.reached)
                grads = grads[len(dense) :]
                for total, g in zip(sums, grads[: len(sums)]):
                    total.add(g)
                grads = grads[len(sums) :]
                for (bucket, i, p), g in zip(uncut, grads):
                    if g is None:
                        continue
                    if g.layout == torch.strided:
                        raise TypeError(
                            f"MetaBalance: the table of shape {tuple(p.shape)} received a dense gradient after sparse "
                            "ones; a table must get sparse gradients only (sparse=True in every lookup, no other use)"
                        )
                    bucket.add_task_rows(i, task, g._indices()[0], g._values())
                for rows, g in zip(cut_grads, grads[len(uncut) :]):
                    rows[task] = g
        with torch.no_grad():
            # A lookup's ids are the same for every task: one part with each task's rows, not T parts (each task's
            # gradient stays where autograd put it).
            for (bucket, i, node), per_task in zip(cut, cut_grads):
                if any(g is not None for g in per_task):
                    bucket.add_part(i, lookup_rows(node, per_task, bucket.params[i]))
        set_summed_grads(capture.others, sums)
    except BaseException:
        capture.abort()
        raise
    return capture
