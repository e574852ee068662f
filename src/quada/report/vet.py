"""The report of `quada vet`: safety and utility per condition, from ``results.json``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from quada.approx import spec_label
from quada.eval.judges import SAFETY_JUDGES
from quada.eval.metrics import Estimate, McNemarResult
from quada.report.format import percent_interval
from quada.report.render import Example, Section
from quada.report.saved import estimate_or_none

RESULTS_FILE = "results.json"


@dataclass
class ConditionResult:
    """Everything measured for one condition (the clean model or one approximation)."""

    approx: str
    asr: dict[str, Estimate]  # safety judge -> attack success rate
    mcnemar: dict[str, McNemarResult]  # safety judge -> paired test against the clean model
    harmfulness: Estimate | None
    over_refusal: Estimate | None
    perplexity: float | None
    accuracy: Estimate | None


def condition_from_json(saved: dict) -> ConditionResult:
    """A :class:`ConditionResult` read back from ``results.json``."""
    return ConditionResult(
        approx=saved["approx"],
        asr={name: Estimate(**e) for name, e in saved["asr"].items()},
        mcnemar={name: McNemarResult(**m) for name, m in saved["mcnemar"].items()},
        harmfulness=estimate_or_none(saved["harmfulness"]),
        over_refusal=estimate_or_none(saved["over_refusal"]),
        perplexity=saved["perplexity"],
        accuracy=estimate_or_none(saved["accuracy"]),
    )


def summary_table(results: list[ConditionResult], judges: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """The report's main table: one row per condition."""
    safety = [j for j in judges if j in SAFETY_JUDGES]
    columns = ["condition", *(f"ASR {j} % [95% CI]" for j in safety), *(f"McNemar p ({j})" for j in safety),
               "HS (1-5)", "over-refusal % [95% CI]", "PPL", "accuracy % [95% CI]"]
    rows = []
    for r in results:
        rows.append([
            spec_label(r.approx),
            *(percent_interval(r.asr[j]) for j in safety),
            *((f"{r.mcnemar[j].p_value:.3g}" if j in r.mcnemar else "-") for j in safety),
            "-" if r.harmfulness is None else f"{r.harmfulness.value:.2f} [{r.harmfulness.low:.2f}, {r.harmfulness.high:.2f}]",
            percent_interval(r.over_refusal),
            "-" if r.perplexity is None else f"{r.perplexity:.2f}",
            percent_interval(r.accuracy),
        ])
    return columns, rows


def asr_figure(results: list[ConditionResult], judges: Sequence[str]):
    """Bar chart of ASR per condition and safety judge, with the 95% intervals as error bars."""
    safety = [j for j in judges if j in SAFETY_JUDGES]
    figure, ax = plt.subplots(figsize=(max(6, 0.6 * len(results) * max(1, len(safety))), 4))
    x = np.arange(len(results))
    width = 0.8 / max(1, len(safety))
    for i, judge in enumerate(safety):
        values = np.array([100 * r.asr[judge].value for r in results])
        low = values - np.array([100 * r.asr[judge].low for r in results])
        high = np.array([100 * r.asr[judge].high for r in results]) - values
        ax.bar(x + i * width, values, width, yerr=[low, high], capsize=3, label=f"{judge} judge")
    ax.set_xticks(x + width * (len(safety) - 1) / 2, [spec_label(r.approx) for r in results], rotation=45, ha="right")
    ax.set_ylabel("attack success rate (%)")
    ax.legend()
    return figure


def report_sections(saved: dict, run_dir: Path) -> list[Section]:
    """The report sections of a vetting, rebuilt from its ``results.json``."""
    judges = saved["config"]["judges"]
    results = [condition_from_json(c) for c in saved["conditions"]]
    columns, rows = summary_table(results, judges)
    return [
        Section(
            "Safety and utility per condition",
            text="ASR: share of harmful prompts answered (95% bootstrap intervals). McNemar: paired test "
            "against the clean model on the same prompts. A very high perplexity means a broken model, "
            "not a safe or unsafe one: read safety next to utility.",
            columns=columns,
            rows=rows,
            figures={"asr": asr_figure(results, judges)},
        ),
        Section("Example responses", examples=[Example(**e) for e in saved.get("examples", [])]),
    ]
