"""Full-ranking top-K metrics: every item is a candidate, the user's training positives are masked out.

For a user with relevant set R (held-out items) and top-K list L (training positives excluded):

    Recall@K    = |L ∩ R| / |R|
    Precision@K = |L ∩ R| / K
    NDCG@K      = DCG / IDCG,  DCG = sum_{k: L_k in R} 1 / log2(k + 2),  IDCG = sum_{k < min(|R|, K)} 1 / log2(k + 2)

averaged over users with at least one relevant item. Scores are computed in user blocks and ranked with
``torch.topk``, so nothing of size users x items is ever held at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

Scorer = Callable[[torch.Tensor], torch.Tensor]
"""Maps a block of user ids ``[b]`` to scores over all items ``[b, num_items]``."""


def _csr(pairs: np.ndarray, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(pairs[:, 0], kind="stable")
    indptr = np.zeros(num_users + 1, np.int64)
    np.add.at(indptr, pairs[:, 0] + 1, 1)
    return np.cumsum(indptr), pairs[order, 1]


def rank_metrics(
    scorer: Scorer,
    relevant: np.ndarray,
    exclude: np.ndarray,
    num_users: int,
    num_items: int,
    ks: Sequence[int] = (10, 20),
    users: np.ndarray | None = None,
    block: int = 256,
) -> dict[str, float]:
    """NDCG/Recall/Precision@K over all items for the users in ``relevant`` (``[N, 2]`` user-item pairs).

    Args:
        scorer: user block -> ``[b, num_items]`` scores (higher is better).
        relevant: held-out pairs; users without any are not evaluated.
        exclude: pairs masked out of the ranking (the training positives).
        users: evaluate only these users (a fixed subsample); default every user with a relevant item.
        block: users scored at once.
    """
    kmax = max(ks)
    rel_ptr, rel_items = _csr(relevant, num_users)
    exc_ptr, exc_items = _csr(exclude, num_users)
    has_relevant = np.diff(rel_ptr) > 0
    eval_users = np.flatnonzero(has_relevant)
    if users is not None:
        users = np.asarray(users, dtype=np.int64)
        eval_users = users[has_relevant[users]]
    discounts = 1.0 / torch.log2(torch.arange(kmax, dtype=torch.float64) + 2.0)
    ideal = torch.cumsum(discounts, 0)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("ndcg", "recall", "precision")}
    for start in range(0, len(eval_users), block):
        ub = eval_users[start : start + block]
        scores = scorer(torch.as_tensor(ub)).float()
        # Mask training positives with -inf (row, column) pairs gathered from the CSR.
        lens = exc_ptr[ub + 1] - exc_ptr[ub]
        rows = np.repeat(np.arange(len(ub)), lens)
        cols = np.concatenate([exc_items[exc_ptr[u] : exc_ptr[u + 1]] for u in ub]) if lens.sum() else []
        scores[torch.as_tensor(rows), torch.as_tensor(np.asarray(cols, np.int64))] = -torch.inf
        # Fewer candidates than K (tiny catalogues): rank what there is, pad the list with misses.
        top_scores, top = torch.topk(scores, min(kmax, num_items), dim=1)
        hit = torch.zeros(len(ub), num_items, dtype=torch.bool)
        rlens = rel_ptr[ub + 1] - rel_ptr[ub]
        rrows = np.repeat(np.arange(len(ub)), rlens)
        rcols = np.concatenate([rel_items[rel_ptr[u] : rel_ptr[u + 1]] for u in ub])
        hit[torch.as_tensor(rrows), torch.as_tensor(rcols)] = True
        hits = (torch.gather(hit, 1, top) & (top_scores > -torch.inf)).double()  # a masked item never counts
        hits = torch.nn.functional.pad(hits, (0, kmax - hits.shape[1]))  # [b, kmax]
        n_rel = torch.as_tensor(rlens, dtype=torch.float64)
        for k in ks:
            h = hits[:, :k]
            n_hit = h.sum(1)
            dcg = (h * discounts[:k]).sum(1)
            idcg = ideal[(torch.clamp(n_rel, max=k) - 1).long()]
            sums[f"ndcg@{k}"] += float((dcg / idcg).sum())
            sums[f"recall@{k}"] += float((n_hit / n_rel).sum())
            sums[f"precision@{k}"] += float((n_hit / k).sum())
    n = max(len(eval_users), 1)
    return {name: value / n for name, value in sums.items()}
