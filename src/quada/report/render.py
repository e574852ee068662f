"""Reports: one Markdown file and one self-contained HTML page per run, built from sections.

A section holds a heading, an optional table, optional figures and optional text. Figures are
saved as PNG files beside the Markdown and embedded as base64 in the HTML, so the HTML page can
be mailed or archived on its own. Example responses go into a collapsed block behind a content
warning; nothing here prints to the terminal.
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from quada.errors import QuadaError  # noqa: E402
from quada.runs import atomic_write_bytes  # noqa: E402

CONTENT_WARNING = (
    "Content warning: the examples below are model responses to harmful requests and may contain "
    "harmful text. They are shown so that the judges' verdicts can be checked."
)


@dataclass
class Example:
    condition: str
    prompt: str
    response: str
    verdict: str


@dataclass
class Section:
    heading: str
    text: str = ""
    lead: str = ""  # what the section answers, in words: printed first and larger
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    figures: dict[str, Figure] = field(default_factory=dict)  # file stem -> figure
    examples: list[Example] = field(default_factory=list)


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A Markdown (GitHub) table; a ``|`` inside a cell is escaped."""

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(columns), line(["---"] * len(columns)), *map(line, rows)])


# A cell that holds a number: a value, maybe signed or in percent, maybe with its interval and a count,
# or "-" for one not measured. Numbers are right-aligned, text left-aligned.
NUMBER_CELL = re.compile(r"^(-|[-+]?\d[\d.,e+-]*%?x?( \[[-+]?[\d.]+, [-+]?[\d.]+\])?( \(\d+\))?)$")


def inline_html(text: str) -> str:
    """``text`` escaped for HTML, with Markdown's inline marks rendered: ``**strong**``, ``*emphasis*``
    and ```code```."""
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    escaped = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"<em>\1</em>", escaped)


def _html_cell(text: str) -> str:
    number = ' class="num"' if NUMBER_CELL.match(text) else ""
    return f"<td{number}>{inline_html(text)}</td>"


def _html_table(columns: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{inline_html(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_html_cell(str(c)) for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.92em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
td.num{text-align:right;white-space:nowrap}
p.answer{font-size:1.1em;line-height:1.5}
th{background:#f3f3f3} img{max-width:100%} .warning{background:#fff4e5;border:1px solid #f0b060;padding:0.6em}
details{margin:1em 0} pre{white-space:pre-wrap;background:#f8f8f8;padding:0.5em}
"""


def write_report(out_dir: str | Path, title: str, summary: str, sections: list[Section]) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and the figures' PNGs into ``out_dir``.

    Every file is rendered first and then written whole or not at all, so a killed run never
    leaves a half-written report. Returns the paths of the Markdown and HTML files.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise QuadaError(f"cannot create the report folder {out} ({err.strerror}); choose another output folder") from err
    md = [f"# {title}", "", summary, ""]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(summary)}</p>"]
    rendered: dict[Path, bytes] = {}
    for section in sections:
        md += [f"## {section.heading}", ""]
        body.append(f"<h2>{html.escape(section.heading)}</h2>")
        if section.lead:
            md += [section.lead, ""]
            body.append(f'<p class="answer">{inline_html(section.lead)}</p>')
        if section.text:
            md += [section.text, ""]
            body.append(f"<p>{inline_html(section.text)}</p>")
        if section.rows:
            md += [markdown_table(section.columns, section.rows), ""]
            body.append(_html_table(section.columns, section.rows))
        for stem, figure in section.figures.items():
            png = _png(figure)
            rendered[out / f"{stem}.png"] = png
            md += [f"![{stem}]({stem}.png)", ""]
            body.append(f'<img alt="{html.escape(stem)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
        if section.examples:
            md += [f"> {CONTENT_WARNING}", "", "<details><summary>Show examples</summary>", ""]
            body.append(f'<p class="warning">{html.escape(CONTENT_WARNING)}</p><details><summary>Show examples</summary>')
            for ex in section.examples:
                md += [f"**{ex.condition}** ({ex.verdict}): {ex.prompt}", "", "```text", ex.response, "```", ""]
                body.append(
                    f"<p><b>{html.escape(ex.condition)}</b> ({html.escape(ex.verdict)}): {html.escape(ex.prompt)}</p>"
                    f"<pre>{html.escape(ex.response)}</pre>"
                )
            md += ["</details>", ""]
            body.append("</details>")
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )
    rendered[out / "report.md"] = "\n".join(md).encode()
    rendered[out / "report.html"] = page.encode()
    for path, data in rendered.items():
        atomic_write_bytes(path, data)
    return out / "report.md", out / "report.html"
