"""The flat layout of one bucket: where each balanced tensor lives in the ``[T, N]`` workspace, and the GPU work
table (chunk table) derived from it, built in one place for both GPU backends; and the memory layout autograd gives
a fresh gradient, which every ``.grad`` the step hands out follows."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Columns of a chunk-table row; the CUDA kernels name them in csrc/cuda/metabalance.h (ChunkColumn), the Triton
# kernels read them by position.
CHUNK_COLUMNS = ("tensor", "begin", "end", "first", "count")


@dataclass
class FlatLayout:
    """Where each balanced tensor lives in the flat ``[T, N]`` workspace of one (device, dtype) bucket.

    ``offsets`` holds P + 1 boundaries (int64, on the bucket's device); tensor i occupies columns
    ``offsets[i]:offsets[i + 1]``. ``sizes`` is the same information on the host, so that no backend
    needs to read a device tensor. ``cache`` holds what backends derive from the layout alone (chunk tables,
    launch plans), built once per layout.
    """

    sizes: tuple[int, ...]
    offsets: torch.Tensor
    cache: dict = field(default_factory=dict)

    @classmethod
    def from_sizes(cls, sizes: list[int] | tuple[int, ...], device: torch.device | str) -> FlatLayout:
        bounds = [0]
        for n in sizes:
            bounds.append(bounds[-1] + int(n))
        return cls(tuple(int(n) for n in sizes), torch.tensor(bounds, dtype=torch.int64, device=device))

    @property
    def num_tensors(self) -> int:
        return len(self.sizes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def chunk_table(self, min_chunk: int, max_chunks: int, granule: int, device: torch.device | str) -> torch.Tensor:
        """The GPU work table: int64 ``[C, 5]`` rows ``(tensor, begin, end, first, count)``, one per chunk.

        A chunk is a run of columns ``[begin, end)`` of one tensor; ``first`` is the row of that tensor's first
        chunk and ``count`` its number of chunks, so a kernel program finds all partial results of its tensor.
        Tensor p is cut into chunks of ``L = roundup(max(min_chunk, ceil(size / max_chunks)), granule)`` columns
        (its last chunk ends at the tensor's end): at most ``max_chunks`` per tensor, and every chunk starts at a
        multiple of ``granule`` from its tensor's start (the alignment phase). Every tensor, even an empty one,
        owns at least one chunk, so that its moving average is updated by some program. Built on the host without
        a per-chunk Python loop, copied to ``device`` once and cached per (parameters, device).
        """
        key = ("chunk_table", min_chunk, max_chunks, granule, torch.device(device))
        table = self.cache.get(key)
        if table is not None:
            return table
        sizes = torch.tensor(self.sizes, dtype=torch.int64)
        starts = torch.zeros_like(sizes)
        if len(sizes) > 1:
            starts[1:] = torch.cumsum(sizes, 0)[:-1]
        length = torch.clamp(-(-sizes // max_chunks), min=min_chunk)
        length = -(-length // granule) * granule
        count = torch.clamp(-(-sizes // length), min=1)
        first = torch.cumsum(count, 0) - count
        tensor = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int64), count)
        within = torch.arange(int(count.sum()), dtype=torch.int64) - first[tensor]
        begin = starts[tensor] + within * length[tensor]
        end = torch.minimum(begin + length[tensor], starts[tensor] + sizes[tensor])
        table = torch.stack([tensor, begin, end, first[tensor], count[tensor]], dim=1).contiguous().to(device)
        self.cache[key] = table
        return table


def fresh_grad_strides(p: torch.Tensor) -> tuple[int, ...]:
    """The strides autograd gives a fresh gradient of ``p`` (:func:`autograd_layout`), without allocating."""
    if p.is_contiguous():
        return p.stride()  # dense and non-overlapping: a fresh gradient takes the parameter's strides
    return torch.empty_like(p, device="meta", memory_format=torch.preserve_format).stride()


def autograd_layout(p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` with the strides autograd gives a fresh gradient of ``p``: the parameter's own when it is dense
    and non-overlapping (channels_last, transposed), else contiguous. Fused optimizers (Adam(fused=True)) pair
    a parameter's and its gradient's memory element by element, so the layouts must agree."""
    if grad.stride() == p.stride() or p.numel() <= 1 or grad.stride() == fresh_grad_strides(p):
        return grad
    return torch.empty_like(p, memory_format=torch.preserve_format).copy_(grad)
