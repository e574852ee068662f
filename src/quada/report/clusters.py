"""The report of `quada clusters` (finding 3): separability and drift, PCA and t-SNE, from ``clusters.json``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from quada.report.render import Section
from quada.report.saved import saved_config
from quada.store import CLEAN

RESULTS_FILE = "clusters.json"


@dataclass
class ClusterMetrics:
    """Separability and drift of one condition (the clean model or the approximation)."""

    condition: str
    silhouette: float
    probe_accuracy: float
    centroid_distance: float
    harmful_to_benign_cosine: float  # mean cosine of harmful points to this condition's benign centroid
    harmful_called_benign: float  # by the clean probe (out-of-fold for the clean condition)


@dataclass
class ClustersResult:
    config: Any  # the ClustersConfig of the run, or the saved one read back (quada.report.saved.saved_config)
    spec: str
    layer: int
    metrics: list[ClusterMetrics]  # clean, then the approximation
    pca: dict[str, list[list[float]]]  # "<class>|<condition>" -> 2-D points (PCA fitted on clean)
    tsne: dict[str, list[list[float]]]  # the same groups in one t-SNE embedding
    report_md: Path
    report_html: Path


def result_from_json(saved: dict, run_dir: Path) -> ClustersResult:
    """A :class:`ClustersResult` read back from the ``clusters.json`` of ``run_dir``."""
    return ClustersResult(saved_config(saved, run_dir), saved["spec"], saved["layer"],
                          [ClusterMetrics(**m) for m in saved["metrics"]], saved["pca"], saved["tsne"],
                          run_dir / "report.md", run_dir / "report.html")


def scatter_figure(groups: dict[str, list[list[float]]], title: str) -> Figure:
    """Points coloured by class (harmful red, benign blue), marked by condition (clean: circles,
    approximated: crosses)."""
    figure, ax = plt.subplots(figsize=(6, 5))
    for name, coords in groups.items():
        kind, condition = name.split("|", 1)
        xy = np.asarray(coords)
        clean = condition == CLEAN
        ax.scatter(xy[:, 0], xy[:, 1], s=18, alpha=0.7, color="tab:red" if kind == "harmful" else "tab:blue",
                   marker="o" if clean else "x", label=f"{kind}, {'clean' if clean else 'approximated'}")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def clusters_section(result: ClustersResult) -> Section:
    """The report section of a cluster analysis: the metrics of both conditions and the two scatter plots."""
    clean, approx = result.metrics
    rows = [[m.condition, f"{m.silhouette:.3f}", f"{100 * m.probe_accuracy:.1f}", f"{m.centroid_distance:.3g}",
             f"{m.harmful_to_benign_cosine:.3f}", f"{100 * m.harmful_called_benign:.1f}"] for m in result.metrics]
    where = f"layer {result.layer}, {result.config.site}, {result.config.pooling} pooling"
    return Section(
        f"Finding 3: harmful and benign activations ({where})",
        text=f"Under {result.spec} the mean cosine of harmful points to the benign centroid goes from "
        f"{clean.harmful_to_benign_cosine:.3f} to {approx.harmful_to_benign_cosine:.3f}, and the probe trained on clean "
        f"activations calls {100 * approx.harmful_called_benign:.1f}% of harmful prompts benign (clean, out of fold: "
        f"{100 * clean.harmful_called_benign:.1f}%). Probe: standardised logistic regression, "
        f"{result.config.folds}-fold cross-validation. PCA axes are fitted on the clean activations.",
        columns=["condition", "silhouette", f"probe accuracy % ({result.config.folds}-fold)", "centroid distance",
                 "cos(harmful, benign centroid)", "harmful called benign by the clean probe %"],
        rows=rows,
        figures={"clusters_pca": scatter_figure(result.pca, f"PCA, {where}"),
                 "clusters_tsne": scatter_figure(result.tsne, f"t-SNE, {where}")},
    )


def report_sections(saved: dict, run_dir: Path) -> list[Section]:
    """The report section of a cluster analysis, rebuilt from its ``clusters.json``."""
    return [clusters_section(result_from_json(saved, run_dir))]
