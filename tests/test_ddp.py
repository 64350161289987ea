"""MetaBalance under DistributedDataParallel: 2 processes on CPU with gloo."""

from __future__ import annotations

import contextlib
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mb_kernels import MetaBalance
from tests.models import TinyMultiTask, batch

WORLD = 2
STEPS = 3
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_model(sparse: bool = False):
    torch.manual_seed(0)
    return TinyMultiTask(dtype=torch.float64, padding_idx=3, sparse=sparse)


def _global_batch(step):
    return batch(step, size=2 * 16, dtype=torch.float64)


@contextlib.contextmanager
def _process_group(rank: int, port: int):
    """This spawned process's gloo group of WORLD ranks (one torch thread), destroyed on the way out."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank, port, mode, out_dir, shared_output=False, sparse=False):
    with _process_group(rank, port):
        model = _make_model(sparse)
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        mb = MetaBalance(model.shared_parameters(), relax_factor=0.7, ddp_module=ddp, ddp_mode=mode)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(STEPS):
            items, labels = _global_batch(step)
            shard = slice(rank * 16, (rank + 1) * 16)
            optimizer.zero_grad(set_to_none=True)
            if shared_output:  # lookups cut at their rows: the table balanced by rows gathered from every rank
                # DDP's own forward may hand back copies of its outputs: take losses and h from the module itself
                # (MetaBalance does the reduction; DDP's backward sync is off).
                losses, shared = ddp.module(items[shard], labels[shard], with_shared=True)
                mb.step(losses, shared_output=shared)
            else:
                mb.step(ddp(items[shard], labels[shard]))
            optimizer.step()
        ema = [mb.state[p]["norm_ema"] for p in model.shared_parameters()]
        torch.save({"params": model.state_dict(), "ema": ema}, os.path.join(out_dir, f"rank{rank}.pt"))


def _run(mode, tmp_path, shared_output=False, sparse=False):
    args = (_free_port(), mode, str(tmp_path), shared_output, sparse)
    mp.start_processes(_worker, args=args, nprocs=WORLD, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _single_process():
    model = _make_model()
    mb = MetaBalance(model.shared_parameters(), relax_factor=0.7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        items, labels = _global_batch(step)
        optimizer.zero_grad(set_to_none=True)
        mb.step(model.losses(items, labels))
        optimizer.step()
    return model.state_dict(), [mb.state[p]["norm_ema"] for p in model.shared_parameters()]


@pytest.mark.parametrize(("shared_output", "sparse"), [(False, False), (True, False), (False, True), (True, True)])
def test_exact_mode_equals_single_process_on_concatenated_batch(tmp_path, shared_output, sparse):
    """Workspaces all-reduced, tables balanced by rows (sparse tables; looked-up tables with shared_output) gathered
    from every rank: every rank ends where one process does with the plain step on the concatenated batch."""
    ranks = _run("exact", tmp_path, shared_output, sparse)
    params, ema = _single_process()
    for rank in ranks:
        for name, value in params.items():
            torch.testing.assert_close(rank["params"][name], value, rtol=1e-10, atol=1e-12, msg=name)
        for a, b in zip(rank["ema"], ema):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=0.0)
    for name in params:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), f"{name} differs between ranks"


@pytest.mark.parametrize("sparse", [False, True])
def test_low_comm_mode_keeps_ranks_identical_and_close(tmp_path, sparse):
    ranks = _run("low_comm", tmp_path, sparse=sparse)
    for name in ranks[0]["params"]:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), f"{name} differs between ranks"
    for a, b in zip(ranks[0]["ema"], ranks[1]["ema"]):
        assert torch.equal(a, b)
    # The weights are approximate (mean of per-rank norms), the training direction is not far off.
    params, _ = _single_process()
    start = copy.deepcopy(_make_model().state_dict())
    for name, value in params.items():
        moved = (value - start[name]).norm()
        diff = (ranks[0]["params"][name] - value).norm()
        assert diff <= 0.5 * moved + 1e-12, name


def test_ddp_module_must_be_ddp():
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        MetaBalance(TinyMultiTask().shared_parameters(), ddp_module=torch.nn.Linear(2, 2))


class SkippedTable(nn.Module):
    """A side table looked up only for items < 10, by Python control flow: a rank whose batch has none never
    reaches it, the other does (the ranks' graphs differ)."""

    def __init__(self, sparse: bool):
        super().__init__()
        self.embedding = nn.Embedding(50, 8)
        self.side = nn.Embedding(20, 8, sparse=sparse)
        self.bottom = nn.Linear(8, 8)
        self.towers = nn.ModuleList([nn.Linear(8, 1) for _ in range(3)])

    def shared_parameters(self):
        return [self.embedding.weight, self.side.weight, *self.bottom.parameters()]

    def forward(self, items, labels):
        x = self.embedding(items)
        small = items < 10
        if bool(small.any()):
            x = x + self.side(items % 20) * small[:, None]
        h = torch.tanh(self.bottom(x))
        losses = [F.binary_cross_entropy_with_logits(t(h).squeeze(-1), labels[:, i]) for i, t in enumerate(self.towers)]
        return losses, h


def _skipped_batch(step, rank=None):
    """32 items, 16 per rank; rank 1's never below 10."""
    gen = torch.Generator().manual_seed(100 + step)
    items = torch.cat([torch.randint(0, 50, (16,), generator=gen), torch.randint(10, 50, (16,), generator=gen)])
    labels = (torch.rand(32, 3, generator=gen) < 0.3).double()
    if rank is None:
        return items, labels
    return items[rank * 16 : (rank + 1) * 16], labels[rank * 16 : (rank + 1) * 16]


def _skipped_model(sparse):
    torch.manual_seed(1)
    return SkippedTable(sparse).double()


def _table_kind(kind):
    """(model builder, batch of a step [and rank]) of "skipped" (SkippedTable) or "bags" (BagTables)."""
    return (_skipped_model, _skipped_batch) if kind == "skipped" else (_bag_model, _bag_batch)


def _table_worker(rank, port, out_dir, kind, shared_output, sparse):
    """``kind``: "skipped" (SkippedTable) or "bags" (BagTables), this rank's shard of each step's batch."""
    model, batch_of = _table_kind(kind)
    with _process_group(rank, port):
        model = model(sparse)
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        mb = MetaBalance(model.shared_parameters(), relax_factor=0.7, ddp_module=ddp)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # takes sparse gradients too
        for step in range(STEPS):
            optimizer.zero_grad(set_to_none=True)
            losses, h = model(*batch_of(step, rank))
            mb.step(losses, shared_output=h if shared_output else None)
            optimizer.step()
        ema = [mb.state[p]["norm_ema"] for p in model.shared_parameters()]
        torch.save({"params": model.state_dict(), "ema": ema}, os.path.join(out_dir, f"rank{rank}.pt"))


def _table_ranks_and_one_process(tmp_path, kind, shared_output, sparse):
    """Each rank's saved results from :func:`_table_worker`, and one process's model and moving averages after the
    same steps on the concatenated batches (dense tables, plain step)."""
    args = (_free_port(), str(tmp_path), kind, shared_output, sparse)
    mp.start_processes(_table_worker, args=args, nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    model, batch_of = _table_kind(kind)
    model = model(False)
    mb = MetaBalance(model.shared_parameters(), relax_factor=0.7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        mb.step(model(*batch_of(step))[0])
        optimizer.step()
    return ranks, model, [mb.state[p]["norm_ema"] for p in model.shared_parameters()]


@pytest.mark.parametrize(("shared_output", "sparse"), [(False, False), (True, True)])
def test_ranks_whose_graphs_differ_agree_and_equal_one_process(tmp_path, shared_output, sparse):
    """Rank 1 never looks the side table up: the ranks agree on which tables are balanced by rows (no collective
    mismatch) and end where one process does on the concatenated batch."""
    ranks, model, _ = _table_ranks_and_one_process(tmp_path, "skipped", shared_output, sparse)
    for rank in ranks:
        for name, value in model.state_dict().items():
            torch.testing.assert_close(rank["params"][name], value, rtol=1e-10, atol=1e-12, msg=name)


class BagTables(nn.Module):
    """Two ``nn.EmbeddingBag`` tables (sum with per-sample weights and a padding id; mean), fixed-size bags; more
    rows than a batch looks up, so that dense tables are balanced by rows too."""

    def __init__(self, sparse: bool):
        super().__init__()
        self.history = nn.EmbeddingBag(200, 6, mode="sum", padding_idx=2, sparse=sparse)
        self.tags = nn.EmbeddingBag(100, 6, mode="mean", sparse=sparse)
        self.bottom = nn.Linear(6, 8)
        self.towers = nn.ModuleList([nn.Linear(8, 1) for _ in range(3)])

    def shared_parameters(self):
        return [self.history.weight, self.tags.weight, *self.bottom.parameters()]

    def forward(self, history, weights, tags, labels):
        h = torch.tanh(self.bottom(self.history(history, per_sample_weights=weights) + self.tags(tags)))
        losses = [F.binary_cross_entropy_with_logits(t(h).squeeze(-1), labels[:, i]) for i, t in enumerate(self.towers)]
        return losses, h


def _bag_batch(step, rank=None):
    """32 examples (16 per rank): 4 weighted history ids (duplicates, the padding id) and 3 tags each."""
    gen = torch.Generator().manual_seed(200 + step)
    history = torch.randint(0, 12, (32, 4), generator=gen)
    weights = torch.rand(32, 4, generator=gen, dtype=torch.float64)
    tags = torch.randint(0, 30, (32, 3), generator=gen)
    labels = (torch.rand(32, 3, generator=gen) < 0.3).double()
    full = (history, weights, tags, labels)
    return full if rank is None else tuple(x[rank * 16 : (rank + 1) * 16] for x in full)


def _bag_model(sparse):
    torch.manual_seed(2)
    return BagTables(sparse).double()


@pytest.mark.parametrize(("shared_output", "sparse"), [(False, True), (True, False)])
def test_embedding_bags_under_ddp_equal_one_process(tmp_path, shared_output, sparse):
    """Embedding-bag tables balanced by rows under DDP: each rank's bag rows (its bags' gradients per id, weighted)
    gathered from every rank; every rank ends where one process does on the concatenated batch."""
    ranks, model, ema = _table_ranks_and_one_process(tmp_path, "bags", shared_output, sparse)
    for rank in ranks:
        for name, value in model.state_dict().items():
            torch.testing.assert_close(rank["params"][name], value, rtol=1e-10, atol=1e-12, msg=name)
        for a, b in zip(rank["ema"], ema):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=0.0)
