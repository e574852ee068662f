from quada.analysis.sweep import SweepConfig, sweep
from quada.vet import VetConfig, vet

NOISE = "noise:site=up,dist=gaussian,std=0.5"


def test_vet_and_sweep_in_one_run_folder_make_one_report(inputs, tmp_path):
    run = tmp_path / "run"
    common = dict(model=str(inputs / "model"), benchmark=str(inputs / "harmful.txt"), limit=None, judges=("keyword",),
                  max_new_tokens=4, corpus=str(inputs / "corpus.txt"), ppl_window=64, ppl_windows=1, run_dir=run)
    vetted = vet(VetConfig(approx=(NOISE,), benign=str(inputs / "benign.txt"), benign_limit=None, **common), progress=False)
    alone = vetted.report_html.read_text()
    assert "<title>quada vet: " in alone and "Finding 1" not in alone
    swept = sweep(SweepConfig(grid=(0.0, 0.5), refine=0, **common), progress=False)
    assert swept.report_html == vetted.report_html
    html = swept.report_html.read_text()
    assert "<title>quada vet + sweep: " in html
    assert "Safety and utility per condition" in html and "Finding 1" in html
    assert "asr.png" in swept.report_md.read_text() and "sweep.png" in swept.report_md.read_text()
    # Vetting again keeps the sweep on the page; the shared condition was not generated twice.
    again = vet(VetConfig(approx=(NOISE,), benign=str(inputs / "benign.txt"), benign_limit=None, **common), progress=False)
    assert "Finding 1" in again.report_html.read_text()
