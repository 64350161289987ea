"""MetaBalance as a drop-in optimizer: gradients, edge cases, errors, state, leaks (reference backend)."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from mb_kernels import MetaBalance
from tests.models import TinyMultiTask, batch
from tests.naive import naive_metabalance_step


def expected_grads(model, items, labels, naive_ema, relax_factor, beta, strategy):
    """Per-task gradients by autograd.grad on a fresh forward, combined by the naive loop (float64)."""
    shared = model.shared_parameters()
    shared_ids = {id(p) for p in shared}
    others = [p for p in model.parameters() if id(p) not in shared_ids]
    losses = model.losses(items, labels)
    per_task = [torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True) for loss in losses]
    # A parameter no task reaches still has its EMA decayed with n = 0 (its workspace rows are zero).
    dense = [[torch.zeros_like(p) if g is None else g for g, p in zip(grads, shared)] for grads in per_task]
    combined = naive_metabalance_step(dense, naive_ema, relax_factor, beta, strategy)
    tower = torch.autograd.grad(sum(losses), others, allow_unused=True)
    reached = [any(g[i] is not None for g in per_task) for i in range(len(shared))]
    return combined, reached, tower


@pytest.mark.parametrize("strategy", ["A", "B", "C"])
@pytest.mark.parametrize("relax_factor", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_step_matches_naive_algorithm_over_several_steps(strategy, relax_factor, beta):
    torch.manual_seed(0)
    model = TinyMultiTask(dtype=torch.float64)
    shadow = copy.deepcopy(model)
    mb = MetaBalance(model.shared_parameters(), relax_factor=relax_factor, beta=beta, strategy=strategy, fused=False)
    naive_ema = [[0.0] * 3 for _ in model.shared_parameters()]
    for step in range(4):
        items, labels = batch(step, dtype=torch.float64)
        combined, reached, tower = expected_grads(shadow, items, labels, naive_ema, relax_factor, beta, strategy)
        model.zero_grad(set_to_none=True)
        mb.step(model.losses(items, labels))
        for p, want, hit in zip(model.shared_parameters(), combined, reached):
            if hit:
                torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12)
            else:
                assert p.grad is None, "a parameter no task reaches must keep grad None"
        shared_ids = {id(p) for p in model.shared_parameters()}
        others = [p for p in model.parameters() if id(p) not in shared_ids]
        for p, want in zip(others, tower):
            torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-14)
    ema = torch.stack([mb.state[p]["norm_ema"] for p in model.shared_parameters()])
    torch.testing.assert_close(ema, torch.tensor(naive_ema, dtype=torch.float64), rtol=1e-10, atol=0.0)


def test_accumulates_onto_existing_grad():
    torch.manual_seed(1)
    model = TinyMultiTask(dtype=torch.float64)
    twin = copy.deepcopy(model)
    items, labels = batch(0, dtype=torch.float64)
    MetaBalance(twin.shared_parameters(), fused=False).step(twin.losses(items, labels))
    prior = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = prior[name].clone()
    MetaBalance(model.shared_parameters(), fused=False).step(model.losses(items, labels))
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        fresh = torch.zeros_like(p) if q.grad is None else q.grad
        torch.testing.assert_close(p.grad, prior[name] + fresh, rtol=1e-12, atol=1e-14)


def test_single_task_equals_plain_backward():
    torch.manual_seed(2)
    model = TinyMultiTask(num_tasks=1, dtype=torch.float64)
    twin = copy.deepcopy(model)
    items, labels = batch(0, num_tasks=1, dtype=torch.float64)
    MetaBalance(model.shared_parameters(), fused=False).step(model.losses(items, labels))
    twin.losses(items, labels)[0].backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_all_zero_gradients_give_no_nan():
    model = TinyMultiTask()
    mb = MetaBalance(model.shared_parameters(), fused=False)
    items, _ = batch(0)
    hidden = model.bottom(model.embedding(items))
    losses = [(hidden * 0.0).sum() + 0.0 * t for t in range(3)]
    mb.step(losses)
    for p in model.shared_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all() and (p.grad == 0).all()
    assert all(torch.isfinite(mb.state[p]["norm_ema"]).all() for p in model.shared_parameters())


def test_no_graph_survives_step_when_caller_keeps_losses():
    model = TinyMultiTask()
    mb = MetaBalance(model.shared_parameters(), fused=False)
    items, labels = batch(0)
    hidden = model.bottom(model.embedding(items))
    probe = torch.sigmoid(model.towers[0](hidden).squeeze(-1))  # saved by BCE's backward of tower 0
    activation_ref = weakref.ref(probe)
    losses = [nn.functional.binary_cross_entropy(probe, labels[:, 0])]
    losses += [
        nn.functional.binary_cross_entropy_with_logits(model.towers[t](hidden).squeeze(-1), labels[:, t])
        for t in (1, 2)
    ]
    del probe, hidden
    mb.step(losses)
    gc.collect()
    assert activation_ref() is None, "tower 0's saved activation outlived the step: the graph leaked"
    with pytest.raises(RuntimeError):
        losses[0].backward()  # freed: a second backward through it must fail


def _live_tensors(integer: bool = False) -> int:
    """Live tensors: floating (or, with ``integer``, integer) ones."""
    gc.collect()
    return sum(
        1 for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter) and o.is_floating_point() != integer
    )


def test_memory_stays_flat_over_many_steps_with_kept_losses():
    model = TinyMultiTask()
    mb = MetaBalance(model.shared_parameters(), fused=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    kept = []  # a caller logging its losses keeps the tensors
    for step in range(60):
        if step == 10:
            baseline, integer_baseline = _live_tensors(), _live_tensors(integer=True)
        items, labels = batch(step)
        opt.zero_grad(set_to_none=True)
        losses = model.losses(items, labels)
        mb.step(losses)
        opt.step()
        kept.append(losses)
    # The kept losses themselves (3 per step) are the only floating growth allowed.
    growth = _live_tensors() - baseline
    assert growth <= 3 * 50, f"live tensors grew by {growth} over 50 steps"
    # The embedding lookup's gradient is taken at its rows, so its node never runs and keeps the ids it saved (the
    # caller's own batch ids) while the caller keeps the losses: one ids tensor per step, nothing else.
    integer_growth = _live_tensors(integer=True) - integer_baseline
    assert integer_growth <= 50, f"integer tensors grew by {integer_growth} over 50 steps"


@pytest.mark.parametrize("optimizer_cls", [torch.optim.Adam, torch.optim.Adagrad, torch.optim.RMSprop])
def test_design_drop_in_example_trains(optimizer_cls):
    torch.manual_seed(3)
    model = TinyMultiTask()
    mb = MetaBalance(model.shared_parameters(), relax_factor=0.7, beta=0.9, strategy="C")
    optimizer = optimizer_cls(model.parameters(), lr=0.05)
    items, labels = batch(0, size=256)
    first = None
    for _ in range(40):
        optimizer.zero_grad(set_to_none=True)
        losses = model.losses(items, labels)
        first = first if first is not None else losses[0].item()
        mb.step(losses)
        optimizer.step()
    assert model.losses(items, labels)[0].item() < 0.8 * first


# ---- errors: raised before anything is modified -----------------------------------------------------------


def _snapshot(model, mb):
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    state = {id(p): mb.state[p]["norm_ema"].clone() for p in model.shared_parameters() if p in mb.state}
    return grads, state


def _assert_unchanged(model, mb, snap):
    grads, state = snap
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads[n] is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n]), n
    for p in model.shared_parameters():
        if id(p) in state:
            assert torch.equal(mb.state[p]["norm_ema"], state[id(p)])


@pytest.mark.parametrize(
    ("make_losses", "error", "match"),
    [
        (lambda ls: [], ValueError, "empty"),
        (lambda ls: ls[0], TypeError, "list or tuple"),
        (lambda ls: [ls[0].expand(2), ls[1], ls[2]], ValueError, "scalar"),
        (lambda ls: [ls[0].detach(), ls[1], ls[2]], ValueError, "does not require grad"),
        (lambda ls: [ls[0], 1.0, ls[2]], TypeError, "not a tensor"),
        (lambda ls: ls[:2], ValueError, "fixed 3 tasks"),
    ],
)
def test_bad_losses_raise_and_leave_state_untouched(make_losses, error, match):
    model = TinyMultiTask()
    mb = MetaBalance(model.shared_parameters(), fused=False)
    mb.step(model.losses(*batch(0)))  # fixes T = 3 and creates state
    snap = _snapshot(model, mb)
    with pytest.raises(error, match=match):
        mb.step(make_losses(model.losses(*batch(1))))
    _assert_unchanged(model, mb, snap)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"relax_factor": 1.5}, "relax_factor"),
        ({"relax_factor": -0.1}, "relax_factor"),
        ({"beta": 1.0}, "beta"),
        ({"beta": -0.5}, "beta"),
        ({"strategy": "D"}, "strategy"),
        ({"fused": True, "backend": "torch"}, "either"),
        ({"backend": "nope"}, "unknown backend"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetaBalance(TinyMultiTask().shared_parameters(), **kwargs)


def test_param_without_requires_grad_raises():
    frozen = nn.Parameter(torch.ones(3), requires_grad=False)
    with pytest.raises(ValueError, match="does not require grad"):
        MetaBalance([frozen])


def test_table_switching_from_dense_to_sparse_gradients_follows_the_switch():
    """A table switched to sparse=True (or back) between steps gets the balanced gradient in its new kind, with the
    same values and the moving averages carried on."""
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 4).double()
    towers = [nn.Linear(4, 1).double() for _ in range(2)]
    twin = copy.deepcopy(embedding)
    mb = MetaBalance(embedding.parameters(), fused=False)
    reference = MetaBalance(twin.parameters(), fused=False)
    for step, sparse in enumerate([False, True, False]):
        ids = torch.tensor([1, 2, 3, 2 + step])
        embedding.sparse = sparse
        embedding.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        mb.step([tower(embedding(ids)).sum() for tower in towers])
        reference.step([tower(twin.weight[ids]).sum() for tower in towers])  # indexing: the [T, N] workspace
        assert embedding.weight.grad.is_sparse == sparse
        got = embedding.weight.grad.to_dense() if sparse else embedding.weight.grad
        torch.testing.assert_close(got, twin.weight.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(mb.state[embedding.weight]["norm_ema"], reference.state[twin.weight]["norm_ema"])


def test_fused_true_without_fused_kernel_raises(monkeypatch):
    from mb_kernels import dispatch

    monkeypatch.setattr(dispatch, "FUSED_PREFERENCE", {"cpu": ()})
    with pytest.raises(RuntimeError, match="no fused backend serves cpu"):
        MetaBalance(TinyMultiTask().shared_parameters(), fused=True)


# ---- state ------------------------------------------------------------------------------------------


def test_state_dict_round_trip_is_bitwise():
    torch.manual_seed(4)
    model = TinyMultiTask()
    twin = copy.deepcopy(model)

    def train(m, mb, opt, steps):
        for step in steps:
            opt.zero_grad(set_to_none=True)
            mb.step(m.losses(*batch(step)))
            opt.step()

    mb, opt = MetaBalance(model.shared_parameters(), fused=False), torch.optim.Adam(model.parameters())
    train(model, mb, opt, range(6))

    mb2, opt2 = MetaBalance(twin.shared_parameters(), fused=False), torch.optim.Adam(twin.parameters())
    train(twin, mb2, opt2, range(3))
    saved = copy.deepcopy((twin.state_dict(), mb2.state_dict(), opt2.state_dict()))
    fresh_model = TinyMultiTask()
    fresh_model.load_state_dict(saved[0])
    mb3 = MetaBalance(fresh_model.shared_parameters(), fused=False)
    mb3.load_state_dict(saved[1])
    opt3 = torch.optim.Adam(fresh_model.parameters())
    opt3.load_state_dict(saved[2])
    assert mb3.num_tasks == 3
    train(fresh_model, mb3, opt3, range(3, 6))
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.shared_parameters(), fresh_model.shared_parameters()):
        assert torch.equal(mb.state[p]["norm_ema"], mb3.state[q]["norm_ema"])


def test_loaded_state_keeps_float32_ema_for_half_params():
    model = TinyMultiTask(dtype=torch.bfloat16)
    mb = MetaBalance(model.shared_parameters(), fused=False)
    mb.step(model.losses(*batch(0, dtype=torch.bfloat16)))
    mb2 = MetaBalance(model.shared_parameters(), fused=False)
    mb2.load_state_dict(mb.state_dict())
    for p in model.shared_parameters():
        assert mb2.state[p]["norm_ema"].dtype == torch.float32
        assert torch.equal(mb2.state[p]["norm_ema"], mb.state[p]["norm_ema"])


def test_param_groups_carry_their_own_hyperparameters():
    torch.manual_seed(5)
    model = TinyMultiTask(dtype=torch.float64)
    groups = [
        {"params": [model.embedding.weight], "relax_factor": 0.0},
        {"params": list(model.bottom.parameters()), "strategy": "A", "beta": 0.0},
    ]
    mb = MetaBalance(groups, relax_factor=1.0, fused=False)
    items, labels = batch(0, dtype=torch.float64)
    twin = copy.deepcopy(model)
    mb.step(model.losses(items, labels))
    # r = 0 on the embedding: exactly the plain sum of task gradients.
    sum(twin.losses(items, labels)).backward()
    torch.testing.assert_close(model.embedding.weight.grad, twin.embedding.weight.grad, rtol=1e-12, atol=1e-15)
    assert mb.param_groups[1]["strategy"] == "A" and mb.param_groups[1]["relax_factor"] == 1.0


def test_diagnostics_report_norms_and_weights():
    model = TinyMultiTask()
    mb = MetaBalance(model.shared_parameters(), fused=False)
    assert mb.diagnostics() == []
    mb.step(model.losses(*batch(0)))
    rows = mb.diagnostics()
    assert len(rows) == len(model.shared_parameters())
    for row in rows:
        assert row["norm_ema"].shape == (3,) and row["weights"].shape == (3,)
        assert row["weights"][0] == 1.0


def test_step_inside_torch_compile_matches_eager():
    torch.manual_seed(6)
    model = TinyMultiTask()
    twin = copy.deepcopy(model)

    def make(m):
        return MetaBalance(m.shared_parameters(), relax_factor=0.7), torch.optim.SGD(m.parameters(), lr=0.1)

    def train_step(m, mb, opt, items, labels):
        opt.zero_grad(set_to_none=True)
        mb.step(m.losses(items, labels))
        opt.step()

    eager, compiled = make(model), make(twin)
    compiled_step = torch.compile(train_step, fullgraph=False, backend="aot_eager")
    for seed in range(3):
        items, labels = batch(seed)
        train_step(model, *eager, items, labels)
        compiled_step(twin, *compiled, items, labels)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)
    for p, q in zip(model.shared_parameters(), twin.shared_parameters()):
        torch.testing.assert_close(eager[0].state[p]["norm_ema"], compiled[0].state[q]["norm_ema"])


def test_a_table_switched_to_dense_accumulates_onto_its_earlier_sparse_gradient():
    """Accumulation across a switch: a sparse .grad kept from before, then a dense step (and the reverse)."""
    torch.manual_seed(1)
    embedding = nn.Embedding(10, 4, sparse=True).double()
    towers = [nn.Linear(4, 1).double() for _ in range(2)]
    twin = copy.deepcopy(embedding)
    mb = MetaBalance(embedding.parameters(), fused=False)
    reference = MetaBalance(twin.parameters(), fused=False)
    for sparse in (True, False, True):
        ids = torch.tensor([1, 2, 2, 5])
        embedding.sparse = sparse
        mb.step([tower(embedding(ids)).sum() for tower in towers])  # grads never zeroed: they accumulate
        reference.step([tower(twin.weight[ids]).sum() for tower in towers])
        got = embedding.weight.grad.to_dense() if embedding.weight.grad.is_sparse else embedding.weight.grad
        torch.testing.assert_close(got, twin.weight.grad, rtol=1e-12, atol=1e-14)
