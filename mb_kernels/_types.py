"""Small shared definitions of the backend contract: the flat layout and the strategies."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# DESIGN §1.4: which auxiliary tasks are rescaled. The kernels receive the index into this tuple.
STRATEGIES = ("A", "B", "C")
STRATEGY_DOC = {
    "A": "rescale only auxiliaries whose moving-average norm exceeds the target's (shrink dominant ones)",
    "B": "rescale only auxiliaries whose moving-average norm is below the target's (boost weak ones)",
    "C": "rescale every auxiliary (the paper's best, the default)",
}


def strategy_index(strategy: str) -> int:
    """Position of ``strategy`` in STRATEGIES (the integer the compiled kernels take); ValueError if unknown."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    return STRATEGIES.index(strategy)


def state_dtype(grad_dtype: torch.dtype) -> torch.dtype:
    """EMA state and accumulation dtype: float32, or float64 for float64 parameters ("float32 or better")."""
    return torch.float64 if grad_dtype == torch.float64 else torch.float32


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class FlatLayout:
    """Where each balanced tensor lives in the flat ``[T, N]`` workspace of one (device, dtype) bucket.

    ``offsets`` holds P + 1 boundaries (int64, on the bucket's device); tensor i occupies columns
    ``offsets[i]:offsets[i + 1]``. ``sizes`` is the same information on the host, so that no backend
    needs to read a device tensor. ``cache`` holds per-backend precomputed tables (chunk maps), built once.
    """

    sizes: tuple[int, ...]
    offsets: torch.Tensor
    cache: dict = field(default_factory=dict)

    @classmethod
    def from_sizes(cls, sizes: list[int] | tuple[int, ...], device: torch.device) -> FlatLayout:
        bounds = [0]
        for n in sizes:
            bounds.append(bounds[-1] + int(n))
        return cls(tuple(int(n) for n in sizes), torch.tensor(bounds, dtype=torch.int64, device=device))

    @property
    def num_tensors(self) -> int:
        return len(self.sizes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)
