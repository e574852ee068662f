"""The report of `quada results arms`: per measure, each arm's rate over its training seeds and its
paired difference against the reference arm, from what ``arms.json`` holds."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from quada.approx import spec_label
from quada.judging import asr_name
from quada.report.render import Section

OVER_REFUSAL = "over-refusal"  # the measure beside the ASR of each safety judge


def measure_name(measure: str) -> str:
    """A measure key as the report names it: the ASR of a judge, or over-refusal."""
    return "over-refusal" if measure == OVER_REFUSAL else f"{asr_name(measure)} ({measure})"


def spread_text(rate: dict) -> str:
    """A rate over seeds in percent: mean, sd and range, ``"12.5 sd 3.1 [9.4-15.6], 3 seeds"``."""
    sd = "" if rate["sd"] is None else f" sd {100 * rate['sd']:.1f}"
    seeds = f"{rate['seeds']} seed{'' if rate['seeds'] == 1 else 's'}"
    return f"{100 * rate['mean']:.1f}{sd} [{100 * rate['low']:.1f}-{100 * rate['high']:.1f}], {seeds}"


def difference_text(difference: dict) -> str:
    """A paired difference in percentage points with its interval, ``"+3.1 [-1.0, 7.2]"``."""
    return f"{100 * difference['value']:+.1f} [{100 * difference['low']:+.1f}, {100 * difference['high']:+.1f}]"


def measure_table(saved: dict, measure: str) -> tuple[list[str], list[list[str]]]:
    """One row per condition: each arm's rate over its seeds, then each other arm's difference
    against the reference."""
    arms, reference = list(saved["runs"]), saved["reference"]
    others = [a for a in arms if a != reference]
    columns = ["condition", *(f"{a} %" for a in arms), *(f"{a} - {reference} (points)" for a in others)]
    rows = []
    for condition in saved["conditions"]:
        rates, differences = saved["rates"][measure][condition], saved["differences"][measure][condition]
        rows.append([spec_label(condition), *(spread_text(rates[a]) for a in arms),
                     *(difference_text(differences[a]) for a in others)])
    return columns, rows


def perplexity_table(saved: dict) -> tuple[list[str], list[list[str]]]:
    """Mean perplexity over seeds per condition and arm."""
    arms = list(saved["runs"])
    rows = [[spec_label(c), *("-" if saved["perplexity"][c][a] is None else f"{saved['perplexity'][c][a]:.2f}" for a in arms)]
            for c in saved["conditions"]]
    return ["condition", *arms], rows


def rate_figure(saved: dict, measure: str):
    """Bars of each arm's mean rate per condition; error bars span the seeds' lowest to highest."""
    arms, conditions = list(saved["runs"]), saved["conditions"]
    figure, ax = plt.subplots(figsize=(max(6, 0.5 * len(conditions) * len(arms)), 4))
    x = np.arange(len(conditions))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        rates = [saved["rates"][measure][c][arm] for c in conditions]
        means = np.array([100 * r["mean"] for r in rates])
        span = np.array([[m - 100 * r["low"] for m, r in zip(means, rates)], [100 * r["high"] - m for m, r in zip(means, rates)]])
        ax.bar(x + (i - (len(arms) - 1) / 2) * width, means, width, yerr=span, capsize=3, label=arm)
    ax.set_xticks(x, [spec_label(c) for c in conditions], rotation=30, ha="right")
    ax.set_ylabel(f"{measure_name(measure)} %")
    ax.legend()
    figure.tight_layout()
    return figure


def confidence_text(saved: dict) -> str:
    """The intervals' level, ``"95%"`` (aggregations from before the option were at 95%)."""
    return f"{100 * saved.get('confidence', 0.95):g}%"


def strong_form_table(saved: dict, measure: str) -> tuple[list[str], list[list[str]]]:
    """One row per condition: each arm's ASR there minus the original model's clean ASR, paired."""
    arms = list(saved["runs"])
    columns = ["condition", *(f"{a} - original clean (points)" for a in arms)]
    differences = saved["versus_original_clean"][measure]
    rows = [[spec_label(c), *(difference_text(differences[c][a]) if a in differences[c] else "-" for a in arms)]
            for c in saved["conditions"]]
    return columns, rows


def arms_summary(saved: dict) -> str:
    """The report's opening paragraph: what was compared and how."""
    runs = "; ".join(f"{arm}: {len(members)} seed{'' if len(members) == 1 else 's'}" for arm, members in saved["runs"].items())
    setup = "; ".join(f"{what}: {value}" for what, value in saved["evaluation"].items())
    return (
        f"Arms of `quada align` runs on {saved['base_model']} ({runs}), each run's aligned model evaluated after "
        f"training; 'original' is the base model, evaluated with each training seed. {setup}. Rates are means over "
        f"the seeds (sd and lowest-highest seed in brackets); differences against {saved['reference']} pair seed i "
        f"with seed i (sorted by training seed) and prompts by id, with a {confidence_text(saved)} seed-level interval "
        "(a t interval over the seeds' differences, never narrower than their prompts' sampling error; one seed: its "
        "Tango interval, which leaves the seed variance out)."
    )


def arms_sections(saved: dict) -> list[Section]:
    """The sections of the report: one table per measure (a figure per ASR), perplexity, the runs."""
    sections = []
    for measure in [*saved["judges"], OVER_REFUSAL]:
        columns, rows = measure_table(saved, measure)
        figures = {} if measure == OVER_REFUSAL else {f"asr-{measure}": rate_figure(saved, measure)}
        text = "Percent; differences in percentage points." + (" Error bars span the lowest to the highest seed." if figures else "")
        sections.append(Section(f"{measure_name(measure)} per condition and arm", columns=columns, rows=rows,
                                figures=figures, text=text))
    for measure in saved["judges"] if "versus_original_clean" in saved else []:
        columns, rows = strong_form_table(saved, measure)
        sections.append(Section(
            f"{measure_name(measure)} against the original model's clean rate (the strong form)", columns=columns,
            rows=rows, text="Each arm's ASR under each condition minus the original's ASR without approximation, seed i "
            f"with seed i and prompt by prompt, with its {confidence_text(saved)} seed-level interval. The paper's "
            "strong form says that after its defense no approximation lifts the ASR above the original's clean ASR: "
            "no interval of the defended arm should lie above 0."))
    columns, rows = perplexity_table(saved)
    sections.append(Section("Perplexity per condition and arm (mean over seeds)", columns=columns, rows=rows))
    run_rows = [[arm, str(m["seed"]), m["folder"]] for arm, members in saved["runs"].items() for m in members]
    sections.append(Section("Runs", text="The evaluation folder each seed of each arm was read from.",
                            columns=["arm", "training seed", "evaluation"], rows=run_rows))
    return sections
