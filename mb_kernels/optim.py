"""The public optimizer-style API: ``MetaBalance(params, ...).step(losses)``."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .backends.contract import STRATEGIES, SUPPORTED_DTYPES, BalanceFn, Hyperparameters, state_dtype
from .backends.reference import balance_weights
from .capture import (
    COMPILED_REGION,
    Bucket,
    capture_task_grads,
    leaf_edges,
    lookup_only_tables,
    sparse_gradient_params,
    tables_kept_dense,
)
from .capture_shared import SharedPlan, capture_task_grads_through, plan_through
from .dispatch import resolve_backends
from .distributed import DistributedSync
from .tables import RowBucket, row_buckets

_STATE_KEY = "norm_ema"
# Saved with each parameter's state, so that a state loaded into parameters in another order is detected.
_SHAPE_KEY = "param_shape"


class MetaBalance(torch.optim.Optimizer):
    r"""Balance auxiliary-task gradients on shared parameters toward the target task's magnitude.

    MetaBalance (He et al., WWW 2022): for every balanced tensor and every step, each auxiliary task's gradient
    is rescaled toward the target task's magnitude using moving averages of the per-task gradient norms, and
    ``p.grad`` receives the target gradient plus the rescaled auxiliary gradients. The exact formula is stated in
    :mod:`mb_kernels.backends.reference` (``relax_factor`` r = 0 is plain summation, Vanilla-Multi; r = 1 gives
    every rescaled auxiliary the target's magnitude). Every backend is bitwise reproducible run to run.

    Pass the *shared* parameters only (e.g. ``model.shared_parameters()``), not ``model.parameters()``: a task
    tower the target never reaches has m_0 = 0, so its auxiliary gradients would be scaled by 1 - r (never trained
    at r = 1). MetaBalance warns once when it sees that.

    Args:
        params: the shared parameters to balance (tensors, ``(name, tensor)`` pairs or param-group dicts).
            Parameters reached by the losses but not listed (task towers) receive the plain sum of the task
            gradients.
        relax_factor: r in [0, 1]. The paper found 0.7 or 0.9 best.
        beta: moving-average factor in [0, 1); 0 uses the current norms (the paper's Algorithm 1).
        strategy: "A", "B" or "C".
        fused: None picks the fastest backend available for the parameters' device, falling back to the
            pure-torch reference; True raises if no fused kernel serves the device; False forces the reference.
        backend: force one implementation: "torch", "cpu", "cuda" or "triton" (tests, benchmarks).
        skip_nonfinite_steps: with ``torch.amp.GradScaler``, set True: a step whose combined gradient is
            non-finite anywhere (the scaler will skip it) leaves every moving average unchanged. Without it,
            only the (tensor, task) pairs whose gradient is non-finite keep their average. Costs one extra
            read of the combined gradient per step.
        ddp_module: the ``DistributedDataParallel`` wrapper of the model, when training with DDP; the
            per-task gradients are then global (see :mod:`mb_kernels.distributed`).
        ddp_mode: "exact" (all-reduce the per-task gradients) or "low_comm" (all-reduce norms and the
            combined gradient only; approximate weights).

    Example::

        mb = MetaBalance(model.shared_parameters(), relax_factor=0.7)
        optimizer.zero_grad(set_to_none=True)
        mb.step([loss_target, loss_aux1, loss_aux2])   # one backward per task
        optimizer.step()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        relax_factor: float = 0.7,
        beta: float = 0.9,
        strategy: str = "C",
        fused: bool | None = None,
        backend: str | None = None,
        skip_nonfinite_steps: bool = False,
        ddp_module: torch.nn.Module | None = None,
        ddp_mode: str = "exact",
    ) -> None:
        self._skip_nonfinite_steps = skip_nonfinite_steps
        self._fused = fused
        self._backend_request = backend
        self._backends: dict[str, tuple[str, BalanceFn]] = {}
        self._buckets: list[tuple[dict, Bucket]] | None = None
        self._tables: list[tuple[dict, RowBucket]] = []
        # (task count, row-table ids, sparse-table ids) the buckets and row buckets were built for
        self._built_for: tuple[int, frozenset[int], frozenset[int]] | None = None
        defaults = dict(relax_factor=relax_factor, beta=beta, strategy=strategy)
        super().__init__(params, defaults)
        self._ddp: DistributedSync | None = None
        if ddp_module is not None:
            balanced = [p for group in self.param_groups for p in group["params"]]
            self._ddp = DistributedSync(ddp_module, ddp_mode, balanced)

    # ---- construction and validation -------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyperparameters and parameters are validated before anything is stored."""
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        _check_hyperparameters(group)
        named = bool(params) and all(isinstance(p, tuple) for p in params)
        if named and not all(len(p) == 2 and isinstance(p[0], str) for p in params):
            raise TypeError(
                "MetaBalance params must be tensors or (name, tensor) pairs as model.named_parameters() yields; "
                "pass model.shared_parameters() or [p for _, p in named_parameters]"
            )
        tensors = [p[1] for p in params] if named else params
        for p in tensors:
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"MetaBalance params must be tensors, got {type(p).__name__}; pass the shared parameters, "
                    "e.g. model.shared_parameters() or [p for name, p in model.named_parameters() if ...]"
                )
            if not p.requires_grad:
                raise ValueError(
                    f"MetaBalance: a parameter of shape {tuple(p.shape)} does not require grad; "
                    "balance only trainable parameters (filter with p.requires_grad)."
                )
            if not p.is_leaf:
                raise ValueError(f"MetaBalance: a parameter of shape {tuple(p.shape)} is not a leaf tensor")
            if p.is_sparse:
                raise ValueError("MetaBalance: sparse parameters are not supported")
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"MetaBalance: parameter dtype {p.dtype} is not one of {SUPPORTED_DTYPES}")
        new_types = {p.device.type for p in tensors} - set(self._backends)
        self._backends.update(resolve_backends(new_types, self._fused, self._backend_request))
        group["params"] = params  # torch.optim.Optimizer turns (name, tensor) pairs into params + param_names
        super().add_param_group(group)
        self._buckets = None

    # ---- copies (copy.deepcopy, pickle, torch.save) -----------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        if self._ddp is not None:
            raise TypeError(
                "MetaBalance: a balancer attached to DDP (ddp_module=) holds the process group and cannot be "
                "copied or pickled; save mb.state_dict() and load it into a MetaBalance built on the other side"
            )
        state = super().__getstate__()
        state["_mb_options"] = {
            "fused": self._fused,
            "backend": self._backend_request,
            "skip_nonfinite_steps": self._skip_nonfinite_steps,
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        options = state.pop("_mb_options", None)
        super().__setstate__(state)
        if options is None:  # torch.optim.Optimizer.load_state_dict calls this too: nothing of ours to restore
            return
        self._fused = options.get("fused")
        self._backend_request = options.get("backend")
        self._skip_nonfinite_steps = options.get("skip_nonfinite_steps", False)
        self._ddp = None
        self._buckets = None  # rebuilt at the next step from the moving averages in self.state
        self._tables = []
        self._built_for = None
        device_types = {p.device.type for group in self.param_groups for p in group["params"]}
        self._backends = resolve_backends(device_types, self._fused, self._backend_request)

    @property
    def backends(self) -> dict[str, str]:
        """The backend chosen for each device type, e.g. ``{"cpu": "cpu", "cuda": "triton"}``."""
        return {device_type: name for device_type, (name, _) in self._backends.items()}

    @property
    def num_tasks(self) -> int | None:
        """Number of tasks fixed by the first step (or by a loaded state), else None."""
        for group in self.param_groups:
            for p in group["params"]:
                ema = self.state.get(p, {}).get(_STATE_KEY)
                if ema is not None:
                    return int(ema.numel())
        return None

    def _check_losses(self, losses: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if isinstance(losses, torch.Tensor) or not isinstance(losses, (list, tuple)):
            raise TypeError(
                "MetaBalance.step(losses) takes a list or tuple of scalar losses, target first "
                f"(got {type(losses).__name__})"
            )
        if len(losses) == 0:
            raise ValueError("MetaBalance.step(losses): the loss list is empty; pass [target_loss, *aux_losses]")
        for t, loss in enumerate(losses):
            name = "target loss (index 0)" if t == 0 else f"auxiliary loss {t}"
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"MetaBalance.step: {name} is a {type(loss).__name__}, not a tensor")
            if loss.numel() != 1:
                raise ValueError(
                    f"MetaBalance.step: {name} has shape {tuple(loss.shape)}; each loss must be a scalar "
                    "(reduce it with .mean() or .sum())"
                )
            if loss.requires_grad and loss.grad_fn is None:
                raise ValueError(
                    f"MetaBalance.step: {name} is a leaf tensor (it requires grad but no computation made it); "
                    "pass losses computed from the model's outputs"
                )
            if not loss.requires_grad:
                raise ValueError(
                    f"MetaBalance.step: {name} does not require grad (no graph reaches a trainable tensor); "
                    "compute it from the model's outputs without torch.no_grad() or .detach()"
                )
        expected = self.num_tasks
        if expected is not None and len(losses) != expected:
            raise ValueError(
                f"MetaBalance.step: got {len(losses)} losses but the first step (or the loaded state) fixed "
                f"{expected} tasks; pass the same tasks in the same order every step"
            )
        return list(losses)

    # ---- state ---------------------------------------------------------------------------------------
    def _build_buckets(
        self, num_tasks: int, sparse_ids: set[int], dense_row_ids: frozenset[int]
    ) -> tuple[list[tuple[dict, Bucket]], list[tuple[dict, RowBucket]]]:
        """Dense buckets per (group, device, dtype), and row buckets per (group, device, dtype, width) of the tables
        balanced by rows: those in ``sparse_ids`` (sparse result) or ``dense_row_ids`` (dense result)."""
        buckets, tables = [], []
        for group in self.param_groups:
            by_key: dict[tuple, list[torch.Tensor]] = {}
            group_tables = []
            for p in group["params"]:
                row = self.state[p].get(_STATE_KEY) if p in self.state else None
                if id(p) in sparse_ids or id(p) in dense_row_ids:
                    group_tables.append((p, row, id(p) in sparse_ids))
                else:
                    by_key.setdefault((p.device, p.dtype), []).append(p)
            for params in by_key.values():
                rows = [self.state[p].get(_STATE_KEY) if p in self.state else None for p in params]
                buckets.append((group, Bucket(params, num_tasks, rows)))
            tables += [(group, bucket) for bucket in row_buckets(group_tables, num_tasks)]
        return buckets, tables

    def _store_state(self, buckets: list[tuple[dict, Bucket]], tables: list[tuple[dict, RowBucket]]) -> None:
        """Point each parameter's optimizer state at its row of the moving averages."""
        for _, bucket in [*buckets, *tables]:
            for p, view in zip(bucket.params, bucket.norm_ema.unbind(0)):
                self.state[p][_STATE_KEY] = view
                self.state[p][_SHAPE_KEY] = tuple(p.shape)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`.

        Everything is checked before anything changes: the hyperparameters, one task count for every moving
        average, finite non-negative averages, and each parameter's shape against the shape saved with its state
        (a state saved with the parameters in another order is refused). The moving averages keep their float32
        (or float64) dtype; ``torch.optim.Optimizer`` would otherwise cast them to the parameter dtype.
        """
        # States saved before 0.2 carry a `deterministic` flag that no backend ever read: drop it.
        saved_groups = [{k: v for k, v in g.items() if k != "deterministic"} for g in state_dict["param_groups"]]
        saved_groups = [dict(g) for g in saved_groups]
        for group in saved_groups:
            _check_hyperparameters(group)
        if len(saved_groups) != len(self.param_groups) or any(
            len(saved["params"]) != len(group["params"]) for saved, group in zip(saved_groups, self.param_groups)
        ):
            raise ValueError(
                "MetaBalance.load_state_dict: the state has "
                f"{[len(g['params']) for g in saved_groups]} parameters per group, this balancer "
                f"{[len(g['params']) for g in self.param_groups]}; build it with the same parameters"
            )
        ids = [pid for group in saved_groups for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        emas: dict[int, torch.Tensor] = {}
        for index, (pid, p) in enumerate(zip(ids, params)):
            entry = state_dict["state"].get(pid)
            if entry is None:
                continue
            shape = entry.get(_SHAPE_KEY)
            if shape is not None and tuple(shape) != tuple(p.shape):
                raise ValueError(
                    f"MetaBalance.load_state_dict: parameter {index} has shape {tuple(p.shape)} but its saved state "
                    f"belongs to a tensor of shape {tuple(shape)}; pass the parameters in the order they were saved"
                )
            ema = entry.get(_STATE_KEY)
            if ema is None:
                continue
            if not isinstance(ema, torch.Tensor) or ema.dim() != 1 or not ema.is_floating_point():
                raise ValueError(
                    f"MetaBalance.load_state_dict: parameter {index}'s {_STATE_KEY} is not a 1-D float tensor"
                )
            if not bool(torch.isfinite(ema).all()) or bool((ema < 0).any()):
                raise ValueError(
                    f"MetaBalance.load_state_dict: parameter {index}'s moving averages must be finite and >= 0, "
                    f"got {ema.tolist()}"
                )
            emas[index] = ema
        counts = sorted({ema.numel() for ema in emas.values()})
        if len(counts) > 1:
            raise ValueError(f"MetaBalance.load_state_dict: inconsistent task counts in the state: {counts}")
        super().load_state_dict({**state_dict, "param_groups": saved_groups})
        for index, ema in emas.items():
            p = params[index]
            self.state[p][_STATE_KEY] = ema.to(device=p.device, dtype=state_dtype(p.dtype)).clone()
            self.state[p][_SHAPE_KEY] = tuple(p.shape)
        self._buckets = None

    # ---- the step -----------------------------------------------------------------------------------
    # Under torch.compile the step runs eagerly: its backward passes are graph breaks anyway, and the fused
    # kernels are already single launches; the caller's forward is still compiled.
    @torch.compiler.disable
    def step(  # type: ignore[override]
        self,
        losses: Sequence[torch.Tensor],
        shared_output: torch.Tensor | Sequence[torch.Tensor] | None = None,
        update_averages: bool = True,
    ) -> None:
        """Backpropagate each loss, balance the shared gradients and add them to ``p.grad``.

        Args:
            losses: scalar losses ``[target, aux_1, ..., aux_K]``, target first; the same count every step.
            shared_output: the shared bottom's output(s) — tensors through which every path from every loss to
                every balanced parameter passes (e.g. the representation the towers take). Then each loss is
                backpropagated through its own tower only, and the T gradients at ``shared_output`` are carried
                through the shared bottom by one batched backward (``torch.vmap``; CUDA) or one backward per task
                (CPU, where that is as fast or faster): the same result as without it, with the towers walked once.
                On CUDA the bottom's backward must be batchable (a custom autograd Function whose backward branches
                on a value is not). Checked before any backward: a loss that reaches a balanced parameter around it
                is an error.
            update_averages: False keeps every moving average as it is and weights this step's gradients with
                the current ones: for gradient accumulation, where several ``step`` calls feed one optimizer
                step, pass True on one micro-batch per optimizer step (or on every one, to average over
                micro-batches as the paper's per-step averages would), False on the others.

        Call it where you would call ``sum(losses).backward()``; then call your optimizer's ``step()``. On any
        error, every ``.grad`` the step touched, the moving averages and the task count are as before the call.
        """
        for group in self.param_groups:  # values edited in param_groups are checked before any backward
            _check_hyperparameters(group)
        losses = self._check_losses(losses)
        num_tasks = len(losses)
        balanced = {id(p) for group in self.param_groups for p in group["params"]}
        plan = None
        row_tables_before = self._built_for[1] if self._built_for else frozenset()
        if shared_output is None:
            edges = list(leaf_edges(losses))
            lookups = lookup_only_tables(edges, balanced, row_tables_before)
            sparse_ids = sparse_gradient_params(edges, balanced)
            leaves = {id(leaf): leaf for _, leaf in edges}  # every leaf the losses reach, each once
            reached = set(leaves)
        else:
            shared = [shared_output] if isinstance(shared_output, torch.Tensor) else list(shared_output)
            try:
                plan = plan_through(losses, shared, balanced, row_tables_before)
            except ValueError as err:
                if self._ddp is None:
                    raise
                raise ValueError(
                    f"{err}. Under DDP, the outputs of ddp(...) can be copies made by DDP: compute the losses and "
                    "shared_output with ddp.module (MetaBalance does the gradient reduction itself)"
                ) from None
            lookups, sparse_ids, reached = plan.lookups, plan.sparse_ids, plan.below_ids
        row_ids, sparse_ids = self._row_tables(balanced, set(lookups), sparse_ids, reached)
        layout_key = (num_tasks, row_ids, sparse_ids)
        buckets_with_groups, tables_with_groups = self._buckets, self._tables
        fresh = buckets_with_groups is None or self._built_for != layout_key
        if fresh:
            buckets_with_groups, tables_with_groups = self._build_buckets(num_tasks, sparse_ids, row_ids - sparse_ids)
            self._warn_about_slow_paths(
                plan, edges if plan is None else plan.edges, balanced, lookups, row_ids, num_tasks
            )
        buckets = [bucket for _, bucket in buckets_with_groups]
        tables = [table for _, table in tables_with_groups]
        previous_ema = [b.norm_ema.clone() for b in buckets] + [table.norm_ema.clone() for table in tables]
        for table in tables:
            table.clear()
        if plan is None:
            capture = capture_task_grads(losses, buckets, tables, leaves, lookups)
        else:
            capture = capture_task_grads_through(losses, buckets, plan, tables)
        table_grads: list[torch.Tensor | None] = []
        try:
            with torch.no_grad():
                if self._ddp is not None:
                    self._ddp.reduce_others()
                outputs = []
                for group, bucket in buckets_with_groups:
                    combined = torch.empty(bucket.layout.numel, dtype=bucket.dtype, device=bucket.device)
                    # beta = 1 leaves every average as it is (m <- 1 m + 0 n); validation keeps users' beta < 1.
                    beta = group["beta"] if update_averages else 1.0
                    hyper = Hyperparameters(group["relax_factor"], beta, group["strategy"])
                    self._balance_fn(bucket.device.type)(
                        bucket.task_grads, bucket.norm_ema, combined, bucket.layout, hyper
                    )
                    outputs.append(combined)
                for group, table in tables_with_groups:
                    if self._ddp is not None:
                        self._ddp.gather_rows(table)  # global rows; then the plain backend, as on one process
                    beta = group["beta"] if update_averages else 1.0
                    hyper = Hyperparameters(group["relax_factor"], beta, group["strategy"])
                    table_grads += table.balance(self._backends[table.device.type][1], hyper)
                if self._skip_nonfinite_steps:
                    emas = [b.norm_ema for b in buckets] + [table.norm_ema for table in tables]
                    results = outputs + [g._values() if g.is_sparse else g for g in table_grads if g is not None]
                    _revert_ema_if_nonfinite(emas, results, previous_ema)
        except BaseException:
            for ema, old in zip([b.norm_ema for b in buckets] + [t.norm_ema for t in tables], previous_ema):
                ema.copy_(old)
            capture.abort()
            raise
        finally:
            for table in tables:
                table.clear()  # drop this step's rows
        capture.commit(outputs, table_grads)
        if fresh:
            self._buckets, self._tables = buckets_with_groups, tables_with_groups
            self._built_for = layout_key
            self._store_state(buckets_with_groups, tables_with_groups)
            self._warn_if_target_never_reaches([(b.norm_ema, b.params) for b in [*buckets, *tables]])

    def _row_tables(
        self, balanced: set[int], lookups: set[int], sparse_ids: set[int], reached: set[int]
    ) -> tuple[frozenset[int], frozenset[int]]:
        """Which balanced tensors are balanced by rows this step, and which of them give sparse results: the tables
        this step's graph reaches through lookups only or gives sparse gradients, and those that were row tables
        before and are not reached now (so that a batch that skips a table neither moves it into a ``[T, V, d]``
        workspace nor rebuilds the buckets). Under DDP every rank must agree: see
        :meth:`~mb_kernels.distributed.DistributedSync.agree_on_row_tables`."""
        _, previous_rows, previous_sparse = self._built_for or (None, frozenset(), frozenset())
        unreached = balanced - reached
        rows = lookups | sparse_ids | (previous_rows & unreached)
        sparse = sparse_ids | (previous_sparse & unreached)
        if self._ddp is not None:
            params = [p for group in self.param_groups for p in group["params"]]
            rows, sparse = self._ddp.agree_on_row_tables(params, rows, sparse, reached)
        return frozenset(rows), frozenset(sparse & rows)

    def _warn_about_slow_paths(
        self,
        plan: SharedPlan | None,
        edges: list[tuple],
        balanced: set[int],
        lookups: dict[int, list],
        row_ids: frozenset[int],
        tasks: int,
    ) -> None:
        """When the layout is built: warn about each large looked-up table that goes through the ``[T, N]``
        workspace (a full ``[V, d]`` gradient per task) because something besides its lookups uses it or a compiled
        region hides them, and about losses that split one tensor of all towers (``shared_output``)."""
        joins = [] if plan is None else plan.splitting_joins()
        if joins:
            warnings.warn(
                f"MetaBalance.step(shared_output=...): the losses meet above shared_output only at "
                f"{', '.join(joins)}: each reads its part of one tensor computed from every tower (e.g. "
                "the towers' outputs concatenated before the losses take their columns), so each loss is "
                f"backpropagated through every tower ({tasks} passes of all towers). Compute each loss from "
                "its own tower's output: then one pass goes through the towers.",
                stacklevel=4,
            )
        for table, reasons in tables_kept_dense(edges, balanced, lookups):
            if id(table) in row_ids:
                continue
            if COMPILED_REGION in reasons:
                warnings.warn(
                    f"MetaBalance: the balanced tensor of shape {tuple(table.shape)} is used inside a torch.compile'd "
                    "region, which the step sees as one autograd node. If it is an embedding table, its lookups are "
                    f"out of sight, so it goes through a dense per-task workspace ({tasks}x its size per step) "
                    "instead of being balanced by its looked-up rows: leave the embedding lookups outside the "
                    "compiled region (compile the layers after them, e.g. the bottom MLP and the towers).",
                    stacklevel=3,
                )
                continue
            warnings.warn(
                f"MetaBalance: the embedding table of shape {tuple(table.shape)} is balanced through a dense "
                f"per-task workspace ({tasks}x its size per step), not by its looked-up "
                f"rows, because it is also used by {', '.join(reasons)}. If that use can apply to the looked-up rows "
                "instead (e.g. a regulariser on the batch's embeddings rather than on the whole table), the table "
                "costs about what it costs a Vanilla-Multi step.",
                stacklevel=3,
            )

    def _warn_if_target_never_reaches(self, emas_and_params: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> None:
        """After the first step of a layout (one host read, once): warn when a balanced tensor has m_0 == 0 but
        an auxiliary m_t > 0, the sign of balancing a tower (model.parameters() passed in)."""
        names = []
        for ema, params in emas_and_params:
            if ema.shape[1] < 2:
                continue
            suspicious = ((ema[:, 0] == 0) & (ema[:, 1:] > 0).any(dim=1)).nonzero().flatten().tolist()
            names += [f"{tuple(params[i].shape)}" for i in suspicious]
        if names:
            warnings.warn(
                f"MetaBalance: {len(names)} balanced tensor(s) (shapes {', '.join(names[:5])}) get gradient from "
                "auxiliary tasks but none from the target (m_0 = 0), so their auxiliary gradients are scaled by "
                "1 - relax_factor. Balance only the shared parameters (e.g. model.shared_parameters(), not "
                "model.parameters()).",
                stacklevel=4,  # the caller of step (through torch.compiler.disable's wrapper)
            )

    def _balance_fn(self, device_type: str) -> BalanceFn:
        _, balance = self._backends[device_type]
        return balance if self._ddp is None else self._ddp.wrap(balance)

    # ---- diagnostics ---------------------------------------------------------------------------------
    def diagnostics(self) -> list[dict[str, Any]]:
        """Per balanced tensor: its moving-average norms per task and the weights applied at the last step.

        Returns one dict per parameter with ``param`` (the tensor), ``norm_ema`` (float32 [T]) and
        ``weights`` ([T], w_0 = 1). Empty before the first step.
        """
        if self._buckets is None:
            return []
        rows = []
        for group, bucket in [*self._buckets, *self._tables]:
            weights = balance_weights(bucket.norm_ema, group["relax_factor"], group["strategy"])
            for i, p in enumerate(bucket.params):
                rows.append({"param": p, "norm_ema": bucket.norm_ema[i].clone(), "weights": weights[i].clone()})
        return rows


def _revert_ema_if_nonfinite(
    emas: list[torch.Tensor], outputs: list[torch.Tensor], previous: list[torch.Tensor]
) -> None:
    """Restore every moving average when any combined gradient is non-finite (no host synchronisation)."""
    if not emas or not outputs:
        return
    # Elementwise, not a sum: a sum of large finite gradients can overflow.
    device = emas[0].device
    all_finite = torch.stack([torch.isfinite(out).all().to(device) for out in outputs]).all()
    for ema, old in zip(emas, previous):
        ema.copy_(torch.where(all_finite.to(ema.device), ema, old))


def _as_number(value: Any) -> float | None:
    """A plain float from a Python/numpy real or a one-element tensor; None for anything else (bools too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 and not value.is_complex() else None
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def _check_hyperparameters(group: dict[str, Any]) -> None:
    """Validate a group's hyperparameters, normalising numbers (numpy scalars, 0-d tensors) to floats in place."""
    r = _as_number(group.get("relax_factor"))
    beta = _as_number(group.get("beta"))
    strategy = group.get("strategy")
    if r is None or not 0.0 <= r <= 1.0:
        raise ValueError(f"MetaBalance: relax_factor must be a number in [0, 1], got {group.get('relax_factor')!r}")
    if beta is None or not 0.0 <= beta < 1.0 or math.isnan(beta):
        raise ValueError(f"MetaBalance: beta must be a number in [0, 1), got {group.get('beta')!r}")
    if strategy not in STRATEGIES:
        raise ValueError(
            f"MetaBalance: unknown strategy {strategy!r}; expected 'A' (shrink auxiliaries larger than the "
            "target), 'B' (boost smaller ones) or 'C' (both, the default)"
        )
    group["relax_factor"], group["beta"] = r, beta
