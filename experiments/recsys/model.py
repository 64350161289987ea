"""The paper's multi-task recommender (MetaBalance §5.1, Appendix A.2, Fig. 6).

Shared bottom: a matrix-factorisation (MF) layer and an MLP over user/item embeddings of size 64; the MF
branch gives ``u_mf ⊙ i_mf`` (64-d), the MLP branch maps ``[u_mlp, i_mlp]`` through 32-16-8. Their
concatenation (72-d) is the shared representation. Each task has its own MLP tower (64-32) ending in one
logit. Dropout 0.5 acts on the towers' hidden layers (the 16/8-wide shared MLP is too narrow for 0.5).

``shared_parameters()`` are the tensors MetaBalance balances; the towers get the plain sum of the task
gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MultiTaskNCF(nn.Module):
    """Shared MF + MLP bottom, one tower per task; ``forward`` returns logits ``[B, num_tasks]``.

    Args:
        num_users, num_items: sizes of the id spaces (ids are 0-based).
        num_tasks: number of tasks, target first.
        embed_dim: embedding size of both branches (paper: 64).
        mlp_layers: hidden sizes of the shared MLP (paper: 32-16-8).
        tower_layers: hidden sizes of every task tower (paper: 64-32).
        dropout: dropout on the towers' hidden layers (paper: 0.5).
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        num_tasks: int,
        embed_dim: int = 64,
        mlp_layers: Sequence[int] = (32, 16, 8),
        tower_layers: Sequence[int] = (64, 32),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if num_users <= 0 or num_items <= 0 or num_tasks <= 0:
            raise ValueError(f"MultiTaskNCF: sizes must be positive, got {num_users=}, {num_items=}, {num_tasks=}")
        self.num_users, self.num_items, self.num_tasks = num_users, num_items, num_tasks
        self.user_mf = nn.Embedding(num_users, embed_dim)
        self.item_mf = nn.Embedding(num_items, embed_dim)
        self.user_mlp = nn.Embedding(num_users, embed_dim)
        self.item_mlp = nn.Embedding(num_items, embed_dim)
        for emb in (self.user_mf, self.item_mf, self.user_mlp, self.item_mlp):
            nn.init.normal_(emb.weight, std=0.01)
        layers: list[nn.Module] = []
        width = 2 * embed_dim
        for size in mlp_layers:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.mlp = nn.Sequential(*layers)
        self.shared_dim = embed_dim + width
        self.towers = nn.ModuleList(_tower(self.shared_dim, tower_layers, dropout) for _ in range(num_tasks))

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared bottom (embeddings + shared MLP): what MetaBalance balances."""
        modules = (self.user_mf, self.item_mf, self.user_mlp, self.item_mlp, self.mlp)
        return [p for m in modules for p in m.parameters()]

    def task_parameters(self) -> list[nn.Parameter]:
        return list(self.towers.parameters())

    def shared(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Shared representation ``[B, shared_dim]`` of (user, item) pairs."""
        mf = self.user_mf(users) * self.item_mf(items)
        mlp = self.mlp(torch.cat([self.user_mlp(users), self.item_mlp(items)], dim=-1))
        return torch.cat([mf, mlp], dim=-1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Per-task logits ``[B, num_tasks]`` for the pairs ``(users[b], items[b])``."""
        h = self.shared(users, items)
        return torch.cat([tower(h) for tower in self.towers], dim=-1)

    @torch.no_grad()
    def score_all_items(self, users: torch.Tensor, task: int = 0, item_chunk: int | None = None) -> torch.Tensor:
        """Logits of ``task`` for every item, ``[len(users), num_items]`` (call in eval mode).

        The first shared-MLP layer acts on ``[u, i]``, so it splits into a per-user and a per-item part that
        are computed once and added pairwise: the same result as ``forward`` on every pair, cheaper.
        """
        first = self.mlp[0]
        d = self.user_mlp.embedding_dim
        item_part = self.item_mlp.weight @ first.weight[:, d:].T + first.bias  # [I, h1]
        user_part = self.user_mlp(users) @ first.weight[:, :d].T  # [U, h1]
        item_mf = self.item_mf.weight
        user_mf = self.user_mf(users)
        tower = self.towers[task]
        chunk = item_chunk or self.num_items
        out = torch.empty(len(users), self.num_items, dtype=item_mf.dtype, device=item_mf.device)
        for start in range(0, self.num_items, chunk):
            sl = slice(start, start + chunk)
            mf = user_mf[:, None, :] * item_mf[None, sl, :]  # [U, C, d]
            h = torch.relu(user_part[:, None, :] + item_part[None, sl, :])
            h = self.mlp[2:](h)
            out[:, sl] = tower(torch.cat([mf, h], dim=-1)).squeeze(-1)
        return out


def _tower(in_dim: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_dim
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)
