"""Build mb_kernels: the pure-Python package plus the compiled extension ``mb_kernels._C``.

One decision, taken once:
* ``MB_KERNELS_PURE_PYTHON=1``: no extension (the package still works on the pure-torch reference backend).
* otherwise a C++ extension with the op schema and the CPU kernel (csrc/metabalance.cpp), grown into a CUDA
  extension (csrc/cuda/) when the installed torch was built with CUDA and a CUDA toolkit is found, or when
  ``FORCE_CUDA=1``. The decision does not depend on a GPU being visible: a GPU-less build box still builds the
  CUDA kernels, for TORCH_CUDA_ARCH_LIST (default "8.0;9.0" when no GPU is visible).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
# Relative paths: setuptools rejects absolute source paths when building wheels.
CPU_SOURCES = ["csrc/metabalance.cpp"]
CUDA_SOURCES = ["csrc/cuda/binding.cpp", "csrc/cuda/metabalance.cu"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _openmp_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags for OpenMP, which at::parallel_for needs to run in parallel (ATen's OpenMP backend
    is header code). The extension links the libgomp that torch ships when there is one, so that the process has
    a single OpenMP runtime and torch.set_num_threads governs the kernel too."""
    import torch

    if "OpenMP" not in torch.__config__.parallel_info() or sys.platform == "darwin":
        return [], []
    if sys.platform == "win32":
        return ["/openmp"], []
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    bundled = sorted(torch_lib.glob("libgomp*.so*"))
    return ["-fopenmp"], [str(bundled[0])] if bundled else ["-fopenmp"]


def _use_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if _env_flag("FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extensions() -> tuple[list, dict]:
    if _env_flag("MB_KERNELS_PURE_PYTHON"):
        print("mb_kernels: MB_KERNELS_PURE_PYTHON=1, building without the compiled extension", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    omp_compile, omp_link = _openmp_flags()
    # BuildExtension adds the C++ standard torch itself was built with.
    cxx_flags = ["-O3", *omp_compile] if sys.platform != "win32" else ["/O2", *omp_compile]
    include_dirs = [str(ROOT / "csrc")]
    if _use_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        print(
            f"mb_kernels: building the CPU + CUDA extension (TORCH_CUDA_ARCH_LIST="
            f"{os.environ.get('TORCH_CUDA_ARCH_LIST', 'the visible GPUs')})",
            file=sys.stderr,
        )
        ext = CUDAExtension(
            "mb_kernels._C",
            CPU_SOURCES + CUDA_SOURCES,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=omp_link,
        )
    else:
        print("mb_kernels: building the CPU extension (torch has no CUDA or no CUDA toolkit found)", file=sys.stderr)
        ext = CppExtension(
            "mb_kernels._C",
            CPU_SOURCES,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=omp_link,
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="mb_kernels",
    version="0.1.0",
    description="MetaBalance (WWW 2022) for PyTorch with fused CPU, CUDA and Triton kernels",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    keywords=["multi-task learning", "recommender systems", "pytorch", "metabalance", "auxiliary tasks"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Intended Audience :: Science/Research",
    ],
    packages=find_packages(include=["mb_kernels", "mb_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
