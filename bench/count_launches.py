"""Count the device work one balancing call launches, per fused CUDA backend, with torch.profiler.

docs/design.md §3: two kernel launches per (device, dtype) group however many tensors. Each
backend is called once to warm up (Triton compiles, tables are cached), then once under the profiler; the
CUDA-side events are split into kernels and memset/memcpy operations (a memset is not a kernel launch of
ours but is device work per step, so it is reported beside the kernels).

    python3 bench/count_launches.py --out launches.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from mb_kernels.backends.contract import Hyperparameters, state_dtype
from mb_kernels.dispatch import BACKENDS, available_backends
from mb_kernels.layout import FlatLayout


def device_events(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels, other = [], []
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        lowered = event.name.lower()
        (other if "memset" in lowered or "memcpy" in lowered else kernels).append(event.name)
    return {
        "kernels": len(kernels),
        "memsets": sum("memset" in n.lower() for n in other),
        "memcpys": sum("memcpy" in n.lower() for n in other),
        "kernel_names": sorted(set(kernels)),
    }


def count(backend: str, sizes: list[int], num_tasks: int) -> dict:
    fn = BACKENDS[backend].loader()
    grads = common.random_task_grads(sizes, num_tasks, torch.float32, "cuda")
    ema = torch.zeros(len(sizes), num_tasks, dtype=state_dtype(grads.dtype), device="cuda")
    out = torch.empty(grads.shape[1], dtype=grads.dtype, device="cuda")
    layout = FlatLayout.from_sizes(sizes, "cuda")

    def call():
        fn(grads, ema, out, layout, Hyperparameters(common.RELAX_FACTOR, common.BETA, common.STRATEGY))

    call()
    return device_events(call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON rows")
    args = parser.parse_args()
    rows = []
    if not torch.cuda.is_available():
        print("count_launches: no CUDA device; nothing counted")
    else:
        shapes = common.kernel_shapes()
        backends = [b for b in available_backends("cuda") if b in common.FUSED_BACKENDS]
        if not backends:
            print("count_launches: no fused CUDA backend is available (cuda extension not built, triton missing?)")
        for backend in backends:
            for shape, num_tasks in (("many-small", 4), ("recsys", 3)):
                case = f"{shape} P={len(shapes[shape])} T={num_tasks}"
                try:
                    row = count(backend, shapes[shape], num_tasks)
                except Exception as err:  # report and go on: one backend failing must not hide the others
                    print(f"count_launches: {backend} {case}: {type(err).__name__}: {err}")
                    continue
                rows.append({"backend": backend, "case": case, **row})
                print(
                    f"{backend:7s} {case:38s} kernels {row['kernels']}  memset {row['memsets']}  "
                    f"memcpy {row['memcpys']}  {row['kernel_names']}"
                )
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
