"""MetaBalance under DistributedDataParallel: 2 processes on CPU with gloo."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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


def _worker(rank, port, mode, out_dir, shared_output=False, sparse=False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
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
    finally:
        dist.destroy_process_group()


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
