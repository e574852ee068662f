"""``quada approx``: list the approximations and profile the error a real one introduces.

It lives outside the :mod:`quada.approx` package, whose import loads torch and the registry, so that
``quada --help`` stays fast; the commands import the package when they run.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from quada.cli_options import print_table
from quada.devices import DEVICE_HELP, DTYPE_HELP, check_dtype, resolve_device
from quada.errors import QuadaError

app = typer.Typer(help="Activation approximations: list them, profile their error against the paper's noise model.", no_args_is_help=True)
console = Console(markup=False)  # prints user text (paths, specs, model names): brackets stay literal


@app.command("list")
def list_command() -> None:
    """Every technique and paper preset, with a one-line description."""
    from quada.approx import list_specs

    print_table(console, "Activation approximations (compose with '+', options as name:key=value,...)",
                ["spec", "description"], [list(row) for row in list_specs()])


@app.command("profile")
def profile_command(
    model: str = typer.Option(..., "--model", "-m", help="Built-in name, model folder, .gguf file or hub id."),
    spec: str = typer.Option(..., "--spec", "-s", help="Approximation spec, e.g. 'bolt' or 'teal:sparsity=0.5'."),
    prompts: Path | None = typer.Option(None, "--prompts", "-p", help="Prompt file (text, CSV or JSONL); default: bundled benign prompts."),
    layers: str | None = typer.Option(None, "--layers", help="Decoder layers, e.g. '0:4', '-4:' or '[0,2]'; default: all."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N prompts."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
) -> None:
    """Measure the local error per layer and site, and the equivalent paper-style noise spec."""
    from quada.approx import parse_spec
    from quada.approx.profile import profile
    from quada.models import load

    parsed = parse_spec(spec)  # fail on a bad spec before loading a model
    target = resolve_device(device)
    check_dtype(dtype)
    if limit is not None and limit < 1:
        raise QuadaError(f"--limit must be a positive whole number, got {limit}")
    texts = None
    if prompts is not None:
        from quada.data import load_benchmark

        texts = [p.text for p in load_benchmark(prompts)]
    if limit is not None:
        from quada.approx.activation_stats import CALIBRATION_PROMPTS

        texts = list(texts or CALIBRATION_PROMPTS)[:limit]
    lm, tokenizer = load(model, dtype=dtype, device=target)
    result = profile(lm, tokenizer, parsed, texts, layers=layers)
    print_table(console, f"Local error of {result.spec} on {model}",
                ["layer", "site", "mean", "std", "laplace b", "rel. error", "sparsity"], [
                    [str(row.layer), row.site, f"{row.mean:+.2e}", f"{row.std:.4f}", f"{row.laplace_scale:.4f}",
                     f"{row.relative_error:.2%}", f"{row.sparsity:.1%}"]
                    for row in result.rows
                ], justify="right")
    console.print("equivalent paper-style noise:", Text(result.equivalent_noise(), style="bold"), highlight=False)
