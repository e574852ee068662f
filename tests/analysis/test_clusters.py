import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import silhouette_score
from sklearn.metrics.pairwise import cosine_similarity
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import quada.analysis.clusters as clusters_module
from quada.analysis.clusters import (
    ClustersConfig,
    called_benign,
    centroid_distance,
    clusters,
    mean_cosine_to,
    pooled_activations,
    probe_accuracy,
    silhouette,
)
from quada.approx import apply
from quada.chat import format_prompt
from quada.errors import QuadaError
from quada.testing import tiny_model

NOISE = "noise:site=up,dist=gaussian,std=0.5"


def blobs(n_per_class, centres, spread, seed=0):
    rng = np.random.default_rng(seed)
    points = np.concatenate([rng.normal(c, spread, size=(n_per_class, len(c))) for c in centres])
    labels = np.repeat(np.arange(len(centres)), n_per_class)
    return points, labels


@pytest.mark.parametrize("spread", [0.3, 1.0, 3.0])
def test_silhouette_matches_scikit_learn(spread):
    points, labels = blobs(15, [(0, 0, 0), (3, 0, 1), (0, 4, 0)], spread)
    assert silhouette(points, labels) == pytest.approx(silhouette_score(points, labels), abs=1e-10)


def test_silhouette_gives_zero_to_a_point_alone_in_its_class():
    points, labels = blobs(6, [(0, 0), (5, 5)], 0.5)
    points, labels = np.vstack([points, [[10, -10]]]), np.append(labels, 2)
    assert silhouette(points, labels) == pytest.approx(silhouette_score(points, labels), abs=1e-10)


def test_probe_accuracy_matches_scikit_learn_cross_validation():
    points, labels = blobs(40, [np.zeros(8), np.full(8, 0.4)], 1.0, seed=1)
    reference = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)), points, labels,
                                cv=StratifiedKFold(5, shuffle=True, random_state=3))
    assert probe_accuracy(points, labels, folds=5, seed=3) == pytest.approx(reference.mean())
    separable, labels = blobs(20, [np.zeros(8), np.full(8, 5.0)], 0.5)
    assert probe_accuracy(separable, labels) == 1.0
    noise, labels = blobs(100, [np.zeros(8), np.zeros(8)], 1.0, seed=2)
    assert 0.3 < probe_accuracy(noise, labels) < 0.7


def test_centroid_distance_and_cosine_match_direct_computation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, size=(10, 5)), rng.normal(-1, 2, size=(7, 5))
    assert centroid_distance(a, b) == pytest.approx(np.sqrt(((a.mean(0) - b.mean(0)) ** 2).sum()))
    assert mean_cosine_to(a, b.mean(0)) == pytest.approx(cosine_similarity(a, b.mean(0)[None]).mean())


def test_the_clean_probe_calls_harmful_points_benign_once_they_moved():
    points, labels = blobs(30, [np.zeros(6), np.full(6, 4.0)], 0.5)  # class 0 benign, class 1 harmful
    harmful = points[labels == 1]
    assert called_benign(points, labels, harmful) == 0.0
    moved = harmful - 4.0  # onto the benign centroid
    assert called_benign(points, labels, moved) == 1.0
    assert called_benign(points, labels, np.concatenate([harmful, moved])) == 0.5


PROMPTS = ["Short one", "A rather longer prompt than the first", "Mid length prompt"]


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_residual_activations_equal_the_unbatched_hidden_states(pooling):
    model, tokenizer = tiny_model("qwen2", seed=0)
    hooks = hook_count(model)
    got = pooled_activations(model, tokenizer, PROMPTS, layer=0, pooling=pooling, prompt_format="plain", batch_size=2)
    assert got.shape == (3, 64) and hook_count(model) == hooks
    for prompt, row in zip(PROMPTS, got):
        ids = tokenizer(format_prompt(tokenizer, prompt, "plain"), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]  # after layer 0
        expected = hidden[-1] if pooling == "last" else hidden.mean(0)
        np.testing.assert_allclose(row, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_site_activations_see_the_approximation_and_hooks_are_removed():
    model, tokenizer = tiny_model("llama", seed=0)
    hooks = hook_count(model)
    clean = pooled_activations(model, tokenizer, PROMPTS, layer=1, site="down", prompt_format="plain")
    assert clean.shape == (3, 128)  # the input of down_proj: the MLP's intermediate width
    with apply(model, "noise:site=down,dist=gaussian,std=1.0", seed=0):
        noisy = pooled_activations(model, tokenizer, PROMPTS, layer=1, site="down", prompt_format="plain")
    assert np.abs(noisy - clean).mean() > 0.1
    again = pooled_activations(model, tokenizer, PROMPTS, layer=1, site="down", prompt_format="plain")
    np.testing.assert_array_equal(again, clean)
    assert hook_count(model) == hooks
    with pytest.raises(QuadaError, match="layer 5 is out of range"):
        pooled_activations(model, tokenizer, PROMPTS, layer=5)


def config(inputs, run_dir, **overrides):
    values = dict(model=str(inputs / "model"), spec=NOISE, harmful=str(inputs / "harmful.txt"),
                  benign=str(inputs / "benign.txt"), limit=None, folds=2, run_dir=run_dir)
    return ClustersConfig(**{**values, **overrides})


def test_clusters_measures_both_conditions_and_writes_the_report(inputs, tmp_path, monkeypatch):
    result = clusters(config(inputs, tmp_path / "run"), progress=False)
    assert result.layer == 1  # the middle of three layers
    clean, noisy = result.metrics
    assert clean.condition == "none" and noisy.condition == NOISE
    for m in result.metrics:
        assert -1 <= m.silhouette <= 1 and 0 <= m.probe_accuracy <= 1 and 0 <= m.harmful_called_benign <= 1
    assert set(result.pca) == {f"{k}|{c}" for k in ("harmful", "benign") for c in ("none", NOISE)}
    assert all(len(v) == 5 and len(v[0]) == 2 for v in result.tsne.values())
    saved = json.loads((tmp_path / "run" / "clusters.json").read_text())
    assert [m["condition"] for m in saved["metrics"]] == ["none", NOISE]
    html = result.report_html.read_text()
    assert "Finding 3" in html and html.count("data:image/png;base64,") == 2
    assert (tmp_path / "run" / "clusters_pca.png").is_file() and (tmp_path / "run" / "clusters_tsne.png").is_file()
    # A rerun reads the stored activations instead of capturing again.
    monkeypatch.setattr(clusters_module, "pooled_activations", lambda *a, **k: pytest.fail("captured again"))
    assert clusters(config(inputs, tmp_path / "run"), progress=False).metrics == result.metrics


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(site="attic"), "unknown site 'attic'"),
        (dict(pooling="max"), "unknown pooling 'max'"),
        (dict(folds=1), "folds must be at least 2"),
        (dict(limit=3, folds=5), "fewer prompts per class than the 5 folds"),
        (dict(spec="none"), "not the clean model"),
        (dict(spec="warp"), "unknown approximation 'warp'"),
        (dict(prompt_format="shouty"), "unknown prompt format"),
    ],
)
def test_bad_configuration_fails_before_any_work(inputs, tmp_path, overrides, message):
    with pytest.raises(QuadaError, match=message):
        config(inputs, tmp_path / "run", **overrides)
    assert not (tmp_path / "run").exists()


def test_a_layer_beyond_the_model_is_a_user_error(inputs, tmp_path):
    with pytest.raises(QuadaError, match="out of range"):
        clusters(config(inputs, tmp_path / "run", layer=7), progress=False)
