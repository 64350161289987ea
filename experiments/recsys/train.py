"""Training and evaluation of the multi-task recommender: MetaBalance, its paper's baselines, and floors.

Methods (MetaBalance §5.1; ``methods.METHODS`` has the one-line list):
    single   the target loss only (auxiliary towers unused)
    vanilla  the sum of all task losses, one backward
    mb       MetaBalance: one backward per task, auxiliary gradients on the shared bottom rescaled toward the
             target's magnitude (strategy A/B/C, relax factor r, moving-average beta)
    mostpop  no training: items ranked by their number of target training purchases (a sanity floor)
    weights, uncertainty, gradnorm, dwa, mgda, pcgrad, gradsim, mtadam: the paper's baselines (``baselines``)

Every task has a binary cross-entropy loss on its own positives and sampled negatives (``data.TrainSampler``);
the shared bottom runs once on all tasks' rows, each tower on its task's rows. Model selection: early stopping
on validation NDCG@10, the best epoch's weights are kept.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mb_kernels import MetaBalance

from . import baselines as B
from .data import MultiBehaviorData, TrainSampler
from .methods import BASELINES
from .methods import METHODS as METHOD_INFO
from .metrics import rank_metrics
from .model import MultiTaskNCF

METHODS = ("single", "vanilla", "mb", "mostpop", *BASELINES)


@dataclass
class TrainConfig:
    """One training run. Defaults are the paper's (Adam lr 1e-3, weight decay 1e-7, batch 256, dropout 0.5)."""

    method: str = "mb"
    strategy: str = "C"
    relax_factor: float = 0.7
    beta: float = 0.9
    seed: int = 0
    epochs: int = 20
    patience: int = 3
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-7
    dropout: float = 0.5
    embed_dim: int = 64
    neg_ratio: int = 1
    mask: str = "all"
    trace_every: int = 0
    """Record MetaBalance diagnostics every this many steps (0: off). Vanilla-Multi then runs through
    MetaBalance with r = 0 — the same update, one backward per task — so its per-task norms can be traced."""
    aux_weight: float = 0.3
    """Weights-Tuning: every auxiliary loss's weight (the target's is 1)."""
    gradnorm_alpha: float = 1.5
    """GradNorm's asymmetry alpha."""
    dwa_temperature: float = 2.0
    """DWA's temperature T."""
    device: str = "cpu"
    shared_output: bool = True
    """MetaBalance methods: ``step(losses, shared_output=h)`` (the towers backpropagated once to the shared
    representation, one batched backward through the bottom; the same gradients, a faster step); False: the plain
    ``step(losses)``."""
    eval_workers: int | None = None
    """CPU threads scoring user blocks in evaluation (None: every core this process may use)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.batch_size <= 0 or self.epochs < 0 or self.neg_ratio < 0:
            raise ValueError("batch_size must be positive, epochs and neg_ratio non-negative")

    @property
    def name(self) -> str:
        """The ``--methods`` name (``mb-C`` etc.)."""
        return f"mb-{self.strategy}" if self.method == "mb" else self.method

    @property
    def label(self) -> str:
        info = METHOD_INFO[self.name]
        if info.hyper is None:
            return info.label
        return f"{info.label} ({info.symbol}={getattr(self, info.hyper):g})"


def method_label(method: str, strategy: str = "C", relax_factor: float = 0.7) -> str:
    """The label of a configuration (kept for callers of the old signature)."""
    return TrainConfig(method=method, strategy=strategy, relax_factor=relax_factor).label


@dataclass
class RunResult:
    config: TrainConfig
    valid: dict[str, float]
    best_epoch: int
    history: list[dict[str, Any]]
    train_seconds: float
    test: dict[str, float] | None = None
    trace: dict[str, Any] | None = None
    model: Any = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("model", "trace", "config")}
        out["config"] = asdict(self.config)
        out["label"] = self.config.label
        return out


Progress = Callable[[str], None]


def _log(progress: Progress | None, text: str) -> None:
    if progress is not None:
        progress(text)


def evaluate(
    model: MultiTaskNCF | None,
    data: MultiBehaviorData,
    split: str = "valid",
    users: np.ndarray | None = None,
    popularity: torch.Tensor | None = None,
    mask: str = "all",
    workers: int | None = None,
) -> dict[str, float]:
    """Full-ranking metrics of the target task on ``split`` ("valid" or "test").

    Also returns ``ndcg@10_se``, the standard error of the NDCG@10 mean over the evaluated users.
    ``workers``: CPU threads scoring user blocks concurrently (default: every core this process may use; 1 for
    a model on a GPU). On CPU, torch's own intra-op threads are set to 1 meanwhile (restored after): on a shared
    machine, fine-grained parallel regions stall at every barrier (a 2,048-user evaluation took 335 s instead of
    5 s with two intra-op threads while another process held a core) while a coarse block per thread keeps going.

    Masked: the training positives — of the target only (``mask="target"``) or of every task (``mask="all"``,
    the default) — and, for "test", the validation pair (a known purchase). ``model=None`` ranks by
    ``popularity`` (MostPop).

    Why "all" by default: the protocol removes the held-out purchases from the auxiliary training pairs, so a
    user's remaining viewed/carted items are by construction *not* the held-out one; left in the ranking, a
    multi-task model puts them on top (the auxiliaries taught it they are likely purchases) and every such slot
    is a guaranteed miss. Masking every training positive ranks only the items the user has not interacted with.
    """
    if mask not in ("all", "target"):
        raise ValueError(f"mask must be 'all' or 'target', got {mask!r}")
    seen = [data.train[data.target]] if mask == "target" else list(data.train.values())
    if split == "valid":
        relevant, exclude = data.valid, np.concatenate(seen)
    else:
        relevant, exclude = data.test, np.concatenate([*seen, data.valid])
    on_gpu = model is not None and next(model.parameters()).device.type != "cpu"
    if workers is None:
        workers = 1 if on_gpu else min(8, len(os.sched_getaffinity(0)))
    if model is not None:
        model.eval()

        def scorer(ub: torch.Tensor) -> torch.Tensor:
            return model.score_all_items(ub, task=0).cpu()

    else:

        def scorer(ub: torch.Tensor) -> torch.Tensor:
            return popularity.expand(len(ub), -1).clone()

    threads = torch.get_num_threads()
    if not on_gpu:  # one intra-op thread per worker, also for workers=1 (see the docstring)
        torch.set_num_threads(1)
    try:
        means, per_user = rank_metrics(
            scorer,
            relevant,
            exclude,
            data.num_users,
            data.num_items,
            users=users,
            block=256,
            workers=workers,
            per_user=True,
        )
    finally:
        torch.set_num_threads(threads)
    n = len(per_user["ndcg@10"])
    means["ndcg@10_se"] = float(per_user["ndcg@10"].std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return means


def fixed_users(data: MultiBehaviorData, split: str, count: int | None, seed: int = 12345) -> np.ndarray | None:
    """A fixed random subsample of ``count`` evaluation users (the same for every method), or None for all."""
    pairs = data.valid if split == "valid" else data.test
    users = np.unique(pairs[:, 0])
    if count is None or count >= len(users):
        return None
    return np.sort(np.random.default_rng(seed).choice(users, size=count, replace=False))


def train(
    data: MultiBehaviorData,
    cfg: TrainConfig,
    progress: Progress | None = None,
    val_users: np.ndarray | None = None,
) -> RunResult:
    """Train one configuration with early stopping on validation NDCG@10; the best weights are kept."""
    if cfg.method == "mostpop":
        pop = torch.as_tensor(np.bincount(data.train[data.target][:, 1], minlength=data.num_items), dtype=torch.float32)
        valid = evaluate(None, data, "valid", val_users, popularity=pop, mask=cfg.mask, workers=cfg.eval_workers)
        result = RunResult(cfg, valid, 0, [], 0.0)
        result.model = pop
        return result

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch.device(cfg.device)
    model = MultiTaskNCF(data.num_users, data.num_items, len(data.tasks), cfg.embed_dim, dropout=cfg.dropout)
    model.to(device)
    tracing = cfg.trace_every > 0 and cfg.method in ("mb", "vanilla")
    balancer = None
    if cfg.method == "mb" or (tracing and cfg.method == "vanilla"):
        r = cfg.relax_factor if cfg.method == "mb" else 0.0
        balancer = MetaBalance(model.shared_parameters(), relax_factor=r, beta=cfg.beta, strategy=cfg.strategy)
    combiner = make_combiner(cfg, model)
    extra = combiner.parameters() if combiner is not None else []
    optimizer = torch.optim.Adam(
        [
            {"params": list(model.parameters()), "weight_decay": cfg.weight_decay},
            *([{"params": extra, "weight_decay": 0.0}] if extra else []),
        ],
        lr=cfg.lr,
    )
    sampler = TrainSampler(data, cfg.neg_ratio, tasks=1 if cfg.method == "single" else None)
    steps = sampler.steps_per_epoch(cfg.batch_size)
    trace = _new_trace(model, data) if tracing else None
    history: list[dict[str, Any]] = []
    best, best_epoch, best_state, bad_epochs, step = -math.inf, 0, None, 0, 0
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sums = torch.zeros(len(data.tasks), dtype=torch.float64, device=device)
        for b, (users, items, labels, segments) in enumerate(sampler.epoch(rng, cfg.batch_size), 1):
            h = model.shared(torch.from_numpy(users).to(device), torch.from_numpy(items).to(device))
            y = torch.from_numpy(labels).to(device)
            losses = [
                F.binary_cross_entropy_with_logits(model.towers[t](h[sl]).squeeze(-1), y[sl])
                for t, sl in enumerate(segments)
            ]
            optimizer.zero_grad(set_to_none=True)
            if cfg.method == "single":
                losses[0].backward()
            elif balancer is not None:
                balancer.step(losses, shared_output=h if cfg.shared_output else None)
            elif combiner is not None:
                combiner.backward(losses)
            else:
                torch.stack(losses).sum().backward()
            if combiner is None or not combiner.owns_step:
                optimizer.step()
            step += 1
            loss_sums[: len(losses)] += torch.stack([loss.detach() for loss in losses]).double()
            if trace is not None and step % cfg.trace_every == 0:
                _record(trace, balancer, step)
            if progress is not None and (b % max(1, steps // 10) == 0 or b == steps):
                _log(progress, f"  {cfg.label} seed {cfg.seed} epoch {epoch}: {_bar(b, steps)}\r")
        loss_sums = loss_sums.cpu().numpy()
        # Per-task weights: DWA's used this epoch, the learned ones at its end, GradSim's fraction of steps used.
        weights_used = combiner.weights() if combiner is not None else None
        if combiner is not None:
            combiner.end_epoch(loss_sums[: len(losses)] / max(b, 1))
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        valid = evaluate(model, data, "valid", val_users, mask=cfg.mask, workers=cfg.eval_workers)
        eval_s = time.perf_counter() - t1
        score = valid["ndcg@10"]
        improved = score > best
        if improved:
            best, best_epoch, bad_epochs = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
        losses_text = " ".join(f"{t} {v / max(b, 1):.4f}" for t, v in zip(data.tasks, loss_sums))
        history.append(
            {
                "epoch": epoch,
                "loss": (loss_sums / max(b, 1)).tolist(),
                "valid": valid,
                "train_s": train_s,
                "eval_s": eval_s,
                **({"task_weights": weights_used} if weights_used is not None else {}),
            }
        )
        _log(
            progress,
            f"  {cfg.label} seed {cfg.seed} epoch {epoch}/{cfg.epochs}: loss {losses_text} | val NDCG@10 "
            f"{score:.4f} R@10 {valid['recall@10']:.4f}{' *' if improved else ''} | train {train_s:.1f}s eval "
            f"{eval_s:.1f}s\n",
        )
        if bad_epochs >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result = RunResult(
        cfg,
        history[best_epoch - 1]["valid"] if history else {},
        best_epoch,
        history,
        time.perf_counter() - start,
        trace=trace,
    )
    result.model = model
    return result


def make_combiner(cfg: TrainConfig, model: MultiTaskNCF) -> B.Combiner | None:
    """The baseline's combiner for ``cfg.method`` (None for single / vanilla / mb / mostpop)."""
    shared = model.shared_parameters()
    towers = [list(t.parameters()) for t in model.towers]
    m = cfg.method
    if m == "weights":
        return B.FixedWeights(shared, towers, cfg.aux_weight)
    if m == "uncertainty":
        return B.Uncertainty(shared, towers)
    if m == "gradnorm":
        last = [p for layer in model.mlp if isinstance(layer, torch.nn.Linear) for p in layer.parameters()][-2:]
        return B.GradNorm(shared, towers, last, alpha=cfg.gradnorm_alpha)
    if m == "dwa":
        return B.DWA(shared, towers, cfg.dwa_temperature)
    if m == "mgda":
        return B.MGDA(shared, towers)
    if m == "pcgrad":
        return B.PCGrad(shared, towers, seed=cfg.seed)
    if m == "gradsim":
        return B.GradSim(shared, towers)
    if m == "mtadam":
        return B.MTAdam(shared, towers, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return None


def evaluate_test(result: RunResult, data: MultiBehaviorData, users: np.ndarray | None = None) -> dict[str, float]:
    """Test metrics of a trained run (its best-validation weights); stored on the result."""
    if result.config.method == "mostpop":
        result.test = evaluate(
            None,
            data,
            "test",
            users,
            popularity=result.model,
            mask=result.config.mask,
            workers=result.config.eval_workers,
        )
    else:
        result.test = evaluate(
            result.model, data, "test", users, mask=result.config.mask, workers=result.config.eval_workers
        )
    return result.test


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = int(width * done / max(total, 1))
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def _new_trace(model: MultiTaskNCF, data: MultiBehaviorData) -> dict[str, Any]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        "tasks": data.tasks,
        "params": [names[id(p)] for p in model.shared_parameters()],
        "step": [],
        "norm_ema": [],
        "weights": [],
    }


def _record(trace: dict[str, Any], balancer: MetaBalance, step: int) -> None:
    rows = balancer.diagnostics()
    trace["step"].append(step)
    trace["norm_ema"].append([row["norm_ema"].tolist() for row in rows])
    trace["weights"].append([row["weights"].tolist() for row in rows])


def summarize(runs: list[RunResult], split: str = "test") -> dict[str, tuple[float, float]]:
    """Mean and (sample) standard deviation of every metric over runs (seeds)."""
    metrics = [getattr(r, split) for r in runs if getattr(r, split)]
    if not metrics:
        return {}
    out = {}
    for key in metrics[0]:
        values = np.array([m[key] for m in metrics])
        out[key] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    return out
