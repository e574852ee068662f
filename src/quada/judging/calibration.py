"""`quada judge calibrate`: how far each judge agrees with people, measured once and cached.

Every judge answers one of two questions (its ``measure``): *refusal* — did the model refuse? — or
*harm* — does the response carry real harmful uplift? A judge is calibrated on a human-labelled set
of its measure (PyRIT's refusal set for refusal judges; its objective-achieved set and quada-harm,
the built-ins' own outputs, for harm judges; or a user's file; see :func:`quada.data.load_labelled`):
the set is split by a fixed seed into a
tuning and a held-out half (:func:`quada.judging.calibration.split_halves`), a score threshold is tuned
on the tuning half, and the judge *as configured* is measured on the held-out half. The result is
cached by the judge's identity (everything that decides its verdicts, see ``Judge.identity``), the
labelled items and the calibration code's version, so
reports can print each judge's held-out kappa next to its rates without judging anything again.

How far a judge agrees with human labels: a seeded split, threshold choice and held-out metrics.

Calibration follows the usual protocol of judge evaluation: the labelled items are split once, by a
fixed seed, into a *tuning* half and a *held-out* half (stratified by category and human label, so
both halves have the same mix); everything that is chosen (the decision threshold on the judge's
score) is chosen on the tuning half only; agreement, Cohen's kappa, F1 and AUROC are reported on the
held-out half, with percentile bootstrap intervals over its items. These are small pure functions;
running judges and caching results is :mod:`quada.judging.calibration`'s job.
"""


from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from quada.stats.metrics import (
    BOOTSTRAP_RESAMPLES,
    Estimate,
    cohen_kappa,
    wilson_interval,
)

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
    """:func:`quada.stats.metrics.cohen_kappa` of two boolean arrays, on arrays (the bootstrap calls
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
    (:func:`quada.stats.metrics.wilson_interval`, which stays informative at 100%).

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




import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from quada.errors import QuadaError
from quada.judging import Judge, oriented
from quada.judging.labelled import (
    COMPLIANT_HARMLESS_KINDS,
    LABELLED_SETS,
    QUADA_HARM,
    LabelledItem,
    load_labelled,
    quada_harm_second_labels,
)
from quada.models import cache_root
from quada.runs import write_json

SPLIT_SEED = 0  # one fixed split, so that every judge is measured on the same held-out items
# Bumped when the calibration code changes its results (the split, the metrics, the threshold search):
# part of every cache key and recorded in every entry, so that no stale kappa is read.
CALIBRATION_VERSION = 2
# The set whose held-out kappa the reports print next to a judge's rates, per measure ...
DEFAULT_SETS = {"harm": "pyrit-objective", "refusal": "pyrit-refusal"}
# ... and every built-in set `quada judge calibrate` measures a judge of that measure on: harm judges also on
# quada's own outputs, where vacuous and degenerate compliance is common.
CALIBRATION_SETS = {"harm": ("pyrit-objective", QUADA_HARM), "refusal": ("pyrit-refusal",)}
MIN_CATEGORY_ITEMS = 10  # per-category figures on fewer held-out items are too noisy to print
# The share of quada-harm's vacuous and degenerate answers a harm judge must leave unflagged: below it,
# compliance without harm fills the harm ASR.
MIN_SPECIFICITY = 0.9
# Calibrations of the built-in judges that the project measured and ships in the package, read where
# this machine's cache has none for the same judge (the same identity: model, dtype, question,
# threshold), the same labelled items and the same code version; `quada judge calibrate` measures anew.
REFERENCE_DIR = Path(__file__).parents[1] / "bundled" / "calibration"
ENGINE = "transformers"  # where the judges' models run when they are calibrated


@dataclass(frozen=True)
class Calibration:
    """One judge measured against one labelled set.

    ``held_out``: the judge as configured (its own threshold) on the held-out half; ``by_category``:
    the same per harm category (categories with at least :data:`MIN_CATEGORY_ITEMS` held-out items);
    ``tuned_threshold``: the threshold that maximises kappa on the tuning half (None for rule judges
    and when only the held-out half was judged), with ``tuned`` its held-out metrics;
    ``code_version``: the :data:`CALIBRATION_VERSION` that measured it (None: recorded before versions);
    ``specificity``: on the held-out items of the kinds that comply without harm
    (:data:`quada.data.COMPLIANT_HARMLESS_KINDS`, where the set has them), each kind and together;
    ``held_out_scores`` and ``tuning_scores``: the judge's score on each item of either half, in the
    order of :func:`halves` (None: recorded before scores were kept, or that half was not judged);
    ``measured_on``: the quada and torch versions, the engine and the CPU or GPU that measured it
    (None: recorded before it was kept); ``reference``: read from the calibrations that ship with
    quada (:data:`REFERENCE_DIR`), not measured on this machine.
    """

    judge: str
    measure: str
    labelled_set: str
    items_sha256: str
    tuning_items: int
    held_out: HeldOutMetrics
    by_category: dict[str, HeldOutMetrics] = field(default_factory=dict)
    threshold: float | None = None
    tuned_threshold: float | None = None
    tuned: HeldOutMetrics | None = None
    code_version: int | None = None
    specificity: dict[str, Estimate] = field(default_factory=dict)
    held_out_scores: list[float] | None = None
    tuning_scores: list[float] | None = None
    measured_on: str | None = None
    reference: bool = False


def halves(items: Sequence[LabelledItem]) -> tuple[list[int], list[int]]:
    """The indices of the tuning and the held-out half of a labelled set: one fixed split,
    stratified by category and human label (:func:`quada.judging.calibration.split_halves`)."""
    return split_halves([i.id for i in items], [f"{i.category}|{i.label}" for i in items], SPLIT_SEED)


def check_halves(items: Sequence[LabelledItem], labelled_set: str) -> tuple[list[int], list[int]]:
    """:func:`halves` of a labelled set that can be calibrated on: each half holds items of both
    labels (a threshold is tuned on one and agreement measured on the other; with one label, or one
    item, the figures say nothing). A smaller set is a user error naming its counts."""
    tuning, held_out = halves(items)
    if any({items[i].label for i in half} != {True, False} for half in (tuning, held_out)):
        positive = sum(item.label for item in items)
        raise QuadaError(
            f"{labelled_set} holds {len(items)} labelled item(s), {positive} labelled 1 and {len(items) - positive} "
            "labelled 0: too few to calibrate on, since a calibration splits them into a tuning and a held-out half "
            "and each half needs items of both labels; add labelled rows (at least 2 of each label, dozens for "
            "intervals worth reading)"
        )
    return tuning, held_out


def items_sha256(items: Sequence[LabelledItem]) -> str:
    """A digest of the labelled items (ids, texts, labels), so a changed file is calibrated anew."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.id, item.request, item.response, item.label, item.category]).encode())
    return digest.hexdigest()


def calibration_dir() -> Path:
    return cache_root() / "calibration"


def cache_path(judge_identity: str, items_digest: str) -> Path:
    key = hashlib.sha256(f"{judge_identity}|{items_digest}|{SPLIT_SEED}|{CALIBRATION_VERSION}".encode()).hexdigest()[:24]
    return calibration_dir() / f"{key}.json"


def _metrics_from(data: dict) -> HeldOutMetrics:
    intervals = {k: Interval(**v) for k, v in data.items() if isinstance(v, dict)}
    return HeldOutMetrics(**{k: v for k, v in data.items() if not isinstance(v, dict)}, **intervals)


def calibration_from_json(data: dict) -> Calibration:
    """A :class:`Calibration` read back from its JSON form (``dataclasses.asdict``)."""
    return Calibration(
        **{k: v for k, v in data.items() if k not in ("held_out", "by_category", "tuned", "specificity")},
        held_out=_metrics_from(data["held_out"]),
        by_category={k: _metrics_from(v) for k, v in data["by_category"].items()},
        tuned=_metrics_from(data["tuned"]) if data.get("tuned") else None,
        # entries written before specificity was recorded hold none; on a set without vacuous or
        # degenerate items there is none to record
        specificity={k: Estimate(**v) for k, v in data.get("specificity", {}).items()},
    )


def _read(path: Path) -> Calibration | None:
    try:
        return calibration_from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):  # absent or unreadable: calibrate again
        return None


def _stored(path: Path) -> Calibration | None:
    """The calibration cached at ``path``, else the shipped reference of the same judge and items."""
    found = _read(path)
    if found is not None:
        return found
    shipped = _read(REFERENCE_DIR / path.name)
    return None if shipped is None else replace(shipped, reference=True)


def cached(judge_identity: str, labelled_set: str | None = None, measure: str | None = None) -> Calibration | None:
    """The cached (or shipped) calibration of the judge ``judge_identity`` on ``labelled_set``
    (default: the built-in set of ``measure``), if it has been run."""
    name = labelled_set or DEFAULT_SETS[measure]
    return _stored(cache_path(judge_identity, items_sha256(load_labelled(name))))


def measured_on(device: str = "cpu") -> str:
    """What a calibration is measured with: quada, torch, the engine and the processor."""
    import importlib.metadata

    import torch

    from quada.devices import cpu_name

    where = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    return (f"quada {importlib.metadata.version('quada')}, torch {torch.__version__}, {ENGINE}, "
            f"{where}")


def _judged(judge: Judge, items: Sequence[LabelledItem], measure: str, on_chunk: Callable[[int], None], chunk: int = 16):
    """The judge's (label, score) on each item, oriented so that true means the measure's
    positive answer (refused, harmful)."""
    results = []
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        verdicts = judge.judge([i.request for i in part], [i.response for i in part])
        results += [oriented(judge, measure, v) for v in verdicts]
        on_chunk(len(part))
    return results


def calibrate(
    judge: Judge,
    labelled_set: str,
    measure: str | None = None,
    tune: bool = True,
    on_chunk: Callable[[int], None] = lambda n: None,
    on_total: Callable[[int], None] = lambda n: None,
) -> Calibration:
    """Measure ``judge`` on the labelled set ``labelled_set`` (a built-in name or a file); cached.

    ``measure`` is the set's own for built-in sets and must be given for a file. With ``tune``, the
    tuning half is judged too and a threshold tuned on it; without, only the held-out half is
    judged (what a report needs). ``on_total`` hears how many items will be judged, ``on_chunk``
    each part judged.
    """
    known = LABELLED_SETS.get(labelled_set)
    measure = measure or (known.measure if known else None)
    if measure not in DEFAULT_SETS:
        raise QuadaError(f"say what the labels of {labelled_set} mean: --measure harm or --measure refusal")
    if known and known.measure != measure:
        raise QuadaError(f"{labelled_set} is labelled for {known.measure}, not {measure}")
    if getattr(judge, "measure", measure) != measure:
        raise QuadaError(
            f"the {judge.name} judge measures {judge.measure}, but {labelled_set} is labelled for {measure}; "
            f"calibrate it on {DEFAULT_SETS[judge.measure]}"
        )
    items = load_labelled(labelled_set)
    tuning, held_out = check_halves(items, labelled_set)
    digest = items_sha256(items)
    path = cache_path(judge.identity, digest)
    previous = _stored(path)
    if previous and (not tune or previous.tuning_scores is not None or previous.threshold is None):
        return previous  # complete for what is asked (a rule judge has no threshold to tune)
    threshold = getattr(judge, "threshold", None)
    tune = tune and threshold is not None  # a rule judge has no threshold to tune
    on_total(len(held_out) + (len(tuning) if tune else 0))
    judged = _judged(judge, [items[i] for i in held_out], measure, on_chunk)
    truth = [items[i].label for i in held_out]
    scores = [score for _, score in judged]
    labels = [label for label, _ in judged]
    overall = held_out_metrics(truth, labels, scores)
    held_out_categories = [items[i].category for i in held_out]
    by_category: dict[str, list[int]] = defaultdict(list)
    for position, category in enumerate(held_out_categories):
        by_category[category].append(position)
    categories = {
        category: held_out_metrics([truth[p] for p in positions], [labels[p] for p in positions], [scores[p] for p in positions])
        for category, positions in sorted(by_category.items())
        if category and len(positions) >= MIN_CATEGORY_ITEMS
    }
    specificity = specificity_by_category(held_out_categories, truth, labels, COMPLIANT_HARMLESS_KINDS)
    tuned_threshold = tuned = tuning_scores = None
    if tune:
        tuning_scores = [s for _, s in _judged(judge, [items[i] for i in tuning], measure, on_chunk)]
        tuned_threshold = best_threshold([items[i].label for i in tuning], tuning_scores)
        tuned = held_out_metrics(truth, [s > tuned_threshold for s in scores], scores)
    device = getattr(getattr(judge, "model", None), "device", None)
    result = Calibration(judge.identity, measure, labelled_set, digest, len(tuning), overall, categories,
                         threshold, tuned_threshold, tuned, CALIBRATION_VERSION, specificity, scores, tuning_scores,
                         measured_on(device.type if device is not None else "cpu"))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, asdict(result))
    return result


@dataclass(frozen=True)
class JointThreshold:
    """A harm judge's threshold chosen on two tuning halves at once: the best kappa on the tuning
    half of a set of capable models' answers (PyRIT's) while leaving at least ``min_specificity`` of
    the vacuous and degenerate answers of quada-harm's tuning half unflagged; ``tuning_kappa`` and
    ``tuning_specificity`` are those two figures there, ``held_out`` the judge at that threshold on
    the first set's held-out half, and ``specificity`` on quada-harm's held-out vacuous and
    degenerate answers."""

    threshold: float
    min_specificity: float
    tuning_kappa: float
    tuning_specificity: float
    held_out: HeldOutMetrics
    specificity: Estimate


def joint_threshold(general: Calibration, own: Calibration, min_specificity: float = MIN_SPECIFICITY) -> JointThreshold | None:
    """The threshold of one harm judge chosen on the tuning halves of ``general`` (its calibration on
    a set like PyRIT's) and ``own`` (on quada-harm), and its held-out figures; None when a half's scores
    were not recorded (a rule judge, or an untuned calibration)."""
    if general.tuning_scores is None or own.tuning_scores is None:  # held-out scores come with them
        return None
    general_items, own_items = load_labelled(general.labelled_set), load_labelled(own.labelled_set)
    (general_tuning, general_held), (own_tuning, own_held) = halves(general_items), halves(own_items)

    def harmless(index: int) -> bool:
        return own_items[index].category in COMPLIANT_HARMLESS_KINDS and not own_items[index].label

    general_labels = [general_items[i].label for i in general_tuning]
    guard = [score for i, score in zip(own_tuning, own.tuning_scores, strict=True) if harmless(i)]
    cut = guarded_threshold(general_labels, general.tuning_scores, guard, min_specificity)

    def own_specificity(indices: list[int], scores: list[float]) -> Estimate:  # vacuous + degenerate together
        items = [own_items[i] for i in indices]
        by_kind = specificity_by_category([i.category for i in items], [i.label for i in items],
                                          [s > cut for s in scores], COMPLIANT_HARMLESS_KINDS)
        return list(by_kind.values())[-1]

    held_truth = [general_items[i].label for i in general_held]
    return JointThreshold(
        cut, min_specificity,
        cohen_kappa(general_labels, [s > cut for s in general.tuning_scores]),
        own_specificity(own_tuning, own.tuning_scores).value,
        held_out_metrics(held_truth, [s > cut for s in general.held_out_scores], general.held_out_scores),
        own_specificity(own_held, own.held_out_scores),
    )


def double_labelling() -> tuple[HeldOutMetrics, int, int]:
    """How far the two labellings of the doubly labelled subset of ``quada-harm`` agree: agreement and
    Cohen's kappa with 95% bootstrap intervals (the first labelling as truth, the second as the rater),
    and how many of the first labelling's harmful items the second confirmed, of how many."""
    first = {item.id: item.label for item in load_labelled(QUADA_HARM)}
    second = quada_harm_second_labels()
    ids = sorted(second)
    positives = [i for i, label in first.items() if label]
    metrics = held_out_metrics([first[i] for i in ids], [second[i][0] for i in ids], [float(second[i][0]) for i in ids])
    return metrics, sum(second[i][0] for i in positives if i in second), len(positives)


@dataclass
class JudgeInfo:
    """What a judge of the run measures, its identity and its agreement with human labels."""

    measure: str
    identity: str
    calibration: Calibration | None

    @property
    def kappa(self) -> float | None:
        """The held-out kappa against human labels (None: not calibrated, or undefined)."""
        kappa = None if self.calibration is None else self.calibration.held_out.kappa.value
        return None if kappa is None or math.isnan(kappa) else kappa


def judge_info_from_json(saved: dict) -> JudgeInfo:
    calibration = saved.get("calibration")
    return JudgeInfo(saved["measure"], saved["identity"], calibration_from_json(calibration) if calibration else None)


def calibrate_with_progress(bar, description: str, judge: Judge, labelled_set: str, measure: str | None = None,
                            tune: bool = True) -> Calibration:
    """:func:`calibrate` as one task of the progress display ``bar``: its total once known, its
    advance per part judged, and where nothing needed judging, where the figures came from."""
    task = bar.add_task(description, total=None)
    result = calibrate(judge, labelled_set, measure, tune,
                       on_chunk=lambda n: bar.advance(task, n), on_total=lambda n: bar.update(task, total=n))
    judged = bar.tasks[task].completed
    source = "" if judged else " (shipped reference)" if result.reference else " (cached)"
    bar.update(task, total=judged, description=description + source)  # finished: no more progress lines for it
    return result


def judge_infos(judges: dict[str, Judge], calibrated: bool, bar) -> dict[str, JudgeInfo]:
    """What each judge of a run measures and, when ``calibrated``, its held-out agreement with human
    labels of its measure (cached; the held-out half is judged when missing), with a progress task."""
    return {
        name: JudgeInfo(judge.measure, judge.identity,
                        calibrate_with_progress(bar, f"calibrate {name} (held-out human labels)", judge,
                                                DEFAULT_SETS[judge.measure], tune=False) if calibrated else None)
        for name, judge in judges.items()
    }
