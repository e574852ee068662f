"""``quada sweep``, ``quada layers``, ``quada clusters``: the analyses of the paper's three findings.

The three commands share one run folder by default (runs/sweep): `quada layers` and `quada
clusters` read the most vulnerable approximation found by `quada sweep` there, and every command
rewrites the folder's report with all the analyses it holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from quada.analysis.options import AnalysisOptions, LayersConfig, SweepConfig
from quada.cli_options import (
    AllPrompts,
    config_options,
    field_help,
    print_table,
    without_limit,
)
from quada.defaults import DEFAULT_MODEL
from quada.devices import DEVICE_HELP, DTYPE_HELP
from quada.errors import QuadaError
from quada.options import EXECUTOR_OPTIONS, EvalOptions, check_given_limits
from quada.report.format import percent_interval

console = Console(markup=False)  # prints user text (paths, specs, model names): brackets stay literal

# The options of `quada clusters`, whose configuration is not built from the shared options.
Model = Annotated[str, typer.Option("--model", "-m", help=field_help(EvalOptions, "model"))]
PromptFormat = Annotated[str, typer.Option(help=field_help(EvalOptions, "prompt_format"))]
Seed = Annotated[int, typer.Option(help=field_help(EvalOptions, "seed"))]
RunDir = Annotated[Path, typer.Option(help=field_help(AnalysisOptions, "run_dir"))]
Device = Annotated[str, typer.Option(help=DEVICE_HELP)]
Dtype = Annotated[str, typer.Option(help=DTYPE_HELP)]
DerivedSpec = Annotated[str | None, typer.Option("--spec", "-s", help=field_help(LayersConfig, "spec"))]
DEFAULT_RUN_DIR = Path("runs") / "sweep"
EVAL_OPTIONS = ("model", "benchmark", "limit", "judges", "judge_model", "judge_prompt", "judge_answers", "prompt_format", "max_new_tokens",
                "stop_on_refusal", "seed", "corpus", "ppl_window", "ppl_windows", "calibrate", *EXECUTOR_OPTIONS)


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    print_table(console, title, columns, rows, justify="right")


@config_options(SweepConfig, "spec", "parameter", "grid", "variants", "ppl_bound", "refine", *EVAL_OPTIONS, "run_dir", "device",
                "dtype")
def sweep_command(options: dict, all_prompts: AllPrompts = False) -> None:
    """Finding 1: sweep an approximation's strength; ASR (with 95% CIs) and perplexity at each point, and the most vulnerable approximation.

    Examples: quada sweep --spec teal --parameter sparsity --grid 0,0.25,0.5,0.75,0.9;
    quada sweep -V bolt -V bumblebee -V nexus -V puma -V iron (the polynomial variants of private inference).

    Every point is stored as it comes: an interrupted sweep continues where it stopped when run again. The figure (sweep.png), the report (report.md, report.html) and the points (sweep.json) go to --run-dir; responses are never printed.
    """
    from quada.analysis.sweep import sweep
    from quada.report.sweep import mva_sentence, point_label

    if options.get("variants") and "grid" in options:
        raise QuadaError("give either --grid (a strength sweep) or --variant (a list of approximations), not both")
    config = SweepConfig(**without_limit(SweepConfig, options, all_prompts))
    check_given_limits(config, options, limit=config.benchmark)
    result = sweep(config)
    _print_table(f"quada sweep: {config.model}", [config.axis, "ASR % [95% CI]", "perplexity", "x clean"], [
        [point_label(config, p), percent_interval(p.asr), f"{p.perplexity:.2f}", f"{p.perplexity / result.clean_perplexity:.2f}"]
        for p in result.points
    ])
    console.print(mva_sentence(result), highlight=False)
    console.print(f"report: {result.report_html} (figure {result.figure_png.name}); store: {config.run_dir / 'results.sqlite'}")


@config_options(LayersConfig, "spec", "stride", "share", "ppl_bound", "proxy_only", *EVAL_OPTIONS, "run_dir", "device",
                "dtype")
def layers_command(options: dict, all_prompts: AllPrompts = False) -> None:
    """Finding 2: ASR with the approximation on a single layer l, on the first k and on the last k layers; tau; the refusal-probability proxy.

    Example: quada sweep && quada layers --stride 2   (uses the sweep's most vulnerable approximation)

    Stored and resumable like `quada vet`; the figure (layers.png) and the report go to --run-dir.
    """
    from quada.analysis.layers import layers
    from quada.report.layers import LABELS

    config = LayersConfig(**without_limit(LayersConfig, options, all_prompts))
    check_given_limits(config, options, limit=config.benchmark)
    result = layers(config)
    _print_table(f"quada layers: {result.spec} on {config.model}", ["condition", "l or k", "ASR % [95% CI]", "refusal prob. %", "perplexity"], [
        [LABELS.get(p.kind, p.kind), str(p.index), percent_interval(p.asr), f"{100 * p.refusal:.1f}", f"{p.perplexity:.2f}"]
        for p in [result.clean, *result.points]
    ])
    console.print(f"tau = {result.tau} (of {result.num_layers} layers)", highlight=False)
    if not config.proxy_only:
        rho = "undefined" if result.spearman is None else f"{result.spearman:.3f}"
        console.print(f"Spearman rank correlation of the proxy with the ASR: {rho}", highlight=False)
    console.print(f"report: {result.report_html}; store: {config.run_dir / 'results.sqlite'}")


def clusters_command(
    context: typer.Context,
    model: Model = DEFAULT_MODEL,
    spec: DerivedSpec = None,
    layer: Annotated[int | None, typer.Option(help="Decoder layer whose activations are captured (0-based); default: the middle one.")] = None,
    site: Annotated[str, typer.Option(help="'residual' (the layer's output) or an approximation site: qkv, gate_up, o, down, act.")] = "residual",
    pooling: Annotated[str, typer.Option(help="'last' (the prompt's last token, where the answer starts) or 'mean' (over the prompt).")] = "last",
    harmful: Annotated[str, typer.Option(help="Harmful prompts: a benchmark name or a prompt file.")] = "advbench",
    benign: Annotated[str, typer.Option(help="Benign prompts: a benchmark name or a prompt file.")] = "quada-benign",
    limit: Annotated[int | None, typer.Option(help="Prompts per class (seeded subsets).")] = 64,
    all_prompts: AllPrompts = False,
    prompt_format: PromptFormat = "paper",
    folds: Annotated[int, typer.Option(help="Cross-validation folds of the linear probe.")] = 5,
    seed: Seed = 0,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Finding 3: do harmful and benign activations separate, and does the approximation move harmful ones toward benign?

    Reports silhouette, cross-validated probe accuracy and centroid distance, clean and approximated, the drift of harmful points toward the benign centroid and the share a clean-trained probe now calls benign; PCA and t-SNE plots go into the report in --run-dir.
    """
    from quada.analysis.clusters import ClustersConfig, clusters

    given = {"limit": limit} if context.get_parameter_source("limit").name != "DEFAULT" else {}
    config = ClustersConfig(
        model=model, spec=spec, layer=layer, site=site, pooling=pooling, harmful=harmful, benign=benign,
        limit=without_limit(ClustersConfig, given, all_prompts).get("limit", limit), prompt_format=prompt_format,
        folds=folds, seed=seed, run_dir=run_dir, device=device, dtype=dtype,
    )
    if given:
        check_given_limits(config, {"limit"}, limit=harmful)
        check_given_limits(config, {"limit"}, limit=benign)
    result = clusters(config)
    _print_table(f"quada clusters: layer {result.layer}, {site}, {pooling} pooling", [
        "condition", "silhouette", "probe accuracy %", "centroid distance", "cos(harmful, benign centroid)",
        "harmful called benign %"], [
        [m.condition, f"{m.silhouette:.3f}", f"{100 * m.probe_accuracy:.1f}", f"{m.centroid_distance:.3g}",
         f"{m.harmful_to_benign_cosine:.3f}", f"{100 * m.harmful_called_benign:.1f}"] for m in result.metrics
    ])
    console.print(f"report: {result.report_html}")
