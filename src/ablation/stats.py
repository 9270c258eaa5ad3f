"""Small-sample statistics for comparing sweep arms: Student-t confidence intervals, paired and Welch differences.

Plain functions on sequences of floats. Quantiles and p-values come from ``scipy.special.stdtrit`` / ``stdtr`` (the
Student t inverse CDF and CDF) rather than ``scipy.stats``, which keeps the import cheap and leaves ``scipy.stats``
free to serve as an independent reference in the tests. With a handful of seeds per arm the t distribution (not
the normal) is what makes an interval honest: at n = 2 its 97.5% quantile is 12.7, not 1.96.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

PAIRED = "paired"
WELCH = "welch"


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with its sample standard deviation (ddof=1) and a two-sided t confidence interval.

    ``sd``, ``low`` and ``high`` are NaN when ``n < 2`` (one value says nothing about spread); ``mean`` is NaN at n = 0.
    """

    n: int
    mean: float
    sd: float
    low: float
    high: float


@dataclass(frozen=True)
class Difference:
    """Estimated difference ``mean(a) - mean(b)`` with its confidence interval and two-sided p-value.

    ``kind`` is ``"paired"`` (``n`` pairs, ``sd`` the standard deviation of the per-pair differences) or ``"welch"``
    (independent samples of sizes ``n_a`` and ``n_b``; ``sd`` is NaN since no per-unit difference exists). ``se`` is
    the standard error of the mean difference and ``df`` the degrees of freedom of the t reference distribution
    (Welch-Satterthwaite for ``"welch"``).
    """

    kind: str
    n: int
    n_a: int
    n_b: int
    mean: float
    sd: float
    se: float
    df: float
    low: float
    high: float
    p_value: float


def _as_array(values: Sequence[float]) -> np.ndarray:
    """The values as a 1-d float64 array (so lists, tuples and arrays behave the same)."""
    return np.asarray(values, dtype=np.float64).reshape(-1)


def t_quantile(level: float, df: float) -> float:
    """The t quantile that a two-sided ``level`` interval spans on each side of the estimate (1.96 as df -> inf)."""
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    from scipy.special import stdtrit

    return float(stdtrit(df, 0.5 + level / 2))


def two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value of a t statistic: the chance of a |T| at least this large when the true difference is 0."""
    if math.isnan(t) or math.isnan(df):
        return math.nan
    from scipy.special import stdtr

    return float(2.0 * stdtr(df, -abs(t)))


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean, sd (ddof=1) and the Student-t interval ``mean ± t_{(1+level)/2, n-1} · sd / √n`` of ``values``.

    Used for one arm's seeds: the interval says how far the arm's mean could plausibly be from what more seeds
    would give, at this n.
    """
    x = _as_array(values)
    n = int(x.size)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Interval(n, mean, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = t_quantile(level, n - 1) * sd / math.sqrt(n)
    return Interval(n, mean, sd, mean - half, mean + half)


def _t_statistic(mean: float, se: float) -> float:
    """``mean / se``, with 0/0 as NaN and x/0 as ±inf (identical samples carry no evidence either way)."""
    if se == 0:
        return math.nan if mean == 0 else math.copysign(math.inf, mean)
    return mean / se


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Difference:
    """Paired t analysis of ``a - b`` where ``a[i]`` and ``b[i]`` share a unit (the same training seed).

    Pairing removes the seed-to-seed variation the two arms share, so it detects smaller effects than an unpaired
    comparison of the same runs. Needs at least 2 pairs; the p-value tests "mean difference = 0".
    """
    x, y = _as_array(a), _as_array(b)
    if x.size != y.size:
        raise ValueError(f"paired samples need equal lengths, got {x.size} and {y.size}")
    if x.size < 2:
        raise ValueError(f"a paired difference needs at least 2 pairs, got {x.size}")
    d = x - y
    ci = mean_ci(d, level)
    se = ci.sd / math.sqrt(ci.n)
    df = float(ci.n - 1)
    p = two_sided_p(_t_statistic(ci.mean, se), df)
    return Difference(PAIRED, ci.n, ci.n, ci.n, ci.mean, ci.sd, se, df, ci.low, ci.high, p)


def welch_df(var_a: float, n_a: int, var_b: float, n_b: int) -> float:
    """Welch-Satterthwaite degrees of freedom of a difference of two means with unequal variances."""
    ua, ub = var_a / n_a, var_b / n_b
    denom = ua * ua / (n_a - 1) + ub * ub / (n_b - 1)
    return math.nan if denom == 0 else (ua + ub) ** 2 / denom


def welch_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Difference:
    """Welch's unpaired t analysis of ``mean(a) - mean(b)`` for independent samples (no shared seeds to pair by).

    Does not assume equal variances; needs at least 2 values in each sample.
    """
    x, y = _as_array(a), _as_array(b)
    if x.size < 2 or y.size < 2:
        raise ValueError(f"Welch's test needs at least 2 values per sample, got {x.size} and {y.size}")
    var_a, var_b = float(x.var(ddof=1)), float(y.var(ddof=1))
    mean = float(x.mean() - y.mean())
    se = math.sqrt(var_a / x.size + var_b / y.size)
    df = welch_df(var_a, x.size, var_b, y.size)
    if math.isnan(df):
        low = high = mean
    else:
        half = t_quantile(level, df) * se
        low, high = mean - half, mean + half
    p = two_sided_p(_t_statistic(mean, se), df) if se > 0 else _t_zero_se_p(mean)
    return Difference(WELCH, int(x.size + y.size), int(x.size), int(y.size), mean, math.nan, se, df, low, high, p)


def _t_zero_se_p(mean: float) -> float:
    """p-value when both samples are constant: 0 if their means differ, undefined (NaN) if they are equal."""
    return math.nan if mean == 0 else 0.0


# ------------------------------------------------------------------------------------------------- many arms, power
POWER = 0.8
ALPHA = 0.05


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (one per comparison against the baseline): the i-th
    smallest is multiplied by (m - i), made non-decreasing and capped at 1. Controls the chance of any false
    "resolved" among the m comparisons at alpha, without Bonferroni's full factor m on every one. NaN stays NaN and
    does not count in m."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = idx.size
    running = 0.0
    for rank, i in enumerate(idx[np.argsort(p[idx], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * float(p[i])))
        out[i] = running
    return out.tolist()


def t_test_power(delta: float, se: float, df: float, alpha: float = ALPHA) -> float:
    """Chance that a two-sided t test at ``alpha`` rejects "no difference" when the true difference is ``delta`` and
    its estimate has standard error ``se`` on ``df`` degrees of freedom (the noncentral t with noncentrality
    delta / se, both tails)."""
    from scipy.special import nctdtr

    if se <= 0 or not math.isfinite(se) or not df > 0:
        return math.nan
    crit = t_quantile(1 - alpha, df)
    nc = abs(delta) / se
    return float(1.0 - nctdtr(df, nc, crit) + nctdtr(df, nc, -crit))


def detectable_difference(se: float, df: float, power: float = POWER, alpha: float = ALPHA) -> float:
    """The smallest true difference a two-sided t test with this standard error and df detects with ``power``
    (solved by bisection on the noncentrality; NaN when the spread is unknown)."""
    if se <= 0 or not math.isfinite(se) or not df > 0:
        return math.nan
    lo, hi = 0.0, 1.0
    while t_test_power(hi, 1.0, df, alpha) < power:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_test_power(mid, 1.0, df, alpha) < power:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * hi:
            break
    return hi * se


def paired_design(sd: float, n: int) -> tuple[float, float]:
    """(standard error, df) of a paired mean difference over ``n`` pairs with per-pair sd ``sd``."""
    return sd / math.sqrt(n), float(n - 1)


def welch_design(var_a: float, var_b: float, n_a: int, n_b: int) -> tuple[float, float]:
    """(standard error, Welch df) of a difference of two independent means."""
    return math.sqrt(var_a / n_a + var_b / n_b), welch_df(var_a, n_a, var_b, n_b)


def seeds_needed(delta: float, design, power: float = POWER, alpha: float = ALPHA, most: int = 1000) -> int | None:
    """The fewest seeds per arm (``n`` for which ``design(n) -> (se, df)``) whose t test detects a true difference
    ``delta`` with ``power``; None when even ``most`` seeds would not (or the spread is unknown)."""
    if not math.isfinite(delta) or delta == 0:
        return None
    for n in range(2, most + 1):
        se, df = design(n)
        if se == 0:
            return n
        if t_test_power(delta, se, df, alpha) >= power:
            return n
    return None
