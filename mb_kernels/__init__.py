"""mb_kernels: MetaBalance (WWW 2022) for PyTorch with fused CPU, CUDA and Triton kernels."""

from .dispatch import available_backends
from .optim import MetaBalance

__all__ = ["MetaBalance", "available_backends"]
__version__ = "0.1.0"
