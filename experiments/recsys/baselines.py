"""The MetaBalance paper's baselines (its Table 2), each implemented here from its own paper.

Each method is a ``Combiner``: given the per-task losses of a step (target first) it sets ``.grad`` on the model's
parameters, after which the app's Adam steps (MTAdam is its own optimiser and steps itself). Methods that need
per-task gradients get them with one ``torch.autograd.grad`` per task on the shared bottom plus that task's tower
(``task_gradients``) — what MetaBalance's capture also costs; loss-weighting methods need a single backward.
The library (``mb_kernels``) stays MetaBalance-only.

    weights      Weights-Tuning: L_0 + w * sum_aux L_t, w chosen on validation
    uncertainty  Kendall, Gal & Cipolla (CVPR 2018): sum_t exp(-s_t) L_t + s_t / 2, s_t = log sigma_t^2 learned
    gradnorm     Chen et al. (ICML 2018): loss weights learned so that w_t ||grad_W L_t|| on the last shared layer
                 W tracks the mean norm times (relative inverse training rate)^alpha
    dwa          Liu, Johns & Davison (CVPR 2019), Dynamic Weight Average: w_t = T exp(r_t / tau) / sum exp(r / tau),
                 r_t = L_t(epoch - 1) / L_t(epoch - 2)
    mgda         Sener & Koltun (NeurIPS 2018): the min-norm point of the convex hull of the task gradients —
                 exact MGDA on the shared parameters, the min-norm point solved exactly (not the MGDA-UB bound on
                 the representation: here every task's loss is on its own rows, so gradients w.r.t. the
                 representation are trivially orthogonal)
    pcgrad       Yu et al. (NeurIPS 2020), "gradient surgery": each task gradient loses its component along any
                 other task's gradient it conflicts with (negative dot product), in random order, then summed
    gradsim      Du et al. (2018), "Adapting auxiliary losses using gradient similarity": an auxiliary gradient
                 is added to the target's only when their cosine similarity is positive (the unweighted variant)
    mtadam       Malkiel & Wolf (EMNLP 2021): Adam with per-term moments; per layer, every term's gradient is
                 rescaled to the anchor's (target's) moving-average magnitude; step by the max second moment

Towers: for the loss-weighting methods a tower gets its weighted loss's gradient; for the gradient-combining
methods (mgda, pcgrad, gradsim, mtadam) the surgery acts on the shared bottom and each tower gets its own task's
gradient, as in those papers (task-specific parameters are not shared, nothing conflicts there).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

Tensors = list[torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Per-task gradients and vector helpers


def task_gradients(
    losses: Sequence[torch.Tensor], shared: Sequence[torch.Tensor], towers: Sequence[Sequence[torch.Tensor]]
) -> tuple[list[Tensors], list[Tensors]]:
    """``(shared_grads[t], tower_grads[t])``: one ``autograd.grad`` per task, on the shared tensors and its tower."""
    shared_grads, tower_grads = [], []
    for t, loss in enumerate(losses):
        inputs = [*shared, *towers[t]]
        grads = torch.autograd.grad(loss, inputs, retain_graph=t < len(losses) - 1, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, grads)]
        shared_grads.append(grads[: len(shared)])
        tower_grads.append(grads[len(shared) :])
    return shared_grads, tower_grads


def _dot(a: Tensors, b: Tensors) -> float:
    return float(sum(torch.sum(x * y, dtype=torch.float64) for x, y in zip(a, b)))


def _axpy(alpha: float, x: Tensors, y: Tensors) -> Tensors:
    """``y + alpha * x`` (new tensors)."""
    return [yy + alpha * xx for xx, yy in zip(x, y)]


def _scale(alpha: float, x: Tensors) -> Tensors:
    return [alpha * xx for xx in x]


# ---------------------------------------------------------------------------------------------------------------
# The combination rules, as pure functions on lists of per-task gradients (what the toy tests exercise)


def pcgrad_combine(grads: Sequence[Tensors], rng: np.random.Generator) -> Tensors:
    """PCGrad (Yu et al. 2020, Alg. 1): for each task i, for the other tasks j in a random order, if
    ``g_i' . g_j < 0`` replace ``g_i'`` by ``g_i' - (g_i' . g_j) / |g_j|^2 g_j``; return the sum of the ``g_i'``."""
    num = len(grads)
    sq = [_dot(g, g) for g in grads]
    out: Tensors | None = None
    for i in range(num):
        gi = list(grads[i])
        for j in rng.permutation(num):
            if j == i or sq[j] == 0.0:
                continue
            d = _dot(gi, grads[j])
            if d < 0.0:
                gi = _axpy(-d / sq[j], grads[j], gi)
        out = gi if out is None else [a + b for a, b in zip(out, gi)]
    return out


def gradsim_mask(grads: Sequence[Tensors]) -> list[bool]:
    """Du et al. (2018): which auxiliary gradients are used — those with positive cosine to the target's (index 0).

    The target is always used; an auxiliary with cosine <= 0 (or a zero gradient either side) is dropped.
    """
    g0 = grads[0]
    n0 = math.sqrt(_dot(g0, g0))
    keep = [True]
    for g in grads[1:]:
        n = math.sqrt(_dot(g, g))
        keep.append(n0 > 0.0 and n > 0.0 and _dot(g0, g) / (n0 * n) > 0.0)
    return keep


def min_norm_weights(gram: np.ndarray, iterations: int = 1000) -> np.ndarray:
    """The convex weights ``alpha`` (sum 1, >= 0) minimising ``|sum_t alpha_t g_t|^2`` given the Gram matrix.

    The min-norm point of the convex hull of the task gradients, MGDA's common descent direction (Sener &
    Koltun 2018, Thm. 1 / Alg. 2). Up to 10 tasks it is solved exactly: on each candidate support S the
    equality-constrained problem is a linear (KKT) system; the best feasible solution over all supports is the
    optimum. More tasks: the paper's Frank-Wolfe iteration with exact line search.
    """
    gram = np.asarray(gram, dtype=np.float64)
    num = len(gram)
    if num == 1:
        return np.ones(1)
    if num <= 10:
        best, best_value = None, math.inf
        for size in range(1, num + 1):
            for support in itertools.combinations(range(num), size):
                idx = list(support)
                kkt = np.zeros((size + 1, size + 1))
                kkt[:size, :size] = gram[np.ix_(idx, idx)]
                kkt[:size, size] = kkt[size, :size] = 1.0
                rhs = np.zeros(size + 1)
                rhs[size] = 1.0
                sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
                if sol.min() < -1e-12 or not np.isfinite(sol).all():
                    continue
                alpha = np.zeros(num)
                alpha[idx] = np.clip(sol, 0.0, None)
                alpha /= alpha.sum()
                value = float(alpha @ gram @ alpha)
                if value < best_value - 1e-15:
                    best, best_value = alpha, value
        return best
    alpha = np.full(num, 1.0 / num)
    for _ in range(iterations):
        grad = gram @ alpha  # <g_t, d> for the current point d = sum alpha g
        t = int(np.argmin(grad))
        # Line search between the current point d and vertex g_t: minimise |(1 - gamma) d + gamma g_t|^2.
        dd, dt, tt = alpha @ gram @ alpha, grad[t], gram[t, t]
        denom = dd - 2 * dt + tt
        gamma = 1.0 if denom <= 0 else float(np.clip((dd - dt) / denom, 0.0, 1.0))
        if gamma == 0.0:
            break
        alpha = (1 - gamma) * alpha
        alpha[t] += gamma
    return alpha


def dwa_weights(history: Sequence[Sequence[float]], temperature: float = 2.0) -> np.ndarray:
    """Dynamic Weight Average (Liu et al. 2019, eq. 7) from the per-epoch mean losses of the epochs so far.

    ``w_t = T exp(r_t / tau) / sum_k exp(r_k / tau)`` with ``r_t = L_t(e-1) / L_t(e-2)``; 1 for the first two
    epochs (fewer than two completed epochs in ``history``).
    """
    num = len(history[-1]) if history else 0
    if len(history) < 2:
        return np.ones(num)
    ratio = np.asarray(history[-1], np.float64) / np.maximum(np.asarray(history[-2], np.float64), 1e-12)
    z = np.exp((ratio - ratio.max()) / temperature)  # shifted: same softmax, no overflow
    return len(ratio) * z / z.sum()


# ---------------------------------------------------------------------------------------------------------------
# Combiners: one object per training run


class Combiner:
    """Sets the model's gradients from the per-task losses of a step; see the module docstring."""

    owns_step = False
    """True when ``backward`` also updates the parameters (MTAdam): the app then skips its optimizer's step."""

    def __init__(self, shared: Sequence[torch.Tensor], towers: Sequence[Sequence[torch.Tensor]]) -> None:
        self.shared, self.towers = list(shared), [list(t) for t in towers]
        self.loss_history: list[list[float]] = []

    def parameters(self) -> list[torch.Tensor]:
        """Extra learnable tensors trained by the app's optimizer with the model (none by default)."""
        return []

    def backward(self, losses: Sequence[torch.Tensor]) -> None:
        raise NotImplementedError

    def end_epoch(self, mean_losses: Sequence[float]) -> None:
        """Called after every epoch with the epoch's mean loss per task."""
        self.loss_history.append([float(x) for x in mean_losses])

    def weights(self) -> list[float] | None:
        """The current per-task loss weights, where the method has them (logged per epoch)."""
        return None

    def _set(self, shared_grad: Tensors, tower_grads: Sequence[Tensors]) -> None:
        for p, g in zip(self.shared, shared_grad):
            p.grad = g
        for params, grads in zip(self.towers, tower_grads):
            for p, g in zip(params, grads):
                p.grad = g


class FixedWeights(Combiner):
    """Weights-Tuning: ``L_0 + w * sum_aux L_t`` (one backward)."""

    def __init__(self, shared, towers, aux_weight: float) -> None:
        super().__init__(shared, towers)
        self.aux_weight = float(aux_weight)

    def backward(self, losses):
        (losses[0] + self.aux_weight * torch.stack(list(losses[1:])).sum()).backward()

    def weights(self):
        return [1.0] + [self.aux_weight] * (len(self.towers) - 1)


class Uncertainty(Combiner):
    """Kendall et al. (2018), classification form: ``sum_t exp(-s_t) L_t + s_t / 2`` with learned ``s_t``.

    For a softmax/Bernoulli likelihood scaled by 1/sigma^2 the paper's objective is ``L / sigma^2 + log sigma``;
    with ``s = log sigma^2`` that is ``exp(-s) L + s / 2``, whose minimum over s, at fixed L, is ``s = log(2 L)``.
    """

    def __init__(self, shared, towers) -> None:
        super().__init__(shared, towers)
        self.log_var = torch.zeros(len(self.towers), device=self.shared[0].device, requires_grad=True)

    def parameters(self):
        return [self.log_var]

    def backward(self, losses):
        s = self.log_var
        (torch.exp(-s) * torch.stack(list(losses)) + 0.5 * s).sum().backward()

    def weights(self):
        return torch.exp(-self.log_var.detach()).tolist()


class DWA(Combiner):
    """Dynamic Weight Average: loss weights fixed within an epoch, from the last two epochs' loss ratios."""

    def __init__(self, shared, towers, temperature: float = 2.0) -> None:
        super().__init__(shared, towers)
        self.temperature = float(temperature)
        self._w = torch.ones(len(self.towers), device=self.shared[0].device)

    def backward(self, losses):
        (self._w * torch.stack(list(losses))).sum().backward()

    def end_epoch(self, mean_losses):
        super().end_epoch(mean_losses)
        self._w = torch.as_tensor(
            dwa_weights(self.loss_history, self.temperature), dtype=torch.float32, device=self.shared[0].device
        )

    def weights(self):
        return self._w.tolist()


class GradNorm(Combiner):
    """GradNorm (Chen et al. 2018, Alg. 1) with W = the last shared layer's parameters.

    Per step: ``G_t = w_t |grad_W L_t|``, ``r_t = (L_t / L_t(0)) / mean_k (L_k / L_k(0))``, target
    ``mean(G) * r_t^alpha`` held constant; ``L_grad = sum_t |G_t - target_t|``, whose gradient w.r.t. ``w_t`` is
    ``sign(G_t - target_t) |grad_W L_t|`` (no second-order backward needed). The network gets
    ``grad(sum_t w_t L_t)``; the weights take an Adam step on ``L_grad`` and are renormalised to sum to T.
    Here W is the shared MLP's last Linear: the top of the shared bottom that has weights (the MF branch's
    elementwise product has none).
    """

    def __init__(self, shared, towers, last_shared: Sequence[torch.Tensor], alpha: float = 1.5, lr: float = 0.025):
        super().__init__(shared, towers)
        self.last_shared = list(last_shared)
        self.alpha = float(alpha)
        num = len(self.towers)
        self.w = torch.ones(num, device=self.shared[0].device, requires_grad=True)
        self.w_optimizer = torch.optim.Adam([self.w], lr=lr)
        self.initial: torch.Tensor | None = None

    def backward(self, losses):
        stacked = torch.stack(list(losses))
        norms = []
        for loss in losses:  # |grad_W L_t| on the last shared layer only: cheap partial backward passes
            grads = torch.autograd.grad(loss, self.last_shared, retain_graph=True, allow_unused=True)
            norms.append(math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads if g is not None)))
        norms_t = torch.tensor(norms, device=self.w.device)
        loss_now = stacked.detach()
        if self.initial is None:
            self.initial = loss_now.clamp_min(1e-12)
        w = self.w.detach()
        g = w * norms_t
        ratio = loss_now / self.initial
        rel = ratio / ratio.mean()
        target = g.mean() * rel**self.alpha
        (w * stacked).sum().backward()  # the network's gradient at the current weights
        self.w_optimizer.zero_grad(set_to_none=True)
        self.w.grad = torch.sign(g - target) * norms_t
        self.w_optimizer.step()
        with torch.no_grad():  # renormalise: sum_t w_t = T, weights positive
            self.w.clamp_(min=1e-3)
            self.w.mul_(len(self.towers) / self.w.sum())

    def weights(self):
        return self.w.detach().tolist()


class _PerTask(Combiner):
    """Base of the gradient-combining methods: per-task gradients on the shared bottom, own gradient per tower."""

    def backward(self, losses):
        shared_grads, tower_grads = task_gradients(losses, self.shared, self.towers)
        self._set(self.combine(shared_grads), tower_grads)

    def combine(self, grads: list[Tensors]) -> Tensors:
        raise NotImplementedError


class PCGrad(_PerTask):
    def __init__(self, shared, towers, seed: int = 0) -> None:
        super().__init__(shared, towers)
        self.rng = np.random.default_rng(seed)

    def combine(self, grads):
        return pcgrad_combine(grads, self.rng)


class GradSim(_PerTask):
    def __init__(self, shared, towers) -> None:
        super().__init__(shared, towers)
        self.used = np.zeros(len(self.towers))
        self.steps = 0

    def combine(self, grads):
        keep = gradsim_mask(grads)
        self.used += keep
        self.steps += 1
        out = list(grads[0])
        for g, k in zip(grads[1:], keep[1:]):
            if k:
                out = [a + b for a, b in zip(out, g)]
        return out

    def weights(self):
        """The fraction of steps each task's gradient was used in (the target: always)."""
        return (self.used / max(self.steps, 1)).tolist()


class MGDA(_PerTask):
    def __init__(self, shared, towers) -> None:
        super().__init__(shared, towers)
        self.alpha = np.full(len(self.towers), 1.0 / len(self.towers))

    def combine(self, grads):
        num = len(grads)
        gram = np.array([[_dot(grads[i], grads[j]) for j in range(num)] for i in range(num)])
        self.alpha = min_norm_weights(gram)
        out = _scale(float(self.alpha[0]), grads[0])
        for a, g in zip(self.alpha[1:], grads[1:]):
            out = _axpy(float(a), g, out)
        return out

    def weights(self):
        return self.alpha.tolist()


class MTAdam(Combiner):
    """MTAdam (Malkiel & Wolf 2021) as the optimiser of every parameter; term 0 (the target) is the anchor.

    Per parameter tensor ("layer") p and term t with a gradient on it: ``n_t <- b3 n_t + (1 - b3) |g_t|``;
    ``g_t <- g_t * n_0 / n_t`` (balanced to the anchor's magnitude; terms on a tensor the anchor does not reach,
    i.e. an auxiliary tower, are left as they are); per-term Adam moments ``m_t, v_t`` of the balanced gradient;
    ``p <- p - lr * sum_t m_hat_t / (sqrt(max_t v_hat_t) + eps)`` — one shared denominator, the largest second
    moment, so a term that is locally steep makes the whole step cautious. Weight decay is added to the anchor's
    gradient (L2, as in Adam).
    """

    owns_step = True

    def __init__(
        self,
        shared,
        towers,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(shared, towers)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.state: dict[int, dict[str, object]] = {}
        self.step_count = 0

    def backward(self, losses):
        shared_grads, tower_grads = task_gradients(losses, self.shared, self.towers)
        self.step_count += 1
        with torch.no_grad():
            for k, p in enumerate(self.shared):
                self._update(p, [g[k] for g in shared_grads])
            for t, params in enumerate(self.towers):
                for k, p in enumerate(params):
                    # Only task t reaches its tower: a single term (anchored to itself).
                    self._update(p, [tower_grads[t][k]])

    def _update(self, p: torch.Tensor, grads: Tensors) -> None:
        b1, b2, b3 = self.betas
        st = self.state.setdefault(
            id(p),
            {
                "n": [0.0] * len(grads),
                "m": [torch.zeros_like(p) for _ in grads],
                "v": [torch.zeros_like(p) for _ in grads],
            },
        )
        if self.weight_decay:
            grads = [grads[0] + self.weight_decay * p, *grads[1:]]
        norms = [float(torch.linalg.vector_norm(g)) for g in grads]
        for t, n in enumerate(norms):
            st["n"][t] = b3 * st["n"][t] + (1 - b3) * n
        anchor = st["n"][0]
        step = self.step_count
        numer, denom = torch.zeros_like(p), None
        for t, g in enumerate(grads):
            if t > 0 and st["n"][t] > 0.0:
                g = g * (anchor / st["n"][t])
            st["m"][t].mul_(b1).add_(g, alpha=1 - b1)
            st["v"][t].mul_(b2).addcmul_(g, g, value=1 - b2)
            numer += st["m"][t] / (1 - b1**step)
            v_hat = st["v"][t] / (1 - b2**step)
            denom = v_hat if denom is None else torch.maximum(denom, v_hat)
        p.sub_(self.lr * numer / (denom.sqrt() + self.eps))
