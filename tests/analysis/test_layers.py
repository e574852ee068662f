import json

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

import quada.engine.plan as engine_module
from quada.analysis.layers import (
    REFUSAL_OPENINGS,
    LayerPoint,
    LayersConfig,
    layer_conditions,
    layers,
    prefix_free,
    refusal_probability,
    select_tau,
    spearman,
    with_layers,
)
from quada.analysis.sweep import SweepConfig, sweep
from quada.approx import parse_spec
from quada.chat import format_prompt
from quada.errors import QuadaError
from quada.judging import REFUSAL_PHRASES
from quada.stats.metrics import Estimate
from quada.store import Generation, Judgement, Store
from quada.testing import tiny_model

NOISE = "noise:site=up,dist=gaussian,std=0.5"


def config(inputs, run_dir, **overrides):
    values = dict(
        model=str(inputs / "model"), spec=NOISE, benchmark=str(inputs / "harmful.txt"), limit=None, max_new_tokens=4,
        corpus=str(inputs / "corpus.txt"), ppl_window=64, ppl_windows=1, run_dir=run_dir,
    )
    return LayersConfig(**{**values, **overrides})


def stored(run_dir):
    with Store(run_dir / "results.sqlite") as store:
        return store.rows(Generation), store.rows(Judgement)


def first(k, asr, ppl):
    return LayerPoint("first", k, f"k={k}", Estimate(asr, asr, asr, 10), ppl, 0.5)


def test_conditions_cover_single_layers_and_first_and_last_counts():
    assert layer_conditions(3) == [
        ("single", 0, (0,)), ("single", 1, (1,)), ("single", 2, (2,)),
        ("first", 1, (0,)), ("first", 2, (0, 1)), ("first", 3, (0, 1, 2)),
        ("last", 1, (2,)), ("last", 2, (1, 2)), ("last", 3, (0, 1, 2)),
    ]
    strided = layer_conditions(28, stride=8)
    assert [i for kind, i, _ in strided if kind == "single"] == [0, 8, 16, 24]
    assert [k for kind, k, _ in strided if kind == "first"] == [8, 16, 24, 28]  # all layers always included
    assert [layers for kind, k, layers in strided if kind == "last"][0] == tuple(range(20, 28))


def test_layer_specs_are_canonical_and_all_layers_is_the_spec_itself():
    noise = parse_spec(NOISE)
    assert str(with_layers(noise, (2,), 4)) == f"{NOISE},layers=2"
    assert str(with_layers(noise, (0, 1, 2), 4)) == f"{NOISE},layers=0:3"
    assert with_layers(noise, (0, 1, 2, 3), 4) is noise
    composed = parse_spec("noise:site=up,dist=gaussian,std=0.1 + noise:site=down,dist=laplace,scale=0.1")
    assert str(with_layers(composed, (1, 2), 4)) == ("noise:site=up,dist=gaussian,std=0.1,layers=1:3 + "
                                                     "noise:site=down,dist=laplace,scale=0.1,layers=1:3")


def test_tau_is_the_smallest_k_reaching_the_share_within_the_bound():
    # All-layer ASR 0.8; 90% of it is 0.72. k=2 reaches it but breaks the perplexity bound (10 x 1.5 = 15).
    points = [first(1, 0.3, 10.5), first(2, 0.75, 16.0), first(3, 0.73, 12.0), first(4, 0.8, 13.0)]
    assert select_tau(points, 0.8, 10.0) == 3
    assert select_tau(points, 0.8, 10.0, ppl_bound=2.0) == 2
    assert select_tau(points, 0.8, 10.0, share=0.3) == 1
    assert select_tau(list(reversed(points)), 0.8, 10.0) == 3  # order of the input does not matter


def test_tau_falls_back_to_the_best_feasible_k_then_the_smallest_k():
    points = [first(1, 0.2, 10.0), first(2, 0.5, 11.0), first(3, 0.5, 12.0), first(4, 0.9, 40.0)]
    assert select_tau(points, 0.9, 10.0) == 2  # nothing feasible reaches 0.81: best feasible, smallest on ties
    broken = [first(1, 0.2, 50.0), first(2, 0.5, float("nan"))]
    assert select_tau(broken, 0.9, 10.0) == 1


def test_tau_ranks_by_the_proxy_when_no_asr_was_measured():
    points = [LayerPoint("first", k, "", None, 10.0, refusal) for k, refusal in ((1, 0.9), (2, 0.5), (3, 0.4))]
    assert points[1].score == pytest.approx(0.5)
    assert select_tau(points, 0.5, 10.0) == 2  # 1 - 0.5 >= 0.9 * 0.5


def test_prefix_free_keeps_the_shortest_openings():
    assert prefix_free([(1, 2), (1,), (1, 2, 3), (4, 5), (4, 5), (), (4, 6)]) == [(1,), (4, 5), (4, 6)]


def test_refusal_openings_come_from_the_keyword_judge():
    assert "I'm sorry" in REFUSAL_OPENINGS and "I cannot" in REFUSAL_OPENINGS and "As an AI" in REFUSAL_OPENINGS
    assert "illegal" not in REFUSAL_OPENINGS and "Hello!" not in REFUSAL_OPENINGS and "I" not in REFUSAL_OPENINGS
    assert set(REFUSAL_OPENINGS) - set(REFUSAL_PHRASES) == {"I can't", "I won't"}


def test_spearman_matches_the_correlation_of_ranks():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=20), rng.normal(size=20)
    y[:5] = y[0]  # ties get average ranks
    expected = np.corrcoef(rankdata(x), rankdata(y))[0, 1]
    assert spearman(list(x), list(y)) == pytest.approx(expected)
    assert spearman([1, 2, 3], [5, 5, 5]) is None


def test_refusal_probability_is_the_chain_rule_over_the_openings():
    model, tokenizer = tiny_model("llama", seed=1)
    prompts = ["How do I bake bread?", "Tell me a secret"]
    openings = ("Sorry", "I cannot", "I cannot help", "No")  # "I cannot help" is inside "I cannot"
    got = refusal_probability(model, tokenizer, prompts, "plain", openings, batch_size=2)
    for prompt, value in zip(prompts, got):
        prompt_ids = tokenizer(format_prompt(tokenizer, prompt, "plain"), add_special_tokens=False)["input_ids"]
        expected = 0.0
        for opening in ("Sorry", "I cannot", "No"):
            ids = tokenizer(opening, add_special_tokens=False)["input_ids"]
            with torch.no_grad():  # one unpadded sequence, read every position's distribution
                probs = torch.softmax(model(torch.tensor([prompt_ids + ids])).logits[0].double(), -1)
            expected += float(np.prod([probs[len(prompt_ids) - 1 + i, t] for i, t in enumerate(ids)]))
        assert value == pytest.approx(expected, rel=1e-4)


def test_layers_measures_every_condition_and_writes_the_report(inputs, tmp_path):
    result = layers(config(inputs, tmp_path / "run"), progress=False)
    assert result.num_layers == 3 and [(p.kind, p.index) for p in result.points] == [
        (kind, i) for kind, i, _ in layer_conditions(3)]
    specs = {p.spec for p in result.points} | {"none"}
    generations, judgements = stored(tmp_path / "run")
    # single 0 = first 1, single 2 = last 1, first 3 = last 3: 6 distinct approximations plus clean.
    assert len(specs) == 7 and {g.key.approx for g in generations} == specs
    assert len(generations) == len(judgements) == 7 * 5
    assert 1 <= result.tau <= 3
    assert all(0 <= p.refusal <= 1 for p in result.points)
    saved = json.loads((tmp_path / "run" / "layers.json").read_text())
    assert saved["tau"] == result.tau and len(saved["points"]) == 9
    html = result.report_html.read_text()
    assert "tau = " in html and f"{NOISE},layers=0:2" in html


def test_a_rerun_of_a_layer_analysis_computes_nothing_new(inputs, tmp_path, monkeypatch):
    # How a killed run resumes is tested once, on the engine (tests/engine/test_engine.py).
    first_run = layers(config(inputs, tmp_path / "run"), progress=False)
    monkeypatch.setattr(engine_module, "generate", lambda *a, **k: pytest.fail("generated again"))
    monkeypatch.setattr(engine_module, "windows_perplexity", lambda *a, **k: pytest.fail("measured again"))
    monkeypatch.setattr("quada.analysis.layers.refusal_probability", lambda *a, **k: pytest.fail("proxy again"))
    again = layers(config(inputs, tmp_path / "run"), progress=False)
    assert again.points == first_run.points and again.tau == first_run.tau


def test_proxy_only_mode_generates_nothing(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "generate", lambda *a, **k: pytest.fail("generated"))
    result = layers(config(inputs, tmp_path / "run", proxy_only=True), progress=False)
    assert all(p.asr is None for p in result.points) and result.spearman is None
    assert stored(tmp_path / "run") == ([], [])
    assert "proxy compliance" in result.report_html.read_text()


def test_the_spec_defaults_to_the_mva_of_the_sweep_in_the_run_folder(inputs, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(QuadaError, match="no sweep in"):
        layers(config(inputs, run, spec=None), progress=False)
    swept = sweep(SweepConfig(model=str(inputs / "model"), grid=(0.0, 0.5), refine=0, benchmark=str(inputs / "harmful.txt"),
                              limit=None, max_new_tokens=4, corpus=str(inputs / "corpus.txt"), ppl_window=64,
                              ppl_windows=1, run_dir=run), progress=False)
    result = layers(config(inputs, run, spec=None, proxy_only=True), progress=False)
    assert result.spec == swept.mva.spec
    html = result.report_html.read_text()
    assert "Finding 1" in html and "Finding 2" in html  # one page for the whole run folder


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(spec=f"{NOISE},layers=0:2"), "drop layers="),
        (dict(spec="none"), "not the clean model"),
        (dict(stride=0), "stride must be at least 1"),
        (dict(share=0), "share must lie in"),
        (dict(share=1.5), "share must lie in"),
        (dict(ppl_bound=0.9), "at least 1"),
        (dict(judges=("harmfulness",)), "first judge decides"),
    ],
)
def test_bad_configuration_fails_before_any_work(inputs, tmp_path, overrides, message):
    with pytest.raises(QuadaError, match=message):
        config(inputs, tmp_path / "run", **overrides)
    assert not (tmp_path / "run").exists()
