import json

import pytest

from quada.cli_options import parse_numbers
from quada.errors import QuadaError


def test_sweep_command_runs_the_grid_and_writes_the_report(cli, inputs, tmp_path):
    run = tmp_path / "run"
    result = cli("sweep", "--model", str(inputs / "model"), "--grid", "clean,0.5", "--refine", "0",
                   "--benchmark", str(inputs / "harmful.txt"), "--limit", "3", "--max-new-tokens", "4",
                   "--corpus", str(inputs / "corpus.txt"), "--ppl-window", "64", "--ppl-windows", "1",
                   "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    assert "Most vulnerable approximation: noise:site=up,dist=gaussian,std=0.5" in result.stdout
    points = json.loads((run / "sweep.json").read_text())["points"]
    assert [p["strength"] for p in points] == [0.0, 0.5]
    assert (run / "sweep.png").is_file() and (run / "report.html").is_file()


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--grid", "0,0.05,lots"], ["'lots' is not a number"]),
        (["--grid", ","], ["--grid is empty"]),
        (["--grid", "0,-1"], ["non-negative"]),
        (["--limit", "0"], ["limit must be at least 1"]),
        (["--spec", "noise:site=up,dist=gaussian", "--parameter", "sparsity"], ["unknown option 'sparsity'"]),
        (["--seed", "-1"], ["seed must be a whole number from 0"]),
        (["--judges", "keyword,llm", "--judge-model", "no-such-judge"], ["unknown model 'no-such-judge'"]),
    ],
)
def test_sweep_command_rejects_bad_options_without_a_traceback(cli, tmp_path, args, fragments):
    cli("sweep", *args, "--run-dir", str(tmp_path / "run")).assert_user_error(*fragments)
    assert not (tmp_path / "run").exists()


def test_sweep_command_sweeps_a_list_of_variants(cli, inputs, tmp_path):
    run = tmp_path / "run"
    result = cli("sweep", *tiny_options(inputs), "-V", "bolt", "--variant", "puma", "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    assert "Most vulnerable approximation:" in result.stdout and "puma" in result.stdout
    points = json.loads((run / "sweep.json").read_text())["points"]
    assert [p["spec"] for p in points] == ["none", "bolt", "puma"]
    cli("sweep", "-V", "bolt", "--grid", "0,0.1", "--run-dir", str(tmp_path / "both")).assert_user_error(
                      "either --grid", "--variant")
    assert not (tmp_path / "both").exists()


def test_parse_numbers_reads_clean_as_zero_and_refuses_a_number_left_out():
    assert parse_numbers(" clean, 0.05 ,1e-1", "--grid") == (0.0, 0.05, 0.1)
    with pytest.raises(QuadaError, match="'x' is not a number"):
        parse_numbers("0,x", "--grid")
    for text in ("0.1,,0.2", "0,0.1,", " ,0.1"):
        with pytest.raises(QuadaError, match=f"--grid {text!r} has an empty entry between commas"):
            parse_numbers(text, "--grid")


def tiny_options(inputs):
    return ["--model", str(inputs / "model"), "--benchmark", str(inputs / "harmful.txt"), "--all-prompts",
            "--max-new-tokens", "4", "--corpus", str(inputs / "corpus.txt"), "--ppl-window", "64", "--ppl-windows", "1"]


def test_layers_and_clusters_commands_read_the_mva_of_the_sweep(cli, inputs, tmp_path):
    run = ["--run-dir", str(tmp_path / "run")]
    cli("layers", *tiny_options(inputs), *run).assert_user_error("no sweep in", "--spec")
    swept = cli("sweep", *tiny_options(inputs), "--grid", "0,0.5", "--refine", "0", *run)
    assert swept.returncode == 0, swept.stderr
    result = cli("layers", *tiny_options(inputs), "--proxy-only", *run)
    assert result.returncode == 0, result.stderr
    assert "tau = " in result.stdout and "first k layers" in result.stdout
    result = cli("clusters", "--model", str(inputs / "model"), "--harmful", str(inputs / "harmful.txt"),
                   "--benign", str(inputs / "benign.txt"), "--all-prompts", "--folds", "2", "--layer", "0", *run)
    assert result.returncode == 0, result.stderr
    assert "silhouette" in result.stdout
    html = (tmp_path / "run" / "report.html").read_text()
    assert all(f"Finding {n}" in html for n in (1, 2, 3))


@pytest.mark.parametrize(
    "command, args, fragments",
    [
        ("layers", ["--spec", "noise:site=up,dist=gaussian,std=0.1", "--share", "2"], ["share must lie in"]),
        ("layers", ["--spec", "noise:site=up,dist=gaussian,std=0.1", "--stride", "0"], ["stride must be at least 1"]),
        ("clusters", ["--spec", "noise:site=up,dist=gaussian,std=0.1", "--pooling", "max"], ["unknown pooling 'max'"]),
        ("clusters", ["--spec", "noise:site=up,dist=gaussian,std=0.1", "--site", "attic"], ["unknown site 'attic'"]),
        ("layers", ["--spec", "noise:site=up,dist=gaussian,std=0.1", "--seed", "-1"], ["seed must be"]),
        ("clusters", ["--spec", "noise:site=up,dist=gaussian,std=0.1", "--seed", "-1"], ["seed must be"]),
    ],
)
def test_layers_and_clusters_reject_bad_options_without_a_traceback(cli, tmp_path, command, args, fragments):
    cli(command, *args, "--run-dir", str(tmp_path / "run")).assert_user_error(*fragments)


@pytest.mark.parametrize(
    "command, args, fragment",
    [
        ("sweep", ["--spec", "noise:site=up,dist=gaussian,layers=99", "--grid", "0,0.1"], "layer 99 in layers=99 is out of range"),
        ("sweep", ["-V", "bolt + iron"], "bolt and iron cannot be composed"),
        ("layers", ["--spec", "bolt + iron"], "bolt and iron cannot be composed"),
    ],
)
def test_specs_are_checked_against_the_model_before_any_generation(cli, inputs, tmp_path, monkeypatch, command, args, fragment):
    monkeypatch.setattr("quada.engine.plan.generate", lambda *a, **k: pytest.fail("generated before checking"))
    cli(command, *tiny_options(inputs), *args, "--run-dir", str(tmp_path / "run")).assert_user_error(fragment)


def test_clusters_checks_the_spec_against_the_model_before_capturing(cli, inputs, tmp_path, monkeypatch):
    monkeypatch.setattr("quada.analysis.clusters.pooled_activations", lambda *a, **k: pytest.fail("captured before checking"))
    result = cli("clusters", "--model", str(inputs / "model"), "--harmful", str(inputs / "harmful.txt"),
                   "--benign", str(inputs / "benign.txt"), "--all-prompts", "--folds", "2", "--spec", "bolt + iron",
                   "--run-dir", str(tmp_path / "run"))
    result.assert_user_error("bolt and iron cannot be composed")
