"""The reference backend against the naive per-tensor transcription of Algorithm 2, in float64."""

from __future__ import annotations

import pytest
import torch

from mb_kernels.backends.contract import Hyperparameters
from mb_kernels.backends.reference import balance_torch
from mb_kernels.layout import FlatLayout
from tests.cases import random_task_grads
from tests.naive import naive_metabalance_step

SIZES = [5, 0, 1, 33, 7, 129]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("strategy", ["A", "B", "C"])
@pytest.mark.parametrize("relax_factor", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("num_tasks", [1, 3])
def test_reference_equals_naive_algorithm(seed, strategy, relax_factor, beta, num_tasks):
    layout = FlatLayout.from_sizes(SIZES, "cpu")
    ema = torch.zeros(len(SIZES), num_tasks, dtype=torch.float64)
    naive_ema = [[0.0] * num_tasks for _ in SIZES]
    for step in range(4):
        grads = random_task_grads(100 * seed + step, SIZES, num_tasks, torch.float64)
        out = torch.empty(grads.shape[1], dtype=torch.float64)
        balance_torch(grads, ema, out, layout, Hyperparameters(relax_factor, beta, strategy))
        per_tensor = [list(row.split(SIZES)) for row in grads]
        expected = torch.cat(naive_metabalance_step(per_tensor, naive_ema, relax_factor, beta, strategy))
        # atol: float64 rounding of sums whose terms reach ~1e3 and cancel (eps64 * 1e3 ~ 2e-13).
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-11)
        torch.testing.assert_close(ema, torch.tensor(naive_ema, dtype=torch.float64), rtol=1e-12, atol=0.0)


def test_strategies_select_the_documented_tasks():
    # One tensor, target norm 2; task 1 larger (norm 8), task 2 smaller (norm 0.5).
    layout = FlatLayout.from_sizes([1], "cpu")
    grads = torch.tensor([[2.0], [8.0], [0.5]], dtype=torch.float64)
    weights = {}
    for strategy in "ABC":
        ema = torch.zeros(1, 3, dtype=torch.float64)
        out = torch.empty(1, dtype=torch.float64)
        balance_torch(grads, ema, out, layout, Hyperparameters(1.0, 0.0, strategy))
        weights[strategy] = out.item()
    # r = 1 rescales to the target's magnitude: 8 -> 2, 0.5 -> 2.
    assert weights["A"] == pytest.approx(2.0 + 2.0 + 0.5)
    assert weights["B"] == pytest.approx(2.0 + 8.0 + 2.0)
    assert weights["C"] == pytest.approx(2.0 + 2.0 + 2.0)


def test_zero_norms_give_no_nan_and_weight_one():
    layout = FlatLayout.from_sizes([4], "cpu")
    grads = torch.zeros(3, 4)
    grads[1] = 1.0  # target and task 2 are zero: m_0 = 0 and m_2 = 0
    ema = torch.zeros(1, 3)
    out = torch.empty(4)
    balance_torch(grads, ema, out, layout, Hyperparameters(0.7, 0.9, "C"))
    assert torch.isfinite(out).all()
    # m_0 = 0: w_1 = r * 0 + (1 - r) = 0.3; m_2 = 0: w_2 = 1 (guard) on a zero gradient.
    torch.testing.assert_close(out, torch.full((4,), 0.3))


def test_non_finite_gradient_keeps_ema_and_poisons_output():
    layout = FlatLayout.from_sizes([3, 2], "cpu")
    grads = torch.ones(2, 5)
    ema = torch.full((2, 2), 0.5)
    grads[1, 0] = float("nan")
    out = torch.empty(5)
    balance_torch(grads, ema, out, layout, Hyperparameters(0.7, 0.9, "C"))
    assert ema[0, 1] == 0.5  # the NaN task's average of tensor 0 is unchanged
    assert ema[0, 0] != 0.5 and ema[1, 1] != 0.5  # the others moved
    assert not torch.isfinite(out[:3]).all()
    assert torch.isfinite(out[3:]).all()
