"""Capture through a shared representation: ``MetaBalance.step(losses, shared_output=h)``.

Each loss is backpropagated through its own tower only, down to ``h``; one batched backward (``is_grads_batched``,
vmap over the task dimension; CUDA) or one backward per task (CPU: :data:`BOTTOM_BACKWARD`) then carries the T
cotangents at ``h`` through the shared bottom. Embedding lookups of
balanced tables (``nn.Embedding``, sum/mean ``nn.EmbeddingBag``) are cut at their outputs (``GradientEdge``), so no
dense ``[V, d]`` embedding backward runs per task;
the rows go to :class:`~mb_kernels.tables.RowBucket` (balanced by rows, dense or sparse result). The ``.grad``
lifecycle and the workspaces are :mod:`mb_kernels.capture`'s; docs/design.md §4 gives the design.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.autograd.graph import GradientEdge

from .capture import (
    Bucket,
    Capture,
    GradientSum,
    collect_dense,
    is_compiled_region,
    leaf_edges,
    lookup_only_tables,
    lookup_rows,
    set_summed_grads,
    sparse_gradient_params,
    task_passes,
    walk_graph,
)
from .tables import RowBucket, TableRows


@dataclass
class SharedPlan:
    """What a step through ``shared`` needs from the graph, found before any backward (one walk above ``shared``,
    one below): the tower leaves, the non-balanced leaves of the bottom, and the embedding lookups."""

    shared: list[torch.Tensor]
    towers: list[torch.Tensor]
    bottom_others: list[torch.Tensor]
    """Non-balanced leaves below ``shared`` (none of them is also a tower leaf: refused)."""
    lookups: dict[int, list]
    """``{id(table): [lookup node, ...]}``: balanced tables the bottom reaches through lookups only (``nn.Embedding``;
    ``nn.EmbeddingBag`` in sum or mean mode: :func:`~mb_kernels.capture.lookup_only_tables`). The bottom's backward
    stops at each lookup's output (each task's ``[rows, d]`` or ``[bags, d]`` gradient: one ``[T, ...]`` tensor when
    batched) instead of running the dense ``[V, d]`` embedding backward once per task."""
    tower_consumers: list[list[tuple]] | None
    """When no autograd function above ``shared`` is reached from two losses (towers apart, losses distinct): per
    loss, the ``(node, input index, shared index)`` edges by which its graph takes ``shared``. Then one backward
    from all losses gives every task's gradient at ``shared``, read at those edges. None otherwise."""
    sparse_ids: set[int]
    """Balanced tables the bottom gives sparse gradients (``sparse=True`` lookups)."""
    below_ids: set[int]
    """Every leaf below ``shared`` (the balanced parameters this step reaches)."""
    edges: list[tuple]
    """The ``(node, leaf)`` edges below ``shared`` (:func:`~mb_kernels.capture.leaf_edges`)."""
    towers_joined: tuple[list, list[set]] | None
    """When the towers are not separate (and no loss is a shared tensor): the losses' nodes and each loss's autograd
    functions above ``shared``, for :meth:`splitting_joins` (read when a layout is built, not every step)."""

    def splitting_joins(self) -> list[str]:
        """The names of the nodes where the losses meet above ``shared`` when they only cut, join or reshape
        tensors (:func:`_splitting_joins`): the towers then take one pass per loss, each through every tower, where
        reading each loss from its own tower's output makes that one pass. Else ``[]``."""
        return [] if self.towers_joined is None else _splitting_joins(*self.towers_joined)


def _shapes(tensors: Sequence[torch.Tensor]) -> str:
    return ", ".join(str(tuple(p.shape)) for p in tensors[:5])


def plan_through(
    losses: Sequence[torch.Tensor],
    shared: Sequence[torch.Tensor],
    balanced_ids: set[int],
    row_tables_before: frozenset[int] = frozenset(),
) -> SharedPlan:
    """Check that ``shared`` separates the losses from the balanced parameters and find the lookups
    (:func:`~mb_kernels.capture.lookup_only_tables`); raises ValueError (nothing touched) when it does not."""
    for i, h in enumerate(shared):
        if not isinstance(h, torch.Tensor) or not h.requires_grad or h.grad_fn is None:
            raise ValueError(
                f"MetaBalance.step: shared_output[{i}] must be a tensor computed from the balanced parameters "
                "(the shared bottom's output), with its graph (not detached, not a leaf)"
            )
    # The same tensor passed twice would get its gradient twice.
    shared = list({(h.grad_fn, h.output_nr): h for h in reversed(shared)}.values())[::-1]
    for i, h in enumerate(shared):
        others = shared[:i] + shared[i + 1 :]
        if others and any(walk_graph([h], others).reached_cut):
            raise ValueError(
                "MetaBalance.step: a tensor of shared_output is computed from another one; pass "
                "tensors that do not depend on each other. A model whose towers or gates read the shared bottom at "
                "two depths (e.g. MMoE gates fed by the shared embeddings as well as the experts' outputs) cannot "
                "use shared_output: call step(losses) without it"
            )
    # Each loss's graph above `shared` on its own: whether the towers share any node decides how the tower
    # gradients are taken (capture_task_grads_through).
    above: dict[int, torch.Tensor] = {}
    reached_shared = [False] * len(shared)
    walks = [walk_graph([loss], shared) for loss in losses]
    for walk in walks:
        above.update((id(leaf), leaf) for leaf in walk.leaves)
        reached_shared = [a or b for a, b in zip(reached_shared, walk.reached_cut)]
    cut_roots = {(h.grad_fn, h.output_nr) for h in shared} & {(loss.grad_fn, loss.output_nr) for loss in losses}
    # A leaf shared by several towers (its AccumulateGrad node) is fine: it sums what the towers send it.
    functions = [{node for node in walk.nodes if not hasattr(node, "variable")} for walk in walks]
    separate = not cut_roots and sum(map(len, functions)) == len(set().union(*functions))
    tower_consumers = [walk.cut_consumers for walk in walks] if separate else None
    above = list(above.values())
    towers = [leaf for leaf in above if id(leaf) not in balanced_ids]
    leaking = [leaf for leaf in above if id(leaf) in balanced_ids]
    if leaking:
        raise ValueError(
            f"MetaBalance.step: a loss reaches balanced parameter(s) of shape {_shapes(leaking)} without passing "
            "through shared_output; pass every tensor the towers take from the shared bottom (a sequence is "
            "accepted) if none of them is computed from another, else (e.g. MMoE gates that read the shared "
            f"embeddings the experts read) call step(losses) without shared_output{_compiled_hint(walks)}"
        )
    if not any(reached_shared):
        hint = _compiled_hint(walks)
        raise ValueError(f"MetaBalance.step: no loss depends on shared_output; pass the shared bottom's output{hint}")
    edges = list(leaf_edges(shared))
    below = {id(leaf): leaf for _, leaf in edges}
    if not any(key in balanced_ids for key in below):
        raise ValueError("MetaBalance.step: shared_output does not depend on any balanced parameter")
    both = [leaf for leaf in towers if id(leaf) in below]
    if both:
        raise ValueError(
            f"MetaBalance.step: parameter(s) of shape {_shapes(both)} are used both above and below shared_output; "
            "call step(losses) without shared_output for this model"
        )
    bottom_others = [leaf for key, leaf in below.items() if key not in balanced_ids]
    return SharedPlan(
        list(shared),
        towers,
        bottom_others,
        lookup_only_tables(edges, balanced_ids, row_tables_before),
        tower_consumers,
        sparse_gradient_params(edges, balanced_ids),
        set(below),
        edges,
        None if separate or cut_roots else ([loss.grad_fn for loss in losses], functions),
    )


def _compiled_hint(walks: Sequence) -> str:
    """What to add to an error when the losses come from a torch.compile'd region: one autograd node to the step,
    so a ``shared_output`` computed inside it is no boundary of the graph (looked for only when raising)."""
    if any(is_compiled_region(node) for walk in walks for node in walk.nodes):
        return (
            " (the losses come from a torch.compile'd region, one autograd node to the step: compile the bottom and "
            "the towers separately, so that shared_output lies between them)"
        )
    return ""


# Autograd functions that only cut, join or reshape tensors: where the losses first meet above `shared` at such a
# node, each loss reads its part of one tensor computed from every tower (e.g. the towers' logits concatenated).
_SPLITTING_NODES = (
    "CatBackward",
    "StackBackward",
    "SelectBackward",
    "SliceBackward",
    "SplitBackward",
    "SplitWithSizesBackward",
    "UnbindBackward",
    "ViewBackward",
    "UnsafeViewBackward",
    "ReshapeAliasBackward",
    "SqueezeBackward",
    "UnsqueezeBackward",
    "TBackward",
    "TransposeBackward",
    "PermuteBackward",
    "IndexBackward",
    "NarrowBackward",
)


def _splitting_joins(loss_nodes: list, functions: list[set]) -> list[str]:
    """The names of the nodes where the losses' graphs above ``shared`` first meet (a node two losses reach, taken
    from a node one loss reaches, or a loss's own node), when every one of them only cuts, joins or reshapes
    tensors; else ``[]`` (the losses share real computation, e.g. one head for all tasks, and each loss must be
    backpropagated through it on its own)."""
    reached_by: dict = {}
    for nodes in functions:
        for node in nodes:
            reached_by[node] = reached_by.get(node, 0) + 1
    meets = {node for node in loss_nodes if reached_by.get(node, 0) > 1}
    for node, count in reached_by.items():
        if count == 1:
            meets.update(child for child, _ in node.next_functions if reached_by.get(child, 0) > 1)
    names = sorted({type(node).__name__ for node in meets})
    return names if names and all(name.startswith(_SPLITTING_NODES) for name in names) else []


def _tower_gradients(
    losses: Sequence[torch.Tensor],
    shared: Sequence[torch.Tensor],
    towers: Sequence[torch.Tensor],
    consumers: list[list[tuple]] | None,
) -> tuple[list[list[torch.Tensor | None]], list[GradientSum]]:
    """Each task's gradient at every ``shared`` tensor (``[task][i]``, None: zero) and the towers' summed gradients,
    freeing the graph above ``shared``.

    With separate towers (``consumers`` given), one backward from all losses: a hook on each node that takes a
    shared tensor reads the gradient it passes down, which belongs to the one loss whose graph holds the node
    (holding a reference also keeps autograd from accumulating into it in place). Otherwise one pass per loss
    (:func:`~mb_kernels.capture.task_passes`)."""
    inputs = [*shared, *towers]
    per_task_h: list[list[torch.Tensor | None]] = [[None] * len(shared) for _ in losses]
    if consumers is not None:

        def keep(task: int, index: int, i: int):
            def hook(grad_inputs, grad_outputs):
                g = grad_inputs[index]
                if g is not None:
                    per_task_h[task][i] = g if per_task_h[task][i] is None else per_task_h[task][i] + g

            return hook

        handles = [
            node.register_hook(keep(t, index, i)) for t, edges in enumerate(consumers) for node, index, i in edges
        ]
        try:
            grads = torch.autograd.grad(list(losses), inputs, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        sums = [GradientSum() for _ in towers]
        for total, g in zip(sums, grads[len(shared) :]):
            total.add(g)
        return per_task_h, sums
    tower_sums = [GradientSum() for _ in towers]
    for task, grads in task_passes(losses, inputs):
        per_task_h[task] = list(grads[: len(shared)])
        for total, g in zip(tower_sums, grads[len(shared) :]):
            total.add(g)
    return per_task_h, tower_sums


# How the bottom is backpropagated from the T gradients at ``shared``, per device type: "batched" (one vmapped
# backward, ``is_grads_batched``) or "per_task" (T backward passes through the bottom, the last freeing the graph).
# On CPU the T passes cost the same as the batched backward at batch 256-1024 and make the whole step 5-8% faster at
# batch 4096 (bench/RESULTS.md, sixth round: the batching rules copy transposed and broadcast operands), and need no
# vmap rule; on CUDA one batched backward launches once for the T tasks.
BOTTOM_BACKWARD = {"cpu": "per_task"}


def _bottom_gradients(
    shared: Sequence[torch.Tensor], per_task_h: list[list[torch.Tensor | None]], inputs: list
) -> list[list[torch.Tensor | None] | None]:
    """Each task's gradient at each of ``inputs`` (leaves and lookup edges below ``shared``) from its gradients at
    ``shared`` (:data:`BOTTOM_BACKWARD`): per input, T tensors (None: zero, as a custom Function may return for one
    task), from one backward per task or as views of one batched backward's ``[T, ...]`` result; None: not reached
    by any task. The last (or only) backward frees the graph. A shared tensor no task's gradient reaches is
    left out (no zero cotangent for it): what lies only below it keeps ``.grad`` None, as with the plain step."""
    num_tasks = len(per_task_h)
    used = [i for i in range(len(shared)) if any(row[i] is not None for row in per_task_h)]
    if not used:
        return [None] * len(inputs)
    shared = [shared[i] for i in used]
    per_task = [
        [row[i] if row[i] is not None else torch.zeros_like(shared[j]) for j, i in enumerate(used)]
        for row in per_task_h
    ]
    if BOTTOM_BACKWARD.get(shared[0].device.type, "batched") == "per_task":
        results = [
            torch.autograd.grad(
                list(shared), inputs, grad_outputs=cotangents, retain_graph=task < num_tasks - 1, allow_unused=True
            )
            for task, cotangents in enumerate(per_task)
        ]
        return [None if all(g is None for g in grads) else list(grads) for grads in zip(*results)]
    cotangents = [torch.stack(column) for column in zip(*per_task)]
    try:
        results = torch.autograd.grad(
            list(shared), inputs, grad_outputs=cotangents, is_grads_batched=True, allow_unused=True
        )
    except RuntimeError as err:
        raise RuntimeError(
            "MetaBalance.step(shared_output=...): the batched backward through the shared bottom failed (e.g. "
            "a custom autograd.Function whose backward branches on a value, or an operation without a vmap rule); "
            f"compute the losses again and call step(losses) without shared_output for this model. Cause: {err}"
        ) from err
    return [None if g is None else list(g.unbind(0)) for g in results]


def capture_task_grads_through(
    losses: Sequence[torch.Tensor], buckets: Sequence[Bucket], plan: SharedPlan, tables: Sequence[RowBucket] = ()
) -> Capture:
    """Per-task gradients of the balanced parameters through the shared representation ``plan.shared`` (tensors
    through which every path from every loss to every balanced parameter passes; :func:`plan_through` checked it).

    The towers are backpropagated down to ``shared`` (once, or once per loss when they share nodes; the towers'
    parameters collect the plain sum, as in :func:`capture_task_grads`); then one batched backward
    (``is_grads_batched``: vmap over the task dimension) carries the T cotangents at ``shared`` through the shared
    bottom into every balanced parameter's per-task gradient; lookups of the tables are cut at their rows, which go
    to the tables. Exact per-task gradients, no subtraction. No graph survives the step (:func:`_tower_gradients`;
    the bottom pass does not retain).
    """
    shared, towers, bottom_others, lookups = plan.shared, plan.towers, plan.bottom_others, plan.lookups
    balanced = [p for bucket in buckets for p in bucket.params]
    for table in (p for bucket in tables for p in bucket.params):
        if id(table) in plan.below_ids and id(table) not in lookups:
            raise ValueError(
                f"MetaBalance.step: the sparse table of shape {tuple(table.shape)} is reached other than by lookups "
                "whose rows the step can take (nn.Embedding; nn.EmbeddingBag in sum or mean mode, with per-sample "
                "weights that need no gradient): e.g. scale_grad_by_freq, learned per-sample weights. With "
                "shared_output, sparse tables must be such lookups only; call step(losses) without shared_output."
            )
    capture = Capture(buckets, towers + bottom_others, tables)
    for p in capture.others:
        p.grad = None
    for p in capture.tables:
        p.grad = None
    for p in balanced:
        p.grad = None
    try:
        per_task_h, tower_sums = _tower_gradients(losses, shared, towers, plan.tower_consumers)
        # Every looked-up table is a row-bucket table (MetaBalance builds them so): the buckets hold no lookup. A
        # balanced parameter the bottom does not reach (frozen since, say) is no input: it keeps its .grad.
        dense = [p for p in balanced if id(p) in plan.below_ids]
        lookup_nodes = [node for p in capture.tables for node in lookups.get(id(p), [])]
        edges = [GradientEdge(node, 0) for node in lookup_nodes]
        results = _bottom_gradients(shared, per_task_h, [*dense, *bottom_others, *edges])
        dense_grads = dict(zip((id(p) for p in dense), results[: len(dense)]))
        row_grads = dict(zip(lookup_nodes, results[len(dense) + len(bottom_others) :]))

        def lookups_of(p: torch.Tensor) -> list[TableRows]:
            found = [(node, row_grads[node]) for node in lookups.get(id(p), [])]
            return [lookup_rows(node, g, p) for node, g in found if g is not None]

        with torch.no_grad():
            per_param = [dense_grads.get(id(p)) for bucket in buckets for p in bucket.params]
            for task in range(len(losses)):  # each task's row of the workspaces, as the plain step's passes fill it
                collect_dense(buckets, [None if g is None else g[task] for g in per_param], task, capture.reached)
            for bucket in tables:
                for i, p in enumerate(bucket.params):
                    for part in lookups_of(p):
                        bucket.add_part(i, part)
            set_summed_grads(towers, tower_sums)
            bottom_sums = [GradientSum() for _ in bottom_others]
            for total, g in zip(bottom_sums, results[len(dense) : len(dense) + len(bottom_others)]):
                for task_grad in [] if g is None else g:  # summed over the tasks
                    total.add(task_grad)
            set_summed_grads(bottom_others, bottom_sums)
    except BaseException:
        capture.abort()
        raise
    return capture
