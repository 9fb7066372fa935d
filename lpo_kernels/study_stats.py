"""Small-sample statistics for the learning study (``lpo_kernels.study``), in plain
Python + math so the study needs no SciPy: Student-t intervals, a paired t-test and an
exact Wilcoxon signed-rank test. The unit of replication is a seed."""

from __future__ import annotations

import functools
import math


def mean_std(values) -> tuple[float, float]:
    """Mean and Bessel-corrected standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std: values is empty")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf_two_sided(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


@functools.lru_cache(maxsize=256)
def t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t (bisection on the CDF; q in (0, 1))."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_ppf: q must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    upper = 1.0 - q if q > 0.5 else q  # one-sided tail mass
    lo, hi = 0.0, 1.0
    while t_sf_two_sided(hi, df) / 2.0 > upper:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf_two_sided(mid, df) / 2.0 > upper:
            lo = mid
        else:
            hi = mid
    t = 0.5 * (lo + hi)
    return t if q > 0.5 else -t


def t_interval(values, level: float = 0.95) -> dict:
    """Mean with its Student-t confidence interval over the values (seeds)."""
    values = [float(v) for v in values]
    mean, std = mean_std(values)
    n = len(values)
    half = t_ppf(0.5 + level / 2.0, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "lo": mean - half, "hi": mean + half}


def paired_t_test(a, b, level: float = 0.95) -> dict:
    """Two-sided paired t-test of mean(a - b) = 0, with the CI of the mean difference."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("paired_t_test: a and b need the same length >= 2")
    diffs = [x - y for x, y in zip(a, b)]
    ci = t_interval(diffs, level)
    n, mean, std = ci["n"], ci["mean"], ci["std"]
    if std == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / (std / math.sqrt(n))
    return {"n": n, "mean_diff": mean, "ci_lo": ci["lo"], "ci_hi": ci["hi"], "t": t,
            "df": n - 1, "p": 1.0 if t == 0.0 else t_sf_two_sided(t, n - 1)}


def _midranks(values: list) -> list:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def wilcoxon_signed_rank(a, b) -> dict:
    """Two-sided Wilcoxon signed-rank test of the paired differences a - b, exact: the
    null distribution of W+ (sum of the ranks of positive differences) over all 2^n sign
    flips, counted by dynamic programming on the (mid)ranks, so ties are handled exactly.
    Zero differences are dropped (Wilcoxon's convention)."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) != len(b):
        raise ValueError("wilcoxon_signed_rank: a and b need the same length")
    diffs = [x - y for x, y in zip(a, b) if x != y]
    n = len(diffs)
    if n == 0:
        return {"n": 0, "w_plus": 0.0, "p": 1.0, "positive": 0, "negative": 0}
    ranks2 = [int(round(2 * r)) for r in _midranks([abs(d) for d in diffs])]  # integers
    w2 = sum(r for r, d in zip(ranks2, diffs) if d > 0)
    counts = [0] * (sum(ranks2) + 1)  # counts[s]: sign patterns with 2*W+ = s
    counts[0] = 1
    for r in ranks2:
        for s in range(len(counts) - 1, r - 1, -1):
            counts[s] += counts[s - r]
    total = 2 ** n
    centre2 = sum(ranks2) / 2.0
    extreme = sum(c for s, c in enumerate(counts) if abs(s - centre2) >= abs(w2 - centre2) - 1e-9)
    return {"n": n, "w_plus": w2 / 2.0, "p": min(1.0, extreme / total),
            "positive": sum(d > 0 for d in diffs), "negative": sum(d < 0 for d in diffs)}
