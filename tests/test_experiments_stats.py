"""Paired significance tests (experiments/recsys/stats.py) against closed forms, numeric integration and exact
enumeration — scipy is not a dependency."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from experiments.recsys import stats as S


def _t_two_sided_numeric(t: float, df: int, n: int = 200_000) -> float:
    """2 * integral_|t|^inf of the Student t density, by the trapezoid rule after x = |t| / u (u in (0, 1])."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    u = np.linspace(1e-9, 1.0, n)
    x = abs(t) / u
    f = c * (1 + x * x / df) ** (-(df + 1) / 2) * abs(t) / (u * u)
    return float(2 * np.trapezoid(f, u))


def test_t_distribution_closed_forms():
    assert S.t_two_sided_p(1.0, 1) == pytest.approx(0.5, abs=1e-12)  # Cauchy: P(|T| > 1) = 1/2
    assert S.t_two_sided_p(0.0, 4) == pytest.approx(1.0, abs=1e-12)
    # df = 2: P(|T| > t) = 1 - t / sqrt(2 + t^2).
    for t in (0.3, 1.7, 4.0):
        assert S.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    # Large df: the normal tail, 2 * (1 - Phi(1.96)) = 0.04999579.
    assert S.t_two_sided_p(1.959963984540054, 10**7) == pytest.approx(0.05, rel=1e-5)


@pytest.mark.parametrize(("t", "df"), [(2.0, 5), (0.7, 3), (3.5, 9), (-2.2, 4)])
def test_t_distribution_matches_numeric_integration(t, df):
    assert S.t_two_sided_p(t, df) == pytest.approx(_t_two_sided_numeric(t, df), rel=1e-5)


def test_paired_t():
    a, b = [0.1, 0.2, 0.3, 0.4, 0.5], [0.05, 0.1, 0.2, 0.33, 0.41]
    t, p = S.paired_t(a, b)
    d = np.subtract(a, b)
    assert t == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(5)))
    assert p == pytest.approx(S.t_two_sided_p(t, 4))
    assert S.paired_t([1.0, 2.0], [1.0, 2.0]) == (0.0, 1.0)
    assert math.isnan(S.paired_t([1.0], [0.0])[1])


def test_wilcoxon_exact_small_cases():
    # All five differences positive: only 2 of 32 sign patterns are as extreme -> p = 1/16.
    assert S.wilcoxon_exact([1, 2, 3, 4, 5], [0, 0, 0, 0, 0]) == (15.0, pytest.approx(0.0625))
    # Zero differences are dropped; no difference left -> p = 1.
    assert S.wilcoxon_exact([1, 2], [1, 2]) == (0.0, 1.0)
    # Symmetric around zero: p = 1.
    assert S.wilcoxon_exact([1, -1, 2, -2], [0, 0, 0, 0])[1] == pytest.approx(1.0)


def test_wilcoxon_exact_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    d = np.round(rng.normal(size=7), 1)  # rounding makes tied |d|
    w, p = S.wilcoxon_exact(d, np.zeros(7))
    nz = d[d != 0]
    ranks = S._average_ranks(np.abs(nz))
    center = ranks.sum() / 2
    obs = abs(ranks[nz > 0].sum() - center)
    count = sum(abs(np.dot(s, ranks) - center) >= obs - 1e-9 for s in itertools.product((0, 1), repeat=len(nz)))
    assert w == ranks[nz > 0].sum() and p == count / 2 ** len(nz)
    assert S._average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
