"""Rates with uncertainty, paired tests and rater agreement: small pure functions.

Every rate quada reports (attack success, over-refusal, accuracy) carries a 95% Wilson interval
and every bounded mean (a grade) a Wilson interval on its rescaled values; a clean run and an
approximated run on the same prompts are compared with McNemar's paired test, and the difference
of their rates gets Tango's score interval, the inversion of the same test, so the two always
agree; judges are compared with Cohen's kappa.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000  # of the percentile bootstrap intervals of the judges' calibration


@dataclass(frozen=True)
class Estimate:
    """A mean (a rate, for 0/1 values) or a difference over ``n`` items with its interval [low, high]."""

    value: float
    low: float
    high: float
    n: int


def proportion(outcomes: Sequence[bool], confidence: float = 0.95) -> Estimate:
    """The share of true ``outcomes`` (a rate: attack success, over-refusal, accuracy) with its
    Wilson score interval (:func:`wilson_interval`), which stays informative at 0 or n successes."""
    n = len(outcomes)
    successes = sum(bool(o) for o in outcomes)
    low, high = wilson_interval(successes, n, confidence)
    return Estimate(successes / n, low, high, n)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson, JASA 22:209, 1927).

    With p = successes/n and z the standard normal quantile of (1+confidence)/2:
    centre = (p + z^2/2n) / (1 + z^2/n), half-width = z/(1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2).
    Unlike the bootstrap it stays informative at 0 or n successes (e.g. a clean ASR of 0/64).
    """
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    return _wilson(successes / n, n, confidence)


def _wilson(p: float, n: int, confidence: float) -> tuple[float, float]:
    """The Wilson score interval of a mean ``p`` in [0, 1] over ``n`` items (:func:`wilson_interval`)."""
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half_width = z / denominator * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    # at p = 0 (1) the lower (upper) bound is exactly 0 (1); rounding could leave it just inside,
    # above the estimate itself
    low = 0.0 if p <= 0 else max(0.0, centre - half_width)
    high = 1.0 if p >= 1 else min(1.0, centre + half_width)
    return low, high


def bounded_mean(values: Sequence[float], bounds: tuple[float, float], confidence: float = 0.95) -> Estimate:
    """The mean of ``values`` known to lie in ``bounds`` (a grade from 1 to 5) with a Wilson score
    interval computed on the values rescaled to [0, 1].

    A variable in [0, 1] with mean m has variance at most m (1 - m) (Bhatia & Davis, Amer Math
    Monthly 107:353, 2000), the variance of a Bernoulli variable with that mean, which the Wilson
    interval assumes; so its coverage is at least the nominal one for large n, and it does not
    collapse when every value is the same (all grades 1: the interval reaches above 1, as a 0 of n
    rate's does above 0), where a bootstrap interval would be a point.
    """
    low_bound, high_bound = bounds
    data = np.asarray(values, dtype=float)
    if data.size == 0 or high_bound <= low_bound or data.min() < low_bound or data.max() > high_bound:
        raise ValueError(f"bounded_mean needs values within {bounds}")
    width = high_bound - low_bound
    scaled = float(np.clip((data.mean() - low_bound) / width, 0.0, 1.0))
    low, high = _wilson(scaled, data.size, confidence)
    return Estimate(float(data.mean()), low_bound + width * low, low_bound + width * high, int(data.size))


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test on paired binary outcomes.

    ``only_a`` counts pairs where only the first run succeeded, ``only_b`` where only the second
    did; ``statistic`` is the signed score statistic z = (only_b - only_a) / sqrt(only_a + only_b)
    and ``p_value`` its two-sided p-value (see :func:`mcnemar`).
    """

    only_a: int
    only_b: int
    statistic: float
    p_value: float
    method: str = "asymptotic"


def mcnemar(outcomes_a: Sequence[bool], outcomes_b: Sequence[bool]) -> McNemarResult:
    """McNemar's test between two runs judged on the same prompts (e.g. clean vs approximated).

    Only discordant pairs carry information: with b pairs where only the first run succeeded and c
    where only the second did, z = (c - b) / sqrt(b + c) and p = 2 (1 - Phi(|z|)) (McNemar,
    Psychometrika 12:153, 1947), without a continuity correction: Fagerland, Lydersen & Laake (BMC
    Med Res Methodol 13:91, 2013) found this asymptotic test's actual size close to the nominal one
    even for small samples, where the exact conditional test is needlessly conservative. It is
    Tango's score test at a difference of 0 (:func:`tango_statistic`), so its p-value is below
    1 - confidence exactly when :func:`tango_interval` excludes 0: test and interval agree.
    """
    if len(outcomes_a) != len(outcomes_b):
        raise ValueError(f"paired outcomes differ in length: {len(outcomes_a)} vs {len(outcomes_b)}")
    only_a = sum(1 for a, b in zip(outcomes_a, outcomes_b) if a and not b)
    only_b = sum(1 for a, b in zip(outcomes_a, outcomes_b) if b and not a)
    if only_a + only_b == 0:
        return McNemarResult(0, 0, 0.0, 1.0)
    statistic = (only_b - only_a) / math.sqrt(only_a + only_b)
    return McNemarResult(only_a, only_b, statistic, math.erfc(abs(statistic) / math.sqrt(2)))


def sign_flip_p(differences: Sequence[int]) -> float:
    """Exact two-sided p-value of the sign-flip (randomisation) test of paired clusters.

    Each cluster i (a prompt) contributes an integer difference d_i, e.g. the number of models on
    which one condition succeeded minus the number on which the other did. Under the null
    hypothesis each d_i is as likely to have either sign, so S = sum_i e_i |d_i| with independent
    fair signs e_i; p = P(|S| >= |sum_i d_i|), computed exactly by convolving the clusters' two-point
    distributions (Fisher, "The Design of Experiments", 1935, section 21; a cluster-level
    permutation test, valid however the outcomes within a cluster depend on one another). With
    every |d_i| <= 1 it is the exact McNemar test (:func:`mcnemar_exact_p`).
    """
    distribution = {0: 1}
    for d in differences:
        step = abs(int(d))
        if not step:
            continue
        moved: dict[int, int] = {}
        for total, count in distribution.items():
            for signed in (total + step, total - step):
                moved[signed] = moved.get(signed, 0) + count
        distribution = moved
    observed = abs(sum(int(d) for d in differences))
    ways = sum(distribution.values())
    return min(1.0, sum(count for total, count in distribution.items() if abs(total) >= observed) / ways)


@dataclass(frozen=True)
class ClusteredDifference:
    """A paired difference of two conditions' rates pooled over several groups (models) that share
    their items (prompts): the mean difference over all item x group pairs, the discordant counts,
    and the sign-flip p-value with each item as one cluster (:func:`sign_flip_p`)."""

    difference: float
    only_first: int
    only_second: int
    p_value: float
    items: int
    groups: int


def clustered_difference(first: Sequence[Sequence[bool]], second: Sequence[Sequence[bool]]) -> ClusteredDifference:
    """``first[g][i]`` against ``second[g][i]`` (group g, item i), tested with items as clusters: the
    groups' outcomes on one item are not independent (the same prompt, related models), so only the
    per-item sums of differences are exchanged."""
    if len(first) != len(second) or not first or any(len(a) != len(b) or len(a) != len(first[0]) for a, b in zip(first, second)):
        raise ValueError("clustered outcomes need the same groups and items on both sides")
    items = len(first[0])
    per_item = [sum(int(a[i]) - int(b[i]) for a, b in zip(first, second)) for i in range(items)]
    only_first = sum(1 for a, b in zip(first, second) for x, y in zip(a, b) if x and not y)
    only_second = sum(1 for a, b in zip(first, second) for x, y in zip(a, b) if y and not x)
    return ClusteredDifference((only_first - only_second) / (items * len(first)), only_first, only_second,
                               sign_flip_p(per_item), items, len(first))


def percent_agreement(labels_a: Sequence[bool], labels_b: Sequence[bool]) -> float:
    """Share of items (0..1) on which two raters give the same label."""
    if len(labels_a) != len(labels_b) or not labels_a:
        raise ValueError("agreement needs two non-empty label lists of the same length")
    return sum(a == b for a, b in zip(labels_a, labels_b)) / len(labels_a)


def cohen_kappa(labels_a: Sequence[bool], labels_b: Sequence[bool]) -> float:
    """Cohen's kappa for two raters: (p_o - p_e) / (1 - p_e) (Cohen, Educ Psychol Meas 20:37, 1960).

    p_o is the observed agreement and p_e = sum over labels of the product of the two raters'
    marginal frequencies. When both raters give one and the same label to every item, p_e = 1 and
    kappa is undefined: NaN is returned.
    """
    observed = percent_agreement(labels_a, labels_b)
    n = len(labels_a)
    categories = set(labels_a) | set(labels_b)
    expected = sum((list(labels_a).count(c) / n) * (list(labels_b).count(c) / n) for c in categories)
    if expected == 1.0:
        return math.nan
    return (observed - expected) / (1 - expected)


def tango_statistic(only_first, only_second, n, delta):
    """Tango's score statistic for the difference ``delta`` = P(first) - P(second) of paired
    proportions (Tango, Stat Med 17:891, 1998; as written by Fagerland, Lydersen & Laake, Stat Med
    33:2850, 2014): T = (n12 - n21 - n delta) / sqrt(n (2 p21 + delta (1 - delta))), where n12
    (``only_first``) and n21 (``only_second``) count the discordant pairs and p21 is the maximum
    likelihood estimate of P(only second) under ``delta``:
    p21 = (sqrt(W^2 - 8 n (-n21) delta (1 - delta)) - W) / (4n), W = -n12 - n21 + (2n - n12 + n21) delta.
    T falls as ``delta`` grows. Numbers or numpy arrays (broadcast), so a simulation tests many
    tables at once with the same code.
    """
    only_first, only_second, n, delta = (np.asarray(x, dtype=float) for x in (only_first, only_second, n, delta))
    w = -only_first - only_second + (2 * n - only_first + only_second) * delta
    p21 = (np.sqrt(np.maximum(w * w + 8 * n * only_second * delta * (1 - delta), 0.0)) - w) / (4 * n)
    variance = n * (2 * p21 + delta * (1 - delta))
    numerator = only_first - only_second - n * delta
    with np.errstate(divide="ignore", invalid="ignore"):
        statistic = np.where(variance > 0, numerator / np.sqrt(np.where(variance > 0, variance, 1.0)),
                             np.where(numerator == 0, 0.0, np.copysign(np.inf, numerator)))
    return float(statistic) if statistic.ndim == 0 else statistic


def score_interval(only_first: int, only_second: int, n: int, critical: float) -> tuple[float, float]:
    """Every ``delta`` in [-1, 1] whose :func:`tango_statistic` lies within +-``critical``: the
    inversion of Tango's score test at that critical value, found by bisection on either side of
    the estimate (n12 - n21)/n. So the interval excludes a difference d exactly when the test of d
    at ``critical`` rejects it. It does not collapse when no pair is discordant: with n12 = n21 = 0
    it is [-c^2/(n+c^2), c^2/(n+c^2)]."""
    if n <= 0 or only_first < 0 or only_second < 0 or only_first + only_second > n:
        raise ValueError(f"a paired score interval needs 0 <= n12 + n21 <= n and n >= 1, got {only_first}, {only_second}, {n}")
    estimate_ = (only_first - only_second) / n

    def inside(delta: float) -> bool:
        return abs(tango_statistic(only_first, only_second, n, delta)) <= critical

    def edge(outer: float) -> float:
        inner = estimate_  # inside; |T| grows monotonically from the estimate towards either end
        if inside(outer):
            return outer
        for _ in range(60):
            middle = (inner + outer) / 2
            inner, outer = (middle, outer) if inside(middle) else (inner, middle)
        return inner

    return edge(-1.0), edge(1.0)


def tango_interval(only_first: int, only_second: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Tango's score interval for the difference of two paired proportions at ``confidence``: the
    :func:`score_interval` at the normal quantile z of (1+confidence)/2."""
    return score_interval(only_first, only_second, n, NormalDist().inv_cdf((1 + confidence) / 2))


def paired_difference(first: Sequence[bool], second: Sequence[bool], confidence: float = 0.95,
                      critical: float | None = None) -> Estimate:
    """The paired difference of two rates on the same items, ``mean(first) - mean(second)``, with
    :func:`tango_interval` at ``confidence``, or the :func:`score_interval` at ``critical`` when
    given (a group-sequential boundary)."""
    if len(first) != len(second) or not first:
        raise ValueError(f"paired outcomes must be non-empty and of one length: {len(first)} vs {len(second)}")
    only_first = sum(1 for a, b in zip(first, second) if a and not b)
    only_second = sum(1 for a, b in zip(first, second) if b and not a)
    if critical is None:
        critical = NormalDist().inv_cdf((1 + confidence) / 2)
    low, high = score_interval(only_first, only_second, len(first), critical)
    return Estimate((only_first - only_second) / len(first), low, high, len(first))
