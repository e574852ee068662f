"""The report of `quada align`: the models compared per approximation, the sweeps before and after,
the training curves, and the model card of the aligned model."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt

from quada.approx import spec_label
from quada.judging import SAFETY_JUDGES
from quada.report.format import percent_interval
from quada.report.render import Section
from quada.report.sweep import SweepResult, mva_sentence, sweep_figure
from quada.report.vet import ConditionResult


def method_name(record: dict) -> str:
    """How a training record's model was aligned: ``plain DPO``, ``QuadA`` or a variant of QuadA,
    e.g. ``QuadA (perturbed reference)`` (records from before the variants name none)."""
    if record["plain_dpo"]:
        return "plain DPO"
    cfg = record["config"]
    variants = [*(["perturbed reference"] if cfg.get("reference") == "perturbed" else []),
                *(["length-normalised IPO"] if cfg.get("preference_loss") == "ipo" else [])]
    return f"QuadA ({', '.join(variants)})" if variants else "QuadA"


def preference_phrase(cfg: dict) -> str:
    """The preference term and the reference of a training configuration, in words."""
    loss = ("IPO's squared loss on per-token mean log-ratios (Azar et al. 2023, eq. 17), tau"
            if cfg.get("preference_loss") == "ipo" else "DPO's loss, beta")
    reference = ("under the same perturbation as the policy" if cfg.get("reference") == "perturbed"
                 else "clean")
    return f"{loss} {cfg['beta']:g}; reference {reference}"


def layers_phrase(cfg: dict) -> str:
    """The decoder layers a training configuration perturbed, in words."""
    if cfg["perturb_layers"] == "none":
        return "no layer (plain DPO)"
    if cfg["perturb_layers"] == "all":
        return "every decoder layer"
    return f"decoder layers 1..{cfg['tau']}"


def _length_phrase(cfg: dict) -> str:
    return f"at most {cfg['max_steps']} steps" if cfg["max_steps"] > 0 else f"{cfg['num_train_epochs']:g} epochs"


def model_card(record: dict, results: list[list[str]] | None = None, columns: list[str] | None = None) -> str:
    """The model folder's README.md: base model, data, configuration, training and results."""
    cfg = record["config"]
    method = "plain DPO (baseline: no perturbation, no regularizer)" if record["plain_dpo"] else method_name(record)
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
        f"- Perturbation: `{cfg['perturbation']}` on {layers_phrase(cfg)}; regularizer weight lambda = "
        f"{cfg['reg_lambda']:g} ({cfg['reg_pooling']} pooling)",
        f"- {'LoRA r=%d, alpha=%g on %s' % (cfg['lora_r'], cfg['lora_alpha'], ', '.join(cfg['lora_target_modules'])) if cfg['use_lora'] else 'Full fine-tuning'}"
        f"; {preference_phrase(cfg)}; learning rate {cfg['learning_rate']:g} ({cfg['lr_scheduler_type']}, warmup "
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


def _change(reference: float | None, value: float | None, relative: bool = False) -> str:
    if reference is None or value is None:
        return "-"
    if relative:
        return f"{100 * (value / reference - 1):+.1f}%" if reference else "-"
    return f"{100 * (value - reference):+.1f}"


def comparison_table(results: Mapping[str, list[ConditionResult]], judges) -> tuple[list[str], list[list[str]]]:
    """One row per condition; per measure (ASR per safety judge, HS, over-refusal, perplexity,
    accuracy) one column per model in ``results`` (label -> its vetting's condition results, the
    original first), and the change of each later model against the first."""
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
        cells.append(lambda rs, j=judge: [percent_interval(rs[label].asr[j]) for label in labels]
                     + [_change(rs[first].asr[j].value, rs[label].asr[j].value) for label in later])
    columns += [f"HS {label}" for label in labels] + [f"over-refusal % {label}" for label in labels]
    cells.append(lambda rs: [hs(rs[label]) for label in labels] + [percent_interval(rs[label].over_refusal) for label in labels])
    columns += [f"PPL {label}" for label in labels] + [f"PPL change {label}" for label in later]
    cells.append(lambda rs: [ppl(rs[label]) for label in labels]
                 + [_change(rs[first].perplexity, rs[label].perplexity, relative=True) for label in later])
    columns += [f"accuracy % {label}" for label in labels]
    cells.append(lambda rs: [percent_interval(rs[label].accuracy) for label in labels])
    rows = []
    for condition in by_label[first]:
        per_model = {label: by_label[label][condition] for label in labels}
        rows.append([spec_label(condition), *(cell for make in cells for cell in make(per_model))])
    return columns, rows


def training_figure(log_history: list[dict]):
    """Preference loss (DPO's or IPO's), regularizer and reward margin per logged step."""
    figure, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    loss = "ipo_loss" if any("ipo_loss" in h for h in log_history) else "dpo_loss"
    logs = [h for h in log_history if loss in h]
    for ax, key, label in zip(axes, (loss, "regularizer", "rewards/margins"),
                              ("IPO loss" if loss == "ipo_loss" else "DPO loss", "regularizer (mean cosine)",
                               "reward margin (DPO's, summed)")):
        ax.plot([h["step"] for h in logs], [h[key] for h in logs], ".-")
        ax.set_title(label)
        ax.set_xlabel("step")
    figure.tight_layout()
    return figure


def align_sections(record: dict, results: Mapping[str, list[ConditionResult]], judges,
                   sweeps: Mapping[str, SweepResult] | None) -> list[Section]:
    """The before/after report: the comparison table, the sweep figure and the training curve."""
    columns, rows = comparison_table(results, judges)
    sections = [Section("Safety and utility per approximation, before and after", columns=columns, rows=rows,
                        text="'none' is the model without approximation. Changes against the original are in "
                        "percentage points (ASR) and percent (perplexity).")]
    if sweeps is not None:
        sections.append(Section(
            "Finding 1 before and after: ASR and perplexity against the noise",
            text=" ".join(f"{label}: {mva_sentence(result)}" for label, result in sweeps.items()),
            figures={"sweep-before-after": sweep_figure(sweeps)},
        ))
    sections.append(Section("Training", figures={"training": training_figure(record["log_history"])},
                            text=f"{record['steps']} steps; per-step preference loss, regularizer (mean pairwise cosine) and "
                            "reward margin as logged by the trainer. Full configuration in model/training.json."))
    return sections
