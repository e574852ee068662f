"""Error profiling and the ``quada approx`` commands."""

import pytest
from typer.testing import CliRunner

import quada.models
from quada.approx import parse_spec, profile
from quada.approx_cli import app
from quada.errors import QuadaError
from quada.testing import tiny_model

PROMPTS = ["Give three tips for staying healthy.", "Write a haiku about the sea.", "What is a prime number?"]


def by_site(result, site):
    return [row for row in result.rows if row.site == site]


def test_profile_recovers_the_noise_it_injects():
    model, tokenizer = tiny_model("llama")
    spec = "noise:site=up,dist=gaussian,std=0.05 + noise:site=down,dist=laplace,scale=0.02"
    result = profile(model, tokenizer, spec, PROMPTS)
    assert {(r.layer, r.site) for r in result.rows} == {(i, s) for i in (0, 1) for s in ("up:attn", "up:mlp", "o", "down")}
    for row in by_site(result, "up:attn") + by_site(result, "up:mlp"):
        assert abs(row.std / 0.05 - 1) < 0.05 and abs(row.mean) < 0.005
    for row in by_site(result, "down"):
        assert abs(row.laplace_scale / 0.02 - 1) < 0.05
    assert all(row.std == 0 for row in by_site(result, "o"))
    up, down = parse_spec(result.equivalent_noise()).parts()
    assert (up.site, up.dist, down.site, down.dist) == ("up", "gaussian", "down", "laplace")
    assert abs(up.std / 0.05 - 1) < 0.05 and abs(down.scale / 0.02 - 1) < 0.05


def test_profile_localises_real_techniques_to_their_sites():
    model, tokenizer = tiny_model("qwen2")
    poly = profile(model, tokenizer, "puma", PROMPTS)
    assert all(r.std == 0 for r in poly.rows if r.site != "down")
    assert all(0 < r.relative_error < 0.1 for r in by_site(poly, "down"))

    a8, a4 = (profile(model, tokenizer, f"smoothquant:bits={b}", PROMPTS) for b in (8, 4))
    for row8, row4 in zip(a8.rows, a4.rows):
        assert 0 < row8.relative_error < 0.05  # errors in original coordinates: scales multiplied back
        assert row4.std > 4 * row8.std

    teal = profile(model, tokenizer, "teal:sparsity=0.5", PROMPTS)
    assert all(0.15 < r.sparsity < 0.35 for r in teal.rows)  # half the tokens, half their entries
    assert teal.spec == "teal:sparsity=0.5,layers=0:2"


def run(*args):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_cli_lists_every_spec():
    result = run("list")
    assert result.exit_code == 0
    for name in ("noise", "teal", "cats", "smoothquant", "omniquant", "bolt", "iron", "paper:teal-90", "paper:omniquant-a4"):
        assert name in result.output


def test_cli_profile_prints_a_table_and_the_equivalent_noise(monkeypatch):
    monkeypatch.setattr(quada.models, "load", lambda source, **_: tiny_model("llama"))
    result = run("profile", "--model", "tiny", "--spec", "bolt", "--layers", "1", "--limit", "2")
    assert result.exit_code == 0, result.output
    assert "up:attn" in result.output and "down" in result.output
    assert "equivalent paper-style noise: noise:site=up,dist=gaussian,std=0 + noise:site=down" in result.output


def test_cli_profile_raises_user_errors_before_loading(monkeypatch):
    monkeypatch.setattr(quada.models, "load", lambda source, **_: pytest.fail("loaded a model for a bad spec"))
    result = run("profile", "--model", "tiny", "--spec", "teal:sparsity=2")
    assert isinstance(result.exception, QuadaError) and "[0, 1)" in str(result.exception)
