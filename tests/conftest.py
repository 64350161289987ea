"""Test-session set-up: run Triton kernels through its interpreter when no GPU is present.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, before the
test modules import mb_kernels' Triton backend.
"""

import os

import pytest

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist every worker would otherwise run torch with all cores (16 workers x 16 threads on a GPU
# machine): give each its share.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _workers > 1 and "torch" in globals():
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


def _uses_cuda(item) -> bool:
    """Whether a collected test runs on CUDA tensors: a "cuda" device among its parameters (alone or in a
    (device, backend) pair), or an explicit ``gpu`` mark."""
    if item.get_closest_marker("gpu") is not None:
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    for value in callspec.params.values():
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if v == "cuda" or (isinstance(v, torch.device) and v.type == "cuda"):
                return True
    return False


def pytest_collection_modifyitems(config, items):
    """The GPU tier: ``pytest -m gpu tests`` selects every test that exercises CUDA tensors (run by
    bench/gpu_check.sh on a GPU machine); the full suite stays CPU CI's."""
    gpu = pytest.mark.gpu
    for item in items:
        if _uses_cuda(item):
            item.add_marker(gpu)


@pytest.fixture(params=["per_task", "batched"])
def bottom_backward(request, monkeypatch):
    """Both ways ``step(losses, shared_output=h)`` backpropagates the shared bottom
    (``mb_kernels.capture_shared.BOTTOM_BACKWARD``), on every device: by default CPU takes one pass per task and
    CUDA one batched backward, so each way is also tested on the other device."""
    from mb_kernels import capture_shared

    monkeypatch.setattr(capture_shared, "BOTTOM_BACKWARD", {"cpu": request.param, "cuda": request.param})
    return request.param
