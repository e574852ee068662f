import math
from statistics import NormalDist

import numpy as np
import pytest

from quada.stats.metrics import (
    bounded_mean,
    clustered_difference,
    cohen_kappa,
    mcnemar,
    paired_difference,
    percent_agreement,
    proportion,
    score_interval,
    sign_flip_p,
    tango_interval,
    tango_statistic,
    wilson_interval,
)


def exact_mcnemar_p(only_a: int, only_b: int) -> float:
    """The reference: the two-sided exact (binomial) McNemar test, p = min(1, 2 sum_{i<=min} C(n, i) / 2^n)."""
    n = only_a + only_b
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n) if n else 1.0


def paired_outcomes(both: int, only_a: int, only_b: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Two paired outcome lists realising a 2x2 table."""
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


def test_a_bounded_mean_carries_a_wilson_interval_that_never_collapses():
    # All grades 1: the mean is 1 and the interval reaches above it, like a rate of 0 of n.
    z = NormalDist().inv_cdf(0.975)
    lowest = bounded_mean([1.0] * 20, (1.0, 5.0))
    assert (lowest.value, lowest.low, lowest.n) == (1.0, 1.0, 20)
    assert lowest.high == pytest.approx(1 + 4 * z * z / (20 + z * z))
    highest = bounded_mean([5.0] * 8, (1.0, 5.0))
    assert highest.high == 5.0 and highest.low < 5.0
    # On 0/1 values it is the Wilson interval of the rate.
    rate = bounded_mean([1, 0, 0, 1, 1], (0, 1))
    assert (rate.low, rate.high) == pytest.approx(wilson_interval(3, 5))
    with pytest.raises(ValueError):
        bounded_mean([0.5], (1.0, 5.0))


@pytest.mark.parametrize("probabilities", [(0.6, 0.1, 0.1, 0.1, 0.1), (0.05, 0.05, 0.1, 0.3, 0.5), (0.9, 0.1, 0, 0, 0)])
def test_a_bounded_mean_covers_the_true_mean_at_least_about_95_percent_of_the_time(probabilities):
    grades = np.arange(1, 6)
    true_mean = float(grades @ np.asarray(probabilities))
    rng = np.random.default_rng(3)
    draws = rng.choice(grades, p=probabilities, size=(2000, 64))
    covered = np.mean([(e := bounded_mean(row, (1.0, 5.0))).low <= true_mean <= e.high for row in draws])
    assert covered >= 0.94  # the Bernoulli variance bounds the grades': at or above nominal, up to noise


def test_wilson_interval_closed_forms_and_coverage():
    # With no successes the upper bound is z^2 / (n + z^2).
    z = NormalDist().inv_cdf(0.975)
    low, high = wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(z * z / (10 + z * z))
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(1 - high)  # symmetric around one half
    rng = np.random.default_rng(1)
    hits = [wilson_interval(int(k), 64) for k in rng.binomial(64, 0.1, size=400)]
    coverage = np.mean([low <= 0.1 <= high for low, high in hits])
    assert 0.9 <= coverage <= 0.99


def test_a_wilson_interval_holds_its_estimate_exactly_at_zero_and_all_successes():
    # rounding once left the bound of 0 of 10 at 1e-17, above the estimate, and a report's error bar negative
    for n in range(1, 400):
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
        for successes in (0, n // 2, n):
            low, high = wilson_interval(successes, n)
            assert low <= successes / n <= high


def test_mcnemar_is_the_asymptotic_score_test_without_continuity_correction():
    # 1 versus 9 discordant pairs: z = (9 - 1) / sqrt(10), p = 2 (1 - Phi(|z|)).
    result = mcnemar(*paired_outcomes(both=30, only_a=1, only_b=9, neither=60))
    z = 8 / math.sqrt(10)
    assert (result.only_a, result.only_b, result.method) == (1, 9, "asymptotic")
    assert result.statistic == pytest.approx(z)
    assert result.p_value == pytest.approx(2 * (1 - NormalDist().cdf(z)), rel=1e-9)
    assert mcnemar(*paired_outcomes(both=3, only_a=0, only_b=0, neither=3)).p_value == 1.0


@pytest.mark.parametrize("n", [16, 96, 384])
def test_mcnemar_and_the_tango_interval_agree_on_every_table(n):
    # The interval excludes 0 exactly when the test rejects at 0.05: 5 against 0 of 96 is p = 0.025 and an
    # interval above 0, where the exact test said 0.0625 beside the same interval.
    for only_a in range(0, min(n, 30)):
        for only_b in range(0, min(n - only_a, 30)):
            first, second = paired_outcomes(both=0, only_a=only_a, only_b=only_b, neither=n - only_a - only_b)
            rejects = mcnemar(second, first).p_value < 0.05
            low, high = tango_interval(only_a, only_b, n)
            assert rejects == (low > 0 or high < 0), (only_a, only_b, n)


def test_a_score_interval_at_a_critical_value_inverts_the_test_at_it():
    for n12, n21, n, critical in [(10, 2, 96, 2.77), (0, 0, 48, 5.9), (30, 3, 192, 4.07), (7, 9, 384, 2.4)]:
        low, high = score_interval(n12, n21, n, critical)
        for edge in (low, high):
            if -1 < edge < 1:
                assert abs(tango_statistic(n12, n21, n, edge)) == pytest.approx(critical, abs=1e-6)
        assert (low > 0) == (tango_statistic(n12, n21, n, 0.0) > critical)
    assert score_interval(0, 0, 100, 3.0)[1] == pytest.approx(9 / 109)
    # the statistic takes arrays, for simulations
    values = tango_statistic(np.array([10, 0]), np.array([2, 0]), 96, 0.0)
    assert values == pytest.approx([8 / math.sqrt(12), 0.0])


def test_mcnemar_rejects_unpaired_outcomes():
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])


def test_cohen_kappa_on_a_textbook_table():
    # 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no: p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5, kappa = 0.4.
    a, b = paired_outcomes(both=20, only_a=5, only_b=10, neither=15)
    assert percent_agreement(a, b) == pytest.approx(0.7)
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa([True] * 4, [True] * 4))


def test_a_proportion_carries_its_wilson_interval():
    rate = proportion([True, False, False, False])
    assert (rate.value, rate.n) == (0.25, 4) and (rate.low, rate.high) == wilson_interval(1, 4)
    assert proportion([False] * 20).high > 0  # informative at zero successes


def constrained_score_statistic(n12: int, n21: int, n: int, delta: float) -> float:
    """The reference: Tango's score statistic with the constrained maximum likelihood estimate of
    P(only second) found numerically, by maximising the multinomial likelihood of the discordant
    cells under p12 - p21 = delta (not by the closed form the implementation uses)."""
    import scipy.optimize

    def negative_log_likelihood(p21):
        p12 = p21 + delta
        concordant = 1 - p12 - p21
        if p21 <= 0 or p12 <= 0 or concordant <= 0:
            return math.inf
        return -(n12 * math.log(p12) + n21 * math.log(p21) + (n - n12 - n21) * math.log(concordant))

    upper = (1 - delta) / 2
    lower = max(0.0, -delta)
    p21 = scipy.optimize.minimize_scalar(negative_log_likelihood, bounds=(lower + 1e-12, upper - 1e-12),
                                         method="bounded", options={"xatol": 1e-12}).x
    return (n12 - n21 - n * delta) / math.sqrt(n * (2 * p21 + delta * (1 - delta)))


@pytest.mark.parametrize("n12, n21, n", [(10, 2, 96), (3, 7, 40), (1, 0, 64), (12, 12, 50)])
def test_tango_interval_inverts_the_score_test(n12, n21, n):
    low, high = tango_interval(n12, n21, n)
    z = NormalDist().inv_cdf(0.975)
    assert low < (n12 - n21) / n < high
    for edge in (low, high):  # at each end the reference statistic is exactly +-z
        assert abs(constrained_score_statistic(n12, n21, n, edge)) == pytest.approx(z, abs=1e-3)
    inside = (low + high) / 2
    assert abs(constrained_score_statistic(n12, n21, n, inside)) < z


def test_tango_interval_does_not_collapse_without_discordant_pairs():
    z2 = NormalDist().inv_cdf(0.975) ** 2
    for n in (8, 96, 400):
        low, high = tango_interval(0, 0, n)
        assert high == pytest.approx(z2 / (n + z2), rel=1e-6) and low == pytest.approx(-high)
    same = [True] * 5 + [False] * 11
    difference = paired_difference(same, same)
    assert difference.value == 0 and difference.high > 0.15  # 16 prompts cannot rule out a 10-point rise


def test_paired_difference_is_first_minus_second_with_tango_interval():
    first, second = paired_outcomes(both=20, only_a=10, only_b=2, neither=64)
    difference = paired_difference(first, second)
    assert difference.value == pytest.approx(8 / 96) and (difference.low, difference.high) == tango_interval(10, 2, 96)
    with pytest.raises(ValueError):
        paired_difference(first, second[1:])


def _brute_force_sign_flip(differences):
    import itertools

    observed = abs(sum(differences))
    totals = [sum(s * d for s, d in zip(signs, differences)) for signs in itertools.product((1, -1), repeat=len(differences))]
    return sum(abs(t) >= observed for t in totals) / len(totals)


@pytest.mark.parametrize("differences", [[3, -1, 2, 0, 1, 1, -2], [1, 1, 1, 1, 1], [0, 0, 0], [2, -2, 3, -3, 1], [-3, -2, -1, 0, 2]])
def test_sign_flip_p_equals_enumerating_every_sign_pattern(differences):
    assert sign_flip_p(differences) == pytest.approx(_brute_force_sign_flip(differences))


@pytest.mark.parametrize("only_a, only_b", [(0, 0), (5, 1), (7, 2), (3, 3), (10, 0)])
def test_sign_flip_on_single_outcomes_is_the_exact_mcnemar_test(only_a, only_b):
    differences = [1] * only_a + [-1] * only_b + [0] * 6
    assert sign_flip_p(differences) == pytest.approx(exact_mcnemar_p(only_a, only_b))


def test_clustered_difference_pools_models_but_tests_prompts_as_clusters():
    # Three models, four prompts: prompt 0 flips on every model, prompt 1 on one.
    first = [[1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 1]]
    second = [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    result = clustered_difference(first, second)
    assert (result.only_first, result.only_second, result.items, result.groups) == (4, 0, 4, 3)
    assert result.difference == pytest.approx(4 / 12)
    # Two informative clusters (sums 3 and 1): 2 of the 4 sign patterns are as extreme, so p = 0.5,
    # where treating the 12 pairs as independent would give McNemar's 4 vs 0, p = 0.125.
    assert result.p_value == pytest.approx(0.5)
    assert exact_mcnemar_p(4, 0) == pytest.approx(0.125)
    with pytest.raises(ValueError):
        clustered_difference(first, second[:2])
