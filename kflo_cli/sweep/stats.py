"""The statistics of a sweep's report: per-cell mean, standard deviation and t interval, and the paired t-test of a
method against the baseline over seeds (Welch's test too, for the JSON). See docs/sweep.md for why paired.

scipy.stats is used when it is installed (scikit-learn depends on it); otherwise Student's t distribution is
computed here from the regularized incomplete beta function (continued fraction, Numerical Recipes 6.4), which
agrees with scipy to ~1e-12.

>>> round(t_ppf(0.975, 4), 6)
2.776445
>>> cmp = paired_test({0: 91.0, 1: 92.0, 2: 93.5}, {0: 90.0, 1: 90.5, 2: 92.0})
>>> cmp.n, round(cmp.mean, 4), cmp.verdict
(3, 1.3333, 'better')
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

#: Significance level of the verdict column.
ALPHA = 0.05
#: Confidence of every interval.
CONFIDENCE = 0.95


def _scipy_t():  # pragma: no cover - trivial
    try:
        from scipy import stats

        return stats.t
    except Exception:  # noqa: BLE001  (no scipy, or a broken one: use our own)
        return None


# -- Student's t without scipy --------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
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
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _t_sf_own(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def _t_ppf_own(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on the survival function; |error| < 1e-12)."""
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -_t_ppf_own(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while _t_sf_own(hi, df) > 1.0 - q:
        hi *= 2.0
        if hi > 1e300:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_sf_own(mid, df) > 1.0 - q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_sf(t: float, df: float, *, use_scipy: bool = True) -> float:
    """P(T > t), Student's t with ``df`` degrees of freedom."""
    dist = _scipy_t() if use_scipy else None
    return float(dist.sf(t, df)) if dist is not None else _t_sf_own(t, df)


def t_ppf(q: float, df: float, *, use_scipy: bool = True) -> float:
    """The q-quantile of Student's t with ``df`` degrees of freedom."""
    dist = _scipy_t() if use_scipy else None
    return float(dist.ppf(q, df)) if dist is not None else _t_ppf_own(q, df)


# -- summaries and tests ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    """n, mean, sample standard deviation (n - 1) and the 95 % t interval of the mean (``None`` when n < 2)."""

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Mean, standard deviation and the t-based 95 % confidence interval of ``values``."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return Summary(0, None, None, None, None)
    mean = sum(xs) / n
    if n < 2:
        return Summary(1, mean, None, None, None)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_ppf(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Comparison:
    """A method minus the baseline, paired over the seeds both finished.

    ``mean``/``ci_low``/``ci_high`` are the mean difference (percentage points) and its 95 % t interval; ``t`` and
    ``p`` the two-sided paired t-test (``p`` is ``None`` for fewer than 2 pairs); ``verdict`` is ``"better"`` or
    ``"worse"`` when p < alpha, ``"within noise"`` otherwise, ``"n/a"`` without a test. ``welch_p`` is Welch's
    unpaired two-sided p-value over all finished seeds of either side, for reference.
    """

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    t: float | None
    p: float | None
    verdict: str
    welch_p: float | None = None
    seeds: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        out = asdict(self)
        out["seeds"] = list(self.seeds)
        return out


def _two_sided_p(t: float, df: float) -> float:
    return min(1.0, 2.0 * t_sf(abs(t), df))


def welch_test(a: Sequence[float], b: Sequence[float]) -> tuple[float | None, float | None]:
    """Welch's unequal-variance t-test of mean(a) - mean(b): (t, two-sided p); ``(None, None)`` if not defined."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return None, None
    sa, sb = summarize(a), summarize(b)
    va, vb = sa.std**2 / na, sb.std**2 / nb
    diff = sa.mean - sb.mean
    if va + vb == 0:
        return (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    return t, _two_sided_p(t, df)


#: The fewest paired seeds that get a verdict.
MIN_PAIRS = 3


def paired_test(method: Mapping[int, float], baseline: Mapping[int, float], *, alpha: float = ALPHA) -> Comparison:
    """Paired t-test over the seeds present in both mappings (seed -> accuracy); at least :data:`MIN_PAIRS` pairs,
    and the exact sign test when every difference is the same."""
    seeds = tuple(sorted(set(method) & set(baseline)))
    diffs = [float(method[s]) - float(baseline[s]) for s in seeds]
    _, welch_p = welch_test(list(method.values()), list(baseline.values()))
    n = len(diffs)
    if n == 0:
        return Comparison(0, None, None, None, None, None, None, "n/a", welch_p, seeds)
    s = summarize(diffs)
    if n < MIN_PAIRS:
        # two pairs give a t-test with one degree of freedom: any verdict would be an artefact of the seeds drawn
        return Comparison(n, s.mean, s.std if n > 1 else None, s.ci_low, s.ci_high, None, None, "n/a", welch_p, seeds)
    if s.std <= 1e-9 * max(1.0, abs(s.mean)):
        # Every seed moved by the same amount (up to float rounding of the percentages) (accuracies are quantised: one test image is a step), so the
        # t statistic is undefined; the exact two-sided sign test is the honest fallback (n = 3: p = 0.25).
        t = 0.0 if s.mean == 0 else math.copysign(math.inf, s.mean)
        p = 1.0 if s.mean == 0 else min(1.0, 2.0 * 0.5**n)
    else:
        t = s.mean / (s.std / math.sqrt(n))
        p = _two_sided_p(t, n - 1)
    verdict = ("better" if s.mean > 0 else "worse") if p < alpha else "within noise"
    return Comparison(n, s.mean, s.std, s.ci_low, s.ci_high, t, p, verdict, welch_p, seeds)


__all__ = ["ALPHA", "CONFIDENCE", "MIN_PAIRS", "Comparison", "Summary", "betainc", "paired_test", "summarize", "t_ppf", "t_sf", "welch_test"]
