"""The small statistics the report needs: mean and Student-t confidence interval, Welch's t-test.

The t distribution comes from the regularized incomplete beta function (no scipy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
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
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail probability P(|T| >= |t|) of Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


_TQ: dict[tuple[float, float], float] = {}


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t (p > 0.5), by bisection on the two-sided tail."""
    key = (p, df)
    if key not in _TQ:
        target = 2.0 * (1.0 - p)
        lo, hi = 0.0, 1.0
        while t_sf2(hi, df) > target:
            hi *= 2.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if t_sf2(mid, df) > target:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-12 * max(1.0, hi):
                break
        _TQ[key] = 0.5 * (lo + hi)
    return _TQ[key]


@dataclass(frozen=True)
class Stat:
    n: int
    mean: float | None
    sd: float | None  # sample standard deviation (n-1); None for n < 2
    ci: float | None  # half-width of the 95% confidence interval of the mean; None for n < 2

    def fmt(self, scale: float = 1.0, digits: int = 2) -> str:
        if self.mean is None:
            return "–"
        text = f"{self.mean * scale:.{digits}f}"
        if self.ci is not None:
            text += f" ± {self.ci * scale:.{digits}f}"
        return text


def mean_ci(values: Sequence[float], level: float = 0.95) -> Stat:
    """Mean and Student-t confidence interval of the mean."""
    n = len(values)
    if n == 0:
        return Stat(0, None, None, None)
    mean = math.fsum(values) / n
    if n == 1:
        return Stat(1, mean, None, None)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    sd = math.sqrt(var)
    return Stat(n, mean, sd, t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n))


@dataclass(frozen=True)
class Comparison:
    diff: float | None  # mean(a) - mean(b)
    p: float | None  # Welch's t-test, two-sided
    df: float | None
    verdict: str  # "differs" | "within noise" | "cannot tell"
    text: str


def welch(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> Comparison:
    """Can the data tell mean(a) from mean(b)? Welch's unequal-variance t-test at level alpha."""
    na, nb = len(a), len(b)
    if na == 0 or nb == 0:
        return Comparison(None, None, None, "cannot tell", "no data")
    sa, sb = mean_ci(a), mean_ci(b)
    diff = sa.mean - sb.mean
    if na < 2 or nb < 2:
        return Comparison(diff, None, None, "cannot tell", f"n={min(na, nb)}, cannot tell")
    va, vb = sa.sd ** 2 / na, sb.sd ** 2 / nb
    se2 = va + vb
    if se2 == 0.0:
        if diff == 0.0:
            return Comparison(0.0, 1.0, None, "within noise", "identical values")
        return Comparison(diff, 0.0, None, "differs", "differs (no spread in either)")
    df = se2 ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    p = t_sf2(diff / math.sqrt(se2), df)
    verdict = "differs" if p < alpha else "within noise"
    return Comparison(diff, p, df, verdict, f"{verdict} (Welch p={p:.3g}, n={na}/{nb})")
