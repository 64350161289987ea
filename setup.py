"""Build mb_kernels: pure Python + the compiled extension (filled in by the csrc work)."""

from setuptools import find_packages, setup

setup(
    name="mb_kernels",
    version="0.1.0",
    description="MetaBalance (WWW 2022) for PyTorch with fused CPU, CUDA and Triton kernels",
    packages=find_packages(include=["mb_kernels", "mb_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
)
