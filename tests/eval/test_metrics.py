import math
from statistics import NormalDist

import numpy as np
import pytest

from quada.eval.metrics import (
    bootstrap_ci,
    estimate,
    cohen_kappa,
    mcnemar,
    mcnemar_exact_p,
    percent_agreement,
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
