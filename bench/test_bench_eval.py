"""Full-ranking evaluation throughput on the real Taobao data (skipped without ../shared/data/taobao).

One benchmark round scores 1,024 of the 15,449 users against all 11,953 items through the paper network with 2
evaluation workers; ``extra_info["projected_all_users_s"]`` scales the median to every user (the target: all users
in <= 60 s on 2 CPU cores). docs/REPRODUCTION.md §2 has the full wall-clock measurement.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import common

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "taobao"


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real Taobao data not found at {REAL_DATA}")
@pytest.mark.skipif("cpu" not in common.devices(), reason="CPU benchmark")
def test_taobao_full_ranking(benchmark):
    from experiments.recsys import data as D
    from experiments.recsys.model import MultiTaskNCF
    from experiments.recsys.train import evaluate, fixed_users

    d = D.load_folder(REAL_DATA)
    torch.manual_seed(0)
    model = MultiTaskNCF(d.num_users, d.num_items, len(d.tasks)).eval()
    users = fixed_users(d, "test", 64 if common.QUICK else 1024)
    benchmark.group = "evaluation cpu"
    benchmark.extra_info.update(kind="evaluation", users=len(users), all_users=d.num_users, items=d.num_items)
    benchmark.pedantic(lambda: evaluate(model, d, "test", users=users, workers=2), rounds=1 if common.QUICK else 3)
    median = common.median_s(benchmark)
    if median is not None:
        benchmark.extra_info["projected_all_users_s"] = median * d.num_users / len(users)
