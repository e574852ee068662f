"""Rates with uncertainty, paired tests and rater agreement: small pure functions.

Every rate quada reports (attack success, over-refusal, accuracy) carries a 95% Wilson interval
and every mean (a grade) a bootstrap interval; a clean run and an approximated run on the same
prompts are compared with McNemar's paired test and the difference of their rates gets Tango's
score interval; several tests that can each raise an alarm are corrected with Holm's method;
judges are compared with Cohen's kappa.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
EXACT_MCNEMAR_BELOW = 25


def bootstrap_ci(
    values: Sequence[float],
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval for the mean of ``values``.

    Draw ``resamples`` samples of size n with replacement, take each one's mean, and return the
    (1-confidence)/2 and (1+confidence)/2 quantiles of those means (Efron & Tibshirani, "An
    Introduction to the Bootstrap", 1993, ch. 13). A rate is the mean of 0/1 outcomes, so the same
    function gives the interval of an attack success rate and of a mean harmfulness score.
    Seeded: the same inputs give the same interval.
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class Estimate:
    """A mean (a rate, for 0/1 values) over ``n`` items with its bootstrap interval [low, high]."""

    value: float
    low: float
    high: float
    n: int


def estimate(values: Sequence[float], confidence: float = 0.95, seed: int = 0) -> Estimate:
    """The mean of ``values`` with its percentile bootstrap interval (:func:`bootstrap_ci`)."""
    low, high = bootstrap_ci(values, confidence=confidence, seed=seed)
    return Estimate(float(np.mean(np.asarray(values, dtype=float))), low, high, len(values))


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
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half_width = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at 0 (n) successes the lower (upper) bound is exactly 0 (1); rounding could leave it just inside,
    # above the estimate itself
    low = 0.0 if successes == 0 else max(0.0, centre - half_width)
    high = 1.0 if successes == n else min(1.0, centre + half_width)
    return low, high


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test on paired binary outcomes.

    ``only_a`` counts pairs where only the first run succeeded, ``only_b`` where only the second
    did; ``method`` is ``"exact"`` or ``"chi2-cc"`` (see :func:`mcnemar`).
    """

    only_a: int
    only_b: int
    statistic: float
    p_value: float
    method: str


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs.

    Under the null hypothesis each of the n = b + c discordant pairs falls either way with
    probability 1/2, so p = min(1, 2 * sum_{i=0}^{min(b,c)} C(n, i) / 2^n)
    (McNemar, Psychometrika 12:153, 1947; Fagerland et al., BMC Med Res Methodol 13:91, 2013).
    """
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def mcnemar_chi2_cc(only_a: int, only_b: int) -> tuple[float, float]:
    """McNemar's chi-square statistic with Edwards' continuity correction and its p-value.

    X^2 = (|b - c| - 1)^2 / (b + c) with one degree of freedom (Edwards, Psychometrika 13:185,
    1948); for one degree of freedom the upper tail is P(X^2 > x) = erfc(sqrt(x / 2)).
    """
    n = only_a + only_b
    if n == 0:
        return 0.0, 1.0
    statistic = max(0.0, abs(only_a - only_b) - 1.0) ** 2 / n
    return statistic, math.erfc(math.sqrt(statistic / 2))


def mcnemar(
    outcomes_a: Sequence[bool], outcomes_b: Sequence[bool], exact_below: int = EXACT_MCNEMAR_BELOW
) -> McNemarResult:
    """McNemar's test between two runs judged on the same prompts (e.g. clean vs approximated).

    Only discordant pairs carry information. With fewer than ``exact_below`` of them (25 by the
    usual rule of thumb) the exact binomial test is used and ``statistic`` is the smaller
    discordant count; otherwise the continuity-corrected chi-square test.
    """
    if len(outcomes_a) != len(outcomes_b):
        raise ValueError(f"paired outcomes differ in length: {len(outcomes_a)} vs {len(outcomes_b)}")
    only_a = sum(1 for a, b in zip(outcomes_a, outcomes_b) if a and not b)
    only_b = sum(1 for a, b in zip(outcomes_a, outcomes_b) if b and not a)
    if only_a + only_b < exact_below:
        return McNemarResult(only_a, only_b, float(min(only_a, only_b)), mcnemar_exact_p(only_a, only_b), "exact")
    statistic, p_value = mcnemar_chi2_cc(only_a, only_b)
    return McNemarResult(only_a, only_b, statistic, p_value, "chi2-cc")


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


def tango_statistic(only_first: int, only_second: int, n: int, delta: float) -> float:
    """Tango's score statistic for the difference ``delta`` = P(first) - P(second) of paired
    proportions (Tango, Stat Med 17:891, 1998; as written by Fagerland, Lydersen & Laake, Stat Med
    33:2850, 2014): T = (n12 - n21 - n delta) / sqrt(n (2 p21 + delta (1 - delta))), where n12
    (``only_first``) and n21 (``only_second``) count the discordant pairs and p21 is the maximum
    likelihood estimate of P(only second) under ``delta``:
    p21 = (sqrt(W^2 - 8 n (-n21) delta (1 - delta)) - W) / (4n), W = -n12 - n21 + (2n - n12 + n21) delta.
    """
    w = -only_first - only_second + (2 * n - only_first + only_second) * delta
    p21 = (math.sqrt(max(w * w + 8 * n * only_second * delta * (1 - delta), 0.0)) - w) / (4 * n)
    variance = n * (2 * p21 + delta * (1 - delta))
    numerator = only_first - only_second - n * delta
    if variance <= 0:
        return 0.0 if numerator == 0 else math.copysign(math.inf, numerator)
    return numerator / math.sqrt(variance)


def tango_interval(only_first: int, only_second: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Tango's score interval for the difference of two paired proportions: every ``delta`` in
    [-1, 1] whose :func:`tango_statistic` lies within the normal quantile z of (1+confidence)/2,
    found by bisection on either side of the estimate (n12 - n21)/n. It does not collapse when no
    pair is discordant: with n12 = n21 = 0 it is [-z^2/(n+z^2), z^2/(n+z^2)]."""
    if n <= 0 or only_first < 0 or only_second < 0 or only_first + only_second > n:
        raise ValueError(f"tango_interval needs 0 <= n12 + n21 <= n and n >= 1, got {only_first}, {only_second}, {n}")
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    estimate_ = (only_first - only_second) / n

    def inside(delta: float) -> bool:
        return abs(tango_statistic(only_first, only_second, n, delta)) <= z

    def edge(outer: float) -> float:
        inner = estimate_  # inside; |T| grows monotonically from the estimate towards either end
        if inside(outer):
            return outer
        for _ in range(60):
            middle = (inner + outer) / 2
            inner, outer = (middle, outer) if inside(middle) else (inner, middle)
        return inner

    return edge(-1.0), edge(1.0)


def paired_difference(first: Sequence[bool], second: Sequence[bool], confidence: float = 0.95) -> Estimate:
    """The paired difference of two rates on the same items, ``mean(first) - mean(second)``, with
    :func:`tango_interval`."""
    if len(first) != len(second) or not first:
        raise ValueError(f"paired outcomes must be non-empty and of one length: {len(first)} vs {len(second)}")
    only_first = sum(1 for a, b in zip(first, second) if a and not b)
    only_second = sum(1 for a, b in zip(first, second) if b and not a)
    low, high = tango_interval(only_first, only_second, len(first), confidence)
    return Estimate((only_first - only_second) / len(first), low, high, len(first))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm, Scand J Statist 6:65, 1979), in the input order:
    with the m p-values sorted ascending, p_adj(i) = max over j <= i of min(1, (m - j + 1) p(j)). A
    hypothesis is rejected at family-wise level alpha when its adjusted p-value is below alpha."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
