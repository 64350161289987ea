"""Balanced embedding tables with sparse gradients (``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True``):
the same balancing as the dense-gradient twin (float64), a sparse balanced gradient over the union of touched rows,
accepted by SparseAdam, Adagrad and SGD."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mb_kernels import MetaBalance
from tests.models import assert_same_step

# Every test here runs with both ways of backpropagating the shared bottom (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("bottom_backward")

T = 3


class SparseRecommender(nn.Module):
    """Two tables (an Embedding with padding_idx, an EmbeddingBag with per-sample weights), a shared MLP (dense), one
    tower per task; task 2 also looks up rows of its own (rows touched by one task only)."""

    def __init__(self, sparse: bool):
        super().__init__()
        self.items = nn.Embedding(60, 6, padding_idx=0, sparse=sparse)
        self.history = nn.EmbeddingBag(50, 6, mode="sum", sparse=sparse)
        self.mlp = nn.Linear(6, 8)
        self.towers = nn.ModuleList([nn.Linear(8, 1) for _ in range(T)])

    def shared_parameters(self):
        return [self.items.weight, self.history.weight, *self.mlp.parameters()]

    def tables(self):
        return [self.items.weight, self.history.weight]

    def losses(self, batch):
        items, bags, offsets, weights, extra, labels = batch
        x = self.items(items) + self.history(bags, offsets, per_sample_weights=weights)
        h = torch.tanh(self.mlp(x))
        out = []
        for t, tower in enumerate(self.towers):
            logits = tower(h).squeeze(-1)
            if t == 2:  # rows only task 2 touches (possibly none: an empty lookup)
                logits = logits + self.items(extra).sum() * 0.1
            out.append(F.binary_cross_entropy_with_logits(logits, labels[:, t]))
        return out


def _batch(seed: int, empty_extra: bool = False):
    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(0, 30, (16,), generator=gen)
    items[:4] = torch.tensor([0, 5, 5, 5])  # the padding row and duplicates
    bags = torch.randint(0, 50, (40,), generator=gen)
    offsets = torch.sort(torch.randint(0, 40, (16,), generator=gen)).values
    offsets[0] = 0
    weights = torch.rand(40, generator=gen, dtype=torch.float64)
    extra = torch.empty(0, dtype=torch.int64) if empty_extra else torch.randint(30, 60, (5,), generator=gen)
    labels = (torch.rand(16, T, generator=gen) < 0.4).double()
    return items, bags, offsets, weights, extra, labels


def _twins():
    torch.manual_seed(0)
    sparse = SparseRecommender(sparse=True).double()
    dense = SparseRecommender(sparse=False).double()
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize(("strategy", "relax", "beta"), [("A", 1.0, 0.0), ("B", 0.5, 0.9), ("C", 0.7, 0.9)])
@pytest.mark.parametrize("fused", [False, None])
def test_sparse_tables_balance_like_their_dense_twins(strategy, relax, beta, fused, device):
    sparse_model, dense_model = (m.to(device) for m in _twins())
    kwargs = dict(relax_factor=relax, beta=beta, strategy=strategy, fused=fused)
    mb_sparse = MetaBalance(sparse_model.shared_parameters(), **kwargs)
    mb_dense = MetaBalance(dense_model.shared_parameters(), **kwargs)
    opt_sparse = torch.optim.SGD(sparse_model.parameters(), lr=0.3)
    opt_dense = torch.optim.SGD(dense_model.parameters(), lr=0.3)
    for step in range(4):
        batch = tuple(x.to(device) for x in _batch(step, empty_extra=step == 2))
        for model, mb, opt in ((sparse_model, mb_sparse, opt_sparse), (dense_model, mb_dense, opt_dense)):
            opt.zero_grad(set_to_none=True)
            mb.step(model.losses(batch))
        assert_same_step(dense_model, mb_dense, sparse_model, mb_sparse)
        for p in sparse_model.tables():
            assert p.grad.is_sparse and p.grad.is_coalesced()
            touched = p.grad._indices()[0]
            assert touched.numel() == touched.unique().numel() <= 16 + 40 + 5  # union of rows, never [V, d]
        opt_sparse.step()
        opt_dense.step()


@pytest.mark.parametrize("make_optimizer", ["SparseAdam", "Adagrad", "SGD"])
def test_optimizers_accept_the_balanced_sparse_gradient(make_optimizer):
    model, _ = _twins()
    mb = MetaBalance(model.shared_parameters(), fused=False)
    tables = model.tables()
    dense = [p for p in model.parameters() if all(p is not t for t in tables)]
    table_opt = getattr(torch.optim, make_optimizer)(tables, lr=0.1)
    dense_opt = torch.optim.Adam(dense, lr=0.01)
    before = [p.detach().clone() for p in tables]
    for step in range(3):
        table_opt.zero_grad(set_to_none=True)
        dense_opt.zero_grad(set_to_none=True)
        mb.step(model.losses(_batch(step)))
        table_opt.step()
        dense_opt.step()
    for p, old in zip(tables, before):
        assert not torch.equal(p.detach(), old)


def test_accumulates_onto_an_existing_sparse_gradient_and_round_trips_state():
    model, _ = _twins()
    mb = MetaBalance(model.shared_parameters(), fused=False)
    mb.step(model.losses(_batch(0)))
    first = model.items.weight.grad.to_dense().clone()
    mb2 = MetaBalance(model.shared_parameters(), fused=False)
    mb2.load_state_dict(mb.state_dict())
    mb.step(model.losses(_batch(1)))  # adds onto the existing sparse grad
    assert model.items.weight.grad.is_sparse
    assert not torch.equal(model.items.weight.grad.to_dense(), first)
    assert mb2.num_tasks == T
    rows = {d["param"].shape: d["weights"] for d in mb.diagnostics()}
    assert (60, 6) in rows and rows[(60, 6)].shape == (T,)


class SparseLookups(nn.Module):
    """nn.Embedding tables only (one with padding_idx, looked up twice), for shared_output."""

    def __init__(self, sparse: bool):
        super().__init__()
        self.users = nn.Embedding(40, 6, sparse=sparse)
        self.items = nn.Embedding(60, 6, padding_idx=0, sparse=sparse)
        self.mlp = nn.Linear(6, 8)
        self.towers = nn.ModuleList([nn.Linear(8, 1) for _ in range(T)])

    def shared_parameters(self):
        return [self.users.weight, self.items.weight, *self.mlp.parameters()]

    def losses(self, batch):
        items, _, _, _, _, labels = batch
        h = torch.tanh(self.mlp(self.users(items % 40) * self.items(items) + self.items((items * 3) % 60)))
        out = [F.binary_cross_entropy_with_logits(t(h).squeeze(-1), labels[:, i]) for i, t in enumerate(self.towers)]
        return out, h


@pytest.mark.parametrize("strategy", ["A", "C"])
def test_sparse_tables_with_shared_output_equal_the_dense_plain_step(strategy):
    torch.manual_seed(3)
    sparse_model = SparseLookups(sparse=True).double()
    dense_model = SparseLookups(sparse=False).double()
    dense_model.load_state_dict(sparse_model.state_dict())
    mb_sparse = MetaBalance(sparse_model.shared_parameters(), strategy=strategy, fused=None)
    mb_dense = MetaBalance(dense_model.shared_parameters(), strategy=strategy, fused=False)
    for step in range(3):
        batch = _batch(step)
        for m in (sparse_model, dense_model):
            m.zero_grad(set_to_none=True)
        losses, h = sparse_model.losses(batch)
        mb_sparse.step(losses, shared_output=h)
        mb_dense.step(dense_model.losses(batch)[0])
        for p, q in zip(sparse_model.parameters(), dense_model.parameters()):
            got = p.grad.to_dense() if p.grad.is_sparse else p.grad
            torch.testing.assert_close(got, q.grad, rtol=1e-10, atol=1e-13)
        assert sparse_model.items.weight.grad.is_sparse and sparse_model.users.weight.grad.is_sparse


def test_shared_output_refuses_uncut_sparse_tables_before_any_backward():
    """A sparse table whose rows the step cannot take (scale_grad_by_freq: a row's gradient depends on the batch)."""
    model, _ = _twins()
    model.items.scale_grad_by_freq = True
    mb = MetaBalance(model.shared_parameters(), fused=False)
    items, bags, offsets, weights, _, _ = _batch(0)
    h = torch.tanh(model.mlp(model.items(items) + model.history(bags, offsets, per_sample_weights=weights)))
    losses = [tower(h).sum() for tower in model.towers]
    with pytest.raises(ValueError, match=r"scale_grad_by_freq"):
        mb.step(losses, shared_output=h)
    assert all(p.grad is None for p in model.parameters())


class TiedOrRenormed(nn.Module):
    """A table looked up with max_norm (rows renormalised in the forward) and, optionally, also tied to an output
    projection. ``by_index``: the same rows renormalised and read by indexing (the reference: the workspace)."""

    def __init__(self, sparse: bool, tied: bool = False, by_index: bool = False):
        super().__init__()
        self.sparse, self.tied, self.by_index = sparse, tied, by_index
        self.items = nn.Embedding(40, 6, max_norm=0.5, sparse=sparse)
        self.mlp = nn.Linear(6, 6)
        self.towers = nn.ModuleList([nn.Linear(6, 1) for _ in range(T)])

    def shared_parameters(self):
        return [self.items.weight, *self.mlp.parameters()]

    def losses(self, ids, labels):
        if self.by_index:
            with torch.no_grad():
                torch.embedding_renorm_(self.items.weight, ids, 0.5, 2.0)
            x = self.items.weight[ids]
        else:
            x = self.items(ids)
        if self.tied:
            x = x + (x @ self.items.weight.t())[:, :6]
        h = torch.tanh(self.mlp(x))
        out = [F.binary_cross_entropy_with_logits(t(h).squeeze(-1), labels[:, i]) for i, t in enumerate(self.towers)]
        return out, h


@pytest.mark.parametrize("shared_output", [False, True], ids=["plain", "shared_output"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_max_norm_tables_balance_like_their_indexed_twins(sparse, shared_output):
    torch.manual_seed(6)
    rows_model = TiedOrRenormed(sparse).double()
    rows_model.items.weight.data.mul_(3)  # most rows above max_norm: the renormalisation matters
    index_model = TiedOrRenormed(sparse=False, by_index=True).double()
    index_model.load_state_dict(rows_model.state_dict())
    rows_mb = MetaBalance(rows_model.shared_parameters(), relax_factor=0.7, beta=0.9, fused=None)
    index_mb = MetaBalance(index_model.shared_parameters(), relax_factor=0.7, beta=0.9, fused=None)
    rows_opt = torch.optim.SGD(rows_model.parameters(), lr=0.5)
    index_opt = torch.optim.SGD(index_model.parameters(), lr=0.5)
    for step in range(3):
        items, _, _, _, _, labels = _batch(step)
        rows_opt.zero_grad(set_to_none=True)
        index_opt.zero_grad(set_to_none=True)
        losses, h = rows_model.losses(items, labels)
        rows_mb.step(losses, shared_output=h if shared_output else None)
        index_mb.step(index_model.losses(items, labels)[0])
        torch.testing.assert_close(rows_model.items.weight, index_model.items.weight, rtol=0, atol=0)
        assert_same_step(index_model, index_mb, rows_model, rows_mb)
        assert rows_model.items.weight.grad.is_sparse == sparse
        rows_opt.step()
        index_opt.step()
    assert [p for _, bucket in rows_mb._tables for p in bucket.params] == [rows_model.items.weight]


@pytest.mark.parametrize("shared_output", [False, True], ids=["plain", "shared_output"])
def test_a_sparse_table_also_used_densely_is_refused_before_any_backward(shared_output):
    """Tied to an output projection, a sparse=True table would get a dense gradient: a clear error, nothing changed."""
    torch.manual_seed(7)
    model = TiedOrRenormed(sparse=True, tied=True).double()
    mb = MetaBalance(model.shared_parameters(), fused=None)
    items, _, _, _, _, labels = _batch(0)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    losses, h = model.losses(items, labels)
    with pytest.raises(ValueError, match=r"sparse=True and also used otherwise"):
        mb.step(losses, shared_output=h if shared_output else None)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert mb.num_tasks is None


def test_a_sparse_lookup_of_a_computed_table_is_a_clear_error():
    """F.embedding(ids, w * 1, sparse=True): a sparse gradient reaches w through an op, which the graph walk does
    not see as a lookup; the pass that meets it names the cause, and every .grad is as before."""
    torch.manual_seed(8)
    w = nn.Parameter(torch.randn(30, 4, dtype=torch.float64))
    mix = nn.Linear(4, 4).double()
    mb = MetaBalance([w, *mix.parameters()], fused=None)
    h = mix(F.embedding(torch.randint(0, 30, (8,)), w * 1, sparse=True))
    with pytest.raises(ValueError, match="through a computation"):
        mb.step([h.sum(), h.square().sum()])
    assert w.grad is None and mix.weight.grad is None
