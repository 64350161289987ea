"""Full-ranking top-K metrics: every item is a candidate, the user's training positives are masked out.

For a user with relevant set R (held-out items) and top-K list L (training positives excluded):

    Recall@K    = |L ∩ R| / |R|
    Precision@K = |L ∩ R| / K
    NDCG@K      = DCG / IDCG,  DCG = sum_{k: L_k in R} 1 / log2(k + 2),  IDCG = sum_{k < min(|R|, K)} 1 / log2(k + 2)

averaged over users with at least one relevant item. Scores are computed in user blocks and ranked with
``torch.topk``, so nothing of size users x items is ever held at once.

Ranking order is "score descending, then item id ascending": exact ties (a dead-ReLU plateau, MostPop's equal
counts) are broken by item id, so the metrics are a function of the scores alone, not of ``topk``'s tie order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

Scorer = Callable[[torch.Tensor], torch.Tensor]
"""Maps a block of user ids ``[b]`` to scores over all items ``[b, num_items]``."""


def _csr(pairs: np.ndarray, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(pairs[:, 0], kind="stable")
    indptr = np.zeros(num_users + 1, np.int64)
    np.add.at(indptr, pairs[:, 0] + 1, 1)
    return np.cumsum(indptr), pairs[order, 1]


def topk_by_score_then_id(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=1)`` with ties ordered by column index (ascending), deterministically.

    ``topk`` alone leaves the order among equal scores unspecified. Rows with a tie inside the top k, or at its
    boundary (more than k scores >= the k-th), are re-ranked with a stable sort; the others keep topk's answer,
    which is then already in that order.
    """
    values, index = torch.topk(scores, k, dim=1)
    if k == 0:
        return values, index
    inside = (values[:, 1:] == values[:, :-1]).any(1)
    boundary = (scores >= values[:, -1:]).sum(1) > k
    rows = torch.nonzero(inside | boundary).flatten()
    if len(rows):
        v, i = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        values[rows], index[rows] = v[:, :k], i[:, :k]
    return values, index


def rank_metrics(
    scorer: Scorer,
    relevant: np.ndarray,
    exclude: np.ndarray,
    num_users: int,
    num_items: int,
    ks: Sequence[int] = (10, 20),
    users: np.ndarray | None = None,
    block: int = 256,
    workers: int = 1,
    per_user: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, np.ndarray]]:
    """NDCG/Recall/Precision@K over all items for the users in ``relevant`` (``[N, 2]`` user-item pairs).

    Args:
        scorer: user block -> ``[b, num_items]`` scores (higher is better).
        relevant: held-out pairs; users without any are not evaluated.
        exclude: pairs masked out of the ranking (the training positives).
        users: evaluate only these users (a fixed subsample); default every user with a relevant item.
        block: users scored at once.
        workers: user blocks scored concurrently by this many Python threads (torch releases the GIL). Coarse
            blocks keep a contended CPU busy where fine-grained intra-op threads would wait at every barrier.
            The result does not depend on it: blocks are summed in order.
        per_user: also return every evaluated user's values (``{"users": ids, metric: [n_users]}``), e.g. for
            the standard error of the mean.
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
    names = [f"{m}@{k}" for k in ks for m in ("ndcg", "recall", "precision")]

    def run_block(start: int) -> dict[str, torch.Tensor]:
        ub = eval_users[start : start + block]
        scores = scorer(torch.as_tensor(ub)).float()
        # Mask training positives with -inf (row, column) pairs gathered from the CSR.
        lens = exc_ptr[ub + 1] - exc_ptr[ub]
        rows = np.repeat(np.arange(len(ub)), lens)
        cols = np.concatenate([exc_items[exc_ptr[u] : exc_ptr[u + 1]] for u in ub]) if lens.sum() else []
        scores[torch.as_tensor(rows), torch.as_tensor(np.asarray(cols, np.int64))] = -torch.inf
        # Fewer candidates than K (tiny catalogues): rank what there is, pad the list with misses.
        top_scores, top = topk_by_score_then_id(scores, min(kmax, num_items))
        hit = torch.zeros(len(ub), num_items, dtype=torch.bool)
        rlens = rel_ptr[ub + 1] - rel_ptr[ub]
        rrows = np.repeat(np.arange(len(ub)), rlens)
        rcols = np.concatenate([rel_items[rel_ptr[u] : rel_ptr[u + 1]] for u in ub])
        hit[torch.as_tensor(rrows), torch.as_tensor(rcols)] = True
        hits = (torch.gather(hit, 1, top) & (top_scores > -torch.inf)).double()  # a masked item never counts
        hits = torch.nn.functional.pad(hits, (0, kmax - hits.shape[1]))  # [b, kmax]
        n_rel = torch.as_tensor(rlens, dtype=torch.float64)
        out = {}
        for k in ks:
            h = hits[:, :k]
            n_hit = h.sum(1)
            dcg = (h * discounts[:k]).sum(1)
            idcg = ideal[(torch.clamp(n_rel, max=k) - 1).long()]
            out[f"ndcg@{k}"] = dcg / idcg
            out[f"recall@{k}"] = n_hit / n_rel
            out[f"precision@{k}"] = n_hit / k
        return out

    starts = range(0, len(eval_users), block)
    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(run_block, starts))
    else:
        parts = [run_block(s) for s in starts]
    sums = dict.fromkeys(names, 0.0)
    for part in parts:  # in block order: the same float sums whatever the number of workers
        for name in names:
            sums[name] += float(part[name].sum())
    n = max(len(eval_users), 1)
    means = {name: value / n for name, value in sums.items()}
    if not per_user:
        return means
    values = {name: torch.cat([p[name] for p in parts]).numpy() if parts else np.zeros(0) for name in names}
    return means, {"users": eval_users, **values}
