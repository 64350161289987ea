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
