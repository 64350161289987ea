"""bench/summarize.py on a synthetic CUDA + CPU result set: every table and target line, no GPU needed."""

from __future__ import annotations

import json

from bench import common, summarize


def _row(median: float, **info) -> dict:
    return {"stats": {"median": median, "min": median * 0.9, "rounds": 5}, "extra_info": info}


def _kernel(device: str, shape: str, tasks: int, backend: str, median: float, **extra) -> dict:
    numel = {"many-small": 512 * 4096, "large": 64 * 2**20}[shape]
    return _row(
        median,
        kind="kernel",
        device=device,
        dtype="float32",
        shape=shape,
        tasks=tasks,
        numel=numel,
        backend=backend,
        bytes=common.kernel_bytes(tasks, numel, 4),
        **extra,
    )


def test_summary_of_a_gpu_run(tmp_path):
    copy_bytes = 2 * 64 * 2**20 * 4
    benchmarks = [
        _row(copy_bytes / 3.0e12, kind="copy", device="cuda", numel=64 * 2**20, bytes=copy_bytes),
        _kernel("cuda", "many-small", 4, "original-style", 0.2),
        _kernel("cuda", "many-small", 4, "reference", 0.002),
        _kernel("cuda", "many-small", 4, "triton", 3e-5, device_time_s=2e-5, copy_gbps_adjacent=3000.0),
        _kernel("cuda", "many-small", 4, "cuda", 4e-5),
        _kernel("cuda", "large", 4, "original-style", 0.01),
        _kernel("cuda", "large", 4, "triton", 1e-3, device_time_s=0.8e-3, copy_gbps_adjacent=3000.0),
        _kernel("cuda", "large", 4, "cuda", 1.1e-3),
        _kernel("cpu", "many-small", 4, "original-style", 0.3),
        _kernel("cpu", "many-small", 4, "reference", 0.04),
        _row(0.05, kind="e2e", device="cuda", batch=256, variant="vanilla", model="m"),
        _row(0.09, kind="e2e", device="cuda", batch=256, variant="original-style", model="m"),
        _row(0.06, kind="e2e", device="cuda", batch=256, variant="fused=None", model="m", backend="triton"),
        _row(
            1.0,
            kind="e2e-interleaved",
            device="cuda",
            batch=256,
            model="m",
            interleaved={
                "vanilla": {"min": 0.04, "median": 0.05, "backend": None},
                "original-style": {"min": 0.08, "median": 0.09, "backend": None},
                "fused=None": {"min": 0.05, "median": 0.06, "backend": "triton"},
            },
        ),
        _row(
            0.01,
            kind="e2e",
            device="cuda",
            batch=256,
            variant="torch-rechub",
            model="m",
            rechub_vs_ours={
                "rel_l2": 0.01,
                "max_abs_over_max": 0.02,
                "worst_param_rel_l2": 0.3,
                "worst_param_shape": [32, 128],
            },
        ),
    ]
    path = tmp_path / "run.json"
    path.write_text(
        json.dumps({"datetime": "now", "machine_info": {"mb_kernels": {"gpu": "H100"}}, "benchmarks": benchmarks})
    )
    launches = tmp_path / "launches.json"
    launches.write_text(
        json.dumps([{"backend": "triton", "case": "many-small", "kernels": 2, "memsets": 1, "memcpys": 0}])
    )
    text = summarize.summarize([path], launches)
    assert "triton ≥ 85% of copy bandwidth, 16×4M, T=4" in text
    assert "triton ≥ 50× original-style, 512×4096, T=4" in text
    assert "cpu op ≥ 20× original-style" in text and "backend cpu was not available" in text
    assert "≤ 2 kernel launches per group" in text and "PASS" in text
    assert "(interleaved): fused ≤ 1.3× Vanilla-Multi" in text and "(separate)" in text
    markdown = summarize.summarize([path], launches, markdown=True)
    assert "| shape | T | N |" in markdown


def test_summary_of_the_shared_bottom_ways(tmp_path):
    run = {
        "vanilla": {"min": 0.009, "median": 0.010},
        "batched": {"min": 0.011, "median": 0.012},
        "per_task": {"min": 0.012, "median": 0.0135},
    }
    bench = _row(1.0, kind="bottom-interleaved", tables="sparse", device="cpu", batch=256, rows=500, interleaved=run)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"datetime": "now", "machine_info": {}, "benchmarks": [bench]}))
    text = summarize.summarize([path], markdown=True)
    assert "batched vs per task" in text
    assert "| sparse | cpu | 500 | 256 | 10 | 12 | 13.5 | 1.2 | 1.35 | 1.12 |" in text
