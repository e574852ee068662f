"""``quada attack``: jailbreak attacks against a model served under activation approximations."""

from __future__ import annotations

from rich.console import Console

from quada.attack.options import AttackConfig
from quada.cli_options import AllPrompts, config_options, print_table, without_limit
from quada.options import EXECUTOR_OPTIONS

console = Console(markup=False)  # prints user text (paths, specs, model names): brackets stay literal


@config_options(
    AttackConfig, "model", "approx", "attack", "benchmark", "limit", "budget", "steps", "candidates", "topk",
    "suffix_tokens", "generations", "population", "elite", "mutator", "queries", "attempts", "rewriter", "shots",
    "target", "judges", "judge_model", "judge_prompt", "judge_answers", "prompt_format", "max_new_tokens",
    "stop_on_refusal", "seed", "calibrate", "run_dir", "device", "dtype", *EXECUTOR_OPTIONS, "yes",
)
def attack_command(options: dict, all_prompts: AllPrompts = False) -> None:
    """Attack a model as served: GCG, AutoDAN-HGA, DRA, past tense and template jailbreaks, clean and under each approximation; ASR with 95% CIs, each attack's cost per behaviour and paired comparisons.

    Examples: quada attack --attack direct,gcg-transfer,dra,past-tense --approx none --approx paper:bolt;
    quada attack --attack gcg,autodan --budget cpu --limit 8.

    Adversarial prompts (every GCG step), responses and verdicts are stored as they come: an interrupted run continues where it stopped when run again. The report goes to --run-dir; prompts and responses are never printed.
    """
    from quada.attack.report import summary_table
    from quada.attack.run import attack

    config = AttackConfig(**without_limit(AttackConfig, options, all_prompts))
    result = attack(config)
    columns, rows = summary_table(result.cells, result.judges)
    # The model is in the title: one column less, so the table fits a terminal.
    columns, rows = columns[1:], [row[1:] for row in rows]
    print_table(console, f"quada attack: {config.model}", columns, rows)
    console.print(f"report: {result.report_html} (and {result.report_md.name}); store: {config.run_dir / 'results.sqlite'}")
