"""The attack report: ASR per attack x approximation x model with 95% intervals, and each
attack's cost, from the run folder's ``attack.json``.

Every `quada attack` run adds its cells to ``attack.json`` (a cell is one attack on one model under
one approximation; a rerun of the same cell replaces it), so one page compares every attack,
approximation and model tried in the folder. Only rates and costs are shown: adversarial prompts
and responses stay in the results store.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from quada.approx import spec_label
from quada.attack.options import PAPER_BUDGETS
from quada.judging.calibration import JudgeInfo, judge_info_from_json
from quada.report.calibration import asr_column
from quada.report.format import percent_interval
from quada.report.render import Section, write_report
from quada.stats.metrics import Estimate, clustered_difference
from quada.store import CLEAN

RESULTS_FILE = "attack.json"
CELL_KEY = ("fingerprint", "approx", "identity", "benchmark", "n", "seed")


@dataclass
class AttackCell:
    """One attack on one model under one approximation: its ASR per judge over ``n`` behaviours
    and its cost (sequences run forward, seconds spent building prompts; responses not counted).
    ``target_reached``: GCG's share of behaviours whose suffix made greedy decoding produce the target."""

    model: str
    fingerprint: str
    approx: str
    attack: str
    identity: str
    benchmark: str
    seed: int
    n: int
    asr: dict[str, Estimate]
    forward_passes: int
    seconds: float
    target_reached: float | None
    queries: list[int] = field(default_factory=list)  # per behaviour: sequences searched + answers judged
    search_seconds: list[float] = field(default_factory=list)  # per behaviour
    budget: str = ""
    stopped: float | None = None  # share of behaviours whose search ended on its stopping rule
    behaviours: list[str] = field(default_factory=list)
    outcomes: dict[str, list[int]] = field(default_factory=dict)  # per judge, per behaviour: 1 = success


def cell_from_json(saved: dict) -> AttackCell:
    known = {f.name for f in fields(AttackCell)}
    return AttackCell(**{**{k: v for k, v in saved.items() if k in known},
                         "asr": {j: Estimate(**e) for j, e in saved["asr"].items()}})


def merge_cells(path: Path, new: list[dict]) -> list[dict]:
    """The cells saved at ``path`` with ``new`` ones replacing those of the same key, then added."""
    saved = json.loads(path.read_text())["cells"] if path.is_file() else []

    def key(cell: dict) -> tuple:
        return tuple(cell[k] for k in CELL_KEY)

    replaced = {key(c) for c in new}
    return [c for c in saved if key(c) not in replaced] + new


def _mean(values: Sequence[float], digits: int) -> str:
    return f"{sum(values) / len(values):.{digits}f}" if values else "-"


def summary_table(cells: Sequence[AttackCell], info: dict[str, JudgeInfo] | None = None) -> tuple[list[str], list[list[str]]]:
    """One row per cell; an ASR column per judge that any cell used, named with the judge's measure and
    its held-out kappa (from ``info``; "not calibrated" without it); the cost per behaviour."""
    info = info or {}
    judges = list(dict.fromkeys(j for c in cells for j in c.asr))
    columns = ["model", "approximation", "attack", "behaviours",
               *(asr_column(j, info) for j in judges),
               "queries per behaviour (mean, max)", "search seconds per behaviour", "stopped by its rule %",
               "GCG target reached %"]
    rows = [[
        c.model, spec_label(c.approx), c.attack, f"{c.n} {Path(c.benchmark).name}",
        *(percent_interval(c.asr.get(j)) for j in judges),
        f"{_mean(c.queries, 1)}, {max(c.queries)}" if c.queries else "-", _mean(c.search_seconds, 1),
        _percent(c.stopped), _percent(c.target_reached),
    ] for c in cells]
    return columns, rows


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}"


def budget_table(cells: Sequence[AttackCell]) -> tuple[list[str], list[list[str]]]:
    """Per attack in ``cells``: the budgets run here, the paper's, and both stopping rules."""
    rows = []
    for attack, (paper, paper_stop, stop) in PAPER_BUDGETS.items():
        budgets = sorted({c.budget for c in cells if c.attack == attack and c.budget})
        if budgets:
            rows.append([attack, "; ".join(budgets), paper, stop, paper_stop])
    return ["attack", "budget here", "the paper's budget", "stopping rule here", "the paper's stopping rule"], rows


def _series(cells: Sequence[AttackCell], judge: str) -> dict[tuple[str, int], dict[tuple[str, str, str], dict[str, bool]]]:
    """Per prompt set (benchmark, seed), per (model, approximation, attack): each behaviour's outcome by
    ``judge``, merged over the cells of one attack identity, so runs on different subsets of the same
    prompts (``--limit 8`` and ``--limit 2``) meet on the prompts they share (a behaviour's outcome is a
    function of its key, whatever the subset). An attack run with several identities in one prompt set
    is named by its identity."""
    usable = [c for c in cells if judge in c.outcomes and c.behaviours]
    identities: dict[tuple, set[str]] = {}
    for c in usable:
        identities.setdefault((c.benchmark, c.seed, c.attack), set()).add(c.identity)
    series: dict[tuple[str, int], dict[tuple[str, str, str], dict[str, bool]]] = {}
    for c in usable:
        attack = c.attack if len(identities[c.benchmark, c.seed, c.attack]) == 1 else c.identity
        outcomes = series.setdefault((c.benchmark, c.seed), {}).setdefault((c.model, c.approx, attack), {})
        outcomes.update((b, bool(o)) for b, o in zip(c.behaviours, c.outcomes[judge]))
    return series


def _paired(cells: Sequence[AttackCell], judge: str) -> list[list[str]]:
    """The comparison rows of ``cells`` grouped by model: each attack against the bare request, and
    each approximation against the clean model, per model and pooled over the models with each prompt
    one cluster; and every pair of models per attack and approximation. Only outcomes on the same
    prompts (benchmark and seed) are paired."""
    prompt_sets = _series(cells, judge)
    rows = []
    for (benchmark, seed), by_key in prompt_sets.items():
        where = f" ({Path(benchmark).name}, seed {seed})" if len(prompt_sets) > 1 else ""
        rows += _paired_on(by_key, judge, where)
    return rows


def _paired_on(by_key: dict[tuple[str, str, str], dict[str, bool]], judge: str, where: str) -> list[list[str]]:
    """:func:`_paired` on one prompt set: ``by_key`` maps (model, approximation, attack) to each
    behaviour's outcome; ``where`` ends every row's label."""
    models = list(dict.fromkeys(m for m, _, _ in by_key))
    rows = []

    def compare(label: str, pairs: list[tuple[str, dict[str, bool], dict[str, bool]]], pooled: bool) -> None:
        shared = set.intersection(*(a.keys() & b.keys() for _, a, b in pairs)) if pairs else set()
        if not shared:
            return
        order = sorted(shared)
        parts = []
        for model, a, b in pairs:
            one = clustered_difference([[a[p] for p in order]], [[b[p] for p in order]])
            parts.append(f"{model}: {100 * one.difference:+.1f} ({one.only_first} vs {one.only_second}, p = {one.p_value:.2g})")
        together = "-"
        if pooled and len(pairs) > 1:
            both = clustered_difference([[a[p] for p in order] for _, a, _ in pairs],
                                        [[b[p] for p in order] for _, _, b in pairs])
            together = (f"{100 * both.difference:+.1f} ({both.only_first} vs {both.only_second}, "
                        f"p = {both.p_value:.2g}, {both.items} prompt clusters x {both.groups} models)")
        rows.append([label + where, judge, "; ".join(parts), together])

    approximations = list(dict.fromkeys(a for _, a, _ in by_key))
    attacks = list(dict.fromkeys(t for _, _, t in by_key))
    for approx in approximations:
        for attack in attacks:
            if attack == "direct":
                continue
            pairs = [(m, by_key[m, approx, attack], by_key[m, approx, "direct"]) for m in models
                     if (m, approx, attack) in by_key and (m, approx, "direct") in by_key]
            compare(f"{attack} vs direct, {spec_label(approx)}", pairs, True)
    for approx in approximations:
        if approx == CLEAN:
            continue
        for attack in attacks:
            pairs = [(m, by_key[m, approx, attack], by_key[m, CLEAN, attack]) for m in models
                     if (m, approx, attack) in by_key and (m, CLEAN, attack) in by_key]
            compare(f"{attack}: {spec_label(approx)} vs clean", pairs, True)
    for first, second in itertools.combinations(models, 2):
        for approx in approximations:
            for attack in attacks:
                if (first, approx, attack) in by_key and (second, approx, attack) in by_key:
                    compare(f"{attack}, {spec_label(approx)}: {first} vs {second}",
                            [(first, by_key[first, approx, attack], by_key[second, approx, attack])], False)
    return rows


def comparison_table(cells: Sequence[AttackCell]) -> tuple[list[str], list[list[str]]]:
    """Paired comparisons of ``cells`` for every judge (:func:`_paired`)."""
    judges = list(dict.fromkeys(j for c in cells for j in c.outcomes))
    columns = ["comparison", "judge", "per model: ASR difference, points (only first vs only second, exact p)",
               "pooled over models, clustered by prompt"]
    return columns, [row for judge in judges for row in _paired(cells, judge)]


def write_attack_report(run_dir: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` of ``run_dir`` from its ``attack.json``."""
    saved = json.loads((run_dir / RESULTS_FILE).read_text())
    cells = [cell_from_json(c) for c in saved["cells"]]
    columns, rows = summary_table(cells, {name: judge_info_from_json(i) for name, i in saved.get("judges", {}).items()})
    models = ", ".join(dict.fromkeys(c.model for c in cells))
    section = Section(
        "Attack success per attack, approximation and model",
        text="ASR: share of behaviours whose response each judge calls a successful attack (95% Wilson "
        "intervals; a best-of-N attack succeeds on a behaviour when any attempt does). Cost per behaviour: "
        "queries are the sequences the attacked model ran while the attack searched (scored candidates, answers "
        "read by a feedback loop) plus the answers judged; search seconds exclude generating the judged answers. "
        "The identities of the attacks, with every parameter, are in attack.json; the prompts and responses in "
        "results.sqlite (`quada results export`).",
        columns=columns, rows=rows,
    )
    budget_columns, budget_rows = budget_table(cells)
    budgets = Section("Budgets and stopping rules against the papers'", text="", columns=budget_columns,
                      rows=budget_rows)
    compare_columns, compare_rows = comparison_table(cells)
    comparisons = Section(
        "Paired comparisons",
        text="Each difference is paired prompt by prompt: per model, the exact McNemar (sign) test; pooled over "
        "the models, an exact sign-flip test with each prompt one cluster, since the models answer the same "
        "prompts and their outcomes on a prompt are not independent. Model against model is given per pair only. "
        "No correction for the number of comparisons.",
        columns=compare_columns, rows=compare_rows,
    )
    summary = ("Attacks against models served under activation approximations; GCG and AutoDAN optimise "
               "through the approximation, DRA adjusts its prompts from the answers as served.")
    return write_report(run_dir, f"quada attack: {models}", summary,
                        [section, *([budgets] if budget_rows else []), *([comparisons] if compare_rows else [])])
