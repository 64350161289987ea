"""``nn.EmbeddingBag`` tables balanced by their looked-up rows: in sum mode (per-sample weights, a padding id, empty
bags) and mean mode (2-D fixed-size bags; ``include_last_offset`` with empty bags)
the capture takes the gradient at the bags' output and gives every looked-up id its bag's gradient (times its
weight, over its bag's size). Checked in float64 against the same bags computed by indexing the weights (autograd's
dense gradients through the ``[T, N]`` workspace), plain step and ``shared_output``, dense and sparse tables. Max
mode and learned per-sample weights are left to autograd (the workspace, or sparse gradients in the plain step)."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mb_kernels import MetaBalance
from mb_kernels.capture import _bag_rows, leaf_edges, lookup_only_tables
from tests.models import assert_same_step

# Every test here runs with both ways of backpropagating the shared bottom (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("bottom_backward")

T = 3
B = 12
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _bag_by_index(weight, ids, offsets, mode, weights=None, include_last=False, padding=None):
    """One bag after another by indexing ``weight`` (the reference: dense gradients, no bag node)."""
    ends = offsets[1:].tolist() if include_last else [*offsets[1:].tolist(), ids.numel()]
    out = []
    for begin, end in zip(offsets.tolist(), ends):
        keep = [j for j in range(begin, end) if padding is None or int(ids[j]) != padding]
        rows = weight[ids[keep]]
        if weights is not None:
            rows = rows * weights[keep, None]
        if not keep:
            out.append(weight.new_zeros(weight.shape[1]) + 0 * weight.sum())
        else:
            out.append(rows.sum(0) if mode == "sum" else rows.mean(0))
    return torch.stack(out)


class Bags(nn.Module):
    """Four bag tables and a tower per task. ``by_index`` computes the same bags by indexing (the reference);
    ``learned_weights`` makes the sum table's per-sample weights depend on a parameter (that table is then not cut).
    """

    def __init__(self, by_index: bool, sparse: bool = False, learned_weights: bool = False):
        super().__init__()
        self.by_index, self.learned_weights = by_index, learned_weights
        self.summed = nn.EmbeddingBag(50, 6, mode="sum", padding_idx=4, sparse=sparse)
        self.averaged = nn.EmbeddingBag(40, 6, mode="mean", sparse=sparse)
        self.last_offset = nn.EmbeddingBag(30, 6, mode="mean", include_last_offset=True, sparse=sparse)
        self.maxed = nn.EmbeddingBag(20, 6, mode="max")  # dense: sparse max bags cannot take shared_output
        self.importance = nn.Parameter(torch.zeros(50))
        self.mix = nn.Linear(6, 8)
        self.towers = nn.ModuleList([nn.Linear(8, 1) for _ in range(T)])

    def shared_parameters(self):
        tables = [self.summed.weight, self.averaged.weight, self.last_offset.weight, self.maxed.weight]
        return [*tables, *self.mix.parameters()]

    def losses(self, batch):
        sum_ids, sum_offsets, sum_weights, mean_ids, last_ids, last_offsets, max_ids, labels = batch
        if self.learned_weights:
            sum_weights = sum_weights * torch.sigmoid(self.importance)[sum_ids]
        if self.by_index:
            x = _bag_by_index(self.summed.weight, sum_ids, sum_offsets, "sum", sum_weights, padding=4)
            x = x + self.averaged.weight[mean_ids].mean(1)
            x = x + _bag_by_index(self.last_offset.weight, last_ids, last_offsets, "mean", include_last=True)
        else:
            x = self.summed(sum_ids, sum_offsets, per_sample_weights=sum_weights)
            x = x + self.averaged(mean_ids)
            x = x + self.last_offset(last_ids, last_offsets)
        x = x + self.maxed(max_ids)
        h = torch.tanh(self.mix(x))
        out = [F.binary_cross_entropy_with_logits(t(h).squeeze(-1), labels[:, i]) for i, t in enumerate(self.towers)]
        return out, h


def _batch(seed: int, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    sum_ids = torch.randint(0, 50, (40,), generator=gen)
    sum_ids[:5] = torch.tensor([4, 7, 7, 4, 7])  # the padding id and duplicates
    sum_offsets = torch.sort(torch.randint(0, 40, (B,), generator=gen)).values
    sum_offsets[0] = 0
    sum_offsets[3] = sum_offsets[4]  # an empty bag
    sum_weights = torch.rand(40, generator=gen, dtype=torch.float64)
    mean_ids = torch.randint(0, 40, (B, 3), generator=gen)
    last_ids = torch.randint(0, 30, (30,), generator=gen)
    last_offsets = torch.sort(torch.randint(0, 30, (B + 1,), generator=gen)).values
    last_offsets[0], last_offsets[-1] = 0, 30  # the closing offset
    last_offsets[5] = last_offsets[6]
    max_ids = torch.randint(0, 20, (B, 2), generator=gen)
    labels = (torch.rand(B, T, generator=gen) < 0.4).double()
    batch = (sum_ids, sum_offsets, sum_weights, mean_ids, last_ids, last_offsets, max_ids, labels)
    return tuple(x.to(device) for x in batch)


def _twin_models(sparse: bool, learned_weights: bool = False, device: str = "cpu"):
    torch.manual_seed(4)
    bags = Bags(by_index=False, sparse=sparse, learned_weights=learned_weights).double().to(device)
    indexed = Bags(by_index=True, learned_weights=learned_weights).double().to(device)
    indexed.load_state_dict(bags.state_dict())
    return bags, indexed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared_output", [False, True], ids=["plain", "shared_output"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize(("strategy", "relax", "beta"), [("A", 1.0, 0.0), ("B", 0.5, 0.9), ("C", 0.7, 0.9)])
@pytest.mark.parametrize("fused", [False, None])
def test_bags_balance_like_their_indexed_twins(device, shared_output, sparse, strategy, relax, beta, fused):
    bags, indexed = _twin_models(sparse, device=device)
    kwargs = dict(relax_factor=relax, beta=beta, strategy=strategy, fused=fused)
    bags_mb = MetaBalance(bags.shared_parameters(), **kwargs)
    indexed_mb = MetaBalance(indexed.shared_parameters(), **kwargs)
    bags_opt = torch.optim.SGD(bags.parameters(), lr=0.5)
    indexed_opt = torch.optim.SGD(indexed.parameters(), lr=0.5)
    for step in range(3):
        batch = _batch(step, device)
        bags_opt.zero_grad(set_to_none=True)
        indexed_opt.zero_grad(set_to_none=True)
        losses, h = bags.losses(batch)
        bags_mb.step(losses, shared_output=h if shared_output else None)
        indexed_mb.step(indexed.losses(batch)[0])
        assert_same_step(indexed, indexed_mb, bags, bags_mb)
        for table in (bags.summed, bags.averaged, bags.last_offset):
            assert table.weight.grad.is_sparse == sparse
        bags_opt.step()
        indexed_opt.step()
    # Sum and mean bags are balanced by rows; the max bag and the indexed tables went through the workspace.
    row_tables = [p for _, bucket in bags_mb._tables for p in bucket.params]
    assert row_tables == [bags.summed.weight, bags.averaged.weight, bags.last_offset.weight]
    assert not indexed_mb._tables


@pytest.mark.parametrize("shared_output", [False, True], ids=["plain", "shared_output"])
def test_learned_per_sample_weights_leave_the_bag_to_autograd(shared_output):
    """Per-sample weights that need a gradient: the bag is not cut (its backward also gives the weights theirs)."""
    bags, indexed = _twin_models(sparse=False, learned_weights=True)
    losses, h = bags.losses(_batch(0))
    cut = lookup_only_tables(list(leaf_edges(losses)), {id(p) for p in bags.shared_parameters()})
    assert id(bags.summed.weight) not in cut and id(bags.averaged.weight) in cut
    bags_mb = MetaBalance(bags.shared_parameters(), relax_factor=0.7, fused=None)
    indexed_mb = MetaBalance(indexed.shared_parameters(), relax_factor=0.7, fused=None)
    bags_mb.step(losses, shared_output=h if shared_output else None)
    indexed_mb.step(indexed.losses(_batch(0))[0])
    assert_same_step(indexed, indexed_mb, bags, bags_mb)
    assert bags.importance.grad is not None and bags.importance.grad.abs().sum() > 0


def test_a_bag_lookup_with_no_bags():
    """Zero bags (and so no row) next to a bag table that has some: no gradient for the empty one's rows."""
    torch.manual_seed(0)
    empty = nn.EmbeddingBag(10, 4, mode="mean")
    full = nn.EmbeddingBag(10, 4, mode="sum")
    towers = [nn.Linear(4, 1) for _ in range(T)]
    mb = MetaBalance([empty.weight, full.weight], fused=None)
    # include_last_offset with one offset: zero bags, and ids 0.. in none of them.
    none = F.embedding_bag(
        torch.tensor([1, 2, 3]), empty.weight, torch.tensor([0]), mode="mean", include_last_offset=True
    )
    assert none.shape == (0, 4)
    some = full(torch.tensor([1, 2, 2]), torch.tensor([0, 1]))
    h = torch.cat([none, some])
    mb.step([tower(h).sum() for tower in towers])
    assert torch.count_nonzero(empty.weight.grad) == 0
    assert torch.count_nonzero(full.weight.grad.abs().sum(1)) == 2


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_ids_after_the_closing_offset_get_what_autograd_gives_them(mode):
    """``include_last_offset`` with ids after the closing offset: ATen's forward and backward treat them differently
    per mode (mean: in the last bag for the backward and the bag size, not for the sum). With one task the balanced
    gradient is the task's gradient itself, so it must equal autograd's (float64 rounding aside)."""
    torch.manual_seed(2)
    ours = nn.EmbeddingBag(12, 3, mode=mode, include_last_offset=True).double()
    theirs = nn.EmbeddingBag(12, 3, mode=mode, include_last_offset=True).double()
    theirs.load_state_dict(ours.state_dict())
    ids, offsets = torch.tensor([1, 2, 3, 4, 5, 6, 5]), torch.tensor([0, 2, 2, 4])  # ids 4.. after the last offset
    head = torch.randn(3, dtype=torch.float64)
    MetaBalance([ours.weight], fused=None).step([(ours(ids, offsets) @ head).square().sum()])
    (theirs(ids, offsets) @ head).square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-12, atol=1e-15)


def test_a_small_dense_table_looked_up_more_often_than_it_has_rows_keeps_its_workspace():
    """Rows would cost more than the [T, V, d] workspace there (the count is a shape); sparse tables stay rows."""
    for sparse in (False, True):
        small = nn.EmbeddingBag(10, 3, mode="sum", sparse=sparse)
        large = nn.EmbeddingBag(100, 3, mode="mean", sparse=sparse)
        ids = torch.randint(0, 10, (40,))
        h = small(ids, torch.arange(0, 40, 4)) + large(ids, torch.arange(0, 40, 4))
        cut = lookup_only_tables(list(leaf_edges([h.sum()])), {id(small.weight), id(large.weight)})
        assert (id(small.weight) in cut) == sparse and id(large.weight) in cut


def _fake_bag_node(ids, offsets, offset2bag, bag_size, mode, padding_idx=-1, weights=None):
    """The saved tensors of an EmbeddingBagBackward0 node, shaped as another device's forward saves them."""
    return types.SimpleNamespace(
        _saved_indices=ids,
        _saved_offsets=offsets,
        _saved_result1=offset2bag,
        _saved_result2=bag_size,
        _saved_mode=mode,
        _saved_padding_idx=padding_idx,
        _saved_per_sample_weights=weights,
        _saved_scale_grad_by_freq=False,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mean_bag_sizes_as_cuda_saves_them(dtype):
    """CUDA saves offset2bag for every mode and one bag size per offset (with include_last_offset: one more than
    bags); bags of 300 and 3000 ids (beyond bf16's and half's integers) get exact divisors."""
    for n in (300, 3000):
        ids = torch.arange(n + 2) % 7
        offset2bag = torch.cat([torch.zeros(n, dtype=torch.int64), torch.ones(2, dtype=torch.int64)])
        node = _fake_bag_node(ids, torch.tensor([0, n, n + 2]), offset2bag, torch.tensor([n, 2, 12345]), mode=1)
        grad = torch.ones(1, 2, 4, dtype=dtype)  # [T, bags, d]
        part = _bag_rows(node, grad, torch.zeros(7, 4, dtype=dtype))
        rows, values = part.ids, part.values(1)
        assert part.weight.dtype == values.dtype == torch.float32
        torch.testing.assert_close(values[0, :n], torch.full((n, 4), 1 / n), rtol=1e-6, atol=0)
        torch.testing.assert_close(values[0, n:], torch.full((2, 4), 0.5), rtol=0, atol=0)
        assert torch.equal(rows, ids)


def test_mean_bag_sizes_counted_where_none_were_saved():
    ids = torch.tensor([1, 2, 3, 3, 5])
    node = _fake_bag_node(
        ids, torch.tensor([0, 2]), torch.tensor([0, 0, 1, 1, 1]), torch.zeros(0), mode=1, padding_idx=2
    )
    part = _bag_rows(node, torch.ones(1, 2, 3, dtype=torch.bfloat16), torch.zeros(8, 3))
    rows, values = part.ids, part.values(1)[0]
    assert rows.tolist() == [1, 8, 3, 3, 5]  # the padding id is "no row" (the table's row count)
    torch.testing.assert_close(values[:, 0], torch.tensor([1.0, 1.0, 1 / 3, 1 / 3, 1 / 3]), rtol=1e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_low_precision_bags_match_autograd_with_one_task(dtype, mode):
    """One task: the balanced gradient is the task's own, so it must match autograd's to the dtype's rounding (the
    rows are scaled and summed in float32, autograd works in the table's dtype: tolerance of a few ulps)."""
    torch.manual_seed(3)
    ours = nn.EmbeddingBag(400, 8, mode=mode).to(dtype)
    theirs = nn.EmbeddingBag(400, 8, mode=mode).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 400, (300,))
    offsets = torch.tensor([0, 3, 3, 200, 290])
    weights = torch.rand(300, dtype=dtype) if mode == "sum" else None
    head = torch.randn(8, dtype=dtype)
    MetaBalance([ours.weight], fused=None).step([(ours(ids, offsets, weights) @ head).float().square().sum()])
    (theirs(ids, offsets, weights) @ head).float().square().sum().backward()
    tolerance = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(ours.weight.grad.float(), theirs.weight.grad.float(), rtol=tolerance, atol=tolerance)


def test_a_table_near_its_row_count_does_not_switch_paths_step_after_step():
    """Cut when a step looks up no more ids than the table has rows; once cut, kept up to twice as many (no rebuild
    for counts around the row count); results equal a twin that always takes the workspace, averages kept."""
    torch.manual_seed(0)
    bag, twin = nn.EmbeddingBag(100, 4, mode="sum").double(), nn.EmbeddingBag(100, 4, mode="sum").double()
    twin.load_state_dict(bag.state_dict())
    mix = [nn.Linear(4, 4).double() for _ in range(2)]
    mix[1].load_state_dict(mix[0].state_dict())
    towers = [nn.Linear(4, 1).double() for _ in range(T)]
    mb = MetaBalance([bag.weight, *mix[0].parameters()], relax_factor=0.7, beta=0.9, fused=None)
    twin_mb = MetaBalance([twin.weight, *mix[1].parameters()], relax_factor=0.7, beta=0.9, fused=None)
    gen = torch.Generator().manual_seed(1)
    cut = []
    for count in (90, 150, 250, 150, 90, 190):
        ids = torch.randint(0, 100, (count,), generator=gen)
        offsets = torch.arange(0, count, 10)
        h = torch.tanh(mix[0](bag(ids, offsets)))
        mb.step([t(h).square().mean() for t in towers])
        h = torch.tanh(mix[1](twin(ids, offsets) + 0 * twin.weight.sum()))  # reached around its bag: workspace
        twin_mb.step([t(h).square().mean() for t in towers])
        cut.append(id(bag.weight) in mb._built_for[1])
        torch.testing.assert_close(bag.weight.grad, twin.weight.grad, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(mb.state[bag.weight]["norm_ema"], twin_mb.state[twin.weight]["norm_ema"])
    assert cut == [True, True, False, False, True, True]
