"""Agreement between judges on stored responses, and against a human-labelled file.

The human file is CSV or JSONL with one row per judged response:
- ``prompt_id``: the prompt's id as stored (see ``quada results export``);
- ``approx``: the condition's spec string (``none`` for the clean model; default ``none``);
- ``label``: 1 (or true/yes) if the response is a successful attack, i.e. a clear, non-trivial
  attempt to carry out the harmful request; 0 (false/no) otherwise.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from quada.data import csv_rows, jsonl_rows
from quada.errors import QuadaError
from quada.judging.labelled import parse_label
from quada.stats.metrics import cohen_kappa, percent_agreement
from quada.store import Judgement, Store


@dataclass(frozen=True)
class Agreement:
    """How often two judges agree (``percent``, 0-100) and Cohen's ``kappa`` on ``n`` items."""

    percent: float
    kappa: float
    n: int


def agreement(labels_a: Sequence[bool], labels_b: Sequence[bool]) -> Agreement:
    """Percent agreement and Cohen's kappa between two judges' labels on the same items."""
    return Agreement(100 * percent_agreement(labels_a, labels_b), cohen_kappa(labels_a, labels_b), len(labels_a))


HUMAN = "human"


def load_human_labels(path: str | Path) -> dict[tuple[str, str], bool]:
    """``{(approx, prompt_id): label}`` from a human-labelled CSV or JSONL file."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".jsonl":
        rows = [(f"line {number}", row) for number, row in jsonl_rows(path, "human label file")]
    else:
        rows = [(f"row {number}", row) for number, row in enumerate(csv_rows(path, "human label file")[1], start=1)]
    labels = {}
    for where, row in rows:
        if not isinstance(row, dict) or "prompt_id" not in row or "label" not in row:
            raise QuadaError(f"{path} {where}: needs the columns prompt_id and label (approx is optional)")
        labels[row.get("approx") or "none", row["prompt_id"]] = parse_label(row["label"], f"{path} {where}")
    if not labels:
        raise QuadaError(f"human label file {path} holds no rows")
    return labels


def stored_labels(store: Store) -> dict[str, dict[tuple[str, str], bool]]:
    """Every judge's labels in the store: ``{judge name: {(approx, prompt_id): label}}``.

    Raises when one (approx, prompt id) was judged for several models or settings by the same
    judge, because then a human label could not be matched to one response.
    """
    labels: dict[str, dict[tuple[str, str], bool]] = {}
    for row in store.rows(Judgement):
        name = row.key.judge.split(":")[0]
        item = (row.key.approx, row.key.prompt_id)
        if item in labels.setdefault(name, {}):
            raise QuadaError(
                f"the store holds several {name} judgements of prompt {item[1]} under {item[0]} (several models "
                "or settings); compute agreement on a store of one run (each `quada vet` run directory has one)"
            )
        labels[name][item] = row.label
    return labels


def pairwise_agreement(
    labels: dict[str, dict[tuple[str, str], bool]], judges: list[str] | None = None
) -> list[tuple[str, str, Agreement]]:
    """Percent agreement and Cohen's kappa for every pair of judges, on the items both labelled.

    Pairs without a common item are left out (a refusal judge labels other prompts than the safety
    judges); it is an error when no pair is left, or when the human labels match no judge's item.
    """
    names = judges or sorted(labels)
    unknown = [n for n in names if n not in labels]
    if unknown:
        raise QuadaError(f"no stored labels of judge {unknown[0]!r}; the store has: {', '.join(sorted(labels))}")
    if len(names) < 2:
        raise QuadaError(
            f"agreement needs two judges, got {', '.join(names) or 'none'}; judge the stored responses with "
            "another judge or give human labels"
        )
    results = []
    for a, b in itertools.combinations(names, 2):
        common = sorted(labels[a].keys() & labels[b].keys())
        if common:
            results.append((a, b, agreement([labels[a][k] for k in common], [labels[b][k] for k in common])))
    if not results:
        raise QuadaError(_no_common_items(f"the judges {', '.join(names)}", labels, names))
    if HUMAN in names and not any(HUMAN in (a, b) for a, b, _ in results):
        raise QuadaError(_no_common_items("the human labels and the stored judgements", labels, names))
    return results


def _no_common_items(between: str, labels: dict[str, dict[tuple[str, str], bool]], names: list[str]) -> str:
    """The message for labels that match no other judge's: which keys are compared, with an example
    key of each judge."""
    examples = "; ".join(
        f"{name} has approx {approx!r}, prompt_id {prompt_id!r}" for name in names for approx, prompt_id in list(labels[name])[:1]
    )
    return (
        f"no common items between {between}: items are matched on (approx, prompt_id), e.g. {examples}; "
        "use the approx specs and prompt ids that `quada results export` writes"
    )
