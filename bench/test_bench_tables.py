"""End to end with recommender-sized tables: dense vs sparse embedding gradients, plain step vs shared_output.

Two models, 3 tasks, batch 256 and 4096: ``ncf``, the paper network (``bench.recsys``) with 200K-row user and item
tables on CPU (1M on CUDA; 500 in quick mode), and ``bags``, ``bench.recsys.BagRecommender`` (two
``nn.EmbeddingBag`` tables of as many rows: a sum bag of 5 weighted ids and a mean bag of 3 per example). Every
variant in alternation (one step each per round, first mover rotating):

- ``vanilla``: ``sum(losses).backward()``, dense embedding gradients, Adam on everything;
- ``vanilla-sparse``: the same with ``sparse=True`` embeddings, SparseAdam on the tables, Adam on the rest;
- ``original-style``: the original implementation's control flow (one backward per task, a per-tensor loop; dense
  gradients only), Adam;
- ``mb``: ``MetaBalance(fused=None).step(losses)``, dense gradients, Adam;
- ``mb+shared_output``: ``step(losses, shared_output=h)``, dense gradients, Adam;
- ``mb-sparse``: ``step(losses)`` with ``sparse=True`` embeddings (sparse tables), SparseAdam + Adam;
- ``mb-sparse+shared_output``: the same with ``shared_output=h``.

``test_shared_bottom_ways_interleaved`` times ``shared_output`` with the bottom batched and per task (the measurement
behind each device's default way).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from bench import common
from bench.recsys import NUM_TASKS, table_batches, table_model
from mb_kernels import MetaBalance, capture_shared

VARIANTS = (
    "vanilla",
    "vanilla-sparse",
    "original-style",
    "mb",
    "mb+shared_output",
    "mb-sparse",
    "mb-sparse+shared_output",
)


def table_rows(device: str) -> int:
    return 500 if common.QUICK else (1_000_000 if device == "cuda" else 200_000)


def _step(variant: str, model: nn.Module, batches, bottom: str | None = None):
    """One training step of ``variant`` (module docstring) over ``batches`` in turn. ``bottom``: how
    ``shared_output`` backpropagates the bottom (``mb_kernels.capture_shared.BOTTOM_BACKWARD``), None: the device's
    default."""
    sparse = "sparse" in variant
    tables = model.tables()
    if sparse:
        rest = [p for p in model.parameters() if all(p is not t for t in tables)]
        optimizers = [torch.optim.SparseAdam(tables, lr=1e-3), torch.optim.Adam(rest, lr=1e-3)]
    else:
        optimizers = [torch.optim.Adam(model.parameters(), lr=1e-3)]
    if variant.startswith("vanilla"):
        balancer = None
    elif variant == "original-style":
        balancer = common.OriginalStyleMetaBalance(model.shared_parameters())
    else:
        balancer = MetaBalance(model.shared_parameters(), fused=None)
    which = itertools.cycle(batches)

    def step():
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        batch = next(which)
        if balancer is None:
            sum(model.losses(batch)).backward()
        elif variant.endswith("+shared_output"):
            losses, h = model.losses_and_shared(batch)
            default = capture_shared.BOTTOM_BACKWARD
            if bottom is not None:
                capture_shared.BOTTOM_BACKWARD = {h.device.type: bottom}
            try:
                balancer.step(losses, shared_output=h)
            finally:
                capture_shared.BOTTOM_BACKWARD = default
        else:
            balancer.step(model.losses(batch))
        for opt in optimizers:
            opt.step()

    return step


@pytest.mark.parametrize("model_kind", ["ncf", "bags"])
@pytest.mark.parametrize(
    ("device", "batch_size"),
    [pytest.param(d, b, id=f"{d}-b{b}") for d in common.devices() for b in ([32] if common.QUICK else [256, 4096])],
)
def test_large_tables_interleaved(benchmark, device, batch_size, model_kind):
    rows = table_rows(device)
    batches = table_batches(model_kind, batch_size, device, rows)
    dense, sparse = table_model(model_kind, device, rows, False), table_model(model_kind, device, rows, True)
    steps = {v: _step(v, copy.deepcopy(sparse if "sparse" in v else dense), batches) for v in VARIANTS}
    del dense, sparse
    benchmark.group = f"tables {model_kind} {device} batch={batch_size}"
    info = benchmark.extra_info
    info.update(kind="tables-interleaved", model=model_kind, device=device, batch=batch_size, rows=rows)
    info["tasks"] = NUM_TASKS
    info["interleaved"] = common.run_interleaved(benchmark, steps, device, min_rounds=5, max_rounds=30)


@pytest.mark.parametrize("tables", ["dense", "sparse"])
@pytest.mark.parametrize(
    ("device", "batch_size"),
    [pytest.param(d, b, id=f"{d}-b{b}") for d in common.devices() for b in ([32] if common.QUICK else [256, 4096])],
)
def test_shared_bottom_ways_interleaved(benchmark, device, batch_size, tables):
    """``step(losses, shared_output=h)`` with the bottom backpropagated by one batched (vmapped) backward and by one
    backward per task, against the Vanilla-Multi step with the same tables: the measurement behind each device's
    default (``mb_kernels.capture_shared.BOTTOM_BACKWARD``). The paper network with dense 15K-row tables (Adam) or
    sparse tables of the suite's size (SparseAdam + Adam)."""
    sparse = tables == "sparse"
    rows = table_rows(device) if sparse else (500 if common.QUICK else 15_000)
    batches = table_batches("ncf", batch_size, device, rows)
    model = table_model("ncf", device, rows, sparse)
    shared = "mb-sparse+shared_output" if sparse else "mb+shared_output"
    steps = {
        "vanilla": _step("vanilla-sparse" if sparse else "vanilla", copy.deepcopy(model), batches),
        "batched": _step(shared, copy.deepcopy(model), batches, bottom="batched"),
        "per_task": _step(shared, copy.deepcopy(model), batches, bottom="per_task"),
    }
    del model
    benchmark.group = f"shared bottom {tables} {device} batch={batch_size}"
    info = benchmark.extra_info
    info.update(kind="bottom-interleaved", tables=tables, device=device, batch=batch_size, rows=rows)
    info["interleaved"] = common.run_interleaved(benchmark, steps, device, min_rounds=5, max_rounds=40)
