#!/usr/bin/env python3
"""ATen operations per training step's gradient part, per way of taking it: a device-free proxy for the launches
(and host time) a step adds on GPU, where small steps are host-bound.

    python3 bench/count_step_ops.py [--device cpu] [--batch 256] [--rows 2000]

For the tables suite's two models (``bench.recsys.table_model``: the paper network ``ncf`` and the bag
recommender ``bags``), dense and sparse tables, counts the operations dispatched while ``sum(losses).backward()``
(vanilla), ``MetaBalance.step(losses)`` (plain) and ``step(losses, shared_output=h)`` (shared_output) run, on the
third step (buckets and plans built). Views and metadata-only operations are not counted: they launch nothing.
``shared_output`` is counted the way CUDA runs it (the bottom's batched backward), on any device.
Prints one line per (model, tables) with the three counts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.recsys import table_batches, table_model
from mb_kernels import MetaBalance, capture_shared

# Operations that only make views or read metadata (no kernel).
_NO_KERNEL = (
    "alias",
    "as_strided",
    "detach",
    "expand",
    "lift_fresh",
    "permute",
    "reshape",
    "select",
    "slice",
    "split",
    "squeeze",
    "t.",
    "transpose",
    "unbind",
    "unsqueeze",
    "view",
    "_unsafe_view",
)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("aten.") and not name[len("aten.") :].startswith(_NO_KERNEL):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count(kind: str, sparse: bool, variant: str, device: str, batch: int, rows: int) -> int:
    model = table_model(kind, device, rows, sparse)
    batches = table_batches(kind, batch, device, rows)
    balancer = MetaBalance(model.shared_parameters())
    counter = _CountOps()
    default, capture_shared.BOTTOM_BACKWARD = capture_shared.BOTTOM_BACKWARD, {}  # every device as CUDA: batched
    try:
        for step, data in enumerate(batches[:3]):
            model.zero_grad(set_to_none=True)
            losses, h = model.losses_and_shared(data) if variant == "shared_output" else (model.losses(data), None)
            with counter if step == 2 else contextlib.nullcontext():
                if variant == "vanilla":
                    sum(losses).backward()
                elif variant == "plain":
                    balancer.step(losses)
                else:
                    balancer.step(losses, shared_output=h)
    finally:
        capture_shared.BOTTOM_BACKWARD = default
    return sum(counter.counts.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    print(f"operations per step ({args.device}, batch {args.batch}, {args.rows} rows): vanilla / plain / shared_output")
    for kind in ("ncf", "bags"):
        for sparse in (False, True):
            ops = [
                count(kind, sparse, v, args.device, args.batch, args.rows)
                for v in ("vanilla", "plain", "shared_output")
            ]
            print(f"{kind:5s} {'sparse' if sparse else 'dense':6s} {ops[0]:4d} / {ops[1]:4d} / {ops[2]:4d}")


if __name__ == "__main__":
    main()
