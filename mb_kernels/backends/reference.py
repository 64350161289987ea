r"""Pure-torch MetaBalance kernel: the semantic ground truth every fused backend is tested against.

This is where the math is stated, once (the other backends, the README and docs/design.md point here).
For one bucket (all balanced tensors of one param group, device and dtype, laid out in a flat ``[T, N]``
workspace) and tasks t = 0..T-1 (t = 0 is the target), per tensor p (Algorithm 2 of the paper):

.. math::
    n_{p,t} &= \lVert g_{p,t} \rVert_2                        && \text{squares summed in float64} \\
    m_{p,t} &\leftarrow \beta\, m_{p,t} + (1-\beta)\, n_{p,t}  && \text{only where } n_{p,t} \text{ is finite} \\
    w_{p,t} &= \begin{cases} r\, m_{p,0}/m_{p,t} + (1 - r) & \text{if } t \text{ is rescaled and } m_{p,t} \ne 0 \\
                             1 & \text{otherwise} \end{cases} \\
    G_p &= g_{p,0} + \textstyle\sum_{t \ge 1} w_{p,t}\, g_{p,t}

Strategy A rescales task t when m_t > m_0, B when m_t < m_0, C always. ``r`` is the relax factor
(r = 0: plain sum, Vanilla-Multi; r = 1: every rescaled auxiliary gets the target's magnitude), ``beta`` the
moving-average factor (m = 0 before the first step). The weight is the paper's (m_0/m_t - 1) r + 1, evaluated as
r m_0/m_t + (1 - r) with m_0/m_t capped at the state dtype's largest finite value (see :func:`balance_weights`;
the cap only matters for a subnormal m_t, where the ratio would overflow and 0 * Inf turn r = 0 into NaN). G is
accumulated in the state dtype and rounded once into
the gradient dtype. Every condition is a ``torch.where`` on device tensors: no host synchronisation on tensor
values.

Norms (:func:`tensor_norms`): the squares are summed in float64 and the square root is rounded once into the state
dtype (float32, or float64 for float64 gradients). The square of any finite float32 (so float16 and bfloat16) value
is exact in float64 and can neither overflow nor underflow there, so every finite gradient whose norm fits in float32
gets its norm to within rounding; a float32 sum would overflow for norms above ~1.8e19 and lose elements below
~1e-19, turning a task into a "non-finite" or a "zero" one without a trace. A norm beyond float32's range rounds to
Inf (the task is then treated as non-finite). float64 gradients keep the plain float64 sum: their squares overflow
for elements above ~1e154 and underflow below ~1e-162 (a scaled sum would cost a second pass for no practical case).
"""

from __future__ import annotations

import torch

from ..layout import FlatLayout
from .contract import Hyperparameters, state_dtype, strategy_index


def balance_weights(norm_ema: torch.Tensor, relax_factor: float, strategy: str) -> torch.Tensor:
    """Weights ``w[p, t]`` from the updated moving averages ``norm_ema[p, t]`` (w[:, 0] == 1)."""
    target = norm_ema[:, :1]
    if strategy == "A":
        rescale = norm_ema > target
    elif strategy == "B":
        rescale = norm_ema < target
    else:
        rescale = torch.ones_like(norm_ema, dtype=torch.bool)
    # Guard m_t == 0 (a task that never reached the tensor): w = 1, never 0/0.
    rescale &= norm_ema != 0
    rescale[:, 0].fill_(False)  # fill_, not item assignment: that makes a host tensor first
    safe_ema = torch.where(norm_ema != 0, norm_ema, torch.ones_like(norm_ema))
    # (m_0/m_t - 1) r + 1 evaluated as r m_0/m_t + (1 - r): both terms are >= 0, so no cancellation
    # when m_0/m_t << 1 (the literal form loses ~eps/w relative accuracy there). m_0/m_t is capped at the largest
    # finite value (it overflows for a subnormal m_t): r = 0 still gives w = 1, and w * 0 stays 0.
    ratio = (target / safe_ema).clamp(max=torch.finfo(norm_ema.dtype).max)
    scaled = ratio * relax_factor + (1.0 - relax_factor)
    return torch.where(rescale, scaled, torch.ones_like(norm_ema))


def update_norm_ema(norm_ema: torch.Tensor, norms: torch.Tensor, beta: float) -> None:
    """In-place EMA step; a non-finite norm (NaN/Inf gradient) leaves that entry's average unchanged."""
    updated = norm_ema * beta + norms * (1.0 - beta)
    norm_ema.copy_(torch.where(torch.isfinite(norms), updated, norm_ema))


def tensor_norms(task_grads: torch.Tensor, layout: FlatLayout) -> torch.Tensor:
    """n[p, t] = ||g_{p,t}||_2 over the flat workspace in the state dtype: squares summed in float64, the square root
    rounded once (module docstring). On devices without float64 (MPS), :func:`_scaled_norms`."""
    acc = state_dtype(task_grads.dtype)
    if layout.num_tensors == 0:
        return torch.zeros(0, task_grads.shape[0], dtype=acc, device=task_grads.device)
    if task_grads.device.type == "mps":
        return _scaled_norms(task_grads, layout)
    segments = task_grads.split(layout.sizes, dim=1)
    return torch.stack([torch.linalg.vector_norm(s, dim=1, dtype=torch.float64) for s in segments]).to(acc)


def _scaled_norms(task_grads: torch.Tensor, layout: FlatLayout) -> torch.Tensor:
    """The norms without float64 (for float32/float16/bfloat16 gradients): each (tensor, task) segment is divided by
    a power of two near its largest magnitude (exact), its float32 norm taken and scaled back, as LAPACK's nrm2
    does. Same range as the float64 sum; float32 accumulation error (docs/design.md §5)."""
    acc = state_dtype(task_grads.dtype)
    if layout.num_tensors == 0:
        return torch.zeros(0, task_grads.shape[0], dtype=acc, device=task_grads.device)
    norms = []
    for segment in task_grads.split(layout.sizes, dim=1):
        segment = segment.to(acc)
        if segment.shape[1] == 0:
            norms.append(segment.new_zeros(segment.shape[0]))
            continue
        largest = segment.abs().amax(dim=1, keepdim=True)
        # 2^-e with e the exponent of the largest magnitude (0 for zero or non-finite segments: they pass through),
        # kept within [-125, 126] so that 2^-e and 2^e are normal floats; the scaled magnitudes are then < 4.
        _, exponent = torch.frexp(torch.where(torch.isfinite(largest) & (largest > 0), largest, 0.5))
        scale = torch.ldexp(torch.ones_like(largest), -exponent.clamp(-125, 126))
        norms.append(torch.linalg.vector_norm(segment * scale, dim=1) / scale.squeeze(1))
    return torch.stack(norms)


def combine(task_grads: torch.Tensor, weights: torch.Tensor, layout: FlatLayout, out: torch.Tensor) -> None:
    """out = g_0 + sum_{t>=1} w[p, t] g_{p,t}, computed in the accumulation dtype and rounded once."""
    if layout.num_tensors == 0:
        return
    acc = state_dtype(task_grads.dtype)
    rows = [row.split(layout.sizes) for row in task_grads]
    combined = [segment.to(acc, copy=True) for segment in rows[0]]
    for t in range(1, task_grads.shape[0]):
        # One 0-d weight per tensor: no per-element weight vector is materialised.
        scaled = torch._foreach_mul([segment.to(acc) for segment in rows[t]], list(weights[:, t].to(acc).unbind()))
        torch._foreach_add_(combined, scaled)
    torch._foreach_copy_(list(out.split(layout.sizes)), combined)


def update_and_weigh(norm_ema: torch.Tensor, norms: torch.Tensor, hyper: Hyperparameters) -> torch.Tensor:
    """The moving-average step from this step's norms ``[P, T]`` (in place) and the weights ``[P, T]`` from the
    updated averages: what every torch-op path (reference, DDP low_comm, sparse tables) runs between norms and
    combination."""
    update_norm_ema(norm_ema, norms.to(norm_ema.dtype), hyper.beta)
    return balance_weights(norm_ema, hyper.relax_factor, hyper.strategy)


def balance_torch(
    task_grads: torch.Tensor,
    norm_ema: torch.Tensor,
    out: torch.Tensor,
    layout: FlatLayout,
    hyper: Hyperparameters,
) -> None:
    """Reference backend (:class:`~mb_kernels.backends.contract.BalanceFn`): ``task_grads`` [T, N] (read),
    ``norm_ema`` [P, T] (updated), ``out`` [N] (written)."""
    strategy_index(hyper.strategy)  # validates before anything is written
    weights = update_and_weigh(norm_ema, tensor_norms(task_grads, layout), hyper)
    combine(task_grads, weights, layout, out)
