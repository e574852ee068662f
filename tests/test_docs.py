"""The documentation a newcomer walks: every relative link of the README and docs/ resolves (the
file, and the heading an anchor names), and every command and subcommand of `quada` has a section
of its own on some page."""

import re
from pathlib import Path

import pytest
import typer.main

from quada.cli import app

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {anchor(line.lstrip("#")) for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if fragment and linked.suffix == ".md":
            assert fragment in anchors(linked), f"{page.name} links to #{fragment}, no heading of {linked.name}"


def commands(group: typer.Typer, prefix: str = "quada") -> list[str]:
    """Every command line of the app, ``quada vet`` and ``quada judge calibrate`` alike."""
    click_group = typer.main.get_command(group)
    found = []
    for name, command in click_group.commands.items():
        if hasattr(command, "commands"):
            found += [f"{prefix} {name} {sub}" for sub in command.commands]
        else:
            found.append(f"{prefix} {name}")
    return found


@pytest.mark.parametrize("command", commands(app))
def test_every_command_has_a_section_of_its_own(command):
    headings = [line for page in PAGES if page.name != "README.md"
                for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    assert any(f"`{command}`" in heading for heading in headings), f"no docs page has a section on `{command}`"
