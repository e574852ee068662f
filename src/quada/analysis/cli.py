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
from rich.table import Table

from quada.devices import DEVICE_HELP
from quada.errors import QuadaError
from quada.report.format import percent_interval

console = Console(markup=False)  # prints user text (paths, specs, model names): brackets stay literal

Model = Annotated[str, typer.Option("--model", "-m", help="Model to analyse: built-in name (see `quada models`), model folder, .gguf file or hub id.")]
Benchmark = Annotated[str, typer.Option(help="Harmful prompts: a benchmark name or a prompt file.")]
AllPrompts = Annotated[bool, typer.Option("--all-prompts", help="Use every prompt, ignoring --limit.")]
Judges = Annotated[str, typer.Option(help="Comma-separated safety judges (keyword, llm); the first decides the ASR.")]
JudgeModel = Annotated[str, typer.Option(help="Model behind the llm judge.")]
PromptFormat = Annotated[str, typer.Option(help="'paper' (the source paper's system prompt and 'Instruction: ' prefix) or 'plain'.")]
MaxNewTokens = Annotated[int, typer.Option(help="Most tokens per response.")]
StopOnRefusal = Annotated[bool, typer.Option(help="End a response at its first refusal phrase: faster, exact for the keyword judge only.")]
Seed = Annotated[int, typer.Option(help="Seed of the prompt subsets, the approximation's noise and the bootstrap.")]
Corpus = Annotated[str, typer.Option(help="Perplexity corpus: pydoc-topics (offline), wikitext2 (hub) or a text file.")]
PplWindow = Annotated[int, typer.Option(help="Tokens per perplexity window.")]
PplWindows = Annotated[int | None, typer.Option(help="Number of perplexity windows.")]
PplBound = Annotated[float, typer.Option(help="Perplexity bound, as a multiple of the clean perplexity.")]
RunDir = Annotated[Path, typer.Option(help="Run folder: results store, report and the analyses' results; share it between `quada vet`, sweep, layers and clusters for one report on the whole story.")]
Device = Annotated[str, typer.Option(help=DEVICE_HELP)]
DerivedSpec = Annotated[str | None, typer.Option("--spec", "-s", help="Approximation spec; default: the most vulnerable approximation found by `quada sweep` in --run-dir.")]
DEFAULT_RUN_DIR = Path("runs") / "sweep"


def parse_numbers(text: str, option: str) -> tuple[float, ...]:
    """Comma-separated numbers; ``clean`` stands for 0 (the unapproximated model)."""
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.lower() == "clean":
            values.append(0.0)
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise QuadaError(f"{option}: {item!r} is not a number; write numbers separated by commas, e.g. 0,0.05,0.1") from None
    if not values:
        raise QuadaError(f"{option} is empty; write numbers separated by commas, e.g. 0,0.05,0.1")
    return tuple(values)


def parse_names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def sweep_command(
    model: Model = "qwen2.5-coder-0.5b-instruct",
    spec: Annotated[str, typer.Option("--spec", "-s", help="The approximation to sweep, without the swept option (see `quada approx list`); e.g. 'teal' with --parameter sparsity, 'noise:site=up,dist=gaussian,layers=0:4' with std.")] = "noise:site=up,dist=gaussian",
    parameter: Annotated[str, typer.Option("--parameter", "-p", help="The option of --spec whose value is swept: std, scale, threshold, sparsity, bits, ...")] = "std",
    grid: Annotated[str | None, typer.Option("--grid", "-g", help="Strengths to evaluate, comma-separated; 0 (or 'clean') is the clean model. [default: 0,0.025,0.05,0.075,0.1,0.15,0.2]", show_default=False)] = None,
    variant: Annotated[list[str] | None, typer.Option("--variant", "-V", help="Sweep a list of approximations instead of a strength (repeat; e.g. -V bolt -V bumblebee -V nexus -V puma -V iron): the clean model and each variant, no refinement.")] = None,
    ppl_bound: Annotated[float, typer.Option(help="The most vulnerable approximation (MVA) must keep perplexity at most this multiple of the clean perplexity.")] = 1.5,
    refine: Annotated[int, typer.Option(help="Bisection rounds around the current MVA after the grid (0 = grid only); each adds at most two points.")] = 2,
    benchmark: Benchmark = "advbench",
    limit: Annotated[int | None, typer.Option(help="Size of the seeded subset of harmful prompts.")] = 64,
    all_prompts: AllPrompts = False,
    judges: Judges = "keyword",
    judge_model: JudgeModel = "qwen2.5-coder-1.5b-instruct",
    prompt_format: PromptFormat = "paper",
    max_new_tokens: MaxNewTokens = 64,
    stop_on_refusal: StopOnRefusal = False,
    seed: Seed = 0,
    corpus: Corpus = "pydoc-topics",
    ppl_window: PplWindow = 1024,
    ppl_windows: PplWindows = 8,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    device: Device = "auto",
) -> None:
    """Finding 1: sweep an approximation's strength; ASR (with 95% CIs) and perplexity at each point, and the most vulnerable approximation.

    Examples: quada sweep --spec teal --parameter sparsity --grid 0,0.25,0.5,0.75,0.9;
    quada sweep -V bolt -V bumblebee -V nexus -V puma -V iron (the polynomial variants of private inference).

    Every point is stored as it comes: an interrupted sweep continues where it stopped when run again. The figure (sweep.png), the report (report.md, report.html) and the points (sweep.json) go to --run-dir; responses are never printed.
    """
    from quada.analysis.sweep import SweepConfig, sweep
    from quada.report.sweep import mva_sentence, point_label

    if variant and grid is not None:
        raise QuadaError("give either --grid (a strength sweep) or --variant (a list of approximations), not both")
    config = SweepConfig(
        model=model, spec=spec, parameter=parameter, variants=tuple(variant or ()),
        grid=parse_numbers(grid, "--grid") if grid is not None else SweepConfig.grid, ppl_bound=ppl_bound,
        refine=refine, benchmark=benchmark, limit=None if all_prompts else limit, judges=parse_names(judges),
        judge_model=judge_model, prompt_format=prompt_format, max_new_tokens=max_new_tokens,
        stop_on_refusal=stop_on_refusal, seed=seed, corpus=corpus, ppl_window=ppl_window, ppl_windows=ppl_windows,
        run_dir=run_dir,
        device=device,
    )
    result = sweep(config)
    _print_table(f"quada sweep: {model}", [config.axis, "ASR % [95% CI]", "perplexity", "x clean"], [
        [point_label(config, p), percent_interval(p.asr), f"{p.perplexity:.2f}", f"{p.perplexity / result.clean_perplexity:.2f}"]
        for p in result.points
    ])
    console.print(mva_sentence(result), highlight=False)
    console.print(f"report: {result.report_html} (figure {result.figure_png.name}); store: {run_dir / 'results.sqlite'}")


def layers_command(
    model: Model = "qwen2.5-coder-0.5b-instruct",
    spec: DerivedSpec = None,
    stride: Annotated[int, typer.Option(help="Measure every stride-th layer l and count k (the all-layer condition always): 4 on a 28-layer model measures 7 + 7 + 7 conditions.")] = 1,
    share: Annotated[float, typer.Option(help="tau is the smallest k whose first-k ASR reaches this share of the all-layer ASR.")] = 0.9,
    ppl_bound: PplBound = 1.5,
    proxy_only: Annotated[bool, typer.Option("--proxy-only", help="Cheap mode: rank layers by the refusal-probability proxy (forward passes only, no generation, no judge).")] = False,
    benchmark: Benchmark = "advbench",
    limit: Annotated[int | None, typer.Option(help="Size of the seeded subset of harmful prompts.")] = 32,
    all_prompts: AllPrompts = False,
    judges: Judges = "keyword",
    judge_model: JudgeModel = "qwen2.5-coder-1.5b-instruct",
    prompt_format: PromptFormat = "paper",
    max_new_tokens: MaxNewTokens = 64,
    stop_on_refusal: StopOnRefusal = False,
    seed: Seed = 0,
    corpus: Corpus = "pydoc-topics",
    ppl_window: PplWindow = 1024,
    ppl_windows: PplWindows = 8,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    device: Device = "auto",
) -> None:
    """Finding 2: ASR with the approximation on a single layer l, on the first k and on the last k layers; tau; the refusal-probability proxy.

    Example: quada sweep && quada layers --stride 2   (uses the sweep's most vulnerable approximation)

    Stored and resumable like `quada vet`; the figure (layers.png) and the report go to --run-dir.
    """
    from quada.analysis.layers import LayersConfig, layers
    from quada.report.layers import LABELS

    config = LayersConfig(
        model=model, spec=spec, stride=stride, share=share, ppl_bound=ppl_bound, proxy_only=proxy_only,
        benchmark=benchmark, limit=None if all_prompts else limit, judges=parse_names(judges), judge_model=judge_model,
        prompt_format=prompt_format, max_new_tokens=max_new_tokens, stop_on_refusal=stop_on_refusal, seed=seed,
        corpus=corpus, ppl_window=ppl_window, ppl_windows=ppl_windows, run_dir=run_dir,
        device=device,
    )
    result = layers(config)
    _print_table(f"quada layers: {result.spec} on {model}", ["condition", "l or k", "ASR % [95% CI]", "refusal prob. %", "perplexity"], [
        [LABELS.get(p.kind, p.kind), str(p.index), percent_interval(p.asr), f"{100 * p.refusal:.1f}", f"{p.perplexity:.2f}"]
        for p in [result.clean, *result.points]
    ])
    console.print(f"tau = {result.tau} (of {result.num_layers} layers)", highlight=False)
    if not proxy_only:
        rho = "undefined" if result.spearman is None else f"{result.spearman:.3f}"
        console.print(f"Spearman rank correlation of the proxy with the ASR: {rho}", highlight=False)
    console.print(f"report: {result.report_html}; store: {run_dir / 'results.sqlite'}")


def clusters_command(
    model: Model = "qwen2.5-coder-0.5b-instruct",
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
) -> None:
    """Finding 3: do harmful and benign activations separate, and does the approximation move harmful ones toward benign?

    Reports silhouette, cross-validated probe accuracy and centroid distance, clean and approximated, the drift of harmful points toward the benign centroid and the share a clean-trained probe now calls benign; PCA and t-SNE plots go into the report in --run-dir.
    """
    from quada.analysis.clusters import ClustersConfig, clusters

    config = ClustersConfig(
        model=model, spec=spec, layer=layer, site=site, pooling=pooling, harmful=harmful, benign=benign,
        limit=None if all_prompts else limit, prompt_format=prompt_format, folds=folds, seed=seed, run_dir=run_dir,
        device=device,
    )
    result = clusters(config)
    _print_table(f"quada clusters: layer {result.layer}, {site}, {pooling} pooling", [
        "condition", "silhouette", "probe accuracy %", "centroid distance", "cos(harmful, benign centroid)",
        "harmful called benign %"], [
        [m.condition, f"{m.silhouette:.3f}", f"{100 * m.probe_accuracy:.1f}", f"{m.centroid_distance:.3g}",
         f"{m.harmful_to_benign_cosine:.3f}", f"{100 * m.harmful_called_benign:.1f}"] for m in result.metrics
    ])
    console.print(f"report: {result.report_html}")
