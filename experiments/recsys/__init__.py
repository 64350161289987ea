"""The multi-task recommender that MetaBalance is evaluated on (He et al., WWW 2022, §5).

``model`` the shared-bottom network, ``data`` loaders/protocol/sampler/synthetic data, ``metrics`` full-ranking
top-K metrics, ``train`` the methods, ``baselines`` the paper's baselines, ``stats`` paired significance tests.
The command line is ``python -m experiments.recsys``. Names are imported lazily, so ``--help`` needs no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataFormatError": "data",
    "MultiBehaviorData": "data",
    "TrainSampler": "data",
    "load": "data",
    "synthetic": "data",
    "rank_metrics": "metrics",
    "MultiTaskNCF": "model",
    "TrainConfig": "train",
    "evaluate": "train",
    "evaluate_test": "train",
    "train": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
