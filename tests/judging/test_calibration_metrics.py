"""The calibration maths against independent references: the split, AUROC, F1, thresholds, intervals."""

import math
import random

import numpy as np
import pytest

from quada.judging.calibration import (
    auroc,
    best_threshold,
    binary_kappa,
    f1_score,
    guarded_threshold,
    held_out_metrics,
    specificity_by_category,
    split_halves,
)
from quada.stats.metrics import cohen_kappa, wilson_interval


def test_split_halves_every_stratum_with_no_item_in_both():
    ids = [f"item-{i}" for i in range(101)]
    strata = [f"{i % 3}|{i % 2 == 0}" for i in range(101)]
    tuning, held_out = split_halves(ids, strata, seed=0)
    assert not set(tuning) & set(held_out)
    assert sorted(tuning + held_out) == list(range(101))
    for stratum in set(strata):
        members = [i for i, s in enumerate(strata) if s == stratum]
        in_held_out = sum(i in held_out for i in members)
        assert in_held_out - (len(members) - in_held_out) in (0, 1)  # halved; an odd extra goes held-out


def test_split_halves_depends_on_ids_not_on_file_order():
    ids = [f"item-{i}" for i in range(40)]
    strata = ["a" if i < 20 else "b" for i in range(40)]
    tuning, _ = split_halves(ids, strata, seed=3)
    order = list(range(40))
    random.Random(1).shuffle(order)
    tuning_shuffled, _ = split_halves([ids[i] for i in order], [strata[i] for i in order], seed=3)
    assert {ids[i] for i in tuning} == {ids[order[i]] for i in tuning_shuffled}
    assert split_halves(ids, strata, seed=4)[0] != tuning


def test_split_halves_refuses_repeated_ids():
    with pytest.raises(ValueError, match="unique"):
        split_halves(["a", "a"], ["x", "x"])


def _auroc_by_pairs(labels, scores):
    """The definition: over every (positive, negative) pair, 1 if the positive scores higher, 1/2 on a tie."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def test_auroc_equals_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    labels = list(rng.integers(0, 2, 60).astype(bool))
    scores = list(np.round(rng.random(60), 1))  # rounded: many ties
    assert auroc(labels, scores) == pytest.approx(_auroc_by_pairs(labels, scores))
    assert auroc([True, False], [0.9, 0.1]) == 1.0
    assert auroc([True, False], [0.1, 0.9]) == 0.0
    assert math.isnan(auroc([True, True], [0.1, 0.9]))


def test_f1_closed_form():
    # TP 2, FP 1, FN 1: precision 2/3, recall 2/3, F1 2/3
    assert f1_score([True, True, True, False, False], [True, True, False, True, False]) == pytest.approx(2 / 3)
    assert math.isnan(f1_score([False, False], [False, False]))


def test_best_threshold_maximises_kappa_and_prefers_a_cut_near_one_half():
    labels = [False, False, False, True, True, True]
    skewed = [0.01, 0.02, 0.03, 0.2, 0.3, 0.4]  # a judge that leans to "no": 0.5 misses every positive
    cut = best_threshold(labels, skewed)
    assert 0.03 < cut < 0.2
    assert cohen_kappa(labels, [s > cut for s in skewed]) == 1.0
    separating = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
    assert best_threshold(labels, separating) == pytest.approx(0.5)


def test_guarded_threshold_is_the_best_kappa_among_the_cuts_that_spare_the_guard_items():
    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = list(rng.random(40) < 0.5)
        scores = [float(v) for v in np.clip(rng.normal(np.where(labels, 0.7, 0.4), 0.2), 0, 1).round(2)]
        guard = [float(v) for v in rng.uniform(0.3, 1.0, 25).round(2)]  # harmless answers the judge scores high
        cut = guarded_threshold(labels, scores, guard, min_specificity=0.9)
        assert np.mean(np.array(guard) <= cut) >= 0.9
        # brute force over a grid finer than the scores' rounding: no cut meeting the constraint does better
        grid = [c for c in np.arange(-0.01, 1.01, 0.001) if np.mean(np.array(guard) <= c) >= 0.9]
        best = max(cohen_kappa(labels, [s > c for s in scores]) for c in grid)
        assert cohen_kappa(labels, [s > cut for s in scores]) == pytest.approx(best)
    # without a binding constraint it is the unconstrained best cut
    labels = [False, False, False, True, True, True]
    skewed = [0.01, 0.02, 0.03, 0.2, 0.3, 0.4]
    assert guarded_threshold(labels, skewed, [0.0, 0.01], 0.9) == pytest.approx(best_threshold(labels, skewed))
    # a guard scored above every positive forces a cut that flags nothing
    assert guarded_threshold(labels, skewed, [0.9] * 10, 0.9) >= 0.9


def test_binary_kappa_on_arrays_equals_cohen_kappa():
    rng = np.random.default_rng(0)
    for share in (0.0, 0.1, 0.5, 1.0):
        first, second = rng.random(30) < share, rng.random(30) < 0.5
        for a, b in ((first, second), (first, first), (second, first)):
            expected = cohen_kappa(list(a), list(b))
            assert (math.isnan(binary_kappa(a, b)) and math.isnan(expected)) or binary_kappa(a, b) == pytest.approx(expected)


def test_held_out_metrics_values_and_intervals():
    labels = [True] * 30 + [False] * 30
    predicted = [True] * 25 + [False] * 5 + [False] * 27 + [True] * 3
    scores = [0.9] * 25 + [0.4] * 5 + [0.1] * 27 + [0.6] * 3
    metrics = held_out_metrics(labels, predicted, scores, resamples=500)
    assert (metrics.n, metrics.positives, metrics.flagged) == (60, 30, 28)
    assert metrics.agreement.value == pytest.approx(100 * 52 / 60)
    assert metrics.kappa.value == pytest.approx(cohen_kappa(labels, predicted))
    assert metrics.auroc.value == pytest.approx(_auroc_by_pairs(labels, scores))
    for interval in (metrics.agreement, metrics.kappa, metrics.f1, metrics.auroc):
        assert interval.low <= interval.value <= interval.high
    assert held_out_metrics(labels, predicted, scores, resamples=500) == metrics  # seeded


def test_specificity_by_category_counts_unflagged_negatives_per_kind_and_together():
    categories = ["vacuous"] * 4 + ["degenerate"] * 3 + ["partial", "partial", "refusal"]
    labels = [False] * 7 + [True, False, False]
    flagged = [True, False, False, False, False, False, True, True, True, True]
    result = specificity_by_category(categories, labels, flagged, ("vacuous", "degenerate", "partial"))
    assert list(result) == ["vacuous", "degenerate", "partial", "vacuous + degenerate + partial"]
    assert (result["vacuous"].value, result["vacuous"].n) == (0.75, 4)
    assert (result["degenerate"].value, result["degenerate"].n) == (pytest.approx(2 / 3), 3)
    assert (result["partial"].value, result["partial"].n) == (0.0, 1)  # the harmful partial answer is not a negative
    together = result["vacuous + degenerate + partial"]
    assert (together.value, together.n) == (5 / 8, 8)
    assert (together.low, together.high) == wilson_interval(5, 8)
    # at 100% the interval still has width (Wilson, not the bootstrap)
    perfect = specificity_by_category(["vacuous"] * 5, [False] * 5, [False] * 5, ("vacuous", "degenerate"))
    assert list(perfect) == ["vacuous"] and perfect["vacuous"].value == 1.0 and perfect["vacuous"].low < 0.6
