"""How far a judge agrees with human labels: a seeded split, threshold choice and held-out metrics.

Calibration follows the usual protocol of judge evaluation: the labelled items are split once, by a
fixed seed, into a *tuning* half and a *held-out* half (stratified by category and human label, so
both halves have the same mix); everything that is chosen (the decision threshold on the judge's
score) is chosen on the tuning half only; agreement, Cohen's kappa, F1 and AUROC are reported on the
held-out half, with percentile bootstrap intervals over its items. These are small pure functions;
running judges and caching results is :mod:`quada.judge_calibration`'s job.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from quada.eval.metrics import BOOTSTRAP_RESAMPLES, Estimate, cohen_kappa, wilson_interval

T = TypeVar("T")


def split_halves(ids: Sequence[str], strata: Sequence[str], seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of the tuning half and of the held-out half of items with the given ``ids``.

    Within each stratum, items are ordered by the SHA-256 of ``"{seed}:{id}"`` and dealt out
    alternately, the first to the held-out half: the split of an item depends only on its id, its
    stratum and the seed (not on the order of the file), every stratum is halved (an odd one gives
    its extra item to the held-out half), and no item is in both halves.
    """
    if len(set(ids)) != len(ids):
        raise ValueError("split_halves needs unique ids")
    groups: dict[str, list[int]] = defaultdict(list)
    for index, stratum in enumerate(strata):
        groups[stratum].append(index)
    tuning, held_out = [], []
    for stratum in sorted(groups):
        ordered = sorted(groups[stratum], key=lambda i: hashlib.sha256(f"{seed}:{ids[i]}".encode()).hexdigest())
        held_out += ordered[0::2]
        tuning += ordered[1::2]
    return sorted(tuning), sorted(held_out)


def auroc(labels: Sequence[bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve: the probability that a random positive item scores above a random
    negative one, ties counting one half (the Mann-Whitney U statistic over n_pos * n_neg; Hanley &
    McNeil, Radiology 143:29, 1982). NaN when one class is absent."""
    labels_arr = np.asarray(labels, dtype=bool)
    scores_arr = np.asarray(scores, dtype=float)
    positives, negatives = scores_arr[labels_arr], scores_arr[~labels_arr]
    if positives.size == 0 or negatives.size == 0:
        return math.nan
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (positives.size * negatives.size))


def f1_score(labels: Sequence[bool], predicted: Sequence[bool]) -> float:
    """F1 of the positive class: 2 TP / (2 TP + FP + FN); NaN when there is no positive at all."""
    truth, guess = np.asarray(labels, dtype=bool), np.asarray(predicted, dtype=bool)
    tp, wrong = int((truth & guess).sum()), int((truth != guess).sum())
    return math.nan if tp + wrong == 0 else 2 * tp / (2 * tp + wrong)


def best_threshold(labels: Sequence[bool], scores: Sequence[float]) -> float:
    """The cut that maximises Cohen's kappa of ``score > cut`` against ``labels``.

    Candidates are the midpoints between consecutive distinct scores (and the ends); among equally
    good cuts the one closest to 0.5 wins, so a judge whose scores already separate at 0.5 keeps it.
    """
    return guarded_threshold(labels, scores, (), 0.0)


def guarded_threshold(
    labels: Sequence[bool], scores: Sequence[float], guard_scores: Sequence[float], min_specificity: float
) -> float:
    """:func:`best_threshold` among the cuts that leave at least ``min_specificity`` of the guard
    items unflagged (``guard score <= cut``); the candidates run over both sets' scores.

    The guard items are human negatives a judge must not flag, e.g. quada-harm's vacuous and
    degenerate answers, while ``labels`` and ``scores`` are another labelled set, e.g. PyRIT's: one
    threshold chosen on two tuning halves at once. Flagging nothing always meets the constraint, so
    there is always an answer.
    """
    guard = np.asarray(guard_scores, dtype=float)
    distinct = sorted(set(float(s) for s in [*scores, *guard_scores]))
    cuts = [distinct[0] - 1e-9] + [(a + b) / 2 for a, b in zip(distinct, distinct[1:])] + [distinct[-1]]
    allowed = [cut for cut in cuts if guard.size == 0 or float(np.mean(guard <= cut)) >= min_specificity]

    def quality(cut: float) -> tuple[float, float]:
        kappa = cohen_kappa(labels, [s > cut for s in scores])
        return (-math.inf if math.isnan(kappa) else kappa, -abs(cut - 0.5))

    return max(allowed, key=quality)


@dataclass(frozen=True)
class Interval:
    """A statistic on the held-out items and its percentile bootstrap interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class HeldOutMetrics:
    """How a judge's labels agree with the human labels on ``n`` held-out items (``positives`` of
    them labelled true by people, ``flagged`` by the judge)."""

    n: int
    positives: int
    flagged: int
    agreement: Interval
    kappa: Interval
    f1: Interval
    auroc: Interval


def _bootstrap(statistic: Callable[[np.ndarray], float], n: int, seed: int, resamples: int) -> tuple[float, float]:
    """Percentile interval of ``statistic(indices)`` over resampled item indices; resamples where
    the statistic is undefined (NaN, e.g. kappa with one class only) are skipped."""
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, n, size=n)) for _ in range(resamples)]
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    low, high = np.quantile(values, [0.025, 0.975])
    return float(low), float(high)


def binary_kappa(first: np.ndarray, second: np.ndarray) -> float:
    """:func:`quada.eval.metrics.cohen_kappa` of two boolean arrays, on arrays (the bootstrap calls
    it thousands of times): p_e from the two raters' shares of true labels; NaN when p_e = 1."""
    share_first, share_second = float(first.mean()), float(second.mean())
    expected = share_first * share_second + (1 - share_first) * (1 - share_second)
    return math.nan if expected == 1.0 else (float(np.mean(first == second)) - expected) / (1 - expected)


def held_out_metrics(
    labels: Sequence[bool],
    predicted: Sequence[bool],
    scores: Sequence[float],
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES // 5,
) -> HeldOutMetrics:
    """Agreement (percent), kappa, F1 and AUROC of a judge against human ``labels``, each with a
    95% percentile bootstrap interval over the items (seeded)."""
    truth, guess, score = np.asarray(labels, bool), np.asarray(predicted, bool), np.asarray(scores, float)
    statistics = {
        "agreement": lambda i: 100 * float(np.mean(truth[i] == guess[i])),
        "kappa": lambda i: binary_kappa(truth[i], guess[i]),
        "f1": lambda i: f1_score(truth[i], guess[i]),
        "auroc": lambda i: auroc(truth[i], score[i]),
    }
    everything = np.arange(len(truth))
    intervals = {
        name: Interval(statistic(everything), *_bootstrap(statistic, len(truth), seed, resamples))
        for name, statistic in statistics.items()
    }
    return HeldOutMetrics(len(truth), int(truth.sum()), int(guess.sum()), **intervals)


def specificity_by_category(
    categories: Sequence[str], labels: Sequence[bool], predicted: Sequence[bool], chosen: Sequence[str]
) -> dict[str, Estimate]:
    """The judge's specificity, TN / (TN + FP), on the human-negative items of each ``chosen`` category
    present, and on all of them together (key ``"a + b"``), with Wilson 95% intervals
    (:func:`quada.eval.metrics.wilson_interval`, which stays informative at 100%).

    A harm judge's specificity on responses that comply without harm (vacuous or degenerate ones) is
    how often it leaves them unflagged: the share of those an attack rate would wrongly count.
    """
    groups: dict[str, list[bool]] = defaultdict(list)
    for category, label, guess in zip(categories, labels, predicted, strict=True):
        if category in chosen and not label:
            groups[category].append(not guess)

    def rate(kept: list[bool]) -> Estimate:
        return Estimate(sum(kept) / len(kept), *wilson_interval(sum(kept), len(kept)), len(kept))

    result = {category: rate(groups[category]) for category in chosen if groups[category]}
    if len(result) > 1:
        result[" + ".join(result)] = rate([kept for category in list(result) for kept in groups[category]])
    return result
