"""The multi-task recommender the end-to-end benchmark trains, and its random batches.

The paper's network (MetaBalance, WWW 2022, §5.1): user and item embeddings of 64 for a
matrix-factorisation branch (u ⊙ i) and for a shared MLP 128-32-16-8, their concatenation feeding one
tower per task (64-32-1); three tasks on Taobao (15,449 users × 11,953 items). The shared parameters
(embeddings and MLP) are the ones MetaBalance balances; the towers get the plain sum of the task gradients.

``build_model`` builds the project's own model (``experiments.recsys.model.MultiTaskNCF``, outside the library).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from experiments.recsys.model import MultiTaskNCF

NUM_USERS, NUM_ITEMS, EMBED_DIM = 15_449, 11_953, 64
NUM_TASKS = 3
QUICK_USERS, QUICK_ITEMS = 200, 150


def task_losses(model: nn.Module, batch) -> list[torch.Tensor]:
    """One binary cross-entropy per task on the same batch, target first (as experiments.recsys.train does)."""
    users, items, labels = batch
    logits = model(users, items)
    return [F.binary_cross_entropy_with_logits(logits[:, t], labels[:, t]) for t in range(labels.shape[1])]


def task_losses_and_shared(model: nn.Module, batch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The same losses as :func:`task_losses`, with the shared representation the towers take (for
    ``MetaBalance.step(losses, shared_output=h)``). Each loss reads its own tower's logit, as experiments.recsys.train
    does: concatenating the towers' logits first would make every task's backward run every tower (T² tower passes)."""
    users, items, labels = batch
    h = model.shared(users, items)
    losses = [
        F.binary_cross_entropy_with_logits(tower(h).squeeze(-1), labels[:, t]) for t, tower in enumerate(model.towers)
    ]
    return losses, h


def build_model(device: str, quick: bool, materialize: bool = True) -> tuple[nn.Module, str]:
    """(model, description). ``materialize=False`` builds on the meta device (shapes only, no memory)."""
    users, items = (QUICK_USERS, QUICK_ITEMS) if quick else (NUM_USERS, NUM_ITEMS)
    target = device if materialize else "meta"
    torch.manual_seed(0)
    with torch.device(target):
        model = MultiTaskNCF(num_users=users, num_items=items, num_tasks=NUM_TASKS)
    return model, f"experiments.recsys.model, {users} users x {items} items"


def random_batches(
    batch_size: int,
    count: int,
    device: str,
    quick: bool,
    seed: int = 0,
    num_users: int | None = None,
    num_items: int | None = None,
):
    """``count`` batches of (users, items, labels[B, 3]); label rates like purchase < cart < click. Ids span the
    bench network's tables unless ``num_users`` / ``num_items`` say otherwise."""
    users, items = (QUICK_USERS, QUICK_ITEMS) if quick else (NUM_USERS, NUM_ITEMS)
    users, items = num_users or users, num_items or items
    gen = torch.Generator().manual_seed(seed)
    rates = torch.tensor([0.1, 0.5, 0.3])
    batches = []
    for _ in range(count):
        u = torch.randint(0, users, (batch_size,), generator=gen)
        i = torch.randint(0, items, (batch_size,), generator=gen)
        y = (torch.rand(batch_size, NUM_TASKS, generator=gen) < rates).float()
        batches.append((u.to(device), i.to(device), y.to(device)))
    return batches


class BagRecommender(nn.Module):
    """A multi-hot recommender: per example, a bag of ``history`` item ids (sum with per-sample weights, e.g.
    recency) and ``categories`` ids (mean), both ``nn.EmbeddingBag`` of ``rows`` x 64, a shared MLP 64-32 and one
    tower per task (32-16-1). ``tables()`` are the two bag tables; the shared parameters are tables + MLP."""

    HISTORY, CATEGORIES = 5, 3  # ids per bag

    def __init__(self, rows: int, sparse: bool = False, num_tasks: int = NUM_TASKS):
        super().__init__()
        self.history = nn.EmbeddingBag(rows, EMBED_DIM, mode="sum", sparse=sparse)
        self.categories = nn.EmbeddingBag(rows, EMBED_DIM, mode="mean", sparse=sparse)
        self.mlp = nn.Sequential(nn.Linear(EMBED_DIM, 32), nn.ReLU())
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1)) for _ in range(num_tasks)
        )

    def tables(self) -> list[nn.Parameter]:
        return [self.history.weight, self.categories.weight]

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.tables(), *self.mlp.parameters()]

    def shared(self, batch) -> torch.Tensor:
        history, weights, categories, _ = batch
        offsets = torch.arange(0, history.numel(), self.HISTORY, device=history.device)
        return self.mlp(self.history(history, offsets, per_sample_weights=weights) + self.categories(categories))

    def losses(self, batch) -> list[torch.Tensor]:
        return self.losses_and_shared(batch)[0]

    def losses_and_shared(self, batch) -> tuple[list[torch.Tensor], torch.Tensor]:
        h, labels = self.shared(batch), batch[-1]
        losses = [F.binary_cross_entropy_with_logits(t(h).squeeze(-1), labels[:, i]) for i, t in enumerate(self.towers)]
        return losses, h


def random_bag_batches(batch_size: int, count: int, device: str, rows: int, seed: int = 0):
    """``count`` batches of (history ids [B·5], their weights, category ids [B, 3], labels [B, 3]) for
    :class:`BagRecommender`."""
    gen = torch.Generator().manual_seed(seed)
    rates = torch.tensor([0.1, 0.5, 0.3])
    batches = []
    for _ in range(count):
        history = torch.randint(0, rows, (batch_size * BagRecommender.HISTORY,), generator=gen)
        weights = torch.rand(history.numel(), generator=gen)
        categories = torch.randint(0, rows, (batch_size, BagRecommender.CATEGORIES), generator=gen)
        labels = (torch.rand(batch_size, NUM_TASKS, generator=gen) < rates).float()
        batches.append(tuple(x.to(device) for x in (history, weights, categories, labels)))
    return batches


class _NCF(MultiTaskNCF):
    """The paper network with the bench's interface: ``tables()``, ``losses(batch)`` (through ``forward``, as the
    app's plain training computes them) and ``losses_and_shared(batch)``."""

    def tables(self) -> list[nn.Parameter]:
        return [m.weight for m in (self.user_mf, self.item_mf, self.user_mlp, self.item_mlp)]

    def losses(self, batch):
        return task_losses(self, batch)

    def losses_and_shared(self, batch):
        return task_losses_and_shared(self, batch)


def table_model(kind: str, device: str, rows: int, sparse: bool) -> nn.Module:
    """The tables suite's models (bench/test_bench_tables.py): ``"ncf"``, the paper network with ``rows``-row
    user and item tables, or ``"bags"``, :class:`BagRecommender`; ``sparse`` sets every table's ``sparse``. Both
    offer ``tables()``, ``shared_parameters()``, ``losses(batch)`` and ``losses_and_shared(batch)``."""
    torch.manual_seed(0)
    with torch.device(device):
        model = _NCF(num_users=rows, num_items=rows, num_tasks=NUM_TASKS) if kind == "ncf" else BagRecommender(rows)
    for table in model.modules():
        if isinstance(table, (nn.Embedding, nn.EmbeddingBag)):
            table.sparse = sparse
    return model.train()


def table_batches(kind: str, batch_size: int, device: str, rows: int):
    """Eight random batches for :func:`table_model`'s ``kind``."""
    if kind == "ncf":
        return random_batches(batch_size, 8, device, quick=False, seed=1, num_users=rows, num_items=rows)
    return random_bag_batches(batch_size, 8, device, rows, seed=1)
