import math
from statistics import NormalDist

import numpy as np
import pytest

from quada.eval.metrics import (
    clustered_difference,
    sign_flip_p,
    bootstrap_ci,
    estimate,
    cohen_kappa,
    holm,
    mcnemar,
    mcnemar_exact_p,
    paired_difference,
    percent_agreement,
    proportion,
    tango_interval,
    wilson_interval,
)


def paired_outcomes(both: int, only_a: int, only_b: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Two paired outcome lists realising a 2x2 table."""
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


def test_bootstrap_interval_covers_the_true_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    true_rate, n, trials = 0.3, 100, 200
    covered = 0
    for trial in range(trials):
        outcomes = rng.random(n) < true_rate
        low, high = bootstrap_ci(outcomes, resamples=1000, seed=trial)
        covered += low <= true_rate <= high
    assert 0.88 <= covered / trials <= 0.99


def test_bootstrap_interval_of_a_mean_is_seeded_and_brackets_the_mean():
    scores = [1, 1, 2, 5, 4, 3, 1, 5, 2, 2]
    low, high = bootstrap_ci(scores, seed=7)
    assert (low, high) == bootstrap_ci(scores, seed=7)
    assert low < np.mean(scores) < high
    assert bootstrap_ci([0, 0, 0]) == (0.0, 0.0)
    rate = estimate([True, False, False, True], seed=7)
    assert (rate.value, rate.n) == (0.5, 4) and rate.low <= 0.5 <= rate.high


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


def test_mcnemar_exact_on_a_small_table():
    # 1 versus 9 discordant pairs: p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024.
    result = mcnemar(*paired_outcomes(both=30, only_a=1, only_b=9, neither=60))
    assert (result.only_a, result.only_b, result.method) == (1, 9, "exact")
    assert result.p_value == pytest.approx(22 / 1024)
    assert mcnemar_exact_p(5, 5) == 1.0
    assert mcnemar_exact_p(0, 0) == 1.0


def test_mcnemar_chi_square_with_continuity_correction_on_a_larger_table():
    # 10 versus 30: X^2 = (|10 - 30| - 1)^2 / 40 = 9.025; a chi-square(1) tail is a two-sided
    # standard normal tail at sqrt(X^2).
    result = mcnemar(*paired_outcomes(both=100, only_a=10, only_b=30, neither=380))
    assert result.method == "chi2-cc"
    assert result.statistic == pytest.approx(9.025)
    assert result.p_value == pytest.approx(2 * (1 - NormalDist().cdf(math.sqrt(9.025))), rel=1e-9)


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


def test_holm_adjusts_step_down_and_keeps_the_order():
    # Holm 1979: sorted p 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x, made monotone.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.2]) == [0.2] and holm([]) == []


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
    assert sign_flip_p(differences) == pytest.approx(mcnemar_exact_p(only_a, only_b))


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
    assert mcnemar_exact_p(4, 0) == pytest.approx(0.125)
    with pytest.raises(ValueError):
        clustered_difference(first, second[:2])
