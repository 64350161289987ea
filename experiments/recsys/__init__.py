"""The multi-task recommender that MetaBalance is evaluated on (He et al., WWW 2022, §5).

``model`` the shared-bottom network, ``data`` loaders/protocol/sampler/synthetic data, ``metrics`` full-ranking
top-K metrics, ``train`` the methods. The command line is ``python -m experiments.recsys``.
"""

from .data import DataFormatError, MultiBehaviorData, TrainSampler, load, synthetic
from .metrics import rank_metrics
from .model import MultiTaskNCF
from .train import TrainConfig, evaluate, evaluate_test, train

__all__ = [
    "DataFormatError",
    "MultiBehaviorData",
    "MultiTaskNCF",
    "TrainConfig",
    "TrainSampler",
    "evaluate",
    "evaluate_test",
    "load",
    "rank_metrics",
    "synthetic",
    "train",
]
