"""Benchmark-session set-up: import paths, and the machine description stored in the JSON results."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `from tests.naive import ...` and `from bench.common import ...`


def pytest_configure(config):
    """``BENCH_THREADS=N`` fixes torch's intra-op threads (see bench/run_cpu.sh --threads)."""
    threads = os.environ.get("BENCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor()
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Adds what the summary and RESULTS.md need: CPU model, cores, threads, load, library versions, GPU."""
    import torch

    from bench import common
    from mb_kernels.dispatch import available_backends

    info = {
        "cpu_model": _lscpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "quick": common.QUICK,
        "devices": common.devices(),
        "backends": {d: available_backends(d) for d in common.devices()},
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    rechub, origin = common.load_rechub()
    info["torch_rechub"] = common.rechub_version() if rechub is not None else origin
    try:
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    machine_info["mb_kernels"] = info
