"""The backend contract, typed once: what every balancing backend takes and guarantees.

A backend is a :class:`BalanceFn`: ``fn(task_grads, norm_ema, out, layout, hyper) -> None`` that, for one bucket
(the balanced tensors of one param group on one device and dtype, laid out by a
:class:`~mb_kernels.layout.FlatLayout`), reads the per-task gradients ``task_grads`` ``[T, N]``, updates the moving
averages ``norm_ema`` ``[P, T]`` in place and writes the balanced gradient into ``out`` ``[N]``, exactly as
:func:`mb_kernels.backends.reference.balance_torch` defines (the math is stated there, once). Every backend is
bitwise reproducible run to run (no atomics, fixed reduction orders) and validates its inputs before it writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..layout import FlatLayout

# Which auxiliary tasks are rescaled; compiled kernels receive the index (csrc/metabalance_math.h: Strategy).
STRATEGIES = ("A", "B", "C")
STRATEGY_DOC = {
    "A": "rescale only auxiliaries whose moving-average norm exceeds the target's (shrink dominant ones)",
    "B": "rescale only auxiliaries whose moving-average norm is below the target's (boost weak ones)",
    "C": "rescale every auxiliary (the paper's best, the default)",
}

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def strategy_index(strategy: str) -> int:
    """Position of ``strategy`` in STRATEGIES (the integer the compiled kernels take); ValueError if unknown."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    return STRATEGIES.index(strategy)


def state_dtype(grad_dtype: torch.dtype) -> torch.dtype:
    """EMA state and combine accumulation dtype: float32, or float64 for float64 parameters ("float32 or better").
    The norms' squares are summed in float64 for every dtype (docs/design.md §1)."""
    return torch.float64 if grad_dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Hyperparameters:
    """One param group's MetaBalance hyperparameters, as the backends receive them (validated by the optimizer)."""

    relax_factor: float
    beta: float
    strategy: str

    def __post_init__(self) -> None:
        # Plain floats: the compiled op's schema takes `float`, and numpy / 0-d tensor values would not pass.
        object.__setattr__(self, "relax_factor", float(self.relax_factor))
        object.__setattr__(self, "beta", float(self.beta))

    @property
    def strategy_code(self) -> int:
        return strategy_index(self.strategy)


class BalanceFn(Protocol):
    """One balancing step of one bucket (see the module docstring)."""

    def __call__(
        self,
        task_grads: torch.Tensor,
        norm_ema: torch.Tensor,
        out: torch.Tensor,
        layout: FlatLayout,
        hyper: Hyperparameters,
    ) -> None: ...
