"""One report per run folder: the vetting and every analysis that wrote its results there.

`quada vet`, `quada sweep`, `quada layers` and `quada clusters` each save their results as JSON
in the run folder (``results.json``, ``sweep.json``, ``layers.json``, ``clusters.json``) and then
rewrite the folder's ``report.md`` / ``report.html`` from all of them, so one page tells the whole
story of a model: how unsafe each approximation makes it, where safety breaks along the strength,
which layers carry it, and how the activations move.
"""

from __future__ import annotations

import json
from pathlib import Path

from quada.report import clusters, layers, sweep, vet
from quada.report.render import write_report

# (name, results file, its sections), in the order of the page.
PARTS = (
    ("vet", vet.RESULTS_FILE, vet.report_sections),
    ("sweep", sweep.POINTS_FILE, sweep.report_sections),
    ("layers", layers.RESULTS_FILE, layers.report_sections),
    ("clusters", clusters.RESULTS_FILE, clusters.report_sections),
)


def write_story(run_dir: str | Path) -> tuple[Path, Path]:
    """Rewrite ``report.md`` and ``report.html`` of ``run_dir`` from every results file in it."""
    run_dir = Path(run_dir)
    names, models, summaries, sections = [], [], [], []
    for name, file_name, report_sections in PARTS:
        path = run_dir / file_name
        if not path.is_file():
            continue
        saved = json.loads(path.read_text())
        names.append(name)
        models.append(saved["config"]["model"])
        summaries.append(saved.get("summary", ""))  # results files of older versions have none
        sections += report_sections(saved, run_dir)
    title = f"quada {' + '.join(names)}: {', '.join(dict.fromkeys(models))}"
    summary = summaries[0] if len(summaries) == 1 else " ".join(f"{n}: {s}" for n, s in zip(names, summaries))
    return write_report(run_dir, title, summary, sections)
