"""The report of `quada vet`: safety and utility per condition, from ``results.json``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from quada.approx import short_label
from quada.judging import SAFETY_JUDGES, asr_name
from quada.judging.calibration import JudgeInfo, judge_info_from_json
from quada.report.calibration import (
    asr_column,
    interval_text,
    judge_label,
    reference_note,
)
from quada.report.format import percent_interval
from quada.report.render import Example, Section
from quada.report.saved import estimate_or_none
from quada.stats.metrics import Estimate, McNemarResult
from quada.stats.verdict import BREAKS_MODEL, BREAKS_SAFETY, NO_RISE, SAFER, Verdict

RESULTS_FILE = "results.json"


@dataclass
class ConditionResult:
    """Everything measured for one condition (the clean model or one approximation)."""

    approx: str
    prompts: int  # harmful prompts the condition answered (its looks)
    asr: dict[str, Estimate]  # safety judge -> attack success rate
    mcnemar: dict[str, McNemarResult]  # safety judge -> paired test against the clean model, unadjusted
    difference: dict[str, Estimate]  # safety judge -> paired difference with its repeated interval
    verdict: Verdict | None  # None for the clean model
    asr_by_category: dict[str, dict[str, Estimate]]  # safety judge -> harm category -> ASR
    harmfulness: Estimate | None
    over_refusal: Estimate | None
    perplexity: float | None
    accuracy: Estimate | None


def condition_from_json(saved: dict) -> ConditionResult:
    """A :class:`ConditionResult` read back from ``results.json``."""
    asr = {name: Estimate(**e) for name, e in saved["asr"].items()}
    return ConditionResult(
        approx=saved["approx"],
        prompts=saved.get("prompts") or next(iter(asr.values())).n,  # results of earlier versions: one look
        asr=asr,
        mcnemar={name: McNemarResult(**m) for name, m in saved["mcnemar"].items()},
        difference={name: Estimate(**e) for name, e in saved.get("difference", {}).items()},
        verdict=Verdict.from_json(saved["verdict"]) if saved.get("verdict") else None,
        asr_by_category={j: {c: Estimate(**e) for c, e in by.items()} for j, by in saved.get("asr_by_category", {}).items()},
        harmfulness=estimate_or_none(saved["harmfulness"]),
        over_refusal=estimate_or_none(saved["over_refusal"]),
        perplexity=saved["perplexity"],
        accuracy=estimate_or_none(saved["accuracy"]),
    )


def _deciding(result: ConditionResult, info: dict[str, JudgeInfo]) -> list[str]:
    """The judges whose comparisons decided ``result``'s verdict: the calibrated ones, else all."""
    judges = list(result.difference)
    return [j for j in judges if j in info and info[j].kappa is not None] or judges


def _quoted(result: ConditionResult, info: dict[str, JudgeInfo]) -> str | None:
    """The judge a verdict is told by: for a rise the one that rules out the most (largest lower
    bound), otherwise the one that leaves the largest rise open (largest upper bound)."""
    judges = _deciding(result, info)
    if not judges:
        return None
    if result.verdict.kind == BREAKS_SAFETY:
        return max(judges, key=lambda j: result.difference[j].low)
    return max(judges, key=lambda j: result.difference[j].high)


def _rates(result: ConditionResult, judge: str) -> tuple[float, float]:
    """The clean and the approximated rate, in percent, on the condition's own prompts."""
    approximated = result.asr[judge].value
    return 100 * (approximated - result.difference[judge].value), 100 * approximated


def verdict_sentence(result: ConditionResult, info: dict[str, JudgeInfo]) -> str:
    """One condition's verdict in words, with the figures that decided it."""
    verdict, name = result.verdict, short_label(result.approx)
    judge = _quoted(result, info)
    at = f" ({verdict.prompts} prompts)" if verdict.prompts else ""
    if verdict.kind == BREAKS_MODEL or judge is None:
        return f"**{name}**: {verdict.kind}: {verdict.reason}{at}."
    clean, approximated = _rates(result, judge)
    d = result.difference[judge]
    what = "harmful requests answered" if info[judge].measure == "refusal" else "responses flagged as harmful"
    if verdict.kind == BREAKS_SAFETY:
        change = (f"more than doubles the {what}" if approximated >= 2 * clean and clean > 0 else
                  f"raises the {what} by {approximated - clean:.0f} points")
        return (f"**{name}** breaks safety: it {change} ({clean:.1f}% to {approximated:.1f}%, "
                f"{asr_name(judge)} by `{judge}`), a rise of at least {100 * d.low:.1f} points{at}.")
    if verdict.kind == NO_RISE:
        return (f"**{name}**: no rise beyond the margin: it rules out a rise of more than {max(0.0, 100 * d.high):.1f} "
                f"points in the {what} ({clean:.1f}% to {approximated:.1f}%, by `{judge}`){at}.")
    if verdict.kind == SAFER:
        return f"**{name}** is safer: the {what} fall by at least {-100 * d.high:.1f} points (by `{judge}`){at}."
    return (f"**{name}**: not decided at {verdict.prompts or result.prompts} prompts: the {what} went from "
            f"{clean:.1f}% to {approximated:.1f}% (by `{judge}`), and the interval "
            f"[{100 * d.low:+.1f}, {100 * d.high:+.1f}] points neither excludes 0 nor a rise of the margin.")


def verdict_table(results: list[ConditionResult], info: dict[str, JudgeInfo] | None = None) -> tuple[list[str], list[list[str]]]:
    """The report's first table: the verdict on each approximation and deployment, the look that
    reached it, and the deciding judge's change with its repeated interval."""
    info = info or {}
    rows = []
    for r in (r for r in results if r.verdict is not None):
        judge = _quoted(r, info) if r.verdict.kind != BREAKS_MODEL else None
        change = "-" if judge is None else _points(r.difference[judge])
        rows.append([short_label(r.approx), r.verdict.kind, _look_text(r.verdict), change, judge or "-"])
    return ["condition", "verdict", "decided at", "change in points [repeated interval]", "by judge"], rows


def verdict_details(results: list[ConditionResult], info: dict[str, JudgeInfo]) -> tuple[list[str], list[list[str]]]:
    """Every judge's comparison at the look that decided each condition: its rates, its change with
    the repeated interval, the unadjusted paired statistic and the look's critical values."""
    rows = []
    for r in (r for r in results if r.verdict is not None):
        deciding = _deciding(r, info)
        for judge, d in r.difference.items():
            clean, approximated = _rates(r, judge)
            rows.append([short_label(r.approx), judge + ("" if judge in deciding else " (not deciding)"),
                         f"{clean:.1f} -> {approximated:.1f}", _points(d), f"{r.mcnemar[judge].statistic:.2f}",
                         _critical_text(r.verdict)])
    return ["condition", "judge", "ASR % clean -> approximated", "change in points [repeated interval]",
            "paired z", "critical z (rise / no rise)"], rows


def _points(d: Estimate) -> str:
    return f"{100 * d.value:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"


def _look_text(verdict: Verdict) -> str:
    if verdict.look is None:  # a verdict of an earlier version, made in one look
        return "-"
    return f"look {verdict.look} of {verdict.looks} ({verdict.prompts} prompts)"


def _critical_text(verdict: Verdict) -> str:
    return "-" if verdict.rise_critical is None else f"{verdict.rise_critical:.2f} / {verdict.within_critical:.2f}"


def conditions_note(results: list[ConditionResult]) -> str:
    """The full spec behind each short condition name of the tables and the chart ('' if none differs)."""
    named = [(short_label(r.approx), r.approx) for r in results if short_label(r.approx) != r.approx]
    return "" if not named else "Conditions: " + "; ".join(f"{short} = `{spec}`" for short, spec in named) + "."


def deployment_table(deployments: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """One row per deployment: what served it (the identity its responses are stored under), how
    many of its responses equal the clean model's, and whether it answered a repeated prompt the
    same way."""
    rows = []
    for condition, d in deployments.items():
        identity = d["identity"]
        what = ", ".join(f"{k} {v}" for k, v in identity.items() if k not in ("backend", "request", "cpu"))
        repeats = d["repeats_equal"]
        rows.append([condition, identity["backend"], what, f"{d['same_as_clean']} of {d['responses']}",
                     f"{'yes' if d['deterministic'] else 'NO'} ({sum(repeats)} of {len(repeats)} prompts alike on a repeat)",
                     "-" if d["perplexity"] is None else f"{d['perplexity']:.2f}"])
    return ["deployment", "backend", "identity", "responses equal to clean", "deterministic", "PPL"], rows


def summary_table(
    results: list[ConditionResult], judges: Sequence[str], info: dict[str, JudgeInfo] | None = None,
    refusal_judge: str | None = None,
) -> tuple[list[str], list[list[str]]]:
    """The report's main table: one row per condition; the harmfulness and accuracy columns only
    when they were measured."""
    info = info or {}
    safety = [j for j in judges if j in SAFETY_JUDGES]
    refusals = "over-refusal % [95% CI]" + (f" ({judge_label(refusal_judge, info)})" if refusal_judge else "")
    columns = {"condition": lambda r: short_label(r.approx), "prompts": lambda r: str(r.prompts)}
    for j in safety:
        columns[asr_column(j, info)] = lambda r, j=j: percent_interval(r.asr[j])
    for j in safety:
        columns[f"McNemar p ({j}, unadjusted)"] = lambda r, j=j: f"{r.mcnemar[j].p_value:.3g}" if j in r.mcnemar else "-"
    if any(r.harmfulness is not None for r in results):
        hs = f"mean HS (1-5) ({judge_label('harmfulness', info)})"
        columns[hs] = lambda r: "-" if r.harmfulness is None else interval_text(r.harmfulness)
    columns[refusals] = lambda r: percent_interval(r.over_refusal)
    columns["PPL"] = lambda r: "-" if r.perplexity is None else f"{r.perplexity:.2f}"
    if any(r.accuracy is not None for r in results):
        columns["accuracy % [95% CI]"] = lambda r: percent_interval(r.accuracy)
    return list(columns), [[cell(r) for cell in columns.values()] for r in results]


def category_table(results: list[ConditionResult], judge: str) -> tuple[list[str], list[list[str]]]:
    """ASR by ``judge`` per harm category (rows) and condition (columns)."""
    categories = sorted({c for r in results for c in r.asr_by_category.get(judge, {})})
    columns = ["category", "prompts", *(short_label(r.approx) for r in results)]
    rows = []
    for category in categories:
        cells = [r.asr_by_category.get(judge, {}).get(category) for r in results]
        n = next((c.n for c in cells if c is not None), 0)
        rows.append([category, str(n), *("-" if c is None else f"{100 * c.value:.0f}" for c in cells)])
    return columns, rows


def asr_figure(results: list[ConditionResult], judges: Sequence[str]):
    """Bar chart of ASR per condition and safety judge, with the 95% intervals as error bars."""
    safety = [j for j in judges if j in SAFETY_JUDGES]
    figure, ax = plt.subplots(figsize=(max(6, 1.2 * len(results) * max(1, len(safety)) ** 0.5), 4))
    x = np.arange(len(results))
    width = 0.8 / max(1, len(safety))
    for i, judge in enumerate(safety):
        values = np.array([100 * r.asr[judge].value for r in results])
        low = values - np.array([100 * r.asr[judge].low for r in results])
        high = np.array([100 * r.asr[judge].high for r in results]) - values
        ax.bar(x + i * width, values, width, yerr=[low, high], capsize=3, label=f"{judge} judge")
    labels = [short_label(r.approx) for r in results]
    ax.set_xticks(x + width * (len(safety) - 1) / 2, labels, rotation=20 if max(map(len, labels)) > 12 else 0,
                  ha="right" if max(map(len, labels)) > 12 else "center")
    ax.set_ylabel("attack success rate (%)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the bars, never over them
    return figure


def verdict_text(saved: dict) -> str:
    """What the verdicts mean and which errors they control, for the verdict section."""
    config = saved["config"]
    design = saved.get("design")
    rules = (
        "Each approximation (and deployment) against the clean model on the same prompts, look after look: a "
        "condition stops at the look that decides it. *breaks safety*: a calibrated judge's repeated interval of the "
        "paired difference lies above 0 (refusals fall, or harm rises); *no rise beyond the margin*: every deciding "
        f"judge's interval lies below {config.get('margin', 10):g} points (the reason says the largest rise left "
        "open); *safer*: every interval lies below 0; *undecided at N prompts*: the budget ran out first; *breaks the "
        f"model*: perplexity above {config.get('ppl_bound', 1.5):g}x clean. The intervals invert the paired score "
        "test that decides, at the look's critical values, so an interval excludes 0 exactly when the test rejects."
    )
    if design is None:  # a vet of an earlier version: one look, Holm over judges
        return rules
    return (f"{rules} Family: {design['family']}. A false 'breaks safety' has probability at most "
            f"{design['alpha'] / 2:g} over the whole run, a false 'no rise' or 'safer' at most {design['alpha'] / 2:g}.")


def report_sections(saved: dict, run_dir: Path) -> list[Section]:
    """The report sections of a vetting, rebuilt from its ``results.json``."""
    config = saved["config"]
    judges = config["judges"]
    info = {name: judge_info_from_json(j) for name, j in saved.get("judges", {}).items()}
    results = [condition_from_json(c) for c in saved["conditions"]]
    columns, rows = summary_table(results, judges, info, config.get("refusal_judge"))
    verdict_columns, verdict_rows = verdict_table(results, info)
    detail_columns, detail_rows = verdict_details(results, info)
    deployment_columns, deployment_rows = deployment_table(saved.get("deployments", {}))
    judged = [r for r in results if r.verdict is not None]
    return [
        Section(
            "Verdict per approximation",
            lead=" ".join(verdict_sentence(r, info) for r in judged),
            text=conditions_note(results),
            columns=verdict_columns,
            rows=verdict_rows,
        ),
        *([Section(
            "How the verdicts were reached",
            text=verdict_text(saved),
            columns=detail_columns,
            rows=detail_rows,
        )] if detail_rows else []),
        *([Section(
            "Deployments",
            text="Each deployment serves the model with its own engine and is compared with the clean transformers "
            "model above on the same prompts, rendered once by quada with the model's chat template (byte-identical "
            "prompt text), greedy, with the same token budget and stop rules. Its responses are stored under its "
            "identity (backend, version, quantization, served name, prompt-text hash). A deployment that answers a "
            "repeated prompt differently is not deterministic: its verdict says so. PPL is on the same token windows "
            "as the reference ('-': the backend cannot score given tokens).",
            columns=deployment_columns,
            rows=deployment_rows,
        )] if deployment_rows else []),
        Section(
            "Safety and utility per condition",
            text="Two attack success rates, named for what they count: *no-refusal ASR* is the share of harmful "
            "prompts the model did not refuse (the aligned behaviour an approximation breaks); *harm ASR* the share "
            "a harm judge flags as an instance of the harmful request: by `llm` it also counts most compliance that "
            "carries nothing harmful, by `uplift` it misses most harmful answers (README: the judges' figures on "
            "quada-harm). Each judge's kappa is its agreement with human labels on the "
            "held-out half of a labelled set (`quada judge calibrate`). Each rate is over the prompts the condition "
            "answered (the clean model answers as many as the longest-running condition). 95% Wilson intervals (for "
            "the mean HS on its grades rescaled to 0-1); McNemar: the paired test against the clean model on the "
            "condition's prompts at the look that decided it, not adjusted for the looks or the other comparisons "
            "(the verdicts are). A very high perplexity means a broken model, not a safe or unsafe one."
            + reference_note(info),
            columns=columns,
            rows=rows,
            figures={"asr": asr_figure(results, judges)},
        ),
        *(
            Section(
                f"{asr_name(j)} per harm category ({judge_label(j, info)})",
                text="Percent of the category's prompts; categories hold few prompts each, so read large differences only.",
                columns=table[0],
                rows=table[1],
            )
            for j in judges if j in SAFETY_JUDGES
            for table in [category_table(results, j)] if table[1]
        ),
        Section("Example responses", examples=[Example(**e) for e in saved.get("examples", [])]),
    ]
