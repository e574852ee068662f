import json

import matplotlib.figure
import pytest

import quada.engine.plan as engine_module
from quada.analysis.sweep import (
    SweepConfig,
    SweepPoint,
    SweepResult,
    most_vulnerable,
    refinement_points,
    spec_at,
    sweep,
)
from quada.approx import parse_spec, parse_technique
from quada.errors import QuadaError
from quada.report.sweep import point_label, sweep_figure
from quada.stats.metrics import Estimate
from quada.store import Generation, Judgement, Store

BASE = "noise:site=up,dist=gaussian"
NOISE = parse_technique(BASE, "std", 0.1)


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
    spec = str(spec_at(NOISE, "std", strength))
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


def test_a_killed_sweep_writes_no_results(inputs, tmp_path, monkeypatch):
    # How a killed run resumes is tested once, on the engine (tests/engine/test_engine.py).
    monkeypatch.setattr(engine_module, "generate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        sweep(config(inputs, tmp_path / "split"), progress=False)
    assert not (tmp_path / "split" / "report.html").exists() and not (tmp_path / "split" / "sweep.json").exists()


def test_a_rerun_of_a_sweep_computes_nothing_new(inputs, tmp_path, monkeypatch):
    first = sweep(config(inputs, tmp_path / "run"), progress=False)
    monkeypatch.setattr(engine_module, "generate", lambda *a, **k: pytest.fail("generated again"))
    monkeypatch.setattr(engine_module, "windows_perplexity", lambda *a, **k: pytest.fail("measured again"))
    again = sweep(config(inputs, tmp_path / "run"), progress=False)
    assert [(p.spec, p.asr, p.perplexity) for p in again.points] == [(p.spec, p.asr, p.perplexity) for p in first.points]


def test_refinement_evaluates_the_bisection_midpoints(inputs, tmp_path):
    grid_only = sweep(config(inputs, tmp_path / "run"), progress=False)
    expected = refinement_points(grid_only.points, grid_only.clean_perplexity, 1.5)
    assert expected
    refined = sweep(config(inputs, tmp_path / "run", refine=1), progress=False)
    assert [p.strength for p in refined.points] == sorted([0.0, 0.5, 1.0, *expected])
    assert refined.mva == most_vulnerable(refined.points, refined.clean_perplexity, 1.5)


VARIANTS = ("bolt", "nexus", "paper:iron")


def test_a_variant_sweep_measures_the_clean_model_and_each_variant_once(inputs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    result = sweep(config(inputs, run, variants=VARIANTS, refine=2), progress=False)
    iron = str(parse_spec("paper:iron"))
    assert [p.spec for p in result.points] == ["none", "bolt", "nexus", iron]
    assert [p.strength for p in result.points] == [0.0, 1.0, 2.0, 3.0]  # positions; refine is not used
    assert [point_label(result.config, p) for p in result.points] == ["clean", "bolt", "nexus", "paper:iron"]
    assert all(p.perplexity != result.clean_perplexity for p in result.points[1:])
    assert result.mva == most_vulnerable(result.points, result.clean_perplexity, 1.5)
    generations, _ = stored(run)
    assert sorted({g.key.approx for g in generations}) == sorted(["none", "bolt", "nexus", iron])
    assert len(generations) == 4 * 5
    assert json.loads((run / "sweep.json").read_text())["config"]["variants"] == ["bolt", "nexus", iron]
    html = result.report_html.read_text()
    assert "over the variants" in html and "paper:iron" in html
    monkeypatch.setattr(engine_module, "generate", lambda *a, **k: pytest.fail("generated again"))
    again = sweep(config(inputs, run, variants=VARIANTS), progress=False)
    assert [(p.spec, p.asr, p.perplexity) for p in again.points] == [(p.spec, p.asr, p.perplexity) for p in result.points]


def test_the_mva_of_a_variant_list_is_its_most_harmful_variant_within_the_bound():
    variants = SweepConfig(variants=("bolt", "nexus", "puma", "iron"))
    points = [SweepPoint(s, spec, Estimate(asr, 0, 1, 20), ppl) for s, spec, asr, ppl in zip(
        [0.0, 1.0, 2.0, 3.0, 4.0], ["none", "bolt", "nexus", "puma", "iron"],
        [0.1, 0.3, 0.6, 0.9, 0.6], [10.0, 11.0, 12.0, 40.0, 14.0])]
    mva = most_vulnerable(points, 10.0, variants.ppl_bound)
    assert mva.spec == "nexus"  # puma does more harm but breaks the model; the tie with iron goes to the earlier
    result = SweepResult(variants, points, 10.0, mva, None, None, None)
    asr_ax, _ = sweep_figure({"before": result, "after": result}).axes
    assert [t.get_text() for t in asr_ax.get_xticklabels()] == ["clean", "bolt", "nexus", "puma", "iron"]
    assert asr_ax.get_xlabel() == "approximation variant"


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
    assert spec_at(NOISE, "std", 0) == "none"
    assert str(spec_at(NOISE, "std", 0.05)) == f"{BASE},std=0.05"
    assert str(spec_at(parse_technique("teal", "sparsity", 0.9), "sparsity", 0.5)) == "teal:sparsity=0.5"
    assert str(spec_at(parse_spec("smoothquant"), "bits", 4.0)) == "smoothquant:bits=4"


def test_the_sweep_parses_its_spec_once_and_replaces_the_swept_option(monkeypatch):
    swept = SweepConfig(spec="smoothquant:alpha=1e+0", parameter="bits", grid=(0, 4, 8))  # '+' of an exponent
    monkeypatch.setattr("quada.approx.base.parse_spec", lambda *a, **k: pytest.fail("parsed again"))
    points = swept.first_points()
    assert [str(a) for _, a in points] == ["none", "smoothquant:bits=4,alpha=1.0", "smoothquant:alpha=1.0"]
    assert all(a == parse_technique("smoothquant:alpha=1", "bits", s) for s, a in points[1:])


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
        (dict(spec="paper:bolt"), "one technique"),
        (dict(spec="smoothquant", parameter="bits", grid=(0, 4.5)), "bits=4.5 of smoothquant must be a whole number"),
        (dict(parameter="layers"), "layers of noise is not a number"),
        (dict(ppl_bound=0.5), "at least 1"),
        (dict(refine=-1), "refine must be"),
        (dict(judges=("harmfulness",)), "first judge decides the ASR"),
        (dict(judges=("keyword", "oracle")), "unknown judge 'oracle'"),
        (dict(limit=0), "limit must be at least 1"),
        (dict(prompt_format="shouty"), "unknown prompt format"),
        (dict(variants=("bolt", "warp-drive")), "unknown approximation 'warp-drive'"),
        (dict(variants=("bolt", "nexus", "bolt")), "repeat a spec"),
    ],
)
def test_bad_configuration_fails_before_any_work(inputs, tmp_path, overrides, message):
    with pytest.raises(QuadaError, match=message):
        config(inputs, tmp_path / "run", **overrides)
    assert not (tmp_path / "run").exists()
