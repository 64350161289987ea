"""Full-ranking evaluation: the fast scorer is the same arithmetic as ``forward``; the ranking order is defined.

What is guaranteed (and checked here on CPU): ``MultiTaskNCF.score_all_items`` gives, for every (user, item), the
bitwise-same float32 logit as ``forward`` on that pair in a batch of >= 8 pairs, because it runs the same kernels
on the same operands in the same order (the first MLP layer is computed as W_u e_u + (W_i e_i + b) by the model
itself, in training too; the tower's one-output layer is a row-wise dot product, whose value does not depend on
the batch, unlike BLAS gemv). Equal scores then give equal rankings, and ties are ordered by item id
(``metrics.topk_by_score_then_id``), so the metrics are identical. Not guaranteed: bitwise equality on a GPU,
where cuBLAS may pick other kernels per shape (equal up to float32 rounding there).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.recsys.metrics import rank_metrics, topk_by_score_then_id
from experiments.recsys.model import MultiTaskNCF

from .test_recsys import REAL_DATA


def _random_model(num_users: int, num_items: int, seed: int, scale: float) -> MultiTaskNCF:
    torch.manual_seed(seed)
    model = MultiTaskNCF(num_users, num_items, 3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, scale)
    return model


def _forward_scores(model: MultiTaskNCF, users: torch.Tensor, task: int) -> torch.Tensor:
    """The straightforward scoring: ``forward`` on every (user, item) pair, all pairs in one batch."""
    n_items = model.num_items
    with torch.no_grad():
        pairs_u = users.repeat_interleave(n_items)
        pairs_i = torch.arange(n_items).repeat(len(users))
        return model(pairs_u, pairs_i)[:, task].view(len(users), n_items)


@pytest.mark.parametrize(("seed", "scale", "threads"), [(0, 0.3, 1), (1, 1.0, 1), (2, 0.01, 1), (0, 0.3, 2)])
def test_fast_scores_bitwise_equal_forward(seed, scale, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = _random_model(60, 700, seed, scale)
        users = torch.tensor([0, 7, 59, 3, 11, 12, 30, 31, 44])
        for task in (0, 2) if threads == 1 else (0,):
            ref = _forward_scores(model, users, task)
            # Blocks of 1..9 users, item chunks that do and do not divide the catalogue, tiny and large blocks.
            for block_users, kwargs in [
                (9, {}),
                (1, {}),
                (3, {"item_chunk": 7}),
                (7, {"item_chunk": 512}),
                (2, {"rows_per_block": 100}),
                (5, {"item_chunk": 700, "rows_per_block": 1 << 16}),
            ]:
                got = torch.cat(
                    [
                        model.score_all_items(users[k : k + block_users], task, **kwargs)
                        for k in range(0, 9, block_users)
                    ]
                )
                assert torch.equal(got, ref), (seed, scale, task, block_users, kwargs, (got - ref).abs().max())
    finally:
        torch.set_num_threads(old)


def test_rankings_and_metrics_equal_straightforward_scoring():
    """Metrics from the fast scorer equal those from forward-on-every-pair, tie order included."""
    model = _random_model(40, 900, 3, 0.5)
    rng = np.random.default_rng(0)
    relevant = np.stack([np.arange(40), rng.integers(0, 900, 40)], 1)
    exclude = np.stack([rng.integers(0, 40, 300), rng.integers(0, 900, 300)], 1)
    fast = rank_metrics(lambda ub: model.score_all_items(ub), relevant, exclude, 40, 900, block=16, workers=2)
    slow = rank_metrics(lambda ub: _forward_scores(model, ub, 0), relevant, exclude, 40, 900, block=13)
    assert fast == slow
    users = torch.arange(40)
    a = topk_by_score_then_id(model.score_all_items(users), 20)
    b = topk_by_score_then_id(_forward_scores(model, users, 0), 20)
    assert torch.equal(a[1], b[1])


def test_ties_are_ordered_by_item_id():
    scores = torch.tensor(
        [
            [1.0, 3.0, 3.0, 2.0, 3.0, 0.0],  # a three-way tie at the top
            [5.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # a tie across the top-3 boundary
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # no tie
        ]
    )
    values, index = topk_by_score_then_id(scores, 3)
    assert index.tolist() == [[1, 2, 4], [0, 1, 2], [5, 4, 3]]
    assert values.tolist() == [[3.0, 3.0, 3.0], [5.0, 1.0, 1.0], [5.0, 4.0, 3.0]]
    # A dead-ReLU plateau (every score equal): the first k ids.
    assert topk_by_score_then_id(torch.zeros(2, 50), 10)[1].tolist() == [list(range(10))] * 2


def test_metrics_with_ties_do_not_depend_on_worker_count_or_block():
    scores = torch.from_numpy(np.random.default_rng(1).integers(0, 4, size=(50, 30)).astype(np.float32))  # many ties
    relevant = np.stack([np.arange(50), np.random.default_rng(2).integers(0, 30, 50)], 1)
    exclude = np.zeros((0, 2), np.int64)

    def run(block: int, workers: int) -> dict[str, float]:
        return rank_metrics(lambda ub: scores[ub], relevant, exclude, 50, 30, ks=(5, 10), block=block, workers=workers)

    # Workers: bitwise the same (blocks are summed in order). Block size: the same up to float summation order.
    assert run(7, 1) == run(7, 3) and run(1, 1) == run(1, 4)
    for key, value in run(50, 1).items():
        assert run(7, 2)[key] == pytest.approx(value, abs=1e-15)
    # Ties broken by id: user 0's top-5 is the lowest ids among its highest scores.
    order = sorted(range(30), key=lambda i: (-float(scores[0, i]), i))[:5]
    assert topk_by_score_then_id(scores[:1], 5)[1].tolist() == [order]


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real Taobao data not found at {REAL_DATA}")
def test_taobao_ranking_runs_on_the_real_data():
    """1,024 of the 15,449 Taobao users x all 11,953 items through the paper network with 2 evaluation workers:
    metrics in range. The speed is a benchmark's business (bench/test_bench_eval.py), not a timed assertion."""
    from experiments.recsys import data as D
    from experiments.recsys.train import evaluate, fixed_users

    d = D.load_folder(REAL_DATA)
    torch.manual_seed(0)
    model = MultiTaskNCF(d.num_users, d.num_items, len(d.tasks)).eval()
    users = fixed_users(d, "test", 1024)
    metrics = evaluate(model, d, "test", users=users, workers=2)
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if not k.endswith("_se"))
