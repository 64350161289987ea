"""A deliberately naive, per-tensor, per-task transcription of MetaBalance (paper Algorithm 2; docs/design.md §1).

Written independently of mb_kernels (no shared helpers) so that it checks the reference (tests/test_reference.py)
and the benchmarks' original-style baseline (``bench.common.original_style_step``, checked against this in
bench/test_bench_kernels.py). It is not itself timed.
"""

from __future__ import annotations

import math

import torch


def naive_metabalance_step(
    task_grads: list[list[torch.Tensor | None]],
    norm_ema: list[list[float]],
    relax_factor: float,
    beta: float,
    strategy: str,
) -> list[torch.Tensor]:
    """``task_grads[t][p]`` is task t's gradient of tensor p (None: the task does not reach p).

    ``norm_ema[p][t]`` holds Python floats (float64) and is updated in place. Returns G per tensor, in float64.
    """
    num_tasks = len(task_grads)
    num_tensors = len(task_grads[0])
    combined = []
    for p in range(num_tensors):
        shape = next((task_grads[t][p].shape for t in range(num_tasks) if task_grads[t][p] is not None), None)
        grads = [task_grads[t][p] for t in range(num_tasks)]
        grads = [torch.zeros(shape, dtype=torch.float64) if g is None else g.double() for g in grads]
        for t in range(num_tasks):
            norm = math.sqrt(sum(float(x) ** 2 for x in grads[t].flatten().tolist()))
            if math.isfinite(norm):
                norm_ema[p][t] = beta * norm_ema[p][t] + (1 - beta) * norm
        total = grads[0].clone()
        for t in range(1, num_tasks):
            m0, mt = norm_ema[p][0], norm_ema[p][t]
            if strategy == "A":
                rescale = mt > m0
            elif strategy == "B":
                rescale = mt < m0
            else:
                rescale = True
            weight = (m0 / mt - 1) * relax_factor + 1 if rescale and mt != 0 else 1.0
            total = total + weight * grads[t]
        combined.append(total)
    return combined
