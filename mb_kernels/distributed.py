"""MetaBalance under DistributedDataParallel: global per-task gradients with few collectives.

DDP's reducer expects one backward per forward and averages whatever gradient that backward produces, but
MetaBalance runs one backward per task and needs each task's gradient separately. So MetaBalance turns DDP's
backward synchronisation off for good (``require_backward_grad_sync = False``, what ``no_sync()`` does for
one step: the user's forward passes then prepare no reduction), runs all per-task passes locally, and does
the communication itself in ``step``:

``"exact"`` (default). One ``all_reduce`` averages each bucket's whole ``[T, N]`` workspace and one more the
flattened gradients of the non-balanced parameters (towers). Every rank then holds the global per-task
gradients and runs the same deterministic kernel on them: the result equals single-process training on
the concatenated batch (equal per-rank batches, mean-reduced losses), and the moving averages stay identical
on every rank.

``"low_comm"``. Each rank computes its local norms; one ``all_reduce`` of the ``[P, T]`` norms gives every
rank the *mean of the per-rank norms*, from which the (identical) moving averages and weights follow; each
rank combines its local gradients with those weights and one ``all_reduce`` averages the combined gradient.
Because the weights are the same on every rank, the averaged result is exactly ``sum_t w_t * mean_rank(g_t)``;
the approximation is in the weights only: the mean of the per-rank norms replaces the norm of the mean
gradient (an upper bound, equal when the ranks' gradients are parallel; per-rank noise inflates every task's
norm, so small per-rank batches bias the ratios toward 1). Communication: ``P*T + N`` values per bucket
instead of ``T*N``, plus the towers. This mode computes with the pure-torch reference functions (it needs the
norms between the two kernel phases).

Embedding tables balanced by their rows (tables reached by lookups only, ``nn.Embedding`` or sum/mean
``nn.EmbeddingBag``, and sparse tables) are exact in either mode: every rank gathers all ranks' looked-up rows
(``T·K·d`` values per rank, far less than a ``[T, V, d]`` all-reduce) and groups the union, so every rank balances
the same global rows (:meth:`DistributedSync.gather_rows`).

Either way the optimizer's step has one path: :meth:`DistributedSync.wrap` turns the chosen backend into a
:class:`~mb_kernels.backends.contract.BalanceFn` that does the collectives around (or instead of) it.

Notes. Backward passes outside ``mb.step`` are not synchronised by DDP any more; module buffers
(BatchNorm statistics) are not broadcast at forward (DDP skips that when backward sync is off). With NCCL on
GPUs nothing changes: the collectives use ``ddp_module.process_group``; keep one process per GPU and build
MetaBalance after wrapping the model in DDP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .backends.contract import BalanceFn, Hyperparameters
from .backends.reference import combine, tensor_norms, update_and_weigh
from .layout import FlatLayout
from .tables import RowBucket

DDP_MODES = ("exact", "low_comm")


class DistributedSync:
    """What MetaBalance does differently under DDP: which passes sync, and the extra collectives."""

    def __init__(self, module: torch.nn.Module, mode: str, balanced: Sequence[torch.Tensor]):
        if mode not in DDP_MODES:
            raise ValueError(f"MetaBalance: ddp_mode must be one of {DDP_MODES}, got {mode!r}")
        if not hasattr(module, "no_sync"):
            raise TypeError(
                "MetaBalance: ddp_module must be the torch.nn.parallel.DistributedDataParallel wrapper "
                f"(it needs .no_sync()), got {type(module).__name__}"
            )
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("MetaBalance: ddp_module given but torch.distributed is not initialised")
        self.module = module
        self.mode = mode
        module.require_backward_grad_sync = False
        self.group = getattr(module, "process_group", None)
        self.world_size = dist.get_world_size(self.group)
        balanced_ids = {id(p) for p in balanced}
        self.others = [p for p in module.parameters() if p.requires_grad and id(p) not in balanced_ids]
        # Only the weights of the module's embedding layers can be balanced by rows: for a model without balanced
        # ones, no agreement is needed (and none is made) at each step.
        self.table_ids = {
            id(m.weight)
            for m in module.modules()
            if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and id(m.weight) in balanced_ids
        }

    def _mean(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        tensor.div_(self.world_size)

    def reduce_others(self) -> None:
        """Average the non-balanced parameters' gradients (a tower no task reached counts as zero)."""
        if not self.others:
            return
        for p in self.others:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.others]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._mean(flat)
        torch._foreach_copy_(grads, [seg.view_as(g) for seg, g in zip(flat.split([g.numel() for g in grads]), grads)])

    def agree_on_row_tables(
        self, params: Sequence[torch.Tensor], rows: set[int], sparse: set[int], reached: set[int]
    ) -> tuple[set[int], set[int]]:
        """The row tables and sparse tables every rank uses, from each rank's own view (ranks' graphs may differ:
        a table one rank's batch skips): a tensor is a row table where some rank wants it and no rank reaches it
        other than as one; sparse where some rank says so. Only the module's balanced embedding weights qualify;
        with none, nothing is communicated. Else one small all-reduce and host read per step."""
        params = [p for p in params if id(p) in self.table_ids]
        if not params:
            return set(), set()
        flags = torch.tensor(
            [[id(p) in reached and id(p) not in rows, id(p) in rows, id(p) in sparse] for p in params],
            dtype=torch.int32,
        )
        device = params[0].device if params else torch.device("cpu")
        flags = flags.to(device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        agreed = flags.tolist()
        rows = {id(p) for p, (blocked, wanted, _) in zip(params, agreed) if wanted and not blocked}
        return rows, {id(p) for p, (_, _, is_sparse) in zip(params, agreed) if is_sparse} & rows

    def gather_rows(self, bucket: RowBucket) -> None:
        """Replace every table's parts in ``bucket`` by all ranks' rows, divided by the world size: the tables'
        global per-task gradients (the mean over ranks, as for the workspaces), in every mode. Sizes are exchanged
        first (one host read); then the reached tables' rows of a rank, each padded to the longest rank's with the
        "no row" id, travel packed in one tensor of ids and one of values: two collectives per bucket, whatever
        the number of tables."""
        num_tables = len(bucket.params)
        rows = [bucket.rows_of(i) for i in range(num_tables)]
        sizes = torch.tensor([[int(bool(bucket.parts[i])), ids.numel()] for i, (ids, _) in enumerate(rows)])
        sizes = sizes.to(bucket.device)
        every = [torch.empty_like(sizes) for _ in range(self.world_size)]
        dist.all_gather(every, sizes, group=self.group)
        per_rank = torch.stack(every).tolist()  # [rank][table] = (reached, ids)
        # No task reached a table on any rank: it gets no part (the same on every rank).
        longest = {i: max(r[i][1] for r in per_rank) for i in range(num_tables) if any(r[i][0] for r in per_rank)}
        total = sum(longest.values())
        packed_ids = torch.empty(total, dtype=torch.int64, device=bucket.device)
        packed = torch.zeros(bucket.num_tasks, total, bucket.width, dtype=bucket.dtype, device=bucket.device)
        start = 0
        for i, k in longest.items():
            ids, values = rows[i]
            packed_ids[start : start + ids.numel()] = ids
            packed_ids[start + ids.numel() : start + k] = bucket.params[i].shape[0]  # "no row"
            packed[:, start : start + ids.numel()] = values
            start += k
        all_ids, all_values = [packed_ids], [packed]
        if total > 0:
            all_ids = [torch.empty_like(packed_ids) for _ in range(self.world_size)]
            all_values = [torch.empty_like(packed) for _ in range(self.world_size)]
            dist.all_gather(all_ids, packed_ids, group=self.group)
            dist.all_gather(all_values, packed, group=self.group)
        bucket.clear()
        start = 0
        for i, k in longest.items():
            ids = torch.cat([rank_ids[start : start + k] for rank_ids in all_ids])
            values = torch.cat([rank_values[:, start : start + k] for rank_values in all_values], dim=1)
            bucket.add_shared_rows(i, ids, values.div_(self.world_size))
            start += k

    def wrap(self, balance: BalanceFn) -> BalanceFn:
        """The balancing step with this mode's collectives: ``exact`` averages the ``[T, N]`` workspace in one
        collective and runs ``balance`` on the global per-task gradients (every backend is bitwise deterministic,
        so every rank computes the same result); ``low_comm`` replaces it (see the module docstring)."""
        if self.mode == "low_comm":
            return self._balance_low_comm

        def balance_exact(
            task_grads: torch.Tensor,
            norm_ema: torch.Tensor,
            out: torch.Tensor,
            layout: FlatLayout,
            hyper: Hyperparameters,
        ) -> None:
            self._mean(task_grads)
            balance(task_grads, norm_ema, out, layout, hyper)

        return balance_exact

    def _balance_low_comm(
        self,
        task_grads: torch.Tensor,
        norm_ema: torch.Tensor,
        out: torch.Tensor,
        layout: FlatLayout,
        hyper: Hyperparameters,
    ) -> None:
        """Local norms -> all-reduced mean -> EMA and weights -> local combine -> mean."""
        norms = tensor_norms(task_grads, layout).to(norm_ema.dtype)
        self._mean(norms)
        combine(task_grads, update_and_weigh(norm_ema, norms, hyper), layout, out)
        self._mean(out)
