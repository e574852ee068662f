"""The report of `quada layers` (finding 2): ASR per layer condition, tau and the proxy, from ``layers.json``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from quada.report.calibration import saved_asr_header
from quada.report.format import percent_interval
from quada.report.render import Section
from quada.report.saved import estimate_or_none, saved_config
from quada.stats.metrics import Estimate

RESULTS_FILE = "layers.json"
KINDS = ("single", "first", "last")
LABELS = {"single": "single layer l", "first": "first k layers", "last": "last k layers"}


@dataclass
class LayerPoint:
    """One layer condition: the approximation on a single layer (``kind`` "single", ``index`` = l),
    the first or the last k layers ("first"/"last", ``index`` = k), or none ("clean")."""

    kind: str
    index: int
    spec: str
    asr: Estimate | None  # None when only the proxy was measured
    perplexity: float
    refusal: float  # mean probability that the response opens with a refusal

    @property
    def score(self) -> float:
        """What ranks conditions: the ASR, or the proxy's compliance (1 - refusal) without it."""
        return self.asr.value if self.asr is not None else 1.0 - self.refusal


@dataclass
class LayersResult:
    config: Any  # the LayersConfig of the run, or the saved one read back (quada.report.saved.saved_config)
    spec: str
    num_layers: int
    clean: LayerPoint
    points: list[LayerPoint]  # single, then first, then last, each by increasing index
    tau: int
    spearman: float | None  # rank correlation of the proxy's compliance with the ASR; None if undefined
    report_md: Path
    report_html: Path


def _point_from_json(saved: dict) -> LayerPoint:
    return LayerPoint(saved["kind"], saved["index"], saved["spec"], estimate_or_none(saved["asr"]), saved["perplexity"],
                      saved["refusal"])


def result_from_json(saved: dict, run_dir: Path) -> LayersResult:
    """A :class:`LayersResult` read back from the ``layers.json`` of ``run_dir``."""
    return LayersResult(saved_config(saved, run_dir), saved["spec"], saved["num_layers"], _point_from_json(saved["clean"]),
                        [_point_from_json(p) for p in saved["points"]], saved["tau"], saved["spearman"],
                        run_dir / "report.md", run_dir / "report.html")


def layers_figure(result: LayersResult) -> Figure:
    """ASR % (solid, 95% band) or, without it, the proxy's compliance % against l or k, one line
    per kind; the proxy dashed; the share target dotted; tau a vertical line."""
    figure, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, kind in enumerate(KINDS):
        pts = [p for p in result.points if p.kind == kind]
        x = [p.index for p in pts]
        if pts[0].asr is not None:
            ax.plot(x, [100 * p.asr.value for p in pts], "o-", color=f"C{i}", label=f"ASR, {LABELS[kind]}")
            ax.fill_between(x, [100 * p.asr.low for p in pts], [100 * p.asr.high for p in pts], color=f"C{i}", alpha=0.12)
        ax.plot(x, [100 * (1 - p.refusal) for p in pts], "x--", color=f"C{i}", alpha=0.7,
                label=f"1 - refusal probability, {LABELS[kind]}")
    all_layers = [p for p in result.points if p.kind == "first"][-1]
    ax.axhline(100 * result.config.share * all_layers.score, color="gray", linestyle=":",
               label=f"{result.config.share:.0%} of the all-layer score")
    ax.axvline(result.tau, color="black", linewidth=1, label=f"tau = {result.tau}")
    ax.set_xlabel("layer l (single) or number of layers k (first / last)")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7, loc="best")
    figure.tight_layout()
    return figure


def layers_section(result: LayersResult, asr_header: str = "ASR % [95% CI]") -> Section:
    """The report section of a layer analysis: every condition's row, tau, the proxy's correlation and the figure."""
    bound = result.config.ppl_bound * result.clean.perplexity
    rows = [[LABELS.get(p.kind, p.kind), str(p.index), p.spec, percent_interval(p.asr), f"{100 * p.refusal:.1f}",
             f"{p.perplexity:.2f}", "yes" if p.perplexity <= bound else "no"] for p in [result.clean, *result.points]]
    rho = "undefined (a constant series)" if result.spearman is None else f"{result.spearman:.3f}"
    correlation = "" if result.config.proxy_only else (
        f" Spearman rank correlation of the proxy (1 - refusal probability) with the ASR over these conditions: {rho}.")
    return Section(
        f"Finding 2: which layers carry safety ({result.spec})",
        text=f"tau = {result.tau}: the smallest k whose first-k perturbation reaches {result.config.share:.0%} of the "
        f"all-layer {'ASR' if not result.config.proxy_only else 'proxy compliance'} with perplexity within "
        f"{result.config.ppl_bound:g} x clean ({bound:.2f}), or the documented fallback (see select_tau)."
        + correlation + " Refusal probability: chance that the response opens with a refusal, from forward passes only.",
        columns=["condition", "l or k", "spec", asr_header, "refusal prob. %", "PPL", "within bound"],
        rows=rows,
        figures={"layers": layers_figure(result)},
    )


def report_sections(saved: dict, run_dir: Path) -> list[Section]:
    """The report section of a layer analysis, rebuilt from its ``layers.json``."""
    return [layers_section(result_from_json(saved, run_dir), saved_asr_header(saved))]
