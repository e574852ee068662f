import matplotlib.pyplot as plt
import pytest

from quada.errors import QuadaError
from quada.report import CONTENT_WARNING, Example, Section, write_report


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
