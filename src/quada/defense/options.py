"""The options of `quada align`: :class:`AlignConfig`, the shared evaluation options
(:class:`quada.options.EvalOptions`) plus the training run and its before/after evaluation.

Like :mod:`quada.options`, this module does not import torch or TRL: the command line builds its
options from these fields, and the training options are checked by ``QuadAConfig`` when a
configuration is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from quada.analysis.options import SweepConfig
from quada.devices import DEVICE_HELP, DTYPE_HELP
from quada.errors import QuadaError, check_seed
from quada.options import EvalOptions, VetConfig, check_counts, redefault

if TYPE_CHECKING:
    from quada.defense.quada import QuadAConfig

CHECKPOINT_DIR = "checkpoints"  # inside the run folder: the Trainer's checkpoints


@dataclass
class AlignConfig(EvalOptions):
    """What `quada align` trains and evaluates; every field but ``training`` is a command-line
    option of the same name.

    ``training`` holds :class:`QuadAConfig` fields (perturbation, tau, reg_lambda, use_lora,
    learning_rate, num_train_epochs, per_device_train_batch_size, ...) that differ from its defaults.
    """

    device: str = redefault(EvalOptions, "device", help=f"{DEVICE_HELP} Training, evaluation and the judge model.")
    dtype: str = redefault(EvalOptions, "dtype", help=f"{DTYPE_HELP} For the evaluations and the judge model; training "
                           "keeps float32 master weights.")
    pairs: Path = field(default=Path("runs") / "pairs" / "pairs.jsonl", metadata={
        "help": "Pairs file from `quada pairs` (JSONL with prompt, chosen, rejected, harmful). Its split.json, if "
        "beside it, names the held-out evaluation prompts.",
        "aliases": ("-p",),
    })
    max_pairs: int | None = field(default=None, metadata={
        "help": "Train on a seeded subset of this many pairs, each kind of pair (its source) keeping its share of the "
        "file; default: every pair.",
    })
    pairs_seed: int = field(default=0, metadata={
        "help": "Seed of the --max-pairs subset, apart from --seed, so that training seeds can vary on one subset.",
    })
    out_dir: Path = field(default_factory=lambda: Path("runs") / "align", metadata={
        "help": "Run folder: checkpoints, adapter, model (with its card), evaluations and report. Rerun with the same "
        "folder to resume.",
        "aliases": ("--out", "-o"),
    })
    plain_dpo: bool = field(default=False, metadata={
        "help": "The baseline: plain DPO on the same pairs (no perturbation, no regularizer).",
    })
    prompt_format: str = redefault(EvalOptions, "prompt_format", help="Prompt format for training and evaluation: 'paper' or 'plain'.")
    seed: int = redefault(EvalOptions, "seed", help="Seed of training (data order, noise, adapter init) and of the evaluation.")
    training: dict = field(default_factory=dict, metadata={"help": "QuadAConfig fields that differ from its defaults."})
    skip_eval: bool = field(default=False, metadata={"help": "Only train and save the model."})
    benchmark: str | None = redefault(EvalOptions, "benchmark", None, help=(
        "Held-out harmful prompts; default: heldout-harmful.jsonl beside the pairs, else advbench."
    ))
    benign: str | None = field(default=None, metadata={
        "help": "Held-out benign prompts; default: heldout-benign.jsonl beside the pairs, else quada-benign.",
    })
    approx: tuple[str, ...] | None = field(default=None, metadata={
        "help": "Approximation to evaluate before and after (repeat); default: the perturbation and the paper's presets.",
        "aliases": ("-a",),
        "repeat": True,
    })
    limit: int | None = redefault(EvalOptions, "limit", 64, help="Harmful prompts per evaluation (a seeded subset of the held-out ones).")
    benign_limit: int | None = field(default=32, metadata={"help": "Benign prompts per evaluation."})
    sweep: bool = field(default=True, metadata={
        "help": "Also run the finding-1 noise sweep before and after (the report's figure).",
    })
    sweep_spec: str = field(default=SweepConfig.spec, metadata={"help": "Base spec of the sweep."})
    sweep_parameter: str = field(default=SweepConfig.parameter, metadata={"help": "Option of --sweep-spec that is swept."})
    sweep_grid: tuple[float, ...] = field(default=SweepConfig.grid, metadata={"help": "Strengths of the sweep, comma-separated."})
    sweep_limit: int | None = field(default=SweepConfig.limit, metadata={"help": "Harmful prompts per sweep point."})
    before_dir: Path | None = field(default=None, metadata={
        "help": "Evaluation folder of the original model (default OUT/before); give several runs on one base model the "
        "same folder to evaluate it once.",
    })
    baseline: Path | None = field(default=None, metadata={
        "help": "The --out folder of a finished run to compare against (e.g. --plain-dpo on the same pairs); its "
        "results join the report.",
    })

    def __post_init__(self):
        super().__post_init__()
        self.pairs, self.out_dir = Path(self.pairs), Path(self.out_dir)
        self.before_dir = None if self.before_dir is None else Path(self.before_dir)
        self.baseline = None if self.baseline is None else Path(self.baseline)
        check_counts(self, "benign_limit", "sweep_limit", "max_pairs")
        try:
            check_seed(self.pairs_seed)
        except QuadaError as err:
            raise QuadaError(f"--pairs-seed: {err}") from None
        if self.plain_dpo:
            self.training = {**self.training, "perturb_layers": "none", "reg_lambda": 0.0}
        self.quada = self.training_config()  # validates the training fields now, before any work
        if self.approx is None:
            from quada.approx import PAPER_PRESETS

            self.approx = (self.quada.perturbation, *PAPER_PRESETS)
        if not self.skip_eval:  # a bad evaluation option fails now, not after the training
            self.vet_config(self.model, self.out_dir)
            if self.sweep:
                self.sweep_config(self.model, self.out_dir)

    def training_config(self) -> QuadAConfig:
        from quada.defense.quada import QuadAConfig

        # The trainer places the model itself (on a GPU when there is one), unless told to use the CPU.
        values = {"seed": self.seed, "logging_steps": 5, "use_cpu": self.device == "cpu", **self.training}
        unknown = sorted(set(values) - set(QuadAConfig.__dataclass_fields__))
        if unknown:
            raise QuadaError(f"unknown training option(s) {', '.join(unknown)}; see the fields of QuadAConfig")
        try:
            return QuadAConfig(
                output_dir=str(self.out_dir / CHECKPOINT_DIR), report_to="none", dataloader_pin_memory=False,
                save_strategy="steps", save_total_limit=2, **values,
            )
        except ValueError as err:  # TrainingArguments' own checks
            raise QuadaError(f"bad training option: {err}") from err

    def vet_config(self, model: str, run_dir: Path) -> VetConfig:
        """The `quada vet` run that evaluates ``model`` into ``run_dir``: one look at every held-out
        prompt, so that the arms of `quada results arms` compare the same prompts."""
        harmful, benign = self.eval_sets()
        return VetConfig(
            **{**self.shared(), "model": model, "benchmark": harmful, "seed": self.quada.seed},
            approx=self.approx, benign=benign, benign_limit=self.benign_limit, run_dir=run_dir, first_look=None,
        )

    def sweep_config(self, model: str, run_dir: Path) -> SweepConfig:
        """The finding-1 `quada sweep` of ``model`` into ``run_dir``, judged by the first judge."""
        harmful, _ = self.eval_sets()
        return SweepConfig(
            **{**self.shared(), "model": model, "benchmark": harmful, "limit": self.sweep_limit,
               "judges": self.judges[:1], "seed": self.quada.seed},
            spec=self.sweep_spec, parameter=self.sweep_parameter, grid=self.sweep_grid, run_dir=run_dir,
        )

    def eval_sets(self) -> tuple[str, str]:
        """The held-out harmful and benign prompt sets: given ones, the split beside the pairs, or the
        bundled suites when the pairs came without one."""
        from quada.defense.pairs import HELDOUT_BENIGN, HELDOUT_HARMFUL, SPLIT_FILE

        split_dir = self.pairs.parent if (self.pairs.parent / SPLIT_FILE).is_file() else None
        harmful = self.benchmark or (str(split_dir / HELDOUT_HARMFUL) if split_dir else "advbench")
        benign = self.benign or (str(split_dir / HELDOUT_BENIGN) if split_dir else "quada-benign")
        return harmful, benign
