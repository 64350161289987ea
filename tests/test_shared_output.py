"""``step(losses, shared_output=h)``: towers backpropagated once each to h, one batched backward through the shared
bottom. It must give the plain ``step(losses)`` results (float64, several models), free the graph, and refuse a bad
h before touching anything."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mb_kernels import MetaBalance
from tests.models import IdentityWithBackward, assert_same_step

# Every test here runs with both ways of backpropagating the shared bottom (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("bottom_backward")

T = 3


class SharedBottom(nn.Module):
    """Embedding + MLP bottom, one tower per task (separate parameters)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(40, 6)
        self.bottom = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8))
        self.towers = nn.ModuleList([nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1)) for _ in range(T)])

    def shared_parameters(self):
        return [*self.embedding.parameters(), *self.bottom.parameters()]

    def losses(self, items, labels):
        h = self.bottom(self.embedding(items))
        out = [F.binary_cross_entropy_with_logits(t(h).squeeze(-1), labels[:, i]) for i, t in enumerate(self.towers)]
        return out, h


class MMoE(nn.Module):
    """Shared experts (balanced); per-task gates from the input (not balanced) and towers."""

    def __init__(self, experts: int = 3):
        super().__init__()
        self.embedding = nn.Embedding(40, 6)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(6, 8), nn.ReLU()) for _ in range(experts)])
        self.gates = nn.ModuleList([nn.Linear(6, experts) for _ in range(T)])
        self.towers = nn.ModuleList([nn.Linear(8, 1) for _ in range(T)])

    def shared_parameters(self):
        return [*self.embedding.parameters(), *self.experts.parameters()]

    def losses(self, items, labels):
        x = self.embedding(items)
        expert_out = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, 8]
        out = []
        for i, (gate, tower) in enumerate(zip(self.gates, self.towers)):
            weights = torch.softmax(gate(x.detach()), dim=-1)  # gates read the input, not the shared graph
            mixed = (weights.unsqueeze(-1) * expert_out).sum(1)
            out.append(F.binary_cross_entropy_with_logits(tower(mixed).squeeze(-1), labels[:, i]))
        return out, expert_out


class TwoOutputs(nn.Module):
    """Two shared branches (user and item), one shared head for all tasks (a tower shared by every loss)."""

    def __init__(self):
        super().__init__()
        self.users = nn.Embedding(30, 5)
        self.items = nn.Embedding(40, 5)
        self.user_mlp = nn.Linear(5, 6)
        self.item_mlp = nn.Linear(5, 6)
        self.head = nn.Linear(12, T)

    def shared_parameters(self):
        return [
            *self.users.parameters(),
            *self.items.parameters(),
            *self.user_mlp.parameters(),
            *self.item_mlp.parameters(),
        ]

    def losses(self, items, labels):
        u = torch.tanh(self.user_mlp(self.users(items % 30)))
        v = torch.tanh(self.item_mlp(self.items(items)))
        logits = self.head(torch.cat([u, v], dim=-1))
        return [F.binary_cross_entropy_with_logits(logits[:, i], labels[:, i]) for i in range(T)], (u, v)


class HTwicePerTower(nn.Module):
    """Separate towers that each take h by two edges (h * h, and h itself), one of them through a node with two
    edges into h: the one-backward tower path must sum every edge of a task."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(40, 6)
        self.bottom = nn.Linear(6, 8)
        self.towers = nn.ModuleList([nn.Linear(8, 1) for _ in range(T)])
        self.scales = nn.Parameter(torch.tensor([0.1, 0.2, 0.3]))

    def shared_parameters(self):
        return [*self.embedding.parameters(), *self.bottom.parameters()]

    def losses(self, items, labels):
        h = torch.tanh(self.bottom(self.embedding(items)))
        out = []
        for i, tower in enumerate(self.towers):
            logits = tower(h).squeeze(-1) + self.scales[i] * (h * h).sum(-1)
            out.append(F.binary_cross_entropy_with_logits(logits, labels[:, i]))
        return out, h


class EmbeddingCases(nn.Module):
    """Lookups the capture handles by rows: a padding_idx table looked up twice (duplicates across lookups), a table
    tied to a matmul (dense path: it is reached around its lookup), and a scale_grad_by_freq table."""

    def __init__(self):
        super().__init__()
        self.padded = nn.Embedding(60, 6, padding_idx=3)  # more rows than the 48 ids of a batch
        self.tied = nn.Embedding(40, 6)
        self.by_freq = nn.Embedding(40, 6, scale_grad_by_freq=True)
        self.mix = nn.Linear(6, 8)
        self.towers = nn.ModuleList([nn.Linear(8, 1) for _ in range(T)])

    def shared_parameters(self):
        return [*self.padded.parameters(), *self.tied.parameters(), *self.by_freq.parameters(), *self.mix.parameters()]

    def losses(self, items, labels):
        x = self.padded(items) + self.padded((items * 7) % 40) + self.by_freq(items % 5)
        x = x + self.tied(items) + (x @ self.tied.weight.t())[:, :6]
        h = torch.tanh(self.mix(x))
        out = [F.binary_cross_entropy_with_logits(t(h).squeeze(-1), labels[:, i]) for i, t in enumerate(self.towers)]
        return out, h


def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(0, 40, (24,), generator=gen)
    items[:3] = 3  # the padding row, and duplicates
    labels = (torch.rand(24, T, generator=gen) < 0.4).double()
    return items, labels


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_cls", [SharedBottom, MMoE, TwoOutputs, HTwicePerTower, EmbeddingCases])
@pytest.mark.parametrize(("strategy", "relax", "beta"), [("A", 1.0, 0.0), ("B", 0.5, 0.9), ("C", 0.7, 0.9)])
@pytest.mark.parametrize("fused", [False, None])
def test_shared_output_equals_plain_step(device, model_cls, strategy, relax, beta, fused):
    torch.manual_seed(0)
    plain_model = model_cls().double().to(device)
    fast_model = copy.deepcopy(plain_model)
    kwargs = dict(relax_factor=relax, beta=beta, strategy=strategy, fused=fused)
    plain_mb = MetaBalance(plain_model.shared_parameters(), **kwargs)
    fast_mb = MetaBalance(fast_model.shared_parameters(), **kwargs)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.5)
    fast_opt = torch.optim.SGD(fast_model.parameters(), lr=0.5)
    for step in range(3):
        items, labels = (x.to(device) for x in _batch(step))
        plain_opt.zero_grad(set_to_none=True)
        fast_opt.zero_grad(set_to_none=True)
        plain_mb.step(plain_model.losses(items, labels)[0])
        losses, shared = fast_model.losses(items, labels)
        fast_mb.step(losses, shared_output=shared)
        assert_same_step(plain_model, plain_mb, fast_model, fast_mb)
        plain_opt.step()
        fast_opt.step()


def test_existing_grads_accumulate_as_with_the_plain_step():
    torch.manual_seed(1)
    plain_model = SharedBottom().double()
    fast_model = copy.deepcopy(plain_model)
    for m in (plain_model, fast_model):
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.25)
    items, labels = _batch(5)
    MetaBalance(plain_model.shared_parameters(), fused=False).step(plain_model.losses(items, labels)[0])
    losses, h = fast_model.losses(items, labels)
    MetaBalance(fast_model.shared_parameters(), fused=False).step(losses, shared_output=h)
    for p, q in zip(plain_model.parameters(), fast_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("model_cls", [SharedBottom, TwoOutputs])  # separate towers; a head shared by the losses
def test_no_graph_survives_the_step(model_cls):
    model = model_cls()
    mb = MetaBalance(model.shared_parameters(), fused=False)
    losses, h = model.losses(*_batch(0))
    mb.step(losses, shared_output=h)
    shared = [h] if isinstance(h, torch.Tensor) else list(h)
    for root in (*losses, *(s.sum() for s in shared)):
        with pytest.raises(RuntimeError, match=r"backward through the graph a second time|freed"):
            root.backward()


def _grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("case", ["detached", "around", "no-balanced", "not-a-tensor", "nested", "tower-below"])
def test_bad_shared_output_raises_before_touching_anything(case):
    torch.manual_seed(2)
    model = SharedBottom()
    mb = MetaBalance(model.shared_parameters(), fused=False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    items, labels = _batch(1)
    losses, h = model.losses(items, labels)
    if case == "detached":
        bad, match = h.detach(), "computed from the balanced parameters"
    elif case == "around":
        # A loss that reaches the embedding without passing through h.
        losses = [losses[0], losses[1] + model.embedding.weight.sum() * 1e-3, losses[2]]
        bad, match = h, "without passing through shared_output"
    elif case == "no-balanced":
        # Losses that reach h, and h computed from a tower only.
        bad = torch.tanh(model.towers[0][0](torch.randn(24, 8)))
        losses = [bad.sum() * k for k in (1.0, 2.0, 3.0)]
        match = "does not depend on any balanced parameter"
    elif case == "nested":
        # The towers read h and a tensor computed from h (wide & deep): both passed.
        inner = model.embedding(items)
        h = model.bottom(inner)
        losses = [(t(h).squeeze(-1) + inner.sum(-1)).pow(2).mean() for t in model.towers]
        bad, match = [inner, h], "computed from another one"
    elif case == "tower-below":
        # A tower's first layer is also used inside the bottom.
        first = model.towers[0][0]
        h = model.bottom(model.embedding(items)) + first(model.bottom(model.embedding(items))).sum(-1, keepdim=True)
        losses = [t(h).pow(2).mean() for t in model.towers]
        bad, match = h, "used both above and below shared_output"
    else:
        bad, match = [h, 3.0], "must be a tensor"
    before = _grads(model)
    with pytest.raises(ValueError, match=match):
        mb.step(losses, shared_output=bad)
    for got, want in zip(_grads(model), before):
        assert torch.equal(got, want)
    assert mb.num_tasks is None


def test_lookups_are_cut_at_their_rows_only_where_that_is_exact():
    from mb_kernels.capture_shared import plan_through

    model = EmbeddingCases()
    losses, h = model.losses(*_batch(0))
    lookups = plan_through(losses, [h], {id(p) for p in model.shared_parameters()}).lookups
    assert set(lookups) == {id(model.padded.weight), id(model.by_freq.weight)}  # tied: reached around its lookup
    assert len(lookups[id(model.padded.weight)]) == 2


def test_looked_up_tables_get_no_dense_per_task_workspace():
    """With shared_output a table reached through lookups only is balanced by its rows: no [T, V, d] workspace."""
    model = SharedBottom()
    mb = MetaBalance(model.shared_parameters(), fused=None)
    losses, h = model.losses(*_batch(0))
    mb.step(losses, shared_output=h)
    workspace = sum(bucket.task_grads.numel() for _, bucket in mb._buckets)
    bottom = sum(p.numel() for p in model.bottom.parameters())
    assert workspace == T * bottom
    assert [p for _, bucket in mb._tables for p in bucket.params] == [model.embedding.weight]
    assert model.embedding.weight.grad.layout == torch.strided


def test_alternating_plain_and_shared_steps_continue_the_same_averages():
    """Plain and shared_output steps alternating on one balancer: the plain step's results every step."""
    torch.manual_seed(4)
    plain_model = TwoOutputs().double()
    mixed_model = copy.deepcopy(plain_model)
    plain_mb = MetaBalance(plain_model.shared_parameters(), fused=None)
    mixed_mb = MetaBalance(mixed_model.shared_parameters(), fused=None)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.5)
    mixed_opt = torch.optim.SGD(mixed_model.parameters(), lr=0.5)
    for step in range(5):
        items, labels = _batch(step)
        plain_opt.zero_grad(set_to_none=True)
        mixed_opt.zero_grad(set_to_none=True)
        plain_mb.step(plain_model.losses(items, labels)[0])
        losses, shared = mixed_model.losses(items, labels)
        if step % 2:
            mixed_mb.step(losses)
        else:
            mixed_mb.step(losses, shared_output=shared)
        assert_same_step(plain_model, plain_mb, mixed_model, mixed_mb)
        plain_opt.step()
        mixed_opt.step()
    assert mixed_mb.state_dict()["state"].keys() == plain_mb.state_dict()["state"].keys()


@pytest.mark.parametrize(
    ("model_cls", "one_backward"), [(SharedBottom, True), (MMoE, True), (HTwicePerTower, True), (TwoOutputs, False)]
)
def test_separate_towers_take_one_backward(model_cls, one_backward):
    """Towers without a common node are backpropagated in one pass (their gradients at h read per task at the
    edges into h); a head shared by the losses needs one pass per loss."""
    from mb_kernels.capture_shared import plan_through

    model = model_cls()
    losses, h = model.losses(*_batch(0))
    shared = [h] if isinstance(h, torch.Tensor) else list(h)
    plan = plan_through(losses, shared, {id(p) for p in model.shared_parameters()})
    assert (plan.tower_consumers is not None) == one_backward


class LookupsOrIndexing(nn.Module):
    """Two tables looked up (one with padding_idx, looked up twice) and a tower per task; ``by_index`` reads the same
    rows by indexing the weights instead (autograd's dense gradient, the [T, N] workspace path)."""

    def __init__(self, by_index: bool):
        super().__init__()
        self.by_index = by_index
        self.users = nn.Embedding(30, 5)
        self.items = nn.Embedding(80, 5, padding_idx=3)  # more rows than the ids of a step: cut at its rows
        self.mix = nn.Linear(5, 8)
        self.towers = nn.ModuleList([nn.Linear(8, 1) for _ in range(T)])

    def shared_parameters(self):
        return [self.users.weight, self.items.weight, *self.mix.parameters()]

    def _items(self, ids):
        if not self.by_index:
            return self.items(ids)
        rows = self.items.weight[ids]
        return torch.where((ids == 3)[:, None], rows.detach(), rows)  # the padding row gets no gradient

    def losses(self, items, labels):
        users = self.users.weight[items % 30] if self.by_index else self.users(items % 30)
        h = torch.tanh(self.mix(users * self._items(items) + self._items((items * 7) % 40)))
        out = [F.binary_cross_entropy_with_logits(t(h).squeeze(-1), labels[:, i]) for i, t in enumerate(self.towers)]
        return out, h


@pytest.mark.parametrize("shared_output", [False, True])
@pytest.mark.parametrize(("strategy", "relax", "beta"), [("A", 1.0, 0.0), ("C", 0.7, 0.9)])
@pytest.mark.parametrize("fused", [False, None])
def test_looked_up_tables_balance_like_the_workspace_path(shared_output, strategy, relax, beta, fused):
    """Tables balanced by their looked-up rows (plain step and shared_output) against the same tables read by
    indexing, which autograd gives dense gradients that go through the [T, N] workspace: float64, three steps."""
    torch.manual_seed(5)
    rows_model = LookupsOrIndexing(by_index=False).double()
    index_model = LookupsOrIndexing(by_index=True).double()
    index_model.load_state_dict(rows_model.state_dict())
    kwargs = dict(relax_factor=relax, beta=beta, strategy=strategy, fused=fused)
    rows_mb = MetaBalance(rows_model.shared_parameters(), **kwargs)
    index_mb = MetaBalance(index_model.shared_parameters(), **kwargs)
    rows_opt = torch.optim.SGD(rows_model.parameters(), lr=0.5)
    index_opt = torch.optim.SGD(index_model.parameters(), lr=0.5)
    for step in range(3):
        items, labels = _batch(step)
        rows_opt.zero_grad(set_to_none=True)
        index_opt.zero_grad(set_to_none=True)
        losses, h = rows_model.losses(items, labels)
        rows_mb.step(losses, shared_output=h if shared_output else None)
        index_mb.step(index_model.losses(items, labels)[0])
        assert_same_step(index_model, index_mb, rows_model, rows_mb)
        rows_opt.step()
        index_opt.step()
    assert [p for _, bucket in rows_mb._tables for p in bucket.params] == [
        rows_model.users.weight,
        rows_model.items.weight,
    ]
    assert not index_mb._tables  # indexing: the workspace path


@pytest.mark.parametrize("model_cls", [SharedBottom, TwoOutputs])  # separate towers; a head shared by the losses
def test_a_tensor_passed_twice_counts_once(model_cls):
    torch.manual_seed(6)
    plain_model = model_cls().double()
    fast_model = copy.deepcopy(plain_model)
    items, labels = _batch(2)
    MetaBalance(plain_model.shared_parameters(), fused=False).step(plain_model.losses(items, labels)[0])
    losses, h = fast_model.losses(items, labels)
    shared = [h, h] if isinstance(h, torch.Tensor) else [*h, h[0]]
    MetaBalance(fast_model.shared_parameters(), fused=False).step(losses, shared_output=shared)
    for p, q in zip(plain_model.parameters(), fast_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-13)


def test_a_table_a_batch_skips_stays_balanced_by_rows():
    """A step that does not look a table up keeps it in its row bucket: no rebuild, no [T, V, d] workspace, the
    same results as the workspace path (indexing)."""
    torch.manual_seed(7)
    rows_model = LookupsOrIndexing(by_index=False).double()
    index_model = LookupsOrIndexing(by_index=True).double()
    index_model.load_state_dict(rows_model.state_dict())
    rows_mb = MetaBalance(rows_model.shared_parameters(), fused=None)
    index_mb = MetaBalance(index_model.shared_parameters(), fused=None)
    for step in range(4):
        items, labels = _batch(step)
        for model in (rows_model, index_model):
            model.zero_grad(set_to_none=True)
        if step == 2:  # the users table is not looked up
            losses = [t(torch.tanh(rows_model.mix(rows_model.items(items)))).pow(2).mean() for t in rows_model.towers]
            twins = [
                t(torch.tanh(index_model.mix(index_model._items(items)))).pow(2).mean() for t in index_model.towers
            ]
        else:
            losses, twins = rows_model.losses(items, labels)[0], index_model.losses(items, labels)[0]
        rows_mb.step(losses)
        index_mb.step(twins)
        if step == 0:
            built = rows_mb._buckets
        assert rows_mb._buckets is built  # never rebuilt
        assert_same_step(index_model, index_mb, rows_model, rows_mb)


def _scaled_by_frequency(weight, ids, padding_idx=None):
    """``weight[ids]`` whose backward gives each row's gradient over how often its id occurs in ``ids`` (none for
    the padding id): ``scale_grad_by_freq`` as documented, by indexing (the reference)."""
    scale = 1.0 / (ids[:, None] == ids[None, :]).sum(1).double()
    if padding_idx is not None:
        scale = scale * (ids != padding_idx)
    rows = weight[ids]
    return rows * scale[:, None] + (rows * (1 - scale[:, None])).detach()


class ByFrequency(nn.Module):
    """``scale_grad_by_freq`` lookups: a padded table looked up twice (counted per lookup), a weighted sum bag and
    a mean bag of 2 ids each. ``by_index``: the same by indexing, the gradients scaled by :func:`_scaled_by_frequency`
    (the reference; PyTorch 2.13's CPU embedding-bag backward divides some rows by another id's count,
    pytorch/pytorch#190063, where CUDA and the documentation divide by the row's own)."""

    def __init__(self, by_index: bool):
        super().__init__()
        self.by_index = by_index
        self.items = nn.Embedding(60, 6, padding_idx=3, scale_grad_by_freq=True)
        self.summed = nn.EmbeddingBag(50, 6, mode="sum", scale_grad_by_freq=True)
        self.averaged = nn.EmbeddingBag(50, 6, mode="mean", scale_grad_by_freq=True)
        self.mix = nn.Linear(6, 8)
        self.towers = nn.ModuleList([nn.Linear(8, 1) for _ in range(T)])

    def shared_parameters(self):
        return [self.items.weight, self.summed.weight, self.averaged.weight, *self.mix.parameters()]

    def losses(self, items, labels):
        bags = items.reshape(-1, 2) % 7  # few distinct ids: high counts
        weights = torch.linspace(0.5, 1.5, bags.numel(), dtype=torch.float64, device=items.device).reshape(bags.shape)
        if self.by_index:
            x = _scaled_by_frequency(self.items.weight, items, 3)
            x = x + _scaled_by_frequency(self.items.weight, (items * 7) % 40, 3)
            ids = bags.reshape(-1)
            summed = (_scaled_by_frequency(self.summed.weight, ids) * weights.reshape(-1, 1)).reshape(-1, 2, 6).sum(1)
            averaged = _scaled_by_frequency(self.averaged.weight, ids).reshape(-1, 2, 6).mean(1)
        else:
            x = self.items(items) + self.items((items * 7) % 40)
            summed, averaged = self.summed(bags, per_sample_weights=weights), self.averaged(bags)
        x = x + summed.repeat_interleave(2, 0) + averaged.repeat(2, 1)
        h = torch.tanh(self.mix(x))
        out = [F.binary_cross_entropy_with_logits(t(h).squeeze(-1), labels[:, i]) for i, t in enumerate(self.towers)]
        return out, h


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared_output", [False, True], ids=["plain", "shared_output"])
@pytest.mark.parametrize(("strategy", "relax", "beta"), [("A", 1.0, 0.0), ("C", 0.7, 0.9)])
def test_scale_grad_by_freq_lookups_by_rows_match_autograd(device, shared_output, strategy, relax, beta):
    torch.manual_seed(0)
    reference = ByFrequency(by_index=True).double().to(device)
    model = ByFrequency(by_index=False).double().to(device)
    model.load_state_dict(reference.state_dict())
    kwargs = dict(relax_factor=relax, beta=beta, strategy=strategy, fused=None)
    reference_mb, mb = (
        MetaBalance(reference.shared_parameters(), **kwargs),
        MetaBalance(model.shared_parameters(), **kwargs),
    )
    for step in range(3):
        items, labels = (x.to(device) for x in _batch(step))
        for m in (reference, model):
            m.zero_grad(set_to_none=True)
        reference_mb.step(reference.losses(items, labels)[0])
        losses, h = model.losses(items, labels)
        mb.step(losses, shared_output=h if shared_output else None)
        assert mb._tables and not reference_mb._tables  # by rows here, through the workspace there
        assert_same_step(reference, reference_mb, model, mb)
        with torch.no_grad():
            for m in (reference, model):
                for p in m.parameters():
                    p -= 0.5 * p.grad


class RegularisedTable(nn.Module):
    """A table of 2**20 elements looked up, and (``regularised``) also penalised as a whole: its gradient is then
    dense, so it goes through the workspace, which MetaBalance says once per layout."""

    def __init__(self, regularised: bool):
        super().__init__()
        self.regularised = regularised
        self.table = nn.Embedding(4096, 256)
        self.towers = nn.ModuleList([nn.Linear(256, 1) for _ in range(T)])

    def shared_parameters(self):
        return [self.table.weight]

    def losses(self, items, labels):
        h = torch.tanh(self.table(items))
        penalty = 1e-4 * self.table.weight.pow(2).sum() if self.regularised else 0.0
        return [
            F.binary_cross_entropy_with_logits(t(h).squeeze(-1), labels[:, i]) + penalty
            for i, t in enumerate(self.towers)
        ]


@pytest.mark.parametrize("regularised", [False, True])
def test_a_large_table_kept_dense_by_another_use_is_reported_once(regularised):
    model = RegularisedTable(regularised)
    mb = MetaBalance(model.shared_parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2):
            mb.step(model.losses(*_batch(step)))
    reports = [w for w in caught if "balanced through a dense per-task workspace" in str(w.message)]
    if not regularised:
        assert not reports and [p for _, b in mb._tables for p in b.params] == [model.table.weight]
        return
    assert len(reports) == 1, "once per layout"
    assert "(4096, 256)" in str(reports[0].message) and "PowBackward0" in str(reports[0].message)
    assert not mb._tables  # the workspace, as reported


class _Cube(torch.autograd.Function):
    """x**3 with a hand-written backward that branches on a value (which vmap cannot batch)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if not bool(grad.isfinite().all()):
            return torch.zeros_like(grad)
        return grad * 3 * x**2


class _CustomFunctionBottom(SharedBottom):
    def losses(self, items, labels):
        h = _Cube.apply(self.bottom(self.embedding(items)))
        out = [F.binary_cross_entropy_with_logits(t(h).squeeze(-1), labels[:, i]) for i, t in enumerate(self.towers)]
        return out, h


def test_a_backward_that_branches_on_values_runs_only_per_task(bottom_backward):
    """One backward per task runs any backward: the same step as without shared_output. The batched backward
    cannot branch on a value: a clear error, every .grad and average as before."""
    torch.manual_seed(5)
    model = _CustomFunctionBottom().double()
    twin = copy.deepcopy(model)
    mb = MetaBalance(model.shared_parameters(), strategy="C", relax_factor=0.7, beta=0.9, fused=None)
    mb_twin = MetaBalance(twin.shared_parameters(), strategy="C", relax_factor=0.7, beta=0.9, fused=None)
    for step in range(2):
        items, labels = _batch(step)
        mb_twin.step(twin.losses(items, labels)[0])
        losses, h = model.losses(items, labels)
        if bottom_backward == "per_task" or step == 0:
            mb.step(losses, shared_output=h) if bottom_backward == "per_task" else mb.step(losses)
            assert_same_step(twin, mb_twin, model, mb)
            continue
        before = _grads(model)
        averages = {id(p): mb.state[p]["norm_ema"].clone() for p in model.shared_parameters()}
        with pytest.raises(RuntimeError, match="batched backward through the shared bottom failed"):
            mb.step(losses, shared_output=h)
        for got, want in zip(_grads(model), before):
            assert torch.equal(got, want)
        for p in model.shared_parameters():
            assert torch.equal(mb.state[p]["norm_ema"], averages[id(p)])


def _zero_as_none(grad):
    """None (autograd's zero) for an all-zero gradient."""
    return None if not bool(grad.any()) else grad


@pytest.mark.parametrize("idle_task", [0, 2])
def test_a_task_whose_backward_gives_none_in_the_bottom(bottom_backward, idle_task):
    """A task that does not reach h gets a zero gradient there; a custom Function turns it into None for that task
    only. Per task: the other tasks' gradients all count (as in the plain step); batched: a clear error."""
    torch.manual_seed(6)
    embedding, bottom = nn.Embedding(40, 6).double(), nn.Linear(6, 8).double()
    towers = nn.ModuleList([nn.Linear(8, 1) for _ in range(T)]).double()
    shared = [embedding.weight, *bottom.parameters()]
    mb, mb_twin = MetaBalance(shared, relax_factor=0.5, beta=0.9), MetaBalance(shared, relax_factor=0.5, beta=0.9)
    items, labels = _batch(0)

    def losses():
        h = IdentityWithBackward.apply(torch.tanh(bottom(embedding(items))), _zero_as_none)
        out = [F.binary_cross_entropy_with_logits(t(h).squeeze(-1), labels[:, i]) for i, t in enumerate(towers)]
        out[idle_task] = towers[idle_task].weight.pow(2).sum()  # reaches no balanced parameter, not h
        return out, h

    mb_twin.step(losses()[0])
    expected = [p.grad.clone() for p in shared]
    for p in [*shared, *towers.parameters()]:
        p.grad = None
    out, h = losses()
    if bottom_backward == "batched":
        with pytest.raises(RuntimeError, match="batched backward through the shared bottom failed"):
            mb.step(out, shared_output=h)
        assert all(p.grad is None for p in shared)
        return
    mb.step(out, shared_output=h)
    for p, want in zip(shared, expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-15)


class _ConcatenatedLogits(SharedBottom):
    """Separate towers whose logits are concatenated, each loss reading its column (as a model's forward often
    returns them): every loss reaches every tower through the cat."""

    def losses(self, items, labels):
        h = self.bottom(self.embedding(items))
        logits = torch.cat([t(h) for t in self.towers], dim=-1)
        return [F.binary_cross_entropy_with_logits(logits[:, i], labels[:, i]) for i in range(T)], h


@pytest.mark.parametrize("model_cls", [_ConcatenatedLogits, SharedBottom, MMoE, TwoOutputs, HTwicePerTower])
def test_losses_that_split_one_tensor_of_all_towers_are_reported_once(model_cls):
    """The towers then take one pass per loss, each through every tower (a slow path that reading each loss from its
    own tower's output avoids): a warning on the first step, naming the node. Separate towers and a head shared by
    every loss (TwoOutputs: real shared computation) get none."""
    torch.manual_seed(7)
    model = model_cls().double()
    mb = MetaBalance(model.shared_parameters())
    for step in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses, h = model.losses(*_batch(step))
            mb.step(losses, shared_output=h)
        reported = [str(w.message) for w in caught if "meet above shared_output" in str(w.message)]
        if model_cls is _ConcatenatedLogits and step == 0:
            assert len(reported) == 1 and "CatBackward" in reported[0] and "own tower's output" in reported[0]
        else:
            assert reported == []


@pytest.mark.parametrize("sparse", [False, True])
def test_a_shared_output_no_loss_uses_gives_no_gradient(sparse):
    """Two shared branches, the losses read one: the other branch's parameters keep .grad None, as with the plain
    step and sum(losses).backward() (a zero gradient would move them under Adam's momentum or weight decay)."""
    torch.manual_seed(8)
    used, unused = nn.Embedding(40, 4, sparse=sparse).double(), nn.Embedding(40, 4, sparse=sparse).double()
    layer, towers = nn.Linear(4, 4).double(), nn.ModuleList([nn.Linear(4, 1) for _ in range(T)]).double()
    mb = MetaBalance([used.weight, unused.weight, *layer.parameters()])
    items = _batch(0)[0]
    a, b = torch.tanh(layer(used(items))), unused(items)
    mb.step([t(a).pow(2).mean() * (i + 1) for i, t in enumerate(towers)], shared_output=[a, b])
    assert unused.weight.grad is None
    assert used.weight.grad is not None and layer.weight.grad is not None


def test_a_compiled_region_that_hides_the_lookups_is_reported():
    """torch.compile makes a whole forward one autograd node: a table looked up inside it cannot be balanced by rows
    (a warning says so and what to do), and shared_output computed inside it is no boundary (the error says why).
    Compiling only the layers after the lookups keeps both working."""
    torch.manual_seed(9)
    table, layer = nn.Embedding(1 << 17, 8), nn.Linear(8, 8)
    towers = nn.ModuleList([nn.Linear(8, 1) for _ in range(T)])
    items = torch.randint(0, 1 << 17, (64,))

    def whole(ids):
        h = torch.relu(layer(table(ids)))
        return [t(h).pow(2).mean() for t in towers], h

    def after_lookups(x):
        h = torch.relu(layer(x))
        return [t(h).pow(2).mean() for t in towers], h

    torch._dynamo.reset()
    compiled = torch.compile(whole, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mb = MetaBalance([table.weight, *layer.parameters()])
        mb.step(compiled(items)[0])
    reports = [str(w.message) for w in caught if "torch.compile'd region" in str(w.message)]
    assert len(reports) == 1 and "(131072, 8)" in reports[0] and "outside the compiled region" in reports[0]
    losses, h = compiled(items)
    with pytest.raises(ValueError, match="compile the bottom and the towers separately"):
        MetaBalance([table.weight, *layer.parameters()]).step(losses, shared_output=h)
    compiled_after = torch.compile(after_lookups, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mb = MetaBalance([table.weight, *layer.parameters()])
        mb.step(compiled_after(table(items))[0])
    assert not [w for w in caught if "torch.compile'd region" in str(w.message)]
    assert [p for _, bucket in mb._tables for p in bucket.params] == [table.weight]  # balanced by rows
    torch._dynamo.reset()
