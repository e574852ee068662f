"""``quada pairs`` and ``quada align``: preference data and QuadA training with a before/after report."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from quada.cli_options import config_options, print_table
from quada.defaults import DEFAULT_MODEL
from quada.defense.options import AlignConfig
from quada.devices import DEVICE_HELP, DTYPE_HELP
from quada.errors import QuadaError
from quada.options import EXECUTOR_OPTIONS, check_given_limits

console = Console(markup=False)  # prints user text (paths, specs, model names): brackets stay literal

MODEL_HELP = "Built-in name (see `quada models`), model folder, .gguf file or hub id."


def _given(**options) -> dict:
    """The options given on the command line; one left out takes its default from the configuration
    of the chosen source (the defaults differ between sources)."""
    return {name: value for name, value in options.items() if value is not None}


def pairs_command(
    source: str = typer.Option("self", help="'self': pairs made offline by the model itself (clean refusals against answers under the perturbation); 'generic': offline, with no approximation anywhere (PyRIT's many-shot answers and an unaligned model's answers against clean or written refusals), standing in for PKU-SafeRLHF; 'restore': on the generic source's prompts, the clean model's response chosen over its response under the perturbation (in the spirit of Q-resafe, arXiv 2506.20251); 'pku': PKU-SafeRLHF, the paper's data (--file, else the hub)."),
    out: Path = typer.Option(Path("runs") / "pairs", "--out", "-o", help="Folder for pairs.jsonl, split.json and the held-out prompt files (and, for 'self' and 'generic', the generation store)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=f"'self', 'generic', 'restore': the model that answers. {MODEL_HELP}"),
    perturbation: str = typer.Option("noise:site=up,dist=gaussian,std=0.075", help="'self', 'restore': the approximation (the MVA, e.g. from `quada sweep`) under which the model's answers are collected (on every layer)."),
    harmful: str = typer.Option("advbench", help="'self', 'generic', 'restore': harmful prompts (benchmark name or prompt file); --heldout of them are kept for evaluation."),
    benign: str | None = typer.Option(None, help="'self', 'generic', 'restore': benign prompts (default: quada-benign for 'self', the 256 of benign-suite for 'generic' and 'restore'); --benign-heldout of them are kept for evaluation."),
    heldout: int = typer.Option(104, help="Harmful prompts held out for evaluation (never trained on)."),
    benign_heldout: int = typer.Option(32, help="Benign prompts held out for the over-refusal evaluation."),
    limit: int | None = typer.Option(None, help="Use at most this many harmful training prompts (a seeded subset), for 'generic' and 'restore' also at most this many many-shot examples; for 'pku', at most this many pairs."),
    benign_limit: int | None = typer.Option(None, help="'self', 'generic', 'restore': use at most this many benign training prompts."),
    attempts: int = typer.Option(3, help="'self', 'restore': noise draws per refused prompt until the perturbed model complies."),
    compliant_pairs: bool = typer.Option(True, help="'self': also pair prompts the clean model already answers with a written refusal as chosen."),
    benign_rejected: str = typer.Option("refusal", help="'self': rejected answer for benign prompts: 'refusal' (a written refusal) or 'approx' (the answer under --heavy)."),
    heavy: str = typer.Option("noise:site=up,dist=gaussian,std=0.5", help="'self' with --benign-rejected approx: the heavy approximation."),
    rejected_model: str | None = typer.Option(None, help=f"'generic': the unaligned model whose answers are rejected where the clean model refuses (default: the built-in smollm2-135m-instruct). {MODEL_HELP}"),
    many_shot: bool = typer.Option(True, help="'generic': also pair PyRIT's 400 many-shot examples (HarmBench behaviours answered by an unaligned model); 'restore': also use their questions as harmful prompts."),
    prompt_format: str = typer.Option("paper", help="'self', 'generic', 'restore': prompt format of the generations ('paper' or 'plain'); use the one you evaluate with."),
    max_new_tokens: int = typer.Option(128, help="'self', 'generic', 'restore': most tokens per response."),
    seed: int = typer.Option(0, help="Seed of the split, the subsets and the noise."),
    file: Path | None = typer.Option(None, "--file", help="'pku': a local PKU-SafeRLHF copy (.json, .jsonl or .parquet with prompt, response_0, response_1, safer_response_id)."),
    device: str = typer.Option("auto", help=f"'self', 'generic', 'restore': {DEVICE_HELP}"),
    dtype: str = typer.Option("auto", help=f"'self', 'generic', 'restore': {DTYPE_HELP}"),
) -> None:
    """Make preference pairs for `quada align`, with a stored train/held-out split of the prompts.

    Generations are stored as they come: an interrupted run continues where it stopped. Responses go to files only.
    """
    from quada.defense.pairs import (
        GenericPairsConfig,
        RestorePairsConfig,
        SelfPairsConfig,
        generic_pairs,
        pku_pairs,
        restore_pairs,
        self_pairs,
    )
    from quada.defense.quada import DEFAULT_MAX_LENGTH

    shared = dict(model=model, harmful=harmful, heldout=heldout, benign_heldout=benign_heldout, limit=limit,
                  benign_limit=benign_limit, prompt_format=prompt_format, max_new_tokens=max_new_tokens, seed=seed,
                  out_dir=out, device=device, dtype=dtype, **_given(benign=benign))
    if source == "self":
        result = self_pairs(SelfPairsConfig(
            **shared, perturbation=perturbation, attempts=attempts, compliant_pairs=compliant_pairs,
            benign_rejected=benign_rejected, heavy=heavy,
        ))
    elif source == "generic":
        result = generic_pairs(GenericPairsConfig(**shared, **_given(rejected_model=rejected_model), many_shot=many_shot))
    elif source == "restore":
        result = restore_pairs(RestorePairsConfig(**shared, perturbation=perturbation, attempts=attempts, many_shot=many_shot))
    elif source == "pku":
        if limit is not None and limit < 1:
            raise QuadaError(f"--limit must be at least 1, got {limit}")
        result = pku_pairs(file, out, limit, seed)
    else:
        raise QuadaError(f"unknown --source {source!r}; choose 'self', 'generic', 'restore' or 'pku'")
    print_table(console, f"quada pairs ({source})", ["kind", "pairs"], [[kind, str(n)] for kind, n in result.counts.items()])
    if result.lengths is not None:
        console.print(result.lengths.summary(DEFAULT_MAX_LENGTH))
    console.print(f"pairs: {result.pairs_file}; held-out prompts: {out / 'heldout-harmful.jsonl'}, "
                  f"{out / 'heldout-benign.jsonl'} (split: {out / 'split.json'})")


@config_options(
    AlignConfig, "pairs", "model", "out_dir", "plain_dpo", "seed", "prompt_format", "skip_eval", "benchmark", "benign",
    "max_pairs", "pairs_seed",
    "approx", "limit", "benign_limit", "judges", "judge_model", "judge_prompt", "judge_answers", "max_new_tokens",
    "stop_on_refusal", "corpus",
    "ppl_window", "ppl_windows", "ppl_bound", "calibrate", "sweep", "sweep_spec", "sweep_parameter", "sweep_grid", "sweep_limit", "before_dir",
    "baseline", "device", "dtype", *EXECUTOR_OPTIONS, required=("pairs",),
)
def align_command(
    options: dict,
    perturbation: str = typer.Option("noise:site=up,dist=gaussian,std=0.075", help="The MVA injected into the policy while training (any spec of `quada approx list`, without layers=)."),
    tau: int = typer.Option(4, help="Perturb decoder layers 1..tau (choose with `quada layers`)."),
    perturb_layers: str = typer.Option("first-tau", help="'first-tau' (QuadA), 'all' (ablation: every layer) or 'none' (ablation: plain DPO)."),
    reference: str = typer.Option("clean", help="How the reference runs: 'clean' (the paper) or 'perturbed' (under the same perturbation and noise draw as the policy, computed every step; its rewards start at 0)."),
    preference_loss: str = typer.Option("dpo", help="'dpo' (the paper: DPO's loss on summed log-ratios) or 'ipo' (length-normalised: IPO's squared loss on per-token mean log-ratios, Azar et al. 2023 eq. 17, with --beta as IPO's tau)."),
    reg_lambda: float = typer.Option(0.1, help="Weight of the regularizer (mean pairwise cosine of harmful prompts' first-layer activations); 0 turns it off."),
    reg_pooling: str = typer.Option("last", help="Pooling of a prompt's first-layer activations: 'last' token or 'mean'."),
    use_lora: bool = typer.Option(True, help="Train a LoRA adapter (default; feasible on a CPU) or, with --no-use-lora, every weight (the paper)."),
    lora_r: int = typer.Option(16, help="LoRA rank."),
    lora_alpha: float = typer.Option(32.0, help="LoRA alpha."),
    learning_rate: float | None = typer.Option(None, help="Peak learning rate; default 5e-5 with LoRA, 1e-6 for full fine-tuning (the paper)."),
    beta: float = typer.Option(0.1, help="DPO beta (the paper: 0.1); IPO's tau with --preference-loss ipo."),
    num_train_epochs: float = typer.Option(2.0, help="Training epochs (the paper: 2)."),
    max_steps: int | None = typer.Option(None, help="Stop after this many optimizer steps (overrides --num-train-epochs)."),
    batch_size: int = typer.Option(4, help="Pairs per step (the regularizer needs two harmful prompts in a batch)."),
    grad_accum: int = typer.Option(1, help="Gradient accumulation steps."),
    max_length: int = typer.Option(512, help="Longest prompt+response in tokens (the paper: 512)."),
    save_steps: int = typer.Option(25, help="Save a checkpoint every N steps (the run resumes from the last one)."),
    log_steps: int = typer.Option(5, help="Log the loss terms every N steps (the report's training curve)."),
) -> None:
    """Align a model with QuadA (or plain DPO), save it with a model card, and report safety and utility before and after.

    Training shows progress and saves checkpoints; rerun the same command to resume. Then the original and the aligned model are vetted on the held-out prompts under the perturbation and the paper's presets, and swept over the noise; the report (report.md, report.html) goes to --out. Responses are never printed.
    """
    from quada.defense.align import align

    training = dict(
        perturbation=perturbation, tau=tau, perturb_layers=perturb_layers, reference=reference,
        preference_loss=preference_loss, reg_lambda=reg_lambda,
        reg_pooling=reg_pooling, use_lora=use_lora, lora_r=lora_r, lora_alpha=lora_alpha, learning_rate=learning_rate,
        beta=beta, num_train_epochs=num_train_epochs, max_steps=-1 if max_steps is None else max_steps,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum, max_length=max_length,
        save_steps=save_steps, logging_steps=log_steps,
    )
    for option, value in (("--batch-size", batch_size), ("--grad-accum", grad_accum), ("--save-steps", save_steps),
                          ("--log-steps", log_steps)):
        if value < 1:
            raise QuadaError(f"{option} must be at least 1, got {value}")
    if max_steps is not None and max_steps < 1:
        raise QuadaError(f"--max-steps must be at least 1, got {max_steps}")
    config = AlignConfig(**options, training=training)
    harmful, benign = config.eval_sets()
    check_given_limits(config, options, limit=harmful, benign_limit=benign, sweep_limit=harmful)
    result = align(config)
    console.print(f"model: {result.model_dir} (card: {result.model_dir / 'README.md'})"
                  + (f"; adapter: {result.adapter_dir}" if result.adapter_dir else ""))
    if result.report_html is not None:
        from quada.report.align import comparison_table

        columns, rows = comparison_table(result.results, config.judges)
        # The terminal gets the headline columns; the report has them all.
        shown = [i for i, c in enumerate(columns) if i == 0 or c.startswith((f"ASR {config.judges[0]} %", "over-refusal", "PPL "))]
        print_table(console, f"quada align: {config.model}, before and after", [columns[i] for i in shown],
                    [[row[i] for i in shown] for row in rows])
        console.print(f"report: {result.report_html} (and {result.report_md.name})")
