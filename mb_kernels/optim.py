"""The public optimizer-style API: ``MetaBalance(params, ...).step(losses)``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .backends.contract import STRATEGIES, SUPPORTED_DTYPES, BalanceFn, Hyperparameters, state_dtype
from .backends.reference import balance_weights
from .capture import Bucket, capture_task_grads
from .dispatch import resolve_backends
from .distributed import DistributedSync

_STATE_KEY = "norm_ema"


class MetaBalance(torch.optim.Optimizer):
    r"""Balance auxiliary-task gradients on shared parameters toward the target task's magnitude.

    MetaBalance (He et al., WWW 2022): for every balanced tensor and every step, each auxiliary task's gradient
    is rescaled toward the target task's magnitude using moving averages of the per-task gradient norms, and
    ``p.grad`` receives the target gradient plus the rescaled auxiliary gradients. The exact formula is stated in
    :mod:`mb_kernels.backends.reference` (``relax_factor`` r = 0 is plain summation, Vanilla-Multi; r = 1 gives
    every rescaled auxiliary the target's magnitude). Every backend is bitwise reproducible run to run.

    Args:
        params: the shared parameters to balance (tensors or param-group dicts). Parameters reached by the
            losses but not listed (task towers) receive the plain sum of the task gradients.
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
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"MetaBalance params must be tensors, got {type(p).__name__}")
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
        new_types = {p.device.type for p in params} - set(self._backends)
        self._backends.update(resolve_backends(new_types, self._fused, self._backend_request))
        group["params"] = params
        super().add_param_group(group)
        self._buckets = None

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
            if not loss.requires_grad or loss.grad_fn is None:
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
    def _build_buckets(self, num_tasks: int) -> list[tuple[dict, Bucket]]:
        buckets = []
        for group in self.param_groups:
            by_key: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                by_key.setdefault((p.device, p.dtype), []).append(p)
            for params in by_key.values():
                rows = [self.state[p].get(_STATE_KEY) for p in params]
                bucket = Bucket(params, num_tasks, rows)
                for p, view in zip(params, bucket.norm_ema_views()):
                    self.state[p][_STATE_KEY] = view
                buckets.append((group, bucket))
        return buckets

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`. The moving averages keep their float32 (or float64)
        dtype; ``torch.optim.Optimizer`` would otherwise cast them to the parameter dtype."""
        # States saved before 0.2 carry a `deterministic` flag that no backend ever read: drop it.
        saved_groups = [{k: v for k, v in g.items() if k != "deterministic"} for g in state_dict["param_groups"]]
        for group in saved_groups:
            _check_hyperparameters(group)
        state_dict = {**state_dict, "param_groups": saved_groups}
        super().load_state_dict(state_dict)
        ids = [pid for group in saved_groups for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        sizes = set()
        for pid, p in zip(ids, params):
            entry = state_dict["state"].get(pid)
            if entry is not None and _STATE_KEY in entry:
                ema = entry[_STATE_KEY].to(device=p.device, dtype=state_dtype(p.dtype)).clone()
                self.state[p][_STATE_KEY] = ema
                sizes.add(ema.numel())
        if len(sizes) > 1:
            raise ValueError(f"MetaBalance.load_state_dict: inconsistent task counts in the state: {sorted(sizes)}")
        self._buckets = None

    # ---- the step -----------------------------------------------------------------------------------
    # Under torch.compile the step runs eagerly: its backward passes are graph breaks anyway, and the fused
    # kernels are already single launches; the caller's forward is still compiled.
    @torch.compiler.disable
    def step(self, losses: Sequence[torch.Tensor]) -> None:  # type: ignore[override]
        """Backpropagate each loss, balance the shared gradients and add them to ``p.grad``.

        Args:
            losses: scalar losses ``[target, aux_1, ..., aux_K]``, target first; the same count every step.

        Call it where you would call ``sum(losses).backward()``; then call your optimizer's ``step()``.
        """
        losses = self._check_losses(losses)
        num_tasks = len(losses)
        if self._buckets is None or self._buckets[0][1].num_tasks != num_tasks:
            self._buckets = self._build_buckets(num_tasks)
        buckets = [bucket for _, bucket in self._buckets]
        capture = capture_task_grads(losses, buckets)
        try:
            with torch.no_grad():
                if self._ddp is not None:
                    self._ddp.reduce_others()
                previous_ema = [b.norm_ema.clone() for b in buckets] if self._skip_nonfinite_steps else None
                outputs = []
                for group, bucket in self._buckets:
                    combined = torch.empty(bucket.layout.numel, dtype=bucket.dtype, device=bucket.device)
                    hyper = Hyperparameters(group["relax_factor"], group["beta"], group["strategy"])
                    self._balance_fn(bucket.device.type)(
                        bucket.task_grads, bucket.norm_ema, combined, bucket.layout, hyper
                    )
                    outputs.append(combined)
                if previous_ema is not None:
                    _revert_ema_if_nonfinite(buckets, outputs, previous_ema)
        except BaseException:
            capture.abort()
            raise
        capture.commit(outputs)

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
        for group, bucket in self._buckets:
            weights = balance_weights(bucket.norm_ema, group["relax_factor"], group["strategy"])
            for i, p in enumerate(bucket.params):
                rows.append({"param": p, "norm_ema": bucket.norm_ema[i].clone(), "weights": weights[i].clone()})
        return rows


def _revert_ema_if_nonfinite(buckets: list[Bucket], outputs: list[torch.Tensor], previous: list[torch.Tensor]) -> None:
    """Restore every moving average when any combined gradient is non-finite (no host synchronisation)."""
    # A float32 sum is non-finite iff an element is (finite gradients would need |g| ~ 1e38 to overflow it).
    device = buckets[0].device
    all_finite = torch.stack([torch.isfinite(out.sum(dtype=torch.float32)).to(device) for out in outputs]).all()
    for bucket, old in zip(buckets, previous):
        bucket.norm_ema.copy_(torch.where(all_finite.to(bucket.device), bucket.norm_ema, old))


def _check_hyperparameters(group: dict[str, Any]) -> None:
    r = group.get("relax_factor")
    beta = group.get("beta")
    strategy = group.get("strategy")
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
        raise ValueError(f"MetaBalance: relax_factor must be a number in [0, 1], got {r!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"MetaBalance: beta must be a number in [0, 1), got {beta!r}")
    if strategy not in STRATEGIES:
        raise ValueError(
            f"MetaBalance: unknown strategy {strategy!r}; expected 'A' (shrink auxiliaries larger than the "
            "target), 'B' (boost smaller ones) or 'C' (both, the default)"
        )
