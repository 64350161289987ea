"""Small multi-task models shared by the optimizer tests and the benchmarks, and a twin-step comparison."""

from __future__ import annotations

import torch
from torch import nn


class IdentityWithBackward(torch.autograd.Function):
    """The identity, whose backward is ``on_grad(grad)``: a probe in a model's graph (a host read, None for a zero
    gradient, ...). ``IdentityWithBackward.apply(x, on_grad)``."""

    @staticmethod
    def forward(ctx, x, on_grad):
        ctx.on_grad = on_grad
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.on_grad(grad), None


class TinyMultiTask(nn.Module):
    """Shared bottom (embedding + MLP) and one tower per task; tower 1 also skips the MLP's last layer.

    ``extra`` is a shared tensor only the auxiliaries reach (the target does not), and ``unused`` is a
    shared tensor no task reaches: both cases the original implementation got wrong.
    """

    def __init__(
        self,
        num_tasks: int = 3,
        num_items: int = 50,
        dim: int = 8,
        dtype=torch.float32,
        padding_idx: int | None = None,
        sparse: bool = False,
    ):
        super().__init__()
        self.embedding = nn.Embedding(num_items, dim, dtype=dtype, padding_idx=padding_idx, sparse=sparse)
        self.bottom = nn.Sequential(nn.Linear(dim, 16, dtype=dtype), nn.ReLU(), nn.Linear(16, 8, dtype=dtype))
        self.extra = nn.Parameter(torch.randn(8, dtype=dtype) * 0.1)
        self.unused = nn.Parameter(torch.randn(3, dtype=dtype))
        self.towers = nn.ModuleList([nn.Linear(8, 1, dtype=dtype) for _ in range(num_tasks)])

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.embedding.parameters(), *self.bottom.parameters(), self.extra, self.unused]

    def forward(self, items: torch.Tensor, labels: torch.Tensor, with_shared: bool = False):
        losses, features = self.losses_and_shared(items, labels)
        return (losses, features) if with_shared else losses

    def losses(self, items: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        return self.losses_and_shared(items, labels)[0]

    def losses_and_shared(self, items: torch.Tensor, labels: torch.Tensor):
        """The losses and the tensors the towers take from the shared part (``shared_output``): the bottom's output
        and ``extra`` (as a computed tensor, ``extra * 1``, exactly ``extra``)."""
        hidden = self.bottom(self.embedding(items))
        extra = self.extra * 1.0
        out = []
        for t, tower in enumerate(self.towers):
            features = hidden if t == 0 else hidden + extra
            logits = tower(features).squeeze(-1)
            out.append(nn.functional.binary_cross_entropy_with_logits(logits, labels[:, t]))
        return out, [hidden, extra]


def batch(seed: int, num_tasks: int = 3, size: int = 32, num_items: int = 50, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(0, num_items, (size,), generator=gen)
    labels = (torch.rand(size, num_tasks, generator=gen) < 0.3).to(dtype)
    return items, labels


def assert_same_step(expected_model, expected_mb, model, mb):
    """Every .grad (None where the expected one is None; a sparse one compared densely) and every moving average
    of ``mb``/``model`` equal to ``expected_mb``/``expected_model``'s, float64 rounding aside."""
    for (name, p), q in zip(expected_model.named_parameters(), model.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            got = q.grad.to_dense() if q.grad.is_sparse else q.grad
            torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-13, msg=lambda m, n=name: f"{n}: {m}")
    for p, q in zip(expected_model.shared_parameters(), model.shared_parameters()):
        torch.testing.assert_close(mb.state[q]["norm_ema"], expected_mb.state[p]["norm_ema"], rtol=1e-10, atol=0)
