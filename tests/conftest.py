"""Test-session set-up: run Triton kernels through its interpreter when no GPU is present.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, before the
test modules import mb_kernels' Triton backend.
"""

import os

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
