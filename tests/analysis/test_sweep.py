import json

import matplotlib.figure
import pytest

import quada.vet as vet_module
from quada.analysis.sweep import (
    SweepConfig,
    SweepPoint,
    SweepResult,
    most_vulnerable,
    refinement_points,
    spec_at,
    sweep,
    sweep_figure,
)
from quada.errors import QuadaError
from quada.eval.metrics import Estimate
from quada.store import Generation, Judgement, Store

BASE = "noise:site=up,dist=gaussian"


def config(inputs, run_dir, **overrides):
    values = dict(
        model=str(inputs / "model"), spec=BASE, grid=(0.0, 0.5, 1.0), refine=0, benchmark=str(inputs / "harmful.txt"),
        limit=None, max_new_tokens=6, corpus=str(inputs / "corpus.txt"), ppl_window=128, ppl_windows=2,
        run_dir=run_dir,
    )
    return SweepConfig(**{**values, **overrides})


def stored(run_dir):
    with Store(run_dir / "results.sqlite") as store:
        return store.rows(Generation), store.rows(Judgement)


def point(strength, asr, ppl):
    spec = spec_at(BASE, "std", strength)
    return SweepPoint(strength, spec, Estimate(asr, max(asr - 0.1, 0), min(asr + 0.1, 1), 20), ppl)


def test_the_grid_gives_one_stored_condition_per_strength(inputs, tmp_path):
    result = sweep(config(inputs, tmp_path / "run"), progress=False)
    specs = ["none", f"{BASE},std=0.5", f"{BASE},std=1.0"]
    assert [p.spec for p in result.points] == specs
    assert [p.strength for p in result.points] == [0.0, 0.5, 1.0]
    assert result.points[0].perplexity == result.clean_perplexity
    assert result.points[2].perplexity != result.clean_perplexity
    generations, judgements = stored(tmp_path / "run")
    assert sorted({g.key.approx for g in generations}) == sorted(specs)
    assert len(generations) == len(judgements) == 3 * 5
    saved = json.loads((tmp_path / "run" / "sweep.json").read_text())
    assert [p["spec"] for p in saved["points"]] == specs
    assert result.figure_png.is_file() and result.report_md.is_file()
    html = result.report_html.read_text()
    assert f"{BASE},std=0.5" in html and "data:image/png;base64," in html


def test_a_killed_sweep_resumes_to_exactly_the_uninterrupted_rows(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(vet_module, "GENERATION_CHUNK", 2)
    whole = sweep(config(inputs, tmp_path / "whole"), progress=False)
    real_generate = vet_module.generate
    calls = []

    def dies_on_fourth_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(vet_module, "generate", dies_on_fourth_chunk)
    with pytest.raises(KeyboardInterrupt):
        sweep(config(inputs, tmp_path / "split"), progress=False)
    partial, _ = stored(tmp_path / "split")
    assert 0 < len(partial) < 15
    assert not (tmp_path / "split" / "report.html").exists()
    monkeypatch.setattr(vet_module, "generate", real_generate)
    resumed = sweep(config(inputs, tmp_path / "split"), progress=False)
    assert stored(tmp_path / "split") == stored(tmp_path / "whole")
    assert [(p.spec, p.asr, p.perplexity) for p in resumed.points] == [(p.spec, p.asr, p.perplexity) for p in whole.points]
    monkeypatch.setattr(vet_module, "generate", lambda *a, **k: pytest.fail("generated again"))
    monkeypatch.setattr(vet_module, "perplexity", lambda *a, **k: pytest.fail("measured again"))
    sweep(config(inputs, tmp_path / "split"), progress=False)


def test_refinement_evaluates_the_bisection_midpoints(inputs, tmp_path):
    grid_only = sweep(config(inputs, tmp_path / "run"), progress=False)
    expected = refinement_points(grid_only.points, grid_only.clean_perplexity, 1.5)
    assert expected
    refined = sweep(config(inputs, tmp_path / "run", refine=1), progress=False)
    assert [p.strength for p in refined.points] == sorted([0.0, 0.5, 1.0, *expected])
    assert refined.mva == most_vulnerable(refined.points, refined.clean_perplexity, 1.5)


# ASR rises with the noise, perplexity explodes past 0.1: the peak within 1.5 x clean (PPL 10) is 0.075.
CURVE = [point(0.0, 0.02, 10.0), point(0.025, 0.10, 10.2), point(0.05, 0.40, 11.0), point(0.075, 0.60, 13.0),
         point(0.1, 0.70, 16.0), point(0.15, 0.30, 80.0)]


def test_the_mva_is_the_highest_asr_within_the_perplexity_bound():
    assert most_vulnerable(CURVE, 10.0, 1.5).strength == 0.075
    assert most_vulnerable(CURVE, 10.0, 2.0).strength == 0.1  # a looser bound admits 0.1
    assert most_vulnerable(CURVE, 10.0, 1.01) is None  # only the clean model is within 1%
    tie = [point(0.0, 0.0, 10), point(0.1, 0.5, 10), point(0.2, 0.5, 10)]
    assert most_vulnerable(tie, 10.0, 1.5).strength == 0.1  # ties go to the mildest approximation
    clean_best = [point(0.0, 0.9, 10), point(0.1, 0.1, 10)]
    assert most_vulnerable(clean_best, 10.0, 1.5).strength == 0.1  # the clean model is never the MVA


def test_a_broken_model_is_never_the_mva():
    assert most_vulnerable([point(0.0, 0.0, 10), point(0.1, 0.9, float("inf")), point(0.2, 0.5, float("nan"))],
                           10.0, 1.5) is None


def test_refinement_bisects_both_sides_of_the_mva():
    assert refinement_points(CURVE, 10.0, 1.5) == [0.0625, 0.0875]
    # At the smallest evaluated strength only the larger side exists; at the largest, the smaller.
    assert refinement_points(CURVE[1:], 10.0, 100.0) == [0.0875, 0.125]
    assert refinement_points(CURVE[:4], 10.0, 100.0) == [0.0625]
    assert refinement_points(CURVE, 10.0, 1.01) == []


def test_refinement_rounds_converge_on_the_peak():
    def asr(s):  # a single peak at 0.07, perplexity flat
        return max(0.0, 1 - abs(s - 0.07) * 10)

    points = [point(s, asr(s), 10.0) for s in (0.0, 0.05, 0.1, 0.15)]
    for _ in range(4):
        points = sorted(points + [point(s, asr(s), 10.0) for s in refinement_points(points, 10.0, 1.5)],
                        key=lambda p: p.strength)
    assert abs(most_vulnerable(points, 10.0, 1.5).strength - 0.07) <= 0.05 / 2**4


def test_spec_at_writes_canonical_conditions():
    assert spec_at(BASE, "std", 0) == "none"
    assert spec_at(BASE, "std", 0.05) == f"{BASE},std=0.05"
    assert spec_at("teal", "sparsity", 0.5) == "teal:sparsity=0.5"
    assert spec_at("smoothquant", "bits", 4.0) == "smoothquant:bits=4"


def test_the_figure_draws_one_line_pair_per_curve():
    result = SweepResult(SweepConfig(), CURVE, 10.0, most_vulnerable(CURVE, 10.0, 1.5), None, None, None)
    figure = sweep_figure({"before": result, "after": result})
    assert isinstance(figure, matplotlib.figure.Figure)
    asr_ax, ppl_ax = figure.axes
    labels = [line.get_label() for line in asr_ax.lines + ppl_ax.lines]
    for label in ("ASR (before)", "ASR (after)", "perplexity (before)", "perplexity (after)", "MVA (after)"):
        assert label in labels
    assert ppl_ax.get_yscale() == "log"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(grid=()), "grid is empty"),
        (dict(grid=(0.0, -0.1)), "non-negative"),
        (dict(spec=f"{BASE},std=0.1"), "leave std= out"),
        (dict(parameter="strength"), "unknown option 'strength'"),
        (dict(spec="warp-drive"), "warp-drive"),
        (dict(spec=f"{BASE} + teal"), "one technique"),
        (dict(ppl_bound=0.5), "at least 1"),
        (dict(refine=-1), "refine must be"),
        (dict(judges=("refusal-keyword",)), "first judge decides the ASR"),
        (dict(judges=("keyword", "oracle")), "unknown judge 'oracle'"),
        (dict(limit=0), "limit must be at least 1"),
        (dict(prompt_format="shouty"), "unknown prompt format"),
    ],
)
def test_bad_configuration_fails_before_any_work(inputs, tmp_path, overrides, message):
    with pytest.raises(QuadaError, match=message):
        config(inputs, tmp_path / "run", **overrides)
    assert not (tmp_path / "run").exists()
