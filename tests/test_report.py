from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from quada.errors import QuadaError
from quada.report.render import CONTENT_WARNING, Example, Section, write_report
from quada.report.story import write_story
from quada.runs import write_json


def test_report_is_markdown_plus_self_contained_html(tmp_path):
    figure, ax = plt.subplots()
    ax.bar(["clean", "noisy"], [0.1, 0.5])
    section = Section(
        "Safety",
        text="ASR per condition.",
        columns=["condition", "ASR"],
        rows=[["clean", "10%"], ["a|b", "50%"]],
        figures={"asr": figure},
        examples=[Example("noisy", "a <request>", "a <b>response</b>", "attack")],
    )
    md_path, html_path = write_report(tmp_path / "r", "Title", "Summary.", [section])
    md, page = md_path.read_text(), html_path.read_text()
    assert "| clean | 10% |" in md and "a\\|b" in md and "![asr](asr.png)" in md
    assert (tmp_path / "r" / "asr.png").read_bytes().startswith(b"\x89PNG")
    assert "data:image/png;base64," in page and "src=\"asr.png\"" not in page
    assert CONTENT_WARNING in md and "<details>" in page
    # Responses are escaped, never rendered as markup.
    assert "a &lt;b&gt;response&lt;/b&gt;" in page
    assert not list((tmp_path / "r").glob("*.partial"))


def test_unwritable_report_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(QuadaError, match="cannot create the report folder"):
        write_report(blocker / "r", "T", "S", [])


def sweep_results(config: dict) -> dict:
    def point(strength, spec, asr, ppl):
        return {"strength": strength, "spec": spec, "asr": {"value": asr, "low": 0.0, "high": 1.0, "n": 4},
                "perplexity": ppl}

    mva = point(0.05, "noise:site=up,dist=gaussian,std=0.05", 0.5, 11.0)
    return {"config": config, "summary": "A sweep.", "clean_perplexity": 10.0,
            "points": [point(0.0, "none", 0.25, 10.0), mva], "mva": mva}


def test_a_run_folder_page_is_drawn_from_its_results_files_alone(tmp_path):
    # The saved configuration is read, not rebuilt: an option this version no longer knows and the
    # folder the run was written in (since moved) do not matter.
    config = {"model": "m", "spec": "noise:site=up,dist=gaussian", "parameter": "std", "variants": [],
              "ppl_bound": 1.5, "refine": 0, "run_dir": "/elsewhere", "retired_option": 1}
    run = tmp_path / "moved"
    run.mkdir()
    write_json(run / "sweep.json", sweep_results(config))
    md, html = write_story(run)
    assert (md, html) == (run / "report.md", run / "report.html")
    page = html.read_text()
    assert "<title>quada sweep: m</title>" in page and "Finding 1" in page
    assert "| 0.05 | noise:site=up,dist=gaussian,std=0.05 | 50.0 [0.0, 100.0] |" in md.read_text()
    assert (run / "sweep.png").read_bytes().startswith(b"\x89PNG")


def test_html_cells_align_by_content_and_render_markdown_marks():
    from quada.report.render import inline_html, _html_table

    table = _html_table(["condition", "ASR % [95% CI]"], [["teal sparsity=0.5", "35.4 [26.6, 45.4]"], ["*bold*", "-"]])
    assert '<td>teal sparsity=0.5</td><td class="num">35.4 [26.6, 45.4]</td>' in table
    assert '<td><em>bold</em></td><td class="num">-</td>' in table
    assert inline_html("*breaks safety* by `llm` & **all**") == (
        "<em>breaks safety</em> by <code>llm</code> &amp; <strong>all</strong>")


CHROMIUM = next((path for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(path).exists()), None)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_a_vet_report_opens_in_a_browser_with_the_answer_first(tmp_path):
    """The page as a browser builds it: the verdicts in words before any table, numbers in cells of
    their own class; and a screenshot to read by eye (left in the test's folder)."""
    import subprocess

    from quada.testing import write_tiny_run_inputs
    from quada.vet import VetConfig, vet

    inputs = write_tiny_run_inputs(tmp_path / "in", harmful=[f"Harmful request {i}" for i in range(6)],
                                   benign=["Benign question?", "Another question?"])
    result = vet(VetConfig(model=str(inputs / "model"), approx=("noise:site=up,dist=gaussian,std=0.5",),
                           benchmark=str(inputs / "harmful.txt"), limit=None, benign=str(inputs / "benign.txt"),
                           benign_limit=None, judges=("keyword",), max_new_tokens=6, corpus=str(inputs / "corpus.txt"),
                           ppl_window=128, ppl_windows=1, run_dir=tmp_path / "run"), progress=False)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    url = result.report_html.resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    body = dom[dom.index("<body>"):]
    assert body.index('class="answer"') < body.index("<table>")
    assert "<strong>noise std=0.5</strong>" in body and 'class="num"' in body and "*" not in body.split("<h2>")[1]
    subprocess.run([CHROMIUM, *flags, "--window-size=1200,900", f"--screenshot={tmp_path / 'report.png'}", url],
                   capture_output=True, timeout=120, check=True)
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
