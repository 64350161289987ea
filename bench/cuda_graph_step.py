#!/usr/bin/env python3
"""Capture one whole MetaBalance training step in a CUDA graph, replay it, and compare with eager steps.

    python3 bench/cuda_graph_step.py [--rows 1000000] [--batch 4096] [--steps 20]

The step: the paper network (bench.recsys) with dense embedding tables, forward, ``MetaBalance.step(losses,
shared_output=h)`` (towers once, one batched bottom backward, tables balanced by rows), and
``Adam(capturable=True)``. That path reads no tensor value on the host, so it can be captured; sparse tables cannot
(the size of a sparse gradient is a host value). Dropout is set to 0 so that eager and replayed steps must agree.

Prints one JSON line: whether capture worked (else the error), the largest relative parameter difference between
``--steps`` replays and as many eager steps on a copy, and the median wall time per step (synchronised) of each.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.recsys import NUM_TASKS, random_batches
from experiments.recsys.model import MultiTaskNCF
from mb_kernels import MetaBalance


def _losses(model: nn.Module, users: torch.Tensor, items: torch.Tensor, labels: torch.Tensor):
    h = model.shared(users, items)
    losses = [F.binary_cross_entropy_with_logits(t(h).squeeze(-1), labels[:, i]) for i, t in enumerate(model.towers)]
    return losses, h


def _trainer(model: nn.Module):
    balancer = MetaBalance(model.shared_parameters(), relax_factor=0.7, fused=None)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)

    def step(users, items, labels):
        losses, h = _losses(model, users, items, labels)
        balancer.step(losses, shared_output=h)
        optimizer.step()

    return balancer, optimizer, step


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="user and item table rows (default 1M)")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20, help="steps compared and timed (default 20)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"captured": False, "error": "no CUDA device"}))
        return
    device = "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        model = MultiTaskNCF(num_users=args.rows, num_items=args.rows, num_tasks=NUM_TASKS)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.train()
    eager_model = copy.deepcopy(model)
    batches = random_batches(args.batch, args.steps, device, quick=False, num_users=args.rows, num_items=args.rows)
    result: dict = {"rows": args.rows, "batch": args.batch, "steps": args.steps, "device": torch.cuda.get_device_name()}

    # Eager reference: the same batches on the copy.
    _, eager_opt, eager_step = _trainer(eager_model)
    for users, items, labels in batches:
        eager_opt.zero_grad(set_to_none=True)
        eager_step(users, items, labels)

    balancer, optimizer, step = _trainer(model)
    static = [t.clone() for t in batches[0]]
    try:
        # Warm-up on a side stream (buckets, plans and caches built; Adam's state allocated), then capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        warm = copy.deepcopy(model.state_dict())
        with torch.cuda.stream(side):
            for _ in range(3):
                optimizer.zero_grad(set_to_none=True)
                step(*static)
        torch.cuda.current_stream().wait_stream(side)
        # Undo the warm-up's updates, keep everything it built (moving averages back to zero as well).
        model.load_state_dict(warm)
        for state in optimizer.state.values():
            for value in state.values():
                value.zero_()
        for group in balancer.param_groups:
            for p in group["params"]:
                balancer.state[p]["norm_ema"].zero_()
        graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            step(*static)
    except Exception as err:  # report, do not crash the GPU check
        result.update(captured=False, error=f"{type(err).__name__}: {err}")
        print(json.dumps(result))
        return
    result["captured"] = True
    # The capture ran no kernel: replay once per batch.
    for users, items, labels in batches:
        for dst, src in zip(static, (users, items, labels)):
            dst.copy_(src)
        graph.replay()
    torch.cuda.synchronize()
    worst = 0.0
    for p, q in zip(model.parameters(), eager_model.parameters()):
        worst = max(worst, float((p - q).norm() / q.norm().clamp_min(1e-30)))
    result["max_rel_param_diff_vs_eager"] = worst

    def eager_once():
        eager_opt.zero_grad(set_to_none=True)
        eager_step(*batches[0])

    result["eager_ms"] = _median_ms(eager_once, args.steps)
    result["replay_ms"] = _median_ms(graph.replay, args.steps)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
