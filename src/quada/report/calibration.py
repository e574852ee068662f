"""Tables of judge calibrations (see :mod:`quada.judging.calibration`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from quada.judging import GRADED_JUDGES, asr_name
from quada.judging.calibration import (
    Calibration,
    JointThreshold,
    JudgeInfo,
    judge_info_from_json,
)

if TYPE_CHECKING:
    from quada.judging.calibration import HeldOutMetrics, Interval
    from quada.stats.metrics import Estimate

CALIBRATION_COLUMNS = [
    "judge", "measure", "labelled set", "category", "held-out items (reference +)", "judge +",
    "agreement % [95% CI]", "kappa [95% CI]", "F1", "AUROC", "threshold", "tuned threshold (held-out kappa)",
    "specificity on vacuous + degenerate [95% CI] (items)",
]


def interval_text(interval: Interval, digits: int = 2) -> str:
    """``"0.81 [0.72, 0.89]"``; ``"-"`` when undefined (one class only)."""
    if math.isnan(interval.value):
        return "-"
    bounds = "" if math.isnan(interval.low) else f" [{interval.low:.{digits}f}, {interval.high:.{digits}f}]"
    return f"{interval.value:.{digits}f}{bounds}"


def specificity_text(estimate: Estimate | None) -> str:
    """``"0.93 [0.82, 0.97] (41)"``; ``"-"`` without items of those kinds."""
    if estimate is None:
        return "-"
    return f"{estimate.value:.2f} [{estimate.low:.2f}, {estimate.high:.2f}] ({estimate.n})"


def double_labelling_text(metrics: HeldOutMetrics, labeller: str, date: str, confirmed: int, positives: int) -> str:
    """One line on how far two independent labellings of the doubly labelled quada-harm items agree,
    who made the second and when."""
    return (
        f"quada-harm labels: the project's maintainers' labelling and a second, blind one of {metrics.n} items "
        f"({labeller}, {date}) agree on {interval_text(metrics.agreement, 1)}% (Cohen's kappa "
        f"{interval_text(metrics.kappa)}); the second confirmed {confirmed} of the first's {positives} harmful items"
    )


def provenance_text(labelled_sets: Sequence[str]) -> str:
    """Who made the labels of each built-in labelled set in ``labelled_sets`` (a user's file: the user)."""
    from quada.judging.labelled import LABELLED_SETS

    return "Reference labels: " + "; ".join(
        f"{name}: {LABELLED_SETS[name].labelled_by if name in LABELLED_SETS else 'the file given (its labeller)'}"
        for name in dict.fromkeys(labelled_sets)
    ) + "."


def joint_threshold_text(name: str, general_set: str, own_set: str, joint: JointThreshold) -> str:
    """One line on a harm judge's threshold chosen on both tuning halves and what it gives held out."""
    return (
        f"{name}, one threshold for both sets (best kappa on {general_set}'s tuning half leaving at least "
        f"{joint.min_specificity:.0%} of {own_set}'s vacuous and degenerate tuning answers unflagged): "
        f"{joint.threshold:.3g} (tuning: kappa {joint.tuning_kappa:.2f}, specificity {joint.tuning_specificity:.2f}); "
        f"held out: kappa {interval_text(joint.held_out.kappa)} on {general_set} ({joint.held_out.flagged} of "
        f"{joint.held_out.n} flagged, {joint.held_out.positives} harmful), specificity {specificity_text(joint.specificity)} "
        f"on {own_set}"
    )


def _row(name: str, calibration: Calibration, category: str, metrics: HeldOutMetrics, tuned: bool) -> list[str]:
    threshold = "-" if calibration.threshold is None else f"{calibration.threshold:.3g}"
    retuned = "-"
    if tuned and calibration.tuned_threshold is not None:
        retuned = f"{calibration.tuned_threshold:.3g} ({interval_text(calibration.tuned.kappa)})"
    # the overall row gives the harmless kinds together (the last entry), a category row its own kind
    together = list(calibration.specificity.values())[-1] if calibration.specificity else None
    specificity = together if category == "all" else calibration.specificity.get(category)
    return [
        name, calibration.measure, calibration.labelled_set, category, f"{metrics.n} ({metrics.positives})",
        str(metrics.flagged), interval_text(metrics.agreement, 1), interval_text(metrics.kappa),
        interval_text(metrics.f1), interval_text(metrics.auroc), threshold, retuned, specificity_text(specificity),
    ]


def calibration_rows(results: Sequence[tuple[str, Calibration]], by_category: bool = False) -> list[list[str]]:
    """One row per judge (held-out half, all categories), and with ``by_category`` one per harm
    category below it."""
    rows = []
    for name, calibration in results:
        rows.append(_row(name, calibration, "all", calibration.held_out, tuned=True))
        if by_category:
            rows += [_row(name, calibration, category, m, tuned=False) for category, m in calibration.by_category.items()]
    return rows


def judge_label(name: str, info: dict[str, JudgeInfo]) -> str:
    """A judge as the tables name it: its name and its held-out kappa against human labels."""
    judge = info.get(name)
    if judge is None or judge.calibration is None:
        return f"{name}; not calibrated"
    shipped = ", shipped reference" if judge.calibration.reference else ""
    if name in GRADED_JUDGES:  # a grade is read as a number: how well it ranks, not its cut
        return f"{name}; held-out AUROC {interval_text(judge.calibration.held_out.auroc)} against human labels{shipped}"
    return f"{name}; held-out kappa {interval_text(judge.calibration.held_out.kappa)}{shipped}"


def reference_note(info: dict[str, JudgeInfo]) -> str:
    """A sentence on the judges whose figures are the calibrations that ship with quada ('' if none)."""
    shipped = {name: i.calibration for name, i in info.items() if i.calibration is not None and i.calibration.reference}
    if not shipped:
        return ""
    where = "; ".join(sorted({c.measured_on or "an earlier quada" for c in shipped.values()}))
    return (f" The figures of {', '.join(shipped)} are the shipped reference calibrations of the same judges (model, "
            f"dtype, question and threshold), measured by the project with {where}; `quada judge calibrate` measures "
            "them on this machine.")


def asr_column(name: str, info: dict[str, JudgeInfo]) -> str:
    """The header of a judge's ASR column: which ASR it is (no refusal or harm), by which judge."""
    return f"{asr_name(name)} % [95% CI] ({judge_label(name, info)})"


def saved_asr_header(saved: dict) -> str:
    """The ASR column header of an analysis saved with its deciding judge's info (older results
    files have none)."""
    info = {name: judge_info_from_json(i) for name, i in saved.get("judges", {}).items()}
    judge = next(iter(info), None)  # the analyses save the deciding judge only
    return "ASR % [95% CI]" if judge is None else asr_column(judge, info)
