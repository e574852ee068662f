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
