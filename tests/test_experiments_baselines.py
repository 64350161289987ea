"""The paper's baselines (experiments/recsys/baselines.py): each one's defining behaviour on a toy problem."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from experiments.recsys import baselines as B


def _t(*values: float) -> list[torch.Tensor]:
    """A 'gradient' as a list of tensors (two tensors, to exercise the multi-tensor dot products)."""
    v = torch.tensor(values, dtype=torch.float64)
    return [v[:1].clone(), v[1:].clone()]


def _flat(g: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.flatten() for x in g])


# ---- PCGrad -------------------------------------------------------------------------------------------------------
def test_pcgrad_projects_out_conflicting_components():
    g1, g2 = _t(1.0, 0.0), _t(-1.0, 1.0)  # g1 . g2 = -1 < 0: conflict
    out = _flat(B.pcgrad_combine([g1, g2], np.random.default_rng(0)))
    # g1' = g1 - (g1.g2)/|g2|^2 g2 = (0.5, 0.5); g2' = g2 - (g2.g1)/|g1|^2 g1 = (0, 1); sum (0.5, 1.5).
    torch.testing.assert_close(out, torch.tensor([0.5, 1.5], dtype=torch.float64))
    # Each projected gradient no longer conflicts with the other task: the sum has a non-negative dot with both.
    assert float(out @ _flat(g1)) >= 0 and float(out @ _flat(g2)) >= 0
    # Plain sum (0, 1) would have a zero dot with g1; PCGrad is not the plain sum here.
    assert not torch.allclose(out, _flat(g1) + _flat(g2))


def test_pcgrad_leaves_agreeing_gradients_alone():
    grads = [_t(1.0, 0.2, 0.0), _t(0.5, 1.0, 0.1), _t(0.3, 0.0, 2.0)]  # all pairwise dots > 0
    out = _flat(B.pcgrad_combine(grads, np.random.default_rng(1)))
    torch.testing.assert_close(out, sum(_flat(g) for g in grads))


def test_pcgrad_three_tasks_each_projection_is_orthogonal_when_it_conflicts():
    rng = np.random.default_rng(3)
    grads = [_t(*rng.normal(size=4)) for _ in range(3)]
    # With one fixed order the first-projected vector is orthogonal to the task it was projected on.
    order_rng = np.random.default_rng(5)
    out = _flat(B.pcgrad_combine(grads, order_rng))
    assert out.shape == (4,) and torch.isfinite(out).all()
    g0, g1 = _flat(grads[0]), _flat(grads[1])
    if float(g0 @ g1) < 0:
        proj = g0 - (g0 @ g1) / (g1 @ g1) * g1
        assert abs(float(proj @ g1)) < 1e-12


# ---- GradSim -------------------------------------------------------------------------------------------------------
def test_gradsim_drops_an_auxiliary_with_negative_cosine():
    target = _t(1.0, 0.0)
    helpful, harmful, orthogonal = _t(0.5, 0.5), _t(-0.1, 1.0), _t(0.0, 3.0)
    assert B.gradsim_mask([target, helpful, harmful, orthogonal]) == [True, True, False, False]


def test_gradsim_combiner_sums_only_the_kept_auxiliaries():
    w = torch.nn.Parameter(torch.tensor([0.0, 0.0]))
    towers = [[torch.nn.Parameter(torch.zeros(1))] for _ in range(3)]
    c = B.GradSim([w], towers)
    losses = [
        (w * torch.tensor([1.0, 0.0])).sum() + towers[0][0].sum(),  # target gradient (1, 0)
        (w * torch.tensor([0.5, 0.5])).sum() + 2 * towers[1][0].sum(),  # cosine > 0: kept
        (w * torch.tensor([-1.0, 0.2])).sum() + 3 * towers[2][0].sum(),  # cosine < 0: dropped
    ]
    c.backward(losses)
    torch.testing.assert_close(w.grad, torch.tensor([1.5, 0.5]))
    # Towers always get their own task's gradient, the dropped auxiliary's too.
    assert [float(t[0].grad) for t in towers] == [1.0, 2.0, 3.0]
    assert c.weights() == [1.0, 1.0, 0.0]


# ---- MGDA ------------------------------------------------------------------------------------------------------------
def _brute_min_norm(gram: np.ndarray, steps: int = 200) -> float:
    best = math.inf
    for i, j in itertools.product(range(steps + 1), repeat=2):
        if i + j > steps:
            continue
        a = np.array([i, j, steps - i - j]) / steps
        best = min(best, float(a @ gram @ a))
    return best


def test_mgda_min_norm_two_tasks_closed_form():
    # Orthogonal, equal norms: the midpoint. A gradient that is a multiple of the other: the shorter one alone.
    np.testing.assert_allclose(B.min_norm_weights(np.eye(2)), [0.5, 0.5])
    g = np.array([[1.0, 0.0], [2.0, 0.0]])
    np.testing.assert_allclose(B.min_norm_weights(g @ g.T), [1.0, 0.0])


@pytest.mark.parametrize("seed", range(5))
def test_mgda_frank_wolfe_reaches_the_min_norm_point_of_the_convex_hull(seed):
    """MGDA (Sener & Koltun 2018), exact variant: min |sum a_t g_t| over the simplex, checked against a grid."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(3, 5)) + np.array([0.3, 0, 0, 0, 0])
    gram = g @ g.T
    alpha = B.min_norm_weights(gram)
    assert alpha.min() >= 0 and abs(alpha.sum() - 1) < 1e-12
    value = float(alpha @ gram @ alpha)
    assert value <= _brute_min_norm(gram) + 1e-9
    # Optimality: d = sum a g has <d, g_t> >= |d|^2 for every task (no convex direction is shorter), so -d is a
    # descent direction for every task when d != 0.
    d = alpha @ g
    assert (g @ d >= d @ d - 1e-6).all()


def test_mgda_combiner_towers_get_their_own_gradient():
    w = torch.nn.Parameter(torch.zeros(2))
    towers = [[torch.nn.Parameter(torch.zeros(1))] for _ in range(2)]
    c = B.MGDA([w], towers)
    c.backward([(w * torch.tensor([1.0, 0.0])).sum() + towers[0][0].sum(), (w[1] + 5 * towers[1][0]).sum()])
    torch.testing.assert_close(w.grad, torch.tensor([0.5, 0.5]))
    assert [float(t[0].grad) for t in towers] == [1.0, 5.0]


# ---- Uncertainty ----------------------------------------------------------------------------------------------------
def test_uncertainty_learns_log_variances_log_2l():
    """At fixed losses L_t, exp(-s) L + s/2 is minimised at s = log(2 L): the learned s_t must get there."""
    w = torch.nn.Parameter(torch.zeros(1))
    c = B.Uncertainty([w], [[], [], []])
    opt = torch.optim.Adam(c.parameters(), lr=0.05)
    targets = torch.tensor([0.1, 1.0, 4.0])
    for _ in range(1500):
        opt.zero_grad()
        c.backward([targets[t] + 0.0 * w.sum() for t in range(3)])
        opt.step()
    torch.testing.assert_close(c.log_var.detach(), torch.log(2 * targets), atol=2e-2, rtol=0)
    # Larger loss -> larger variance -> smaller weight exp(-s).
    weights = c.weights()
    assert weights[0] > weights[1] > weights[2]


# ---- DWA -------------------------------------------------------------------------------------------------------------
def test_dwa_weights_from_loss_ratios():
    assert B.dwa_weights([], 2.0).tolist() == [] and B.dwa_weights([[1.0, 2.0]], 2.0).tolist() == [1.0, 1.0]
    history = [[1.0, 1.0, 1.0], [0.5, 0.9, 1.0]]  # rates r = 0.5, 0.9, 1.0: task 0 learns fastest
    w = B.dwa_weights(history, temperature=2.0)
    expected = 3 * np.exp(np.array([0.5, 0.9, 1.0]) / 2) / np.exp(np.array([0.5, 0.9, 1.0]) / 2).sum()
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    assert abs(w.sum() - 3) < 1e-12 and w[0] < w[1] < w[2]  # the slowest-learning task weighs most
    # A larger temperature flattens the weights toward 1.
    assert np.ptp(B.dwa_weights(history, temperature=100.0)) < np.ptp(w)


def test_dwa_combiner_updates_per_epoch():
    w = torch.nn.Parameter(torch.ones(1))
    c = B.DWA([w], [[], []], temperature=1.0)
    c.end_epoch([1.0, 1.0])
    assert c.weights() == [1.0, 1.0]
    c.end_epoch([0.25, 1.0])
    w0, w1 = c.weights()
    assert w1 > w0 and abs(w0 + w1 - 2) < 1e-6
    c.backward([w.sum(), 2 * w.sum()])
    assert float(w.grad) == pytest.approx(w0 + 2 * w1, rel=1e-6)


# ---- GradNorm ------------------------------------------------------------------------------------------------------
def test_gradnorm_moves_weights_toward_equal_gradient_norms():
    """alpha = 0: the target for every w_t |grad_W L_t| is their mean, so the task with the larger gradient on the
    last shared layer loses weight; the weights keep summing to the number of tasks."""
    W = torch.nn.Parameter(torch.ones(3))
    c = B.GradNorm([W], [[], []], last_shared=[W], alpha=0.0, lr=0.01)
    for _ in range(100):
        W.grad = None
        c.backward([(W * 1.0).sum(), (W * 10.0).sum()])  # |grad_W| = sqrt(3) and 10 sqrt(3)
    w_small, w_big = c.weights()
    assert abs(w_small + w_big - 2) < 1e-5
    assert w_big < 0.5 < 1.5 < w_small
    # The network's gradient is the weighted sum at the step's weights.
    assert torch.allclose(W.grad, torch.full((3,), 1.0) * W.grad[0])


def test_gradnorm_alpha_favours_the_slower_task():
    """Equal gradient norms, but task 0's loss halves after the first step while task 1's stays: the relative
    inverse training rate of task 1 is larger, so with alpha > 0 its target norm is larger and its weight grows."""
    W = torch.nn.Parameter(torch.ones(2))
    c = B.GradNorm([W], [[], []], last_shared=[W], alpha=1.5, lr=0.01)

    def loss(value: float) -> torch.Tensor:  # value `value`, gradient (1, 1) on W
        s = W.sum()
        return s - s.detach() + value

    for step in range(60):
        W.grad = None
        c.backward([loss(2.0 if step == 0 else 1.0), loss(2.0)])
    w0, w1 = c.weights()
    assert w1 > 1.2 and w0 < 0.8 and abs(w0 + w1 - 2) < 1e-5


# ---- MTAdam -------------------------------------------------------------------------------------------------------
def _mtadam_trajectory(aux_scale: float, steps: int = 30) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    tower = [[torch.nn.Parameter(torch.zeros(1))], [torch.nn.Parameter(torch.zeros(1))]]
    c = B.MTAdam([w], tower, lr=0.05)
    a, b = torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([0.0, 1.0, 1.0, -1.0])
    for _ in range(steps):
        losses = [((w - a) ** 2).sum() + tower[0][0].sum(), aux_scale * ((w - b) ** 2).sum() + tower[1][0].sum()]
        c.backward(losses)
    return w.detach().clone()


def test_mtadam_is_invariant_to_an_auxiliary_loss_scale():
    """The defining property: the auxiliary term's gradient is rescaled to the anchor's magnitude per layer, so
    multiplying that loss by 1000 leaves the trajectory unchanged — where Adam on the plain sum is dominated by it."""
    base, scaled = _mtadam_trajectory(1.0), _mtadam_trajectory(1000.0)
    torch.testing.assert_close(base, scaled, rtol=1e-5, atol=1e-6)

    def adam(scale: float) -> torch.Tensor:
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4))
        opt = torch.optim.Adam([w], lr=0.05)
        a, b = torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([0.0, 1.0, 1.0, -1.0])
        for _ in range(30):
            opt.zero_grad()
            (((w - a) ** 2).sum() + scale * ((w - b) ** 2).sum()).backward()
            opt.step()
        return w.detach()

    assert (adam(1.0) - adam(1000.0)).abs().max() > 0.1


def test_mtadam_single_term_matches_adam():
    """With one loss term MTAdam is Adam (the max over one second moment is that moment)."""
    torch.manual_seed(1)
    w1 = torch.nn.Parameter(torch.randn(5))
    w2 = torch.nn.Parameter(w1.detach().clone())
    c = B.MTAdam([w1], [[]], lr=0.01)
    opt = torch.optim.Adam([w2], lr=0.01)
    for k in range(10):
        c.backward([((w1 - k) ** 2).sum()])
        opt.zero_grad()
        ((w2 - k) ** 2).sum().backward()
        opt.step()
    torch.testing.assert_close(w1, w2, rtol=1e-6, atol=1e-7)


# ---- Weights-Tuning -------------------------------------------------------------------------------------------------
def test_fixed_weights_scale_the_auxiliaries_only():
    w = torch.nn.Parameter(torch.zeros(2))
    c = B.FixedWeights([w], [[], [], []], aux_weight=0.25)
    c.backward([(w * torch.tensor([1.0, 0.0])).sum(), (w * 4).sum(), (w * torch.tensor([0.0, 8.0])).sum()])
    torch.testing.assert_close(w.grad, torch.tensor([1.0 + 1.0, 1.0 + 2.0]))
    assert c.weights() == [1.0, 0.25, 0.25]


def test_task_gradients_match_separate_backward_passes():
    torch.manual_seed(0)
    shared = torch.nn.Linear(3, 2)
    towers = [torch.nn.Linear(2, 1) for _ in range(2)]
    x = torch.randn(5, 3)
    h = shared(x)
    losses = [towers[t](h).pow(2).mean() for t in range(2)]
    sg, tg = B.task_gradients(losses, list(shared.parameters()), [list(t.parameters()) for t in towers])
    for t in range(2):
        shared.zero_grad()
        towers[t].zero_grad()
        towers[t](shared(x)).pow(2).mean().backward()
        for g, p in zip(sg[t], shared.parameters()):
            torch.testing.assert_close(g, p.grad)
        for g, p in zip(tg[t], towers[t].parameters()):
            torch.testing.assert_close(g, p.grad)


def test_mgda_frank_wolfe_path_for_many_tasks_is_close():
    rng = np.random.default_rng(7)
    g = rng.normal(size=(12, 30))
    gram = g @ g.T
    alpha = B.min_norm_weights(gram)
    exact = B.min_norm_weights(gram[:10, :10])  # a 10-task sub-problem by the exact path, as a sanity anchor
    assert alpha.min() >= 0 and abs(alpha.sum() - 1) < 1e-9 and abs(exact.sum() - 1) < 1e-9
    d = alpha @ g
    assert (g @ d >= d @ d - 1e-2 * (d @ d) - 1e-9).all()  # approximately KKT after Frank-Wolfe
