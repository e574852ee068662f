"""The attack report: ASR per attack x approximation x model with 95% intervals, and each
attack's cost, from the run folder's ``attack.json``.

Every `quada attack` run adds its cells to ``attack.json`` (a cell is one attack on one model under
one approximation; a rerun of the same cell replaces it), so one page compares every attack,
approximation and model tried in the folder. Only rates and costs are shown: adversarial prompts
and responses stay in the results store.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from quada.approx import spec_label
from quada.eval.metrics import Estimate
from quada.judge_calibration import JudgeInfo, judge_info_from_json
from quada.report.calibration import asr_column
from quada.report.format import percent_interval
from quada.report.render import Section, write_report

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


def cell_from_json(saved: dict) -> AttackCell:
    return AttackCell(**{**saved, "asr": {j: Estimate(**e) for j, e in saved["asr"].items()}})


def merge_cells(path: Path, new: list[dict]) -> list[dict]:
    """The cells saved at ``path`` with ``new`` ones replacing those of the same key, then added."""
    saved = json.loads(path.read_text())["cells"] if path.is_file() else []

    def key(cell: dict) -> tuple:
        return tuple(cell[k] for k in CELL_KEY)

    replaced = {key(c) for c in new}
    return [c for c in saved if key(c) not in replaced] + new


def summary_table(cells: Sequence[AttackCell], info: dict[str, JudgeInfo] | None = None) -> tuple[list[str], list[list[str]]]:
    """One row per cell; an ASR column per judge that any cell used, named with the judge's measure and
    its held-out kappa (from ``info``; "not calibrated" without it)."""
    info = info or {}
    judges = list(dict.fromkeys(j for c in cells for j in c.asr))
    columns = ["model", "approximation", "attack", "behaviours",
               *(asr_column(j, info) for j in judges),
               "forward passes", "seconds", "GCG target reached %"]
    rows = [[
        c.model, spec_label(c.approx), c.attack, f"{c.n} {c.benchmark}",
        *(percent_interval(c.asr.get(j)) for j in judges),
        str(c.forward_passes), f"{c.seconds:.1f}", "-" if c.target_reached is None else f"{100 * c.target_reached:.0f}",
    ] for c in cells]
    return columns, rows


def write_attack_report(run_dir: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` of ``run_dir`` from its ``attack.json``."""
    saved = json.loads((run_dir / RESULTS_FILE).read_text())
    cells = [cell_from_json(c) for c in saved["cells"]]
    columns, rows = summary_table(cells, {name: judge_info_from_json(i) for name, i in saved.get("judges", {}).items()})
    models = ", ".join(dict.fromkeys(c.model for c in cells))
    section = Section(
        "Attack success per attack, approximation and model",
        text="ASR: share of behaviours whose response each judge calls a successful attack (95% Wilson "
        "intervals). Cost: sequences run forward and seconds spent finding the adversarial prompts (generating "
        "the responses not included). The identities of the attacks, with every parameter, are in attack.json; "
        "the prompts and responses in results.sqlite (`quada results export`).",
        columns=columns, rows=rows,
    )
    summary = ("Attacks against models served under activation approximations; GCG and AutoDAN optimise "
               "through the approximation.")
    return write_report(run_dir, f"quada attack: {models}", summary, [section])
