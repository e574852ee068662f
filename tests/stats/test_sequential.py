"""The group-sequential design: its critical values against published tables and a simulation,
its look schedule, and the error rates of the verdicts it decides, by simulation."""

import numpy as np
import pytest

from quada.stats.sequential import (
    Design,
    critical_values,
    crossings,
    look_schedule,
    obrien_fleming_spending,
    simulate,
)
from quada.stats.verdict import compare


def test_the_schedule_doubles_from_the_first_look_up_to_the_budget():
    assert look_schedule(48, 384) == (48, 96, 192, 384)
    assert look_schedule(48, 300) == (48, 96, 192, 300)
    assert look_schedule(48, 48) == (48,) and look_schedule(96, 40) == (40,) and look_schedule(None, 96) == (96,)


def test_the_spending_function_spends_alpha_by_the_end_and_little_early():
    assert obrien_fleming_spending(1.0, 0.05) == pytest.approx(0.05)
    assert obrien_fleming_spending(0.25, 0.05) < 0.0001
    with pytest.raises(ValueError):
        obrien_fleming_spending(0.0, 0.05)


@pytest.mark.parametrize("fractions, published", [
    # Lan-DeMets O'Brien-Fleming-type bounds, two-sided alpha 0.05, equally spaced looks (as tabled by the
    # ldbounds R package and gsDesign's sfLDOF; Jennison & Turnbull 2000, table 7.6)
    ((0.25, 0.5, 0.75, 1.0), (4.3326, 2.9631, 2.3590, 2.0141)),
    ((0.2, 0.4, 0.6, 0.8, 1.0), (4.8769, 3.3569, 2.6803, 2.2898, 2.0310)),
])
def test_critical_values_match_the_published_tables(fractions, published):
    assert critical_values(fractions, 0.05) == pytest.approx(published, abs=2e-4)


def test_one_look_is_the_fixed_sample_test():
    assert critical_values((1.0,), 0.05) == pytest.approx((1.959964,), abs=1e-6)


def test_critical_values_spend_what_a_simulated_brownian_motion_crosses():
    # An independent reference: standard normal statistics with independent increments, simulated.
    fractions, alpha = (0.125, 0.25, 0.5, 1.0), 0.2  # a large alpha, so the early looks' crossings can be counted
    bounds = critical_values(fractions, alpha)
    rng = np.random.default_rng(0)
    steps = np.diff((0.0, *fractions))
    paths = np.cumsum(rng.standard_normal((400_000, len(fractions))) * np.sqrt(steps), axis=1) / np.sqrt(fractions)
    outside = np.abs(paths) >= np.asarray(bounds)
    first = np.where(outside.any(axis=1), outside.argmax(axis=1), -1)
    spent = [obrien_fleming_spending(t, alpha) for t in fractions]
    for look in range(len(fractions)):
        expected = spent[look] - (spent[look - 1] if look else 0.0)
        assert np.mean(first == look) == pytest.approx(expected, abs=4 * np.sqrt(expected / 400_000) + 1e-4)


def test_the_looks_decisions_are_the_repeated_intervals_bounds():
    # crossings (what a simulation and a vet decide) against the intervals the report shows
    for n in (48, 192):
        for only_a in range(0, 40, 3):
            for only_b in range(0, 40, 4):
                clean = [False] * only_a + [True] * only_b + [False] * (n - only_a - only_b)
                noisy = [True] * only_a + [False] * only_b + [False] * (n - only_a - only_b)
                c = compare("keyword", "refusal", 0.7, clean, noisy, 4.07, 3.55, 0.10)
                assert c.rises == (c.difference.low > 0) and c.within == (c.difference.high < 0.10)
                assert c.falls == (c.difference.high < 0)
                assert (c.rises, c.within, c.falls) == tuple(crossings(only_a, only_b, n, 4.07, 3.55, 0.10))


@pytest.mark.parametrize("identical_judges", [False, True])
def test_false_alarms_over_looks_conditions_and_judges_stay_within_half_alpha(identical_judges):
    design = Design((48, 96, 192, 384), 0.05, judges=3, conditions=3)
    null = simulate(design, (0.0, 0.0, 0.0), 0.2, 3000, identical_judges, seed=1)
    alarm = np.mean((null["verdict"] == "rise").any(axis=1))
    assert alarm <= 0.025 + 3 * np.sqrt(0.025 / 3000)
    at_margin = simulate(design, (0.1, 0.1, 0.1), 0.2, 3000, identical_judges, seed=2)
    assert np.mean((at_margin["verdict"] == "within").any(axis=1)) <= 0.025 + 3 * np.sqrt(0.025 / 3000)


def test_a_large_rise_stops_early_and_no_rise_is_decided_with_more_prompts():
    design = Design((48, 96, 192, 384), 0.05, judges=1, conditions=1)
    large = simulate(design, (0.4,), 0.45, 500, seed=3)
    assert np.all(large["verdict"] == "rise") and np.mean(large["prompts"]) < 100
    none = simulate(design, (0.0,), 0.1, 500, seed=4)
    assert np.mean(none["verdict"] == "within") > 0.95 and np.all(none["prompts"] >= 96)
