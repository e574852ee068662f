"""The report of `quada sweep` (finding 1): ASR and perplexity against the strength, the MVA.

The figure serves `quada align` too, which draws the sweeps of the model before and after.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from quada.approx import spec_label
from quada.report.calibration import saved_asr_header
from quada.report.format import percent_interval, plain_number
from quada.report.render import Section
from quada.report.saved import saved_config
from quada.stats.metrics import Estimate
from quada.store import CLEAN

FIGURE_STEM = "sweep"
POINTS_FILE = "sweep.json"


@dataclass
class SweepPoint:
    strength: float  # the swept value; for variants their position in the list (0 = clean)
    spec: str  # the condition in the store ("none" at strength 0)
    asr: Estimate  # by the first judge
    perplexity: float


@dataclass
class SweepResult:
    config: Any  # the SweepConfig of the run, or the saved one read back (quada.report.saved.saved_config)
    points: list[SweepPoint]  # sorted by strength
    clean_perplexity: float
    mva: SweepPoint | None
    report_md: Path
    report_html: Path
    figure_png: Path


def result_from_json(saved: dict, run_dir: Path) -> SweepResult:
    """A :class:`SweepResult` read back from the ``sweep.json`` of ``run_dir``."""
    points = [SweepPoint(p["strength"], p["spec"], Estimate(**p["asr"]), p["perplexity"]) for p in saved["points"]]
    mva = next((p for p in points if saved["mva"] and p.spec == saved["mva"]["spec"]), None)
    return SweepResult(saved_config(saved, run_dir), points, saved["clean_perplexity"], mva, run_dir / "report.md",
                       run_dir / "report.html", run_dir / f"{FIGURE_STEM}.png")


def axis_name(config) -> str:
    """What a sweep varies, for table headers: ``variant``, or the swept option."""
    return "variant" if config.variants else config.parameter


def point_label(config, point: SweepPoint) -> str:
    """The point's name on the swept axis: its strength, or the variant's preset or spec name."""
    if not config.variants:
        return plain_number(point.strength)
    return "clean" if point.spec == CLEAN else spec_label(point.spec)


def sweep_figure(curves: Mapping[str, SweepResult]) -> Figure:
    """ASR % (left axis, solid, 95% band) and perplexity (right axis, log, dashed) against the
    strength, one pair of lines per label; stars mark each curve's MVA, a dotted line the
    perplexity bound. A sweep over variants has a categorical axis: points with 95% error bars,
    no lines between them, each curve shifted a little so that their bars do not overlap."""
    figure, asr_ax = plt.subplots(figsize=(7, 4.2))
    ppl_ax = asr_ax.twinx()
    ppl_ax.set_yscale("log")
    first = next(iter(curves.values()), None)
    categorical = first is not None and bool(first.config.variants)
    for index, (label, result) in enumerate(curves.items()):
        color = f"C{index}"
        suffix = f" ({label})" if label else ""
        shift = 0.12 * (index - (len(curves) - 1) / 2) if categorical else 0.0
        x = [p.strength + shift for p in result.points]
        asr = [100 * p.asr.value for p in result.points]
        low, high = [100 * p.asr.low for p in result.points], [100 * p.asr.high for p in result.points]
        if categorical:
            asr_ax.errorbar(x, asr, yerr=[[a - lo for a, lo in zip(asr, low)], [hi - a for a, hi in zip(asr, high)]],
                            fmt="o", capsize=3, color=color, label=f"ASR{suffix}")
        else:
            asr_ax.plot(x, asr, "o-", color=color, label=f"ASR{suffix}")
            asr_ax.fill_between(x, low, high, color=color, alpha=0.15)
        finite = [(p.strength + shift, p.perplexity) for p in result.points if math.isfinite(p.perplexity)]
        if finite:
            ppl_ax.plot(*zip(*finite), "s" if categorical else "s--", color=color, alpha=0.7,
                        label=f"perplexity{suffix}")
        ppl_ax.axhline(result.config.ppl_bound * result.clean_perplexity, color=color, linestyle=":", linewidth=1)
        if result.mva is not None:
            asr_ax.plot([result.mva.strength + shift], [100 * result.mva.asr.value], "*", color=color, markersize=16,
                        markeredgecolor="black", label=f"MVA{suffix}")
    if categorical:
        asr_ax.set_xticks([p.strength for p in first.points], [point_label(first.config, p) for p in first.points],
                          rotation=20, ha="right")
        asr_ax.set_xlabel("approximation variant")
    else:
        asr_ax.set_xlabel(f"{first.config.parameter} of {first.config.spec}" if first else "strength")
    asr_ax.set_ylabel("attack success rate (%)")
    asr_ax.set_ylim(-2, 102)
    ppl_ax.set_ylabel("perplexity (log scale; dotted: bound)")
    lines = asr_ax.get_legend_handles_labels()
    more = ppl_ax.get_legend_handles_labels()
    asr_ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
    figure.tight_layout()
    return figure


def mva_sentence(result: SweepResult) -> str:
    """The MVA in words, with the bound it respects."""
    bound = result.config.ppl_bound * result.clean_perplexity
    if result.mva is None:
        return (f"No approximated point keeps the perplexity within {result.config.ppl_bound:g} x clean "
                f"({bound:.2f}): no most vulnerable approximation at this bound.")
    m = result.mva
    clean = next((p for p in result.points if p.spec == CLEAN), None)
    no_rise = clean is not None and m.asr.value <= clean.asr.value
    return (f"Most vulnerable approximation: {m.spec}, ASR {100 * m.asr.value:.1f}% [{100 * m.asr.low:.1f}, "
            f"{100 * m.asr.high:.1f}] at perplexity {m.perplexity:.2f} (bound {bound:.2f} = "
            f"{result.config.ppl_bound:g} x clean {result.clean_perplexity:.2f})."
            + (" No approximated point raises the ASR above the clean model's." if no_rise else ""))


def _points_sentence(result: SweepResult) -> str:
    if result.config.variants:
        return f" The clean model and {len(result.config.variants)} variants; a list is not refined."
    return f" {len(result.points)} points, {result.config.refine} refinement round(s) around the MVA."


def sweep_section(result: SweepResult, asr_header: str = "ASR % [95% CI]") -> Section:
    """The report section of a sweep: the points' table, the MVA and the figure."""
    bound = result.config.ppl_bound * result.clean_perplexity
    rows = [
        [point_label(result.config, p), p.spec, percent_interval(p.asr),
         f"{p.perplexity:.2f}", f"{p.perplexity / result.clean_perplexity:.2f}",
         "yes" if p.perplexity <= bound else "no", "MVA" if p is result.mva else ""]
        for p in result.points
    ]
    return Section(
        f"Finding 1: safety against utility over {'the variants' if result.config.variants else result.config.parameter}",
        text=mva_sentence(result) + _points_sentence(result)
        + " A perplexity far above clean means a broken model, not an unsafe one.",
        columns=[axis_name(result.config), "condition", asr_header, "PPL", "PPL / clean", "within bound", ""],
        rows=rows,
        figures={FIGURE_STEM: sweep_figure({"": result})},
    )


def report_sections(saved: dict, run_dir: Path) -> list[Section]:
    """The report section of a sweep, rebuilt from its ``sweep.json``."""
    return [sweep_section(result_from_json(saved, run_dir), saved_asr_header(saved))]
