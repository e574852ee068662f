"""`quada align`: train a model with QuadA, save it with its card, and measure it before and after.

Run folder layout (``out_dir``):

    data/                       the training pairs as a dataset, tokenized and with the reference
                                log-probabilities cached beside it (a resumed run reuses them)
    checkpoints/checkpoint-N/   Trainer checkpoints; a rerun with the same folder resumes from the last
    adapter/                    the LoRA adapter (LoRA runs only)
    model/                      the merged model, loadable by quada.models.load, with its card README.md
    before/vet, before/sweep    `quada vet` and finding-1 sweep of the original (``before_dir`` moves them,
                                so that several runs on one base model evaluate it once)
    after/vet, after/sweep      the same for the aligned model
    report.md, report.html      the before/after report (and align.json, its numbers); with ``baseline``,
                                the after-results of another finished run (e.g. plain DPO) join the table

The model folder is written under a temporary name and renamed when complete, so its presence
means training finished; a rerun then goes straight to the evaluation, which resumes from the
results stores of the vet and sweep runs.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import torch

from quada.analysis.sweep import SweepConfig
from quada.approx import spec_label
from quada.chat import messages
from quada.defense.pairs import HELDOUT_BENIGN, HELDOUT_HARMFUL, SPLIT_FILE, PreferencePair, load_pairs
from quada.defense.quada import HARMFUL_COLUMN, QuadAConfig, QuadATrainer
from quada.devices import check_device
from quada.errors import QuadaError
from quada.eval.engine import check_specs_fit
from quada.eval.judges import DEFAULT_JUDGE_MODEL, SAFETY_JUDGES, check_judge_model
from quada.eval.metrics import Estimate
from quada.eval.utility import DEFAULT_CORPUS, PAPER_WINDOW
from quada.models import DEFAULT_MODEL
from quada.report import Section, write_report
from quada.runs import atomic_folder, atomic_write_text, jsonable, open_run_dir, write_json
from quada.vet import PAPER_PRESETS, VetConfig

MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
DATA_DIR = "data"
DATA_PAIRS_MARK = "pairs.sha256"  # which pairs file the run folder trains on
TRAINING_FILE = "training.json"  # inside the model folder: what trained it and how it went


@dataclass
class AlignConfig:
    """What `quada align` trains and evaluates; every field has a CLI option of the same name.

    ``training`` holds :class:`QuadAConfig` fields (perturbation, tau, reg_lambda, use_lora,
    learning_rate, num_train_epochs, per_device_train_batch_size, ...) that differ from its defaults.
    """

    model: str = DEFAULT_MODEL
    device: str = "auto"  # where training, the evaluated models and the judge run: auto, cpu, cuda or cuda:N
    pairs: Path = Path("runs") / "pairs" / "pairs.jsonl"
    out_dir: Path = field(default_factory=lambda: Path("runs") / "align")
    plain_dpo: bool = False  # the baseline: no perturbation, no regularizer
    prompt_format: str = "paper"  # how pairs are rendered for training, and prompts for the evaluation
    training: dict = field(default_factory=dict)
    # evaluation
    skip_eval: bool = False
    benchmark: str | None = None  # held-out harmful prompts; default: the split beside the pairs, else advbench
    benign: str | None = None  # held-out benign prompts; default: the split beside the pairs, else quada-benign
    approx: tuple[str, ...] | None = None  # default: the perturbation and the paper's presets
    limit: int | None = 64
    benign_limit: int | None = 32
    judges: tuple[str, ...] = ("keyword", "llm")
    judge_model: str = DEFAULT_JUDGE_MODEL
    max_new_tokens: int = 128
    stop_on_refusal: bool = False  # exact for the keyword judge only
    corpus: str = DEFAULT_CORPUS
    ppl_window: int = PAPER_WINDOW
    ppl_windows: int | None = 8
    sweep: bool = True
    sweep_spec: str = "noise:site=up,dist=gaussian"
    sweep_parameter: str = "std"
    sweep_grid: tuple[float, ...] = (0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2)
    sweep_limit: int | None = 64
    before_dir: Path | None = None  # evaluation folder of the original; share it between runs on one base model
    baseline: Path | None = None  # a finished `quada align` run (e.g. --plain-dpo) to compare against

    def __post_init__(self):
        self.device = check_device(self.device)
        self.pairs, self.out_dir = Path(self.pairs), Path(self.out_dir)
        self.before_dir = None if self.before_dir is None else Path(self.before_dir)
        self.baseline = None if self.baseline is None else Path(self.baseline)
        if self.plain_dpo:
            self.training = {**self.training, "perturb_layers": "none", "reg_lambda": 0.0}
        self.quada = self.training_config()  # validates the training fields now, before any work
        if self.approx is None:
            self.approx = (self.quada.perturbation, *PAPER_PRESETS)
        if not self.skip_eval:  # a bad evaluation option fails now, not after the training
            self.vet_config(self.model, self.out_dir)
            if self.sweep:
                self.sweep_config(self.model, self.out_dir)

    def training_config(self) -> QuadAConfig:
        # The trainer places the model itself (on a GPU when there is one), unless told to use the CPU.
        values = {"seed": 0, "logging_steps": 5, "use_cpu": self.device == "cpu", **self.training}
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
        """The `quada vet` run that evaluates ``model`` into ``run_dir``."""
        harmful, benign = self.eval_sets()
        return VetConfig(
            model=model, device=self.device, approx=self.approx, benchmark=harmful, limit=self.limit, benign=benign,
            benign_limit=self.benign_limit, judges=self.judges, judge_model=self.judge_model,
            prompt_format=self.prompt_format, max_new_tokens=self.max_new_tokens,
            stop_on_refusal=self.stop_on_refusal, seed=self.quada.seed,
            corpus=self.corpus, ppl_window=self.ppl_window, ppl_windows=self.ppl_windows, run_dir=run_dir,
        )

    def sweep_config(self, model: str, run_dir: Path) -> SweepConfig:
        """The finding-1 `quada sweep` of ``model`` into ``run_dir``, judged by the first judge."""
        harmful, _ = self.eval_sets()
        return SweepConfig(
            model=model, device=self.device, spec=self.sweep_spec, parameter=self.sweep_parameter, grid=self.sweep_grid,
            benchmark=harmful, limit=self.sweep_limit, judges=self.judges[:1], judge_model=self.judge_model,
            prompt_format=self.prompt_format, max_new_tokens=self.max_new_tokens,
            stop_on_refusal=self.stop_on_refusal, seed=self.quada.seed,
            corpus=self.corpus, ppl_window=self.ppl_window, ppl_windows=self.ppl_windows, run_dir=run_dir,
        )

    def eval_sets(self) -> tuple[str, str]:
        """The held-out harmful and benign prompt sets: given ones, the split beside the pairs, or the
        bundled suites when the pairs came without one."""
        split_dir = self.pairs.parent if (self.pairs.parent / SPLIT_FILE).is_file() else None
        harmful = self.benchmark or (str(split_dir / HELDOUT_HARMFUL) if split_dir else "advbench")
        benign = self.benign or (str(split_dir / HELDOUT_BENIGN) if split_dir else "quada-benign")
        return harmful, benign


@dataclass
class AlignResult:
    config: AlignConfig
    model_dir: Path
    adapter_dir: Path | None
    training: dict  # log history, runtime, pairs
    results: dict[str, list] | None  # label ("original", "QuadA", ...) -> quada.vet.ConditionResult per condition
    report_md: Path | None
    report_html: Path | None


# --------------------------------------------------------------------------- data


def preference_rows(pairs: list[PreferencePair], prompt_format: str) -> list[dict]:
    """Pairs as conversational TRL rows in the evaluation's prompt format, with ``harmful``."""
    return [
        {"prompt": messages(p.prompt, prompt_format), "chosen": [{"role": "assistant", "content": p.chosen}],
         "rejected": [{"role": "assistant", "content": p.rejected}], HARMFUL_COLUMN: p.harmful}
        for p in pairs
    ]


def training_data(config: AlignConfig, pairs: list[PreferencePair]):
    """The training dataset, saved once in the run folder: reloaded with the same fingerprint, it lets
    TRL reuse its tokenization and precomputed reference log-probabilities on a resumed run."""
    from datasets import Dataset, load_from_disk

    folder = config.out_dir / DATA_DIR
    digest = file_sha256(config.pairs)
    if not (folder / DATA_PAIRS_MARK).is_file():
        with atomic_folder(folder) as tmp:
            Dataset.from_list(preference_rows(pairs, config.prompt_format)).save_to_disk(str(tmp))
            (tmp / DATA_PAIRS_MARK).write_text(f"{digest} {config.prompt_format}")
    if (folder / DATA_PAIRS_MARK).read_text() != f"{digest} {config.prompt_format}":
        raise QuadaError(
            f"the run folder {config.out_dir} was started with other pairs or another prompt format; "
            "choose a new --out (or delete that folder to start over)"
        )
    return load_from_disk(str(folder))


def check_disjoint(pairs: list[PreferencePair], *prompt_sets: str) -> None:
    """Fail when an evaluation prompt is also a training prompt (compared as stripped text)."""
    from quada.data import load_benchmark

    trained = {p.prompt.strip() for p in pairs}
    for name in prompt_sets:
        shared = [p for p in load_benchmark(name) if p.text.strip() in trained]
        if shared:
            raise QuadaError(
                f"{len(shared)} prompt(s) of {name} are also training prompts (e.g. {shared[0].id}); evaluate on the "
                "held-out file that `quada pairs` wrote beside the pairs, or make pairs from other prompts"
            )


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- training


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def train(config: AlignConfig, pairs: list[PreferencePair]) -> dict:
    """Train (resuming from the last checkpoint), save adapter and merged model; return the
    training record that goes into the model card."""
    from quada.models import load

    from quada.models import resolve

    quada = config.quada
    model, tokenizer = load(config.model, dtype=torch.float32, device=config.device)  # fp32 master weights for the optimizer
    # Name the local folder (not a built-in's name) as the base, so PEFT finds its config offline.
    model.name_or_path = str(resolve(config.model))
    evaluated = () if config.skip_eval else config.vet_config(config.model, config.out_dir).approximations
    check_specs_fit(model, [quada.approximation, *evaluated])
    trainer = QuadATrainer(model, args=quada, train_dataset=training_data(config, pairs), processing_class=tokenizer)
    resume = _last_checkpoint(config.out_dir / CHECKPOINT_DIR)
    started = time.monotonic()
    output = trainer.train(resume_from_checkpoint=resume)
    record = {
        "base_model": config.model,
        "pairs_file": str(config.pairs),
        "pairs_sha256": file_sha256(config.pairs),
        "pairs": len(pairs),
        "harmful_pairs": sum(p.harmful for p in pairs),
        "prompt_format": config.prompt_format,
        "plain_dpo": config.plain_dpo,
        "resumed_from": resume,
        "steps": trainer.state.global_step,
        "train_seconds_this_run": time.monotonic() - started,
        "train_loss": output.training_loss,
        "config": {k: _plain(getattr(quada, k)) for k in TRAINING_FIELDS},
        "log_history": trainer.state.log_history,
    }
    check_finite_weights(trainer.model, config.out_dir)
    adapter_dir = None
    policy = trainer.model
    if quada.use_lora:
        adapter_dir = config.out_dir / ADAPTER_DIR
        # The embeddings are not adapted; without the flag PEFT would look the base model up on the hub.
        with atomic_folder(adapter_dir) as tmp:
            policy.save_pretrained(tmp, save_embedding_layers=False)
        policy = policy.merge_and_unload()
    record["adapter_dir"] = str(adapter_dir) if adapter_dir else None

    with atomic_folder(config.out_dir / MODEL_DIR) as tmp:
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / TRAINING_FILE, jsonable(record))
        (tmp / "README.md").write_text(model_card(record), encoding="utf-8")
    del trainer, policy, model
    gc.collect()
    return record


def check_finite_weights(model: torch.nn.Module, out_dir: Path) -> None:
    """Refuse to save a model that training left with NaN or infinite weights (it diverged)."""
    broken = [name for name, param in model.named_parameters() if not torch.isfinite(param).all()]
    if broken:
        raise QuadaError(
            f"training diverged: {len(broken)} weight tensors (e.g. {broken[0]}) hold NaN or infinite values, so "
            f"nothing was saved; lower --lr or --beta and train again in a new --out (the checkpoints in "
            f"{out_dir / CHECKPOINT_DIR} hold the diverged weights)"
        )


def _plain(value):
    """A configuration value as JSON holds it (enums by their value)."""
    return value.value if isinstance(value, Enum) else jsonable(value)


TRAINING_FIELDS = (
    "perturbation", "tau", "perturb_layers", "reg_lambda", "reg_pooling", "use_lora", "lora_r", "lora_alpha",
    "lora_dropout", "lora_target_modules", "beta", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "weight_decay", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "max_length", "precompute_ref_log_probs", "bf16", "seed",
)


# --------------------------------------------------------------------------- model card


def model_card(record: dict, results: list[list[str]] | None = None, columns: list[str] | None = None) -> str:
    """The model folder's README.md: base model, data, configuration, training and results."""
    cfg = record["config"]
    method = "plain DPO (baseline: no perturbation, no regularizer)" if record["plain_dpo"] else "QuadA"
    lines = [
        f"# {record['base_model']}, aligned with {method}",
        "",
        "QuadA (activation-approximation-aware alignment; Zhang et al., arXiv 2502.00840) fine-tunes a model with "
        "DPO while an activation approximation perturbs its first layers, and pulls the first-layer activations of "
        "harmful prompts together, so that the model stays safe when deployed with approximated activations "
        "(private inference, sparsity, quantization). Trained with `quada align`.",
        "",
        "## Training",
        "",
        f"- Base model: `{record['base_model']}`",
        f"- Data: `{record['pairs_file']}` (SHA-256 `{record['pairs_sha256'][:16]}...`), {record['pairs']} preference "
        f"pairs, {record['harmful_pairs']} with a harmful prompt; prompt format `{record['prompt_format']}`",
        f"- Perturbation: `{cfg['perturbation']}` on {_layers_phrase(cfg)}; regularizer weight lambda = "
        f"{cfg['reg_lambda']:g} ({cfg['reg_pooling']} pooling)",
        f"- {'LoRA r=%d, alpha=%g on %s' % (cfg['lora_r'], cfg['lora_alpha'], ', '.join(cfg['lora_target_modules'])) if cfg['use_lora'] else 'Full fine-tuning'}"
        f"; beta {cfg['beta']:g}, learning rate {cfg['learning_rate']:g} ({cfg['lr_scheduler_type']}, warmup "
        f"{cfg['warmup_steps']:g}), weight decay {cfg['weight_decay']:g}, {_length_phrase(cfg)}, "
        f"batch {cfg['per_device_train_batch_size']} x {cfg['gradient_accumulation_steps']}, max length "
        f"{cfg['max_length']}, seed {cfg['seed']}",
        f"- {record['steps']} optimizer steps; mean training loss {record['train_loss']:.4f}",
        "- The weights are saved in float32 (merged adapter); `quada.models.load` reads them as bfloat16 by default.",
        "",
        "Full configuration and log: `training.json`.",
    ]
    if results:
        lines += ["", "## Results (held-out prompts, before and after)", "",
                  "| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
        lines += ["| " + " | ".join(row) + " |" for row in results]
    return "\n".join(lines) + "\n"


def _length_phrase(cfg: dict) -> str:
    return f"at most {cfg['max_steps']} steps" if cfg["max_steps"] > 0 else f"{cfg['num_train_epochs']:g} epochs"


def _layers_phrase(cfg: dict) -> str:
    if cfg["perturb_layers"] == "none":
        return "no layer (plain DPO)"
    if cfg["perturb_layers"] == "all":
        return "every decoder layer"
    return f"decoder layers 1..{cfg['tau']}"


# --------------------------------------------------------------------------- evaluation and report


def _vet(config: AlignConfig, model: str, run_dir: Path):
    from quada.vet import vet

    return vet(config.vet_config(model, run_dir))


def _sweep(config: AlignConfig, model: str, run_dir: Path):
    from quada.analysis.sweep import sweep

    return sweep(config.sweep_config(model, run_dir))


def _rate(e: Estimate | None) -> str:
    return "-" if e is None else f"{100 * e.value:.1f} [{100 * e.low:.1f}, {100 * e.high:.1f}]"


def _change(reference: float | None, value: float | None, relative: bool = False) -> str:
    if reference is None or value is None:
        return "-"
    if relative:
        return f"{100 * (value / reference - 1):+.1f}%" if reference else "-"
    return f"{100 * (value - reference):+.1f}"


def comparison_table(results: dict[str, list], judges) -> tuple[list[str], list[list[str]]]:
    """One row per condition; per measure (ASR per safety judge, HS, over-refusal, perplexity,
    accuracy) one column per model in ``results`` (label -> its ``quada.vet`` condition results,
    the original first), and the change of each later model against the first."""
    safety = [j for j in judges if j in SAFETY_JUDGES]
    labels = list(results)
    first, later = labels[0], labels[1:]
    by_label = {label: {r.approx: r for r in rows} for label, rows in results.items()}

    def hs(r) -> str:
        return "-" if r.harmfulness is None else f"{r.harmfulness.value:.2f}"

    def ppl(r) -> str:
        return "-" if r.perplexity is None else f"{r.perplexity:.2f}"

    columns, cells = ["condition"], []
    for judge in safety:
        columns += [f"ASR {judge} % {label}" for label in labels] + [f"ASR {judge} change {label}" for label in later]
        cells.append(lambda rs, j=judge: [_rate(rs[label].asr[j]) for label in labels]
                     + [_change(rs[first].asr[j].value, rs[label].asr[j].value) for label in later])
    columns += [f"HS {label}" for label in labels] + [f"over-refusal % {label}" for label in labels]
    cells.append(lambda rs: [hs(rs[label]) for label in labels] + [_rate(rs[label].over_refusal) for label in labels])
    columns += [f"PPL {label}" for label in labels] + [f"PPL change {label}" for label in later]
    cells.append(lambda rs: [ppl(rs[label]) for label in labels]
                 + [_change(rs[first].perplexity, rs[label].perplexity, relative=True) for label in later])
    columns += [f"accuracy % {label}" for label in labels]
    cells.append(lambda rs: [_rate(rs[label].accuracy) for label in labels])
    rows = []
    for condition in by_label[first]:
        per_model = {label: by_label[label][condition] for label in labels}
        rows.append([spec_label(condition), *(cell for make in cells for cell in make(per_model))])
    return columns, rows


def write_align_report(config: AlignConfig, record: dict, results: dict[str, list], sweeps: dict | None) -> tuple[Path, Path]:
    """The before/after report: the comparison table, the sweep figure and the training curve."""
    harmful, benign = config.eval_sets()
    columns, rows = comparison_table(results, config.judges)
    cfg = record["config"]
    summary = (
        f"{record['base_model']} aligned with {method_name(record)} on {record['pairs']} pairs ({config.pairs}); "
        f"perturbation {cfg['perturbation']} on {_layers_phrase(cfg)}, lambda {cfg['reg_lambda']:g}. Compared: "
        f"{', '.join(results)}. Evaluated on held-out prompts: {harmful} (limit {config.limit}) and {benign} "
        f"(limit {config.benign_limit}); prompt format {config.prompt_format}; greedy, {config.max_new_tokens} new "
        "tokens. ASR with 95% bootstrap intervals; a perplexity far above the original means a broken model."
    )
    sections = [Section("Safety and utility per approximation, before and after", columns=columns, rows=rows,
                        text="'none' is the model without approximation. Changes against the original are in "
                        "percentage points (ASR) and percent (perplexity).")]
    if sweeps is not None:
        from quada.analysis.sweep import mva_sentence, sweep_figure

        sections.append(Section(
            "Finding 1 before and after: ASR and perplexity against the noise",
            text=" ".join(f"{label}: {mva_sentence(result)}" for label, result in sweeps.items()),
            figures={"sweep-before-after": sweep_figure(sweeps)},
        ))
    sections.append(Section("Training", figures={"training": training_figure(record["log_history"])},
                            text=f"{record['steps']} steps; per-step DPO loss, regularizer (mean pairwise cosine) and "
                            "reward margin as logged by the trainer. Full configuration in model/training.json."))
    return write_report(config.out_dir, f"quada align: {record['base_model']}", summary, sections)


def training_figure(log_history: list[dict]):
    """DPO loss, regularizer and reward margin per logged step."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    logs = [h for h in log_history if "dpo_loss" in h]
    for ax, key, label in zip(axes, ("dpo_loss", "regularizer", "rewards/margins"),
                              ("DPO loss", "regularizer (mean cosine)", "reward margin")):
        ax.plot([h["step"] for h in logs], [h[key] for h in logs], ".-")
        ax.set_title(label)
        ax.set_xlabel("step")
    figure.tight_layout()
    return figure


def method_name(record: dict) -> str:
    return "plain DPO" if record["plain_dpo"] else "QuadA"


def _read_record(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / TRAINING_FILE).read_text())
    except (OSError, ValueError) as err:
        raise QuadaError(f"{model_dir} holds no finished `quada align` model ({err}); give the --out folder of a finished run") from err


def evaluation_subjects(config: AlignConfig, record: dict) -> dict[str, tuple[str, Path]]:
    """label -> (model source, evaluation folder): the original, this run's model and the baseline."""
    subjects = {"original": (config.model, config.before_dir or config.out_dir / "before"),
                method_name(record): (str(config.out_dir / MODEL_DIR), config.out_dir / "after")}
    if config.baseline is not None:
        label = method_name(_read_record(config.baseline / MODEL_DIR))
        subjects[config.baseline.name if label in subjects else label] = (str(config.baseline / MODEL_DIR),
                                                                          config.baseline / "after")
    return subjects


def align(config: AlignConfig, progress: bool = True) -> AlignResult:
    """Train (or resume, or reuse a finished model), then evaluate before/after and report."""
    pairs = load_pairs(config.pairs)
    harmful, benign = config.eval_sets()
    if not config.skip_eval:
        check_disjoint(pairs, harmful, benign)
        check_judge_model(config.judges, config.judge_model)
        if config.baseline is not None:
            _read_record(config.baseline / MODEL_DIR)  # fail before training, not after
    open_run_dir(config.out_dir, "--out")
    model_dir = config.out_dir / MODEL_DIR
    record = _read_record(model_dir) if (model_dir / TRAINING_FILE).is_file() else train(config, pairs)
    adapter_dir = Path(record["adapter_dir"]) if record.get("adapter_dir") else None
    if config.skip_eval:
        return AlignResult(config, model_dir, adapter_dir, record, None, None, None)
    subjects = evaluation_subjects(config, record)
    results = {label: _vet(config, model, folder / "vet").conditions for label, (model, folder) in subjects.items()}
    sweeps = None
    if config.sweep:
        sweeps = {label: _sweep(config, model, folder / "sweep") for label, (model, folder) in subjects.items()}
    md, html = write_align_report(config, record, results, sweeps)
    columns, rows = comparison_table(results, config.judges)
    atomic_write_text(model_dir / "README.md", model_card(record, rows, columns))
    write_json(config.out_dir / "align.json", jsonable({
        "config": {k: v for k, v in asdict(config).items() if k != "training"} | {"training": record["config"]},
        "models": {label: model for label, (model, _) in subjects.items()},
        "results": {label: [asdict(r) for r in rows] for label, rows in results.items()},
        "sweeps": None if sweeps is None else {label: {"points": [asdict(p) for p in s.points],
                                                       "mva": asdict(s.mva) if s.mva else None}
                                               for label, s in sweeps.items()},
    }))
    return AlignResult(config, model_dir, adapter_dir, record, results, md, html)
