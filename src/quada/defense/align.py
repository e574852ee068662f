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

import contextlib
import gc
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import torch

from quada.approx.sites import resolve_decoder
from quada.defense.options import CHECKPOINT_DIR, AlignConfig
from quada.defense.pairs import (
    PreferencePair,
    load_pairs,
    pair_ids_sha256,
    pair_lengths,
    preference_rows,
    stratified_pairs,
)
from quada.defense.quada import QuadATrainer, perturbed_layers
from quada.engine.plan import check_specs_fit
from quada.errors import QuadaError, warn
from quada.judging import check_judge_model
from quada.measures.generate import check_prompts_fit
from quada.report.align import (
    align_sections,
    comparison_table,
    layers_phrase,
    method_name,
    model_card,
)
from quada.report.render import write_report
from quada.runs import (
    atomic_folder,
    atomic_write_text,
    check_apart,
    jsonable,
    open_run_dir,
    write_json,
)

MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
DATA_DIR = "data"
DATA_PAIRS_MARK = "pairs.sha256"  # which pairs file (and --max-pairs subset) the run folder trains on
TRAINING_FILE = "training.json"  # inside the model folder: what trained it and how it went


@dataclass
class AlignResult:
    config: AlignConfig
    model_dir: Path
    adapter_dir: Path | None
    training: dict  # log history, runtime, pairs
    results: dict[str, list] | None  # label ("original", "QuadA", ...) -> quada.report.vet.ConditionResult per condition
    report_md: Path | None
    report_html: Path | None


# --------------------------------------------------------------------------- data


def training_data(config: AlignConfig, pairs: list[PreferencePair]):
    """The training dataset, saved once in the run folder: reloaded with the same fingerprint, it lets
    TRL reuse its tokenization and precomputed reference log-probabilities on a resumed run."""
    from datasets import Dataset, load_from_disk

    folder = config.out_dir / DATA_DIR
    mark = data_mark(config, pairs)
    if not (folder / DATA_PAIRS_MARK).is_file():
        with atomic_folder(folder) as tmp:
            Dataset.from_list(preference_rows(pairs, config.prompt_format)).save_to_disk(str(tmp))
            (tmp / DATA_PAIRS_MARK).write_text(mark)
    if (folder / DATA_PAIRS_MARK).read_text() != mark:
        raise QuadaError(
            f"the run folder {config.out_dir} was started with other pairs (another file or --max-pairs subset) or "
            "another prompt format; "
            "choose a new --out (or delete that folder to start over)"
        )
    return load_from_disk(str(folder))


def data_mark(config: AlignConfig, pairs: list[PreferencePair]) -> str:
    """What the training data was made from: the pairs file, the prompt format and, for a --max-pairs
    subset, the digest of its ids (a run folder without a subset keeps the mark it always had)."""
    mark = f"{file_sha256(config.pairs)} {config.prompt_format}"
    return mark if config.max_pairs is None else f"{mark} {pair_ids_sha256(pairs)}"


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


def check_pair_lengths(config: AlignConfig, pairs: list[PreferencePair], tokenizer) -> int:
    """How many of ``pairs`` training drops at ``--max-length`` (a pair whose prompt alone fills it,
    see :meth:`PairLengths.dropped`), said in a warning; a run left with no pair, or with no harmful
    pair where the regularizer needs them, is refused. Every message names the length that keeps them."""
    quada = config.quada
    if quada.max_length is None or quada.truncation_mode != "keep_start":  # keep_end drops nothing
        return 0
    lengths = pair_lengths(tokenizer, pairs, config.prompt_format)
    dropped = set(lengths.dropped(quada.max_length))
    kept = [pair for i, pair in enumerate(pairs) if i not in dropped]
    where = f"in the model's chat template ({config.prompt_format} prompt format)"
    if not kept:
        raise QuadaError(
            f"--max-length {quada.max_length} leaves no pair to train on: the prompt of each of the {len(pairs)} pairs "
            f"fills {quada.max_length} tokens or more {where}, so training would drop it; {lengths.advice()}"
        )
    if quada.reg_lambda > 0 and not any(pair.harmful for pair in kept):
        cause = (f"--max-length {quada.max_length} drops every harmful pair (its prompt fills it {where}); {lengths.advice()}"
                 if any(pair.harmful for pair in pairs) else f"{config.pairs} holds none")
        raise QuadaError(f"the regularizer (--reg-lambda {quada.reg_lambda:g}) compares harmful prompts, but no "
                         f"harmful pair is left to train on: {cause}; or set --reg-lambda 0")
    if dropped:
        harmful = sum(pairs[i].harmful for i in dropped)
        warn(f"--max-length {quada.max_length} drops {len(dropped)} of the {len(pairs)} pairs ({harmful} of them "
             f"harmful), whose prompt alone fills it {where}; {lengths.advice()}")
    return len(dropped)


def training_model(config: AlignConfig, pairs: list[PreferencePair]):
    """``(model, tokenizer, dropped)`` to train, in fp32 (master weights for the optimizer), once
    everything that training and the evaluation after it need of the model is checked: the pairs'
    lengths against --max-length (``dropped``: how many it drops), the perturbation and the
    evaluated approximations against its layers, tau, the evaluation's prompts against its context
    and its corpus against a perplexity window. So a bad option fails before the run folder is made,
    not after hours of training."""
    from quada.measures.utility import check_corpus, load_corpus
    from quada.models import load, resolve
    from quada.vet import prompt_sets

    quada = config.quada
    model, tokenizer = load(config.model, dtype=torch.float32, device=config.device)
    # Name the local folder (not a built-in's name) as the base, so PEFT finds its config offline.
    model.name_or_path = str(resolve(config.model))
    dropped = check_pair_lengths(config, pairs, tokenizer)
    perturbed_layers(quada.perturb_layers, quada.tau, len(resolve_decoder(model).layers))
    if config.skip_eval:
        check_specs_fit(model, [quada.approximation])
        return model, tokenizer, dropped
    evaluation = config.vet_config(config.model, config.out_dir)
    check_specs_fit(model, [quada.approximation, *evaluation.approximations])
    harmful, benign = prompt_sets(evaluation)
    check_prompts_fit(model, tokenizer, [*harmful, *benign], config.prompt_format, config.max_new_tokens)
    check_corpus(tokenizer, load_corpus(config.corpus), config.ppl_window)
    return model, tokenizer, dropped


def train(config: AlignConfig, pairs: list[PreferencePair], model, tokenizer, dropped: int = 0) -> dict:
    """Train ``model`` (from :func:`training_model`; resuming from the last checkpoint), save adapter
    and merged model; return the training record that goes into the model card (``dropped``: the
    pairs that --max-length leaves out)."""
    quada = config.quada
    trainer = QuadATrainer(model, args=quada, train_dataset=training_data(config, pairs), processing_class=tokenizer)
    resume = _last_checkpoint(config.out_dir / CHECKPOINT_DIR)
    started = time.monotonic()
    output = trainer.train(resume_from_checkpoint=resume)
    record = {
        "base_model": config.model,
        "pairs_file": str(config.pairs),
        "pairs_sha256": file_sha256(config.pairs),
        "pairs": len(pairs),
        "pairs_dropped_by_max_length": dropped,
        "max_pairs": config.max_pairs,
        "pairs_seed": config.pairs_seed,
        "pair_ids_sha256": pair_ids_sha256(pairs),
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
            f"nothing was saved; lower --learning-rate or --beta and train again in a new --out (the checkpoints in "
            f"{out_dir / CHECKPOINT_DIR} hold the diverged weights)"
        )


def _plain(value):
    """A configuration value as JSON holds it (enums by their value)."""
    return value.value if isinstance(value, Enum) else jsonable(value)


TRAINING_FIELDS = (
    "perturbation", "tau", "perturb_layers", "reference", "preference_loss", "reg_lambda", "reg_pooling", "use_lora", "lora_r", "lora_alpha",
    "lora_dropout", "lora_target_modules", "beta", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "weight_decay", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "max_length", "precompute_ref_log_probs", "bf16", "seed",
)


# --------------------------------------------------------------------------- evaluation and report


def evaluate(config: AlignConfig, subjects: dict[str, tuple[str, Path]], progress: bool) -> tuple[dict, dict | None]:
    """The `quada vet` (and with ``config.sweep`` the finding-1 `quada sweep`) of every subject
    (label -> (model source, evaluation folder)), all in the same plans on one executor: the
    conditions by label, and the sweeps by label (or ``None``)."""
    from quada.analysis.sweep import Sweeping
    from quada.engine.executors import make_executor
    from quada.engine.plan import run_jobs
    from quada.runs import progress_bar
    from quada.vet import Vetting

    with make_executor(config) as executor, progress_bar(progress) as bar, contextlib.ExitStack() as stack:
        vettings = {label: stack.enter_context(Vetting(config.vet_config(model, folder / "vet"), executor, bar, f"{label}: "))
                    for label, (model, folder) in subjects.items()}
        sweepings = {} if not config.sweep else {
            label: stack.enter_context(Sweeping(config.sweep_config(model, folder / "sweep"), executor, bar, f"{label}: "))
            for label, (model, folder) in subjects.items()}
        run_jobs([*vettings.values(), *sweepings.values()])
        results = {label: vetting.report().conditions for label, vetting in vettings.items()}
        sweeps = {label: sweeping.report() for label, sweeping in sweepings.items()} if config.sweep else None
    return results, sweeps


def write_align_report(config: AlignConfig, record: dict, results: dict[str, list], sweeps: dict | None) -> tuple[Path, Path]:
    """The before/after report of the run in ``config.out_dir`` (see :func:`quada.report.align.align_sections`)."""
    harmful, benign = config.eval_sets()
    cfg = record["config"]
    summary = (
        f"{record['base_model']} aligned with {method_name(record)} on {record['pairs']} pairs ({config.pairs}); "
        f"perturbation {cfg['perturbation']} on {layers_phrase(cfg)}, lambda {cfg['reg_lambda']:g}. Compared: "
        f"{', '.join(results)}. Evaluated on held-out prompts: {harmful} (limit {config.limit}) and {benign} "
        f"(limit {config.benign_limit}); prompt format {config.prompt_format}; greedy, {config.max_new_tokens} new "
        "tokens. ASR with 95% Wilson intervals; a perplexity far above the original means a broken model."
    )
    sections = align_sections(record, results, config.judges, sweeps)
    return write_report(config.out_dir, f"quada align: {record['base_model']}", summary, sections)


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


def check_outputs(config: AlignConfig) -> None:
    """Refuse, before any work, a run folder whose writes would replace one of the run's inputs (its
    data, checkpoints, adapter and model folders are replaced whole; its report and the results of its
    evaluations are written), or where a file stands in the way of one of its folders."""
    harmful, benign = config.eval_sets()
    inputs = [("--pairs", config.pairs), ("--model", config.model), ("--benchmark", harmful), ("--benign", benign),
              ("--corpus", config.corpus), ("--judge-model", config.judge_model)]
    out = config.out_dir
    before = ("--before-dir", config.before_dir) if config.before_dir else ("--out", out / "before")
    evaluations = [(option, folder / part) for option, folder in (before, ("--out", out / "after"))
                   for part in ("vet", "sweep")]
    check_apart(inputs, folders=[("--out", out / name) for name in (DATA_DIR, CHECKPOINT_DIR, ADAPTER_DIR, MODEL_DIR)],
                run_dirs=[("--out", out), *evaluations])


def align(config: AlignConfig, progress: bool = True) -> AlignResult:
    """Train (or resume, or reuse a finished model), then evaluate before/after and report."""
    check_outputs(config)
    pairs = stratified_pairs(load_pairs(config.pairs), config.max_pairs, config.pairs_seed)
    harmful, benign = config.eval_sets()
    if not config.skip_eval:
        check_disjoint(pairs, harmful, benign)
        check_judge_model(config.judges, config.judge_model)
        if config.baseline is not None:
            _read_record(config.baseline / MODEL_DIR)  # fail before training, not after
    model_dir = config.out_dir / MODEL_DIR
    trained = (model_dir / TRAINING_FILE).is_file()
    to_train = None if trained else training_model(config, pairs)
    open_run_dir(config.out_dir, "--out")
    record = _read_record(model_dir) if trained else train(config, pairs, *to_train)
    adapter_dir = Path(record["adapter_dir"]) if record.get("adapter_dir") else None
    if config.skip_eval:
        return AlignResult(config, model_dir, adapter_dir, record, None, None, None)
    subjects = evaluation_subjects(config, record)
    results, sweeps = evaluate(config, subjects, progress)
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
