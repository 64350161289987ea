"""The multi-task recommender the end-to-end benchmark trains, and its random batches.

The paper's network (MetaBalance, WWW 2022, §5.1): user and item embeddings of 64 for a
matrix-factorisation branch (u ⊙ i) and for a shared MLP 128-32-16-8, their concatenation feeding one
tower per task (64-32-1); three tasks on Taobao (15,449 users × 11,953 items). The shared parameters
(embeddings and MLP) are the ones MetaBalance balances; the towers get the plain sum of the task gradients.

``build_model`` uses the project's own model (``mb_kernels.recsys.model.MultiTaskNCF``) when it exists,
else the same-shape stand-in below, and says which in its second return value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_USERS, NUM_ITEMS, EMBED_DIM = 15_449, 11_953, 64
MLP_DIMS, TOWER_DIMS, NUM_TASKS = (32, 16, 8), (64, 32), 3
QUICK_USERS, QUICK_ITEMS = 200, 150


class SameShapeMultiTask(nn.Module):
    """Stand-in with the paper network's shapes (used when mb_kernels.recsys.model is absent): separate MF and
    MLP embeddings of users and items, MF branch ⊙, shared MLP 32-16-8, one 64-32-1 tower per task."""

    def __init__(self, num_users: int, num_items: int, num_tasks: int = NUM_TASKS, embed_dim: int = EMBED_DIM):
        super().__init__()
        self.user_mf, self.item_mf = nn.Embedding(num_users, embed_dim), nn.Embedding(num_items, embed_dim)
        self.user_mlp, self.item_mlp = nn.Embedding(num_users, embed_dim), nn.Embedding(num_items, embed_dim)
        layers: list[nn.Module] = []
        width = 2 * embed_dim
        for hidden in MLP_DIMS:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.mlp = nn.Sequential(*layers)
        feature = embed_dim + width
        self.towers = nn.ModuleList(
            nn.Sequential(
                nn.Linear(feature, TOWER_DIMS[0]),
                nn.ReLU(),
                nn.Dropout(0.5),
                nn.Linear(TOWER_DIMS[0], TOWER_DIMS[1]),
                nn.ReLU(),
                nn.Dropout(0.5),
                nn.Linear(TOWER_DIMS[1], 1),
            )
            for _ in range(num_tasks)
        )

    def shared_parameters(self) -> list[nn.Parameter]:
        modules = (self.user_mf, self.item_mf, self.user_mlp, self.item_mlp, self.mlp)
        return [p for m in modules for p in m.parameters()]

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        mf = self.user_mf(users) * self.item_mf(items)
        mlp = self.mlp(torch.cat([self.user_mlp(users), self.item_mlp(items)], dim=-1))
        shared = torch.cat([mf, mlp], dim=-1)
        return torch.cat([tower(shared) for tower in self.towers], dim=-1)


def task_losses(model: nn.Module, batch) -> list[torch.Tensor]:
    """One binary cross-entropy per task on the same batch, target first (as mb_kernels.recsys.train does)."""
    users, items, labels = batch
    logits = model(users, items)
    return [F.binary_cross_entropy_with_logits(logits[:, t], labels[:, t]) for t in range(labels.shape[1])]


def _project_model(num_users: int, num_items: int):
    """The project's recommender (mb_kernels.recsys.model.MultiTaskNCF), or None when it is not there."""
    try:
        from mb_kernels.recsys.model import MultiTaskNCF
    except ImportError:
        return None
    return MultiTaskNCF(num_users=num_users, num_items=num_items, num_tasks=NUM_TASKS)


def build_model(device: str, quick: bool, materialize: bool = True) -> tuple[nn.Module, str]:
    """(model, description). ``materialize=False`` builds on the meta device (shapes only, no memory)."""
    users, items = (QUICK_USERS, QUICK_ITEMS) if quick else (NUM_USERS, NUM_ITEMS)
    target = device if materialize else "meta"
    torch.manual_seed(0)
    with torch.device(target):
        model = _project_model(users, items)
        source = "mb_kernels.recsys.model"
        if model is None:
            model = SameShapeMultiTask(users, items)
            source = "bench.recsys.SameShapeMultiTask (same shapes as the paper network)"
    return model, f"{source}, {users} users x {items} items"


def random_batches(batch_size: int, count: int, device: str, quick: bool, seed: int = 0):
    """``count`` batches of (users, items, labels[B, 3]); label rates like purchase < cart < click."""
    users, items = (QUICK_USERS, QUICK_ITEMS) if quick else (NUM_USERS, NUM_ITEMS)
    gen = torch.Generator().manual_seed(seed)
    rates = torch.tensor([0.1, 0.5, 0.3])
    batches = []
    for _ in range(count):
        u = torch.randint(0, users, (batch_size,), generator=gen)
        i = torch.randint(0, items, (batch_size,), generator=gen)
        y = (torch.rand(batch_size, NUM_TASKS, generator=gen) < rates).float()
        batches.append((u.to(device), i.to(device), y.to(device)))
    return batches
