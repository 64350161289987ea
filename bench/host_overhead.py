#!/usr/bin/env python3
"""Host enqueue time and device time per balancing call, per fused CUDA backend, dtype and task count.

    python3 bench/host_overhead.py --out host_overhead.json

Layout: 512 tensors x 4096 elements (the kernel suite's many-small shape), where the kernels take tens of
microseconds, so a launcher's Python/C++ host work shows. For each case, after warm-up calls (JIT compile,
launch plan): ``host_enqueue`` = wall time of CALLS back-to-back calls without synchronising, divided by CALLS
(the GPU queue absorbs them, so this is the host's cost per call as long as it exceeds the device time);
``device`` = CUDA-event time of the same CALLS calls, divided by CALLS; ``wall`` = calls each followed by a
synchronise. A backend is host-bound where host_enqueue ~ device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from mb_kernels.backends.contract import Hyperparameters, state_dtype
from mb_kernels.dispatch import BACKENDS, available_backends
from mb_kernels.layout import FlatLayout

CALLS = 50


def measure(backend: str, dtype: torch.dtype, num_tasks: int, sizes: list[int]) -> dict:
    fn = BACKENDS[backend].loader()
    grads = common.random_task_grads(sizes, num_tasks, dtype, "cuda")
    ema = torch.zeros(len(sizes), num_tasks, dtype=state_dtype(dtype), device="cuda")
    out = torch.empty(grads.shape[1], dtype=dtype, device="cuda")
    layout = FlatLayout.from_sizes(sizes, "cuda")
    hyper = Hyperparameters(common.RELAX_FACTOR, common.BETA, common.STRATEGY)
    for _ in range(3):
        fn(grads, ema, out, layout, hyper)
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start = time.perf_counter()
    begin.record()
    for _ in range(CALLS):
        fn(grads, ema, out, layout, hyper)
    end.record()
    host = (time.perf_counter() - start) / CALLS
    end.synchronize()
    device = begin.elapsed_time(end) / 1e3 / CALLS
    start = time.perf_counter()
    for _ in range(CALLS):
        fn(grads, ema, out, layout, hyper)
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / CALLS
    return {"host_enqueue_s": host, "device_s": device, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    if not torch.cuda.is_available():
        print("host_overhead: no CUDA device; nothing measured")
    else:
        sizes = common.kernel_shapes()["many-small"]
        for backend in [b for b in available_backends("cuda") if b in common.FUSED_BACKENDS]:
            for dtype in (torch.float32, torch.bfloat16):
                for num_tasks in (2, 3, 4, 8):
                    row = {"backend": backend, "dtype": str(dtype).removeprefix("torch."), "tasks": num_tasks}
                    try:
                        row.update(measure(backend, dtype, num_tasks, sizes))
                    except Exception as err:  # report and go on
                        print(f"host_overhead: {row}: {type(err).__name__}: {err}")
                        continue
                    rows.append(row)
                    ms = {k: row[k] * 1e3 for k in ("host_enqueue_s", "device_s", "wall_s")}
                    print(
                        f"{backend:7s} {row['dtype']:9s} T={num_tasks}  host_enqueue {ms['host_enqueue_s']:.3f} ms"
                        f"  device {ms['device_s']:.3f} ms  wall {ms['wall_s']:.3f} ms"
                    )
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
