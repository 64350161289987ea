"""The GPU tier's selection (``pytest -m gpu tests``), checked without a GPU: pytest runs a small test file with
this suite's conftest hook, and the marker must land on exactly the CUDA cases."""

from __future__ import annotations

pytest_plugins = ["pytester"]

_SAMPLE = """
import pytest
import torch

@pytest.mark.parametrize("device", ["cpu", "cuda", pytest.param("cuda", id="cuda-param")])
def test_device(device):
    pass

@pytest.mark.parametrize(("device", "backend"), [("cpu", "torch"), ("cuda", "triton")])
def test_pair(device, backend):
    pass

@pytest.mark.parametrize("case", [("cpu", "cpu"), ("cuda", "cuda")])
def test_tuple_case(case):
    pass

@pytest.mark.parametrize("device", [torch.device("cuda", 0)], ids=["cuda0"])
def test_torch_device(device):
    pass

@pytest.mark.gpu
def test_explicit():
    pass

def test_plain():
    pass
"""


def test_gpu_marker_selects_exactly_the_cuda_cases(pytester):
    pytester.makeconftest("from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n")
    pytester.makeini("[pytest]\nmarkers =\n    gpu: CUDA tests\n")
    pytester.makepyfile(test_sample=_SAMPLE)
    selected = pytester.runpytest("-m", "gpu", "--collect-only", "-q")
    names = {line.split("::")[-1] for line in selected.outlines if "::" in line}
    assert names == {
        "test_device[cuda]",
        "test_device[cuda-param]",
        "test_pair[cuda-triton]",
        "test_tuple_case[case1]",
        "test_torch_device[cuda0]",
        "test_explicit",
    }
    rest = pytester.runpytest("-m", "not gpu", "--collect-only", "-q")
    names = {line.split("::")[-1] for line in rest.outlines if "::" in line}
    assert names == {"test_device[cpu]", "test_pair[cpu-torch]", "test_tuple_case[case0]", "test_plain"}
