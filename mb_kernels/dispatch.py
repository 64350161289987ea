"""Backend selection: one table of backends with one signature, resolved once per device type.

Every backend is a function ``fn(task_grads, norm_ema, out, layout, relax_factor, beta, strategy,
deterministic) -> None`` implementing :func:`mb_kernels.reference.balance_torch`'s contract.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .reference import balance_torch

BalanceFn = Callable[..., None]


@dataclass(frozen=True)
class Backend:
    name: str
    fused: bool
    device_types: tuple[str, ...]
    loader: Callable[[], BalanceFn]
    """Imports the implementation; raises ImportError/RuntimeError with the reason when unavailable."""

    def unavailable_reason(self) -> str | None:
        try:
            self.loader()
        except (ImportError, RuntimeError, OSError) as err:
            return str(err)
        return None


def _load_torch() -> BalanceFn:
    return balance_torch


def _load_cpp(device_type: str) -> Callable[[], BalanceFn]:
    def load() -> BalanceFn:
        ops = importlib.import_module("mb_kernels.ops")
        return ops.compiled_backend(device_type)

    return load


def _load_triton() -> BalanceFn:
    module = importlib.import_module("mb_kernels.triton_backend")
    return module.balance_triton


def _triton_device_types() -> tuple[str, ...]:
    # The Triton interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors: tests use it.
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", False, ("any",), _load_torch),
    "cpu": Backend("cpu", True, ("cpu",), _load_cpp("cpu")),
    "cuda": Backend("cuda", True, ("cuda",), _load_cpp("cuda")),
    "triton": Backend("triton", True, ("cuda",), _load_triton),
}

# Preference order of fused backends per device type (fused=None / fused=True).
FUSED_PREFERENCE = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}


def _serves(backend: Backend, device_type: str) -> bool:
    if backend.name == "torch":
        return True
    types = _triton_device_types() if backend.name == "triton" else backend.device_types
    return device_type in types


def resolve_backends(
    device_types: Iterable[str], fused: bool | None, backend: str | None
) -> dict[str, tuple[str, BalanceFn]]:
    """Map each device type to (backend name, function). Raises a ValueError/RuntimeError naming the fix."""
    if backend is not None and fused is not None:
        raise ValueError("pass either fused= or backend=, not both (backend= already names one implementation)")
    resolved: dict[str, tuple[str, BalanceFn]] = {}
    for device_type in sorted(set(device_types)):
        if backend is not None:
            if backend not in BACKENDS:
                raise ValueError(f"unknown backend {backend!r}; expected one of {sorted(BACKENDS)}")
            chosen = BACKENDS[backend]
            if not _serves(chosen, device_type):
                raise ValueError(
                    f"backend={backend!r} does not serve {device_type} tensors; it serves "
                    f"{_triton_device_types() if backend == 'triton' else chosen.device_types}"
                )
            reason = chosen.unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"backend={backend!r} is not available: {reason}")
            resolved[device_type] = (chosen.name, chosen.loader())
            continue
        if fused is False:
            resolved[device_type] = ("torch", balance_torch)
            continue
        reasons = []
        for name in FUSED_PREFERENCE.get(device_type, ()):
            reason = BACKENDS[name].unavailable_reason()
            if reason is None:
                resolved[device_type] = (name, BACKENDS[name].loader())
                break
            reasons.append(f"{name}: {reason}")
        else:
            if fused:
                detail = "; ".join(reasons) or "no fused kernel exists for this device type"
                raise RuntimeError(
                    f"MetaBalance(fused=True): no fused backend serves {device_type} tensors ({detail}). "
                    "Install mb_kernels with its compiled extension (pip install . without "
                    "MB_KERNELS_PURE_PYTHON=1) or Triton on a CUDA machine, or pass fused=None/False "
                    "to use the pure-torch reference."
                )
            resolved[device_type] = ("torch", balance_torch)
    return resolved


def available_backends(device_type: str) -> list[str]:
    """Names of the backends that can run on ``device_type`` here (tests and benchmarks iterate this)."""
    names = []
    for name, backend in BACKENDS.items():
        if _serves(backend, device_type) and backend.unavailable_reason() is None:
            names.append(name)
    return names
