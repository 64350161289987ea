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
import torch.nn.functional as F
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

    def first_layer_parts(self, user_emb: torch.Tensor, item_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first shared-MLP layer on ``[e_u, e_i]``, split as ``W_u e_u`` and ``W_i e_i + b``.

        ``Linear(concat(e_u, e_i)) = W_u e_u + (W_i e_i + b)``: the model always computes it in this split form
        (training, ``forward`` and ``score_all_items`` alike), so full-ranking evaluation can compute each part once
        per user / per item and still do the same floating-point operations as ``forward`` on every pair.
        """
        first = self.mlp[0]
        d = self.user_mlp.embedding_dim
        return F.linear(user_emb, first.weight[:, :d]), F.linear(item_emb, first.weight[:, d:], first.bias)

    def shared(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Shared representation ``[B, shared_dim]`` of (user, item) pairs."""
        mf = self.user_mf(users) * self.item_mf(items)
        user_part, item_part = self.first_layer_parts(self.user_mlp(users), self.item_mlp(items))
        return torch.cat([mf, self.mlp[1:](user_part + item_part)], dim=-1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Per-task logits ``[B, num_tasks]`` for the pairs ``(users[b], items[b])``."""
        h = self.shared(users, items)
        return torch.cat([tower(h) for tower in self.towers], dim=-1)

    @torch.no_grad()
    def score_all_items(
        self,
        users: torch.Tensor,
        task: int = 0,
        item_chunk: int | None = None,
        rows_per_block: int | None = None,
    ) -> torch.Tensor:
        """Logits of ``task`` for every item, ``[len(users), num_items]`` (call in eval mode).

        Per-user and per-item work is done once: the embedding look-ups and the first MLP layer's two parts
        (``first_layer_parts``). What remains per pair — the MF product, the add + rest of the shared MLP, the
        tower — runs on blocks of ``rows_per_block`` pairs in preallocated buffers, so every intermediate stays in
        cache and nothing is allocated per block.

        Same arithmetic as ``forward``: every pair goes through the operations ``forward`` applies to it (the same
        kernels: ``addmm`` for each Linear, elementwise mul/add/relu, operands in the same order), so the logits
        are bitwise equal to ``forward``'s on the same pairs — given that a matrix product computes each row
        independently of how many rows the product has. The CPU BLAS behind torch does that for products of >= 8
        rows (smaller ones take other kernels and can differ in the last bit), so every product here has >= 8
        rows; ``tests/test_experiments_eval.py`` checks the bitwise equality, including blocks of 1-7 users.

        Args:
            users: user ids ``[U]``.
            task: which tower.
            item_chunk: items per block (default: all items, or ``rows_per_block`` if smaller).
            rows_per_block: pairs per block (default 4096 on CPU, 2**20 on a GPU).
        """
        if self.training:
            raise RuntimeError("score_all_items: call model.eval() first (dropout must be off)")
        device = self.item_mf.weight.device
        users = users.to(device)
        n_users, n_items = len(users), self.num_items
        padded = users if n_users >= _MIN_ROWS else torch.cat([users, users[:1].expand(_MIN_ROWS - n_users)])
        user_part, item_part = self.first_layer_parts(self.user_mlp(padded), self.item_mlp.weight)  # [U,h1], [I,h1]
        user_mf, item_mf = self.user_mf(users), self.item_mf.weight
        rest, tower = list(self.mlp[1:]), list(self.towers[task])
        rows = rows_per_block or (4096 if device.type == "cpu" else 1 << 20)
        chunk = max(1, min(n_items, item_chunk or rows))
        per_block = max(1, rows // chunk)
        if per_block * chunk < _MIN_ROWS:
            per_block = -(-_MIN_ROWS // chunk)
        d, dtype = item_mf.shape[1], item_mf.dtype
        out = torch.empty(n_users, n_items, dtype=dtype, device=device)
        x_buf = torch.empty(per_block * chunk, self.shared_dim, dtype=dtype, device=device)
        h_buf = torch.empty(per_block * chunk, user_part.shape[1], dtype=dtype, device=device)
        for u0 in range(0, n_users, per_block):
            us = slice(u0, min(u0 + per_block, n_users))
            nu = us.stop - us.start
            for i0 in range(0, n_items, chunk):
                its = slice(i0, min(i0 + chunk, n_items))
                nr = nu * (its.stop - its.start)
                if nr < _MIN_ROWS:  # a small tail block: pad it with repeats of its first row
                    nr = _MIN_ROWS
                x = x_buf[:nr]
                # forward: cat([u_mf * i_mf, mlp[1:](W_u e_u + (W_i e_i + b))]); written in place into x.
                m = nu * (its.stop - its.start)
                torch.mul(user_mf[us, None, :], item_mf[None, its, :], out=x[:m, :d].view(nu, -1, d))
                h = h_buf[:nr]
                torch.add(user_part[us, None, :], item_part[None, its, :], out=h[:m].view(nu, -1, h.shape[1]))
                if nr > m:
                    x[m:] = x[:1]
                    h[m:] = h[:1]
                x[:, d:] = _run(rest, h)
                out[us, its] = _run(tower, x)[:m].view(nu, -1)
        return out


_MIN_ROWS = 8
"""Matrix products with fewer rows take other BLAS kernels (whose last bits can differ); see score_all_items."""


def _run(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``nn.Sequential(*layers)(x)`` in eval mode with the same kernels (addmm per Linear, relu), fewer temporaries."""
    for layer in layers:
        if isinstance(layer, RowDot):
            x = layer(x)
        elif isinstance(layer, nn.Linear):
            x = torch.addmm(layer.bias, x, layer.weight.t())
        elif isinstance(layer, nn.ReLU):
            x = x.relu_()
        elif not isinstance(layer, nn.Dropout):  # dropout is the identity in eval mode
            raise TypeError(f"score_all_items: unsupported layer {layer!r}")
    return x


def _tower(in_dim: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_dim
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    layers.append(RowDot(width))
    return nn.Sequential(*layers)


class RowDot(nn.Linear):
    """``nn.Linear(in_features, 1)`` computed as a row-wise dot product ``(x * w).sum(-1) + b``.

    Why: BLAS computes a one-column product (gemv) with kernels whose rounding depends on the number of rows, so
    a pair's logit would change in the last bit with the batch it is scored in; an elementwise product and an
    inner-dimension sum give every row the same value whatever the batch. Same parameters and state_dict keys as
    ``nn.Linear``.
    """

    def __init__(self, in_features: int) -> None:
        super().__init__(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weight[0]).sum(-1, keepdim=True) + self.bias
