"""The report's statistics: mean and Student-t confidence interval, Welch's t-test (scipy.stats)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from scipy import stats as sps


@cache
def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t (cached: a report asks for the same few degrees of freedom many times)."""
    return float(sps.t.ppf(p, df))


@dataclass(frozen=True)
class Stat:
    n: int
    mean: float | None
    sd: float | None  # sample standard deviation (n-1); None for n < 2
    ci: float | None  # half-width of the 95% confidence interval of the mean; None for n < 2


def mean_ci(values: Sequence[float], level: float = 0.95) -> Stat:
    n = len(values)
    if n < 2:
        return Stat(n, statistics.fmean(values) if n else None, None, None)
    sd = statistics.stdev(values)
    return Stat(n, statistics.fmean(values), sd, t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n))


@dataclass(frozen=True)
class Comparison:
    diff: float | None  # mean(a) - mean(b)
    p: float | None  # Welch's t-test, two-sided
    df: float | None
    verdict: str  # "differs" | "not resolved" | "cannot tell"
    text: str
    interval: tuple[float, float] | None = None  # 95% CI of diff (Welch-Satterthwaite df)
    points: tuple[tuple[float, ...], tuple[float, ...]] = ((), ())  # the values of a and b

    @property
    def n(self) -> tuple[int, int]:
        return len(self.points[0]), len(self.points[1])


def welch(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> Comparison:
    """Can the data tell mean(a) from mean(b)? Welch's unequal-variance t-test at level alpha, and the
    1 - alpha interval of the difference with the Welch-Satterthwaite degrees of freedom."""
    na, nb = len(a), len(b)
    points = (tuple(a), tuple(b))
    if na == 0 or nb == 0:
        return Comparison(None, None, None, "cannot tell", "no data", points=points)
    diff = math.fsum(a) / na - math.fsum(b) / nb
    if na < 2 or nb < 2:
        return Comparison(diff, None, None, "cannot tell", f"n={min(na, nb)}, cannot tell", points=points)
    if len(set(a)) == 1 and len(set(b)) == 1:  # scipy gives nan: equal constants are the same, unequal differ
        if diff == 0.0:
            return Comparison(0.0, 1.0, None, "not resolved", "identical values", (0.0, 0.0), points)
        return Comparison(diff, 0.0, None, "differs", "differs (no spread in either)", (diff, diff), points)
    result = sps.ttest_ind(a, b, equal_var=False)
    p, df, ci = float(result.pvalue), float(result.df), result.confidence_interval(1.0 - alpha)
    verdict = "differs" if p < alpha else "not resolved"
    return Comparison(diff, p, df, verdict, f"{verdict} (Welch p={p:.3g}, n={na}/{nb})",
                      (float(ci.low), float(ci.high)), points)
