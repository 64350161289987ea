"""What a new user's trial found (copies, layouts, transactional errors, state loading, traps); each test failed on
the code before the fix."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mb_kernels import MetaBalance
from tests.models import TinyMultiTask, batch


def _train(model, mb, opt, steps):
    for step in steps:
        opt.zero_grad(set_to_none=True)
        mb.step(model.losses(*batch(step)))
        opt.step()


def _grads(model):
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


# ---- 1. copies ---------------------------------------------------------------------------------------------------
def _pickled(obj):
    return pickle.loads(pickle.dumps(obj))


def _torch_saved(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", [copy.deepcopy, _pickled, _torch_saved], ids=["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("fused", [False, None])
def test_copies_continue_identically(how, fused):
    torch.manual_seed(0)
    model = TinyMultiTask()
    mb = MetaBalance(model.shared_parameters(), fused=fused, skip_nonfinite_steps=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train(model, mb, opt, range(2))
    model2, mb2, opt2 = how((model, mb, opt))
    assert mb2.backends == mb.backends
    _train(model, mb, opt, range(2, 5))
    _train(model2, mb2, opt2, range(2, 5))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.shared_parameters(), model2.shared_parameters()):
        assert torch.equal(mb.state[p]["norm_ema"], mb2.state[q]["norm_ema"])


# ---- 2. layouts --------------------------------------------------------------------------------------------------
class StridedModel(nn.Module):
    """A channels_last conv weight and a transposed matrix in the shared bottom."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Parameter(torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last))
        self.proj = nn.Parameter(torch.randn(16, 8).t())  # shape [8, 16], strides (1, 8)
        self.towers = nn.ModuleList([nn.Linear(16, 1) for _ in range(3)])

    def shared_parameters(self):
        return [self.conv, self.proj]

    def losses(self, x):
        h = torch.nn.functional.conv2d(x, self.conv).mean(dim=(2, 3))  # [B, 8]
        h = torch.tanh(h @ self.proj)
        return [tower(h).pow(2).mean() * scale for tower, scale in zip(self.towers, (1.0, 3.0, 0.3))]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("fused", [False, None])
def test_balanced_gradients_have_autograd_strides_and_fused_adam_matches(fused, device):
    torch.manual_seed(1)
    model = StridedModel().to(device)
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6, device=device)
    mb = MetaBalance(model.shared_parameters(), relax_factor=0.0, fused=fused)  # r = 0: the plain sum
    opt = torch.optim.Adam(model.parameters(), lr=0.05, fused=True)
    opt_twin = torch.optim.Adam(twin.parameters(), lr=0.05, fused=True)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        opt_twin.zero_grad(set_to_none=True)
        mb.step(model.losses(x))
        sum(twin.losses(x)).backward()
        for p, q in zip(model.shared_parameters(), twin.shared_parameters()):
            assert p.grad.stride() == q.grad.stride() == p.stride()
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
        opt.step()
        opt_twin.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ---- 3. transactional errors ---------------------------------------------------------------------------------------
def _with_existing_grads(model):
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)


def _assert_untouched(model, mb, before_grads, before_ema, num_tasks):
    for name, p in model.named_parameters():
        want = before_grads[name]
        assert (p.grad is None) == (want is None), name
        if want is not None:
            assert torch.equal(p.grad, want), f"{name}.grad changed by a failed step"
    assert mb.num_tasks == num_tasks
    for p in model.shared_parameters():
        ema = mb.state.get(p, {}).get("norm_ema")
        assert (ema is None) == (before_ema.get(p) is None)
        if ema is not None:
            assert torch.equal(ema, before_ema[p])


def _snapshot(model, mb):
    return _grads(model), {
        p: mb.state[p]["norm_ema"].clone() for p in model.shared_parameters() if "norm_ema" in mb.state.get(p, {})
    }


@pytest.mark.parametrize("warm", [False, True], ids=["first-step", "later-step"])
@pytest.mark.parametrize("failure", ["graph-freed", "relax-edited", "strategy-edited", "sparse-table-used-densely"])
def test_failed_step_leaves_every_grad_and_the_state_untouched(failure, warm):
    torch.manual_seed(2)
    model = TinyMultiTask()
    if failure == "sparse-table-used-densely":
        model.embedding = nn.Embedding(50, 8, sparse=True)
    mb = MetaBalance(model.shared_parameters(), fused=False)
    if warm:
        mb.step(model.losses(*batch(0)))
    num_tasks = mb.num_tasks
    _with_existing_grads(model)
    losses = model.losses(*batch(1))
    if failure == "graph-freed":
        losses[1].backward(retain_graph=False)  # frees the graph the other losses share
        _with_existing_grads(model)
    elif failure == "relax-edited":
        mb.param_groups[0]["relax_factor"] = 5.0
    elif failure == "strategy-edited":
        mb.param_groups[0]["strategy"] = "Z"
    else:  # a dense use of the sparse table: its gradient arrives dense, which a sparse table refuses
        losses = [losses[0], losses[1] + model.embedding.weight.pow(2).sum() * 1e-3, losses[2]]
    before_grads, before_ema = _snapshot(model, mb)
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        mb.step(losses)
    _assert_untouched(model, mb, before_grads, before_ema, num_tasks)


def test_a_step_that_fails_in_balancing_restores_the_averages(monkeypatch):
    torch.manual_seed(3)
    model = TinyMultiTask()
    mb = MetaBalance(model.shared_parameters(), fused=False)
    mb.step(model.losses(*batch(0)))
    _with_existing_grads(model)
    before_grads, before_ema = _snapshot(model, mb)
    name, balance = mb._backends["cpu"]

    def balance_then_fail(task_grads, norm_ema, out, layout, hyper):
        balance(task_grads, norm_ema, out, layout, hyper)  # the averages are updated, then
        raise RuntimeError("injected failure after the kernel")

    monkeypatch.setitem(mb._backends, "cpu", (name, balance_then_fail))
    with pytest.raises(RuntimeError, match="injected"):
        mb.step(model.losses(*batch(1)))
    _assert_untouched(model, mb, before_grads, before_ema, 3)


# ---- 4. load_state_dict ---------------------------------------------------------------------------------------------
def _trained_state():
    torch.manual_seed(5)
    model = TinyMultiTask()
    mb = MetaBalance(model.shared_parameters(), fused=False)
    _train(model, mb, torch.optim.SGD(model.parameters(), lr=0.1), range(2))
    return model, mb.state_dict()


def test_load_state_dict_checks_everything_before_changing_anything():
    model, state = _trained_state()
    target = MetaBalance(model.shared_parameters(), fused=False)
    bad_counts = copy.deepcopy(state)
    bad_counts["state"][1]["norm_ema"] = torch.zeros(2)
    with pytest.raises(ValueError, match="inconsistent task counts"):
        target.load_state_dict(bad_counts)
    assert target.num_tasks is None and len(target.state) == 0
    for bad_value, what in ((float("nan"), "NaN"), (-1.0, "negative")):
        bad = copy.deepcopy(state)
        bad["state"][0]["norm_ema"][1] = bad_value
        with pytest.raises(ValueError, match="finite and >= 0"):
            target.load_state_dict(bad)
        assert target.num_tasks is None, what


def test_load_state_dict_refuses_parameters_in_another_order():
    model, state = _trained_state()
    shared = model.shared_parameters()
    swapped = [shared[1], shared[0], *shared[2:]]  # embedding [50, 8] and bottom.0.weight [16, 8] swapped
    target = MetaBalance(swapped, fused=False)
    with pytest.raises(ValueError, match="in the order they were saved"):
        target.load_state_dict(state)
    assert target.num_tasks is None


# ---- 6. traps -------------------------------------------------------------------------------------------------
def test_balancing_towers_warns_once():
    torch.manual_seed(6)
    model = TinyMultiTask()
    mb = MetaBalance([*model.shared_parameters()[:-2], *model.towers.parameters()], fused=False)
    with pytest.warns(UserWarning, match=r"none from the target \(m_0 = 0\)"):
        mb.step(model.losses(*batch(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mb.step(model.losses(*batch(1)))  # once, not every step


def test_update_averages_false_keeps_every_average_bitwise():
    torch.manual_seed(7)
    model = TinyMultiTask()
    mb = MetaBalance(model.shared_parameters(), fused=False)
    mb.step(model.losses(*batch(0)))
    before = {p: mb.state[p]["norm_ema"].clone() for p in model.shared_parameters()}
    model.zero_grad(set_to_none=True)
    mb.step(model.losses(*batch(1)), update_averages=False)
    for p in model.shared_parameters():
        assert torch.equal(mb.state[p]["norm_ema"], before[p])
    assert model.embedding.weight.grad is not None  # the micro-batch's gradients still arrive


@pytest.mark.parametrize(
    "relax",
    [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), 1, np.int64(1)],
    ids=["np32", "np64", "0-d", "int", "npint"],
)
def test_hyperparameters_accept_numpy_scalars_and_0d_tensors(relax):
    model = TinyMultiTask()
    mb = MetaBalance(model.shared_parameters(), relax_factor=relax, beta=np.float32(0.9), fused=False)
    assert isinstance(mb.param_groups[0]["relax_factor"], float)
    mb.step(model.losses(*batch(0)))


def test_named_parameters_are_accepted():
    model = TinyMultiTask()
    shared = {id(p) for p in model.shared_parameters()}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in shared]
    mb = MetaBalance(named, fused=False)
    mb.step(model.losses(*batch(0)))
    assert model.embedding.weight.grad is not None


def test_leaf_scalar_loss_is_named_as_such():
    model = TinyMultiTask()
    mb = MetaBalance(model.shared_parameters(), fused=False)
    leaf = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(ValueError, match="is a leaf tensor"):
        mb.step([model.losses(*batch(0))[0], leaf])


class _OddTowers(nn.Module):
    """Towers whose gradients autograd.grad hands out shared (a + b), expanded (v.sum()) or as views into one
    buffer (cat of two parameters), and a transposed tower parameter (q) only the first task uses."""

    def __init__(self, num_tasks: int):
        super().__init__()
        self.embedding = nn.Embedding(20, 4)
        self.bottom = nn.Linear(4, 4)
        self.a, self.b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
        self.v = nn.Parameter(torch.randn(3))
        self.p1, self.p2 = nn.Parameter(torch.randn(2, 1)), nn.Parameter(torch.randn(2, 4))
        self.q = nn.Parameter(torch.randn(4, 3).t())  # strides (1, 3): its gradient takes them too
        self.num_tasks = num_tasks

    def shared_parameters(self):
        return [self.embedding.weight, *self.bottom.parameters()]

    def losses(self, ids):
        h = torch.tanh(self.bottom(self.embedding(ids)))
        weight = torch.cat([self.p1, self.p2], 1)  # [2, 5]
        out = []
        for t in range(self.num_tasks):
            z = (h * (self.a + self.b)).sum(-1) * (t + 1) + self.v.sum()
            if t == 0:
                z = z + (h @ self.q.t()).sum(-1) * 0.5
            out.append((z.mean() + weight.sum() * 0.1 * (t + 1)) ** 2)
        return out, h


@pytest.mark.parametrize("num_tasks", [1, 3])
@pytest.mark.parametrize("shared_output", [False, True])
def test_tower_gradients_are_owned_and_laid_out_like_autograds(num_tasks, shared_output):
    """With relax_factor=0 MetaBalance is Vanilla-Multi: the towers' .grad must be what sum(losses).backward()
    gives, as separate tensors in each parameter's layout, so that accumulation and in-place use stay right."""
    torch.manual_seed(0)
    model = _OddTowers(num_tasks).double()
    twin = copy.deepcopy(model)
    mb = MetaBalance(model.shared_parameters(), relax_factor=0.0, fused=False)
    for step in range(2):  # .grad never zeroed: the second step accumulates onto the first
        ids = torch.tensor([1, 2, 3, 2 + step])
        losses, h = model.losses(ids)
        mb.step(losses, shared_output=h if shared_output else None)
        sum(twin.losses(ids)[0]).backward()
        towers = [(model.a, twin.a), (model.b, twin.b), (model.v, twin.v), (model.p1, twin.p1), (model.p2, twin.p2)]
        towers.append((model.q, twin.q))
        for p, q in towers:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
            assert p.grad.stride() == p.stride()
        assert model.a.grad.data_ptr() != model.b.grad.data_ptr()
    for p in model.parameters():
        p.grad.mul_(0.5)  # in place on every .grad (an expanded gradient would refuse this)


def test_a_balanced_parameter_frozen_later_keeps_its_grad():
    torch.manual_seed(1)
    model = _OddTowers(3)
    mb = MetaBalance(model.shared_parameters(), fused=None)
    mb.step(model.losses(torch.tensor([1, 2]))[0])
    model.bottom.bias.requires_grad_(False)
    before = model.bottom.bias.grad.clone()
    mb.step(model.losses(torch.tensor([3, 4]))[0])
    assert torch.equal(model.bottom.bias.grad, before)
    model.embedding.weight.requires_grad_(False)
    losses, h = model.losses(torch.tensor([5, 6]))
    mb.step(losses, shared_output=h)


@pytest.mark.parametrize("shared_output", [False, True])
def test_a_sparse_table_in_a_tower_gets_its_sparse_gradient(shared_output):
    """A non-balanced nn.Embedding(sparse=True) (a task's own table) gets what sum(losses).backward() gives: a
    sparse gradient, accumulated onto the one from before (was: copy_ between dense and sparse)."""
    torch.manual_seed(3)
    model = nn.ModuleDict(
        {
            "shared": nn.Embedding(10, 4),
            "bottom": nn.Linear(4, 4),
            "own": nn.Embedding(7, 4, sparse=True),
            "tower": nn.Linear(4, 1),
        }
    ).double()
    twin = copy.deepcopy(model)

    def losses(m, step):
        h = torch.tanh(m["bottom"](m["shared"](torch.tensor([1, 2, 3 + step]))))
        own = m["own"](torch.tensor([0, 1, 1]))
        return [
            (h * own).sum(),
            m["tower"](h).pow(2).sum(),
            (m["own"](torch.tensor([4, step])).sum() + h.sum()) ** 2,
        ], h

    mb = MetaBalance([model["shared"].weight, *model["bottom"].parameters()], relax_factor=0.0)
    for step in range(2):  # .grad never zeroed: the second step accumulates onto the first
        out, h = losses(model, step)
        mb.step(out, shared_output=h if shared_output else None)
        sum(losses(twin, step)[0]).backward()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert p.grad.layout == q.grad.layout, name
            torch.testing.assert_close(p.grad.to_dense(), q.grad.to_dense(), rtol=1e-12, atol=1e-14)
