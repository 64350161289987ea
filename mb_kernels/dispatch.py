"""Backend selection: one table of backends (each a :class:`~mb_kernels.backends.contract.BalanceFn`), resolved
once per device type when parameters are added."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .backends.contract import BalanceFn
from .backends.reference import balance_torch


def _interpreting_triton() -> bool:
    # The Triton interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors: tests use it.
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Backend:
    """One implementation of the balancing step."""

    name: str
    description: str
    serves: Callable[[str], bool]
    """Whether it runs on tensors of a device type ("cpu", "cuda", ...)."""
    loader: Callable[[], BalanceFn]
    """Imports the implementation; raises ImportError/RuntimeError/OSError with the reason when unavailable."""

    def unavailable_reason(self) -> str | None:
        try:
            self.loader()
        except (ImportError, RuntimeError, OSError) as err:
            return str(err)
        return None


def _compiled(device_type: str) -> Callable[[], BalanceFn]:
    def load() -> BalanceFn:
        return importlib.import_module("mb_kernels.backends.compiled").compiled_backend(device_type)

    return load


def _triton() -> BalanceFn:
    return importlib.import_module("mb_kernels.backends.triton").balance_triton


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", "pure-torch reference (the semantics)", lambda _: True, lambda: balance_torch),
    "cpu": Backend("cpu", "C++ op, CPU kernel", lambda d: d == "cpu", _compiled("cpu")),
    "cuda": Backend("cuda", "C++ op, CUDA kernels", lambda d: d == "cuda", _compiled("cuda")),
    "triton": Backend(
        "triton", "Triton kernels", lambda d: d == "cuda" or (d == "cpu" and _interpreting_triton()), _triton
    ),
}

# fused=None / fused=True: the first available backend of this list for the device type. On CUDA the C++ op comes
# first: on an H100 it was faster than the Triton kernels in every measured case (bench/RESULTS.md, GPU section);
# Triton serves CUDA tensors where the extension was built without CUDA kernels. The Triton interpreter on CPU is
# a test vehicle, never a fused choice.
FUSED_PREFERENCE: dict[str, tuple[str, ...]] = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


def resolve_backends(
    device_types: Iterable[str], fused: bool | None, backend: str | None
) -> dict[str, tuple[str, BalanceFn]]:
    """Map each device type to (backend name, function). Raises a ValueError/RuntimeError naming the fix."""
    if backend is not None and fused is not None:
        raise ValueError("pass either fused= or backend=, not both (backend= already names one implementation)")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {sorted(BACKENDS)}")
    resolved: dict[str, tuple[str, BalanceFn]] = {}
    for device_type in sorted(set(device_types)):
        if backend is not None:
            chosen = BACKENDS[backend]
            if not chosen.serves(device_type):
                served = [d for d in ("cpu", "cuda") if chosen.serves(d)]
                raise ValueError(f"backend={backend!r} does not serve {device_type} tensors; it serves {served}")
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
    return [
        name
        for name, backend in BACKENDS.items()
        if backend.serves(device_type) and backend.unavailable_reason() is None
    ]
