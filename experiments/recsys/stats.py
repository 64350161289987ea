"""Paired significance tests over seeds, without scipy: Student's t (via the regularised incomplete beta
function) and the exact Wilcoxon signed-rank test (enumeration of the 2^n sign patterns)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The continued fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom: ``I_{df/(df+t^2)}(df/2, 1/2)``."""
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def paired_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Paired t-test of ``a - b`` (two-sided): ``(t, p)``; p = 1 when every difference is 0, nan for n < 2."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    n = len(d)
    if n < 2:
        return float("nan"), float("nan")
    sd = d.std(ddof=1)
    if sd == 0.0:
        return (0.0, 1.0) if d.mean() == 0.0 else (math.copysign(math.inf, d.mean()), 0.0)
    t = d.mean() / (sd / math.sqrt(n))
    return float(t), t_two_sided_p(t, n - 1)


def wilcoxon_exact(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Exact two-sided Wilcoxon signed-rank test of ``a - b``: ``(W+, p)``.

    Zero differences are dropped (Wilcoxon's convention), tied |differences| get their average rank, and the null
    distribution is enumerated over all 2^n sign patterns of those ranks (exact also with ties); n <= 20.
    p = P(|W+ - n(n+1)/4| >= |observed - n(n+1)/4|) under the null. With no non-zero difference p = 1.
    """
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    d = d[d != 0.0]
    n = len(d)
    if n == 0:
        return 0.0, 1.0
    if n > 20:
        raise ValueError(f"wilcoxon_exact: enumeration is for n <= 20 pairs, got {n}")
    ranks = _average_ranks(np.abs(d))
    w_plus = float(ranks[d > 0].sum())
    center = ranks.sum() / 2.0
    observed = abs(w_plus - center)
    count = 0
    for signs in itertools.product((0.0, 1.0), repeat=n):
        if abs(float(np.dot(signs, ranks)) - center) >= observed - 1e-9:
            count += 1
    return w_plus, count / 2**n


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks
