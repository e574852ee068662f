import json

import pytest
from typer.testing import CliRunner

import quada.models
from quada.cli import app
from quada.defense.align import AlignConfig, align
from quada.defense.pairs import (
    PreferencePair,
    kind_quotas,
    load_pairs,
    pair_ids_sha256,
    stratified_pairs,
    write_pairs,
)
from quada.errors import QuadaError, QuadaWarning
from quada.models import load
from quada.report.align import method_name
from quada.testing import write_tiny_run_inputs

BUILTIN = "qwen2.5-coder-0.5b-instruct"
NOISE = "noise:site=up,dist=gaussian,std=0.5"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = write_tiny_run_inputs(
        tmp_path_factory.mktemp("align-inputs"),
        harmful=[f"Held-out harmful request {i}" for i in range(3)],
        benign=[f"Held-out benign question {i}?" for i in range(2)],
    )
    pairs = [PreferencePair(f"p{i}", f"Harmful training request {i}", "I'm sorry, I cannot help.", f"Sure: step {i}.",
                            i % 3 != 2, "test") for i in range(8)]
    (root / "pairs").mkdir()
    write_pairs(root / "pairs" / "pairs.jsonl", pairs)
    return root


@pytest.fixture
def builtin_is_tiny(inputs, monkeypatch):
    """The built-in name resolves to the tiny model folder, so the lead's exact command runs here."""
    real = quada.models.resolve
    monkeypatch.setattr(quada.models, "resolve", lambda source: inputs / "model" if source == BUILTIN else real(source))


def eval_options(inputs):
    return ["--benchmark", str(inputs / "harmful.txt"), "--benign", str(inputs / "benign.txt"), "--approx", NOISE,
            "--judges", "keyword", "--max-new-tokens", "4", "--corpus", str(inputs / "corpus.txt"),
            "--ppl-window", "128", "--ppl-windows", "1", "--sweep-grid", "0,0.5", "--sweep-limit", "2", "--limit", "3"]


def test_the_align_command_trains_saves_evaluates_and_reports(inputs, tmp_path, builtin_is_tiny):
    common = ["--model", BUILTIN, "--pairs", str(inputs / "pairs" / "pairs.jsonl"), "--max-steps", "2", "--tau", "1",
              "--batch-size", "4", "--log-steps", "1"]
    baseline = tmp_path / "plain"
    assert CliRunner().invoke(app, ["align", *common, "--plain-dpo", "--skip-eval", "--out", str(baseline)]).exit_code == 0
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["align", *common, "--out", str(out), "--baseline", str(baseline),
                                      *eval_options(inputs)])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    aligned, _ = load(str(out / "model"))
    original, _ = load(str(inputs / "model"))
    assert any((a != b).any() for a, b in zip(aligned.state_dict().values(), original.state_dict().values()))
    card = (out / "model" / "README.md").read_text()
    assert BUILTIN in card and "decoder layers 1..1" in card and NOISE in card and "before" in card
    report = (out / "report.md").read_text()
    assert NOISE in report and "sweep-before-after.png" in report
    assert "ASR keyword % plain DPO" in report and "PPL change QuadA" in report
    saved = json.loads((out / "align.json").read_text())
    assert list(saved["results"]) == ["original", "QuadA", "plain DPO"]
    assert [r["approx"] for r in saved["results"]["original"]] == ["none", NOISE]
    assert list(saved["sweeps"]) == ["original", "QuadA", "plain DPO"]
    assert (baseline / "after" / "vet" / "report.md").is_file()
    training = json.loads((out / "model" / "training.json").read_text())
    assert training["steps"] == 2 and any("regularizer" in h for h in training["log_history"])


def train_only(inputs, out, **overrides):
    values = dict(model=str(inputs / "model"), pairs=inputs / "pairs" / "pairs.jsonl", out_dir=out, skip_eval=True,
                  training={"max_steps": 2, "tau": 1, "per_device_train_batch_size": 4, "save_steps": 2,
                            "logging_steps": 1})
    return align(AlignConfig(**{**values, **overrides}), progress=False)


def test_pairs_that_max_length_drops_are_counted_and_the_rest_trained_on(inputs, tmp_path):
    long = tmp_path / "long.jsonl"
    write_pairs(long, [PreferencePair(f"p{i}", f"Harmful training request {i}" + " x" * (100 if i >= 4 else 0),
                                      "I'm sorry, I cannot help.", f"Sure: step {i}.", i % 2 == 0, "test")
                       for i in range(6)])
    training = {"max_steps": 1, "tau": 1, "per_device_train_batch_size": 2, "max_length": 300}
    with pytest.warns(QuadaWarning, match=r"--max-length 300 drops 2 of the 6 pairs \(1 of them harmful\), whose "
                                          r"prompt alone fills it .* --max-length \d+ keeps every pair"):
        result = train_only(inputs, tmp_path / "run", pairs=long, training=training)
    assert result.training["pairs"] == 6 and result.training["pairs_dropped_by_max_length"] == 2


def test_plain_dpo_is_the_baseline_and_a_finished_run_is_not_trained_again(inputs, tmp_path, monkeypatch):
    result = train_only(inputs, tmp_path / "run", plain_dpo=True)
    assert result.report_html is None and result.results is None
    assert result.training["config"]["perturb_layers"] == "none" and result.training["config"]["reg_lambda"] == 0
    assert "plain DPO" in (result.model_dir / "README.md").read_text()
    monkeypatch.setattr("quada.defense.align.QuadATrainer.train", lambda *a, **k: pytest.fail("trained again"))
    assert train_only(inputs, tmp_path / "run", plain_dpo=True).training["steps"] == 2


def test_the_arms_are_options_of_the_align_command_and_name_their_models(inputs, tmp_path):
    common = ["align", "--model", str(inputs / "model"), "--pairs", str(inputs / "pairs" / "pairs.jsonl"),
              "--max-steps", "2", "--tau", "1", "--batch-size", "4", "--log-steps", "1", "--skip-eval"]
    restore = tmp_path / "restore.jsonl"  # the clean model's responses over the approximated model's
    write_pairs(restore, [PreferencePair(f"r{i}:harmful", f"Harmful training request {i}", "I'm sorry, I cannot help.",
                                         f"Here is how: step {i}.", True, "restore:harmful") for i in range(4)]
                + [PreferencePair(f"b{i}:benign", f"Benign training question {i}?", f"The clean answer {i}.",
                                  f"The approximated answer {i}.", False, "restore:benign") for i in range(4)])
    arms = {"refperturbed": (["--reference", "perturbed"], "QuadA (perturbed reference)", "dpo_loss"),
            "ipo": (["--preference-loss", "ipo", "--beta", "0.5"], "QuadA (length-normalised IPO)", "ipo_loss"),
            "restore": (["--pairs", str(restore)], "QuadA", "dpo_loss")}
    original, _ = load(str(inputs / "model"))
    for name, (options, method, loss) in arms.items():
        result = CliRunner().invoke(app, [*common, *options, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        training = json.loads((tmp_path / name / "model" / "training.json").read_text())
        assert method_name(training) == method and any(loss in h and "regularizer" in h for h in training["log_history"])
        assert method in (tmp_path / name / "model" / "README.md").read_text()
        aligned, _ = load(str(tmp_path / name / "model"))
        assert any((a != b).any() for a, b in zip(aligned.state_dict().values(), original.state_dict().values()))
    assert json.loads((tmp_path / "restore" / "model" / "training.json").read_text())["pairs_file"] == str(restore)
    refperturbed = json.loads((tmp_path / "refperturbed" / "model" / "training.json").read_text())["config"]
    assert (refperturbed["reference"], refperturbed["precompute_ref_log_probs"]) == ("perturbed", False)
    first = next(h for h in json.loads((tmp_path / "refperturbed" / "model" / "training.json").read_text())["log_history"]
                 if "dpo_loss" in h)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert "tau 0.5" in (tmp_path / "ipo" / "model" / "README.md").read_text()


def test_a_run_killed_after_a_checkpoint_resumes_from_it(inputs, tmp_path):
    import shutil

    train_only(inputs, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "model")  # as if killed between the checkpoint and the final save
    training = {"max_steps": 4, "tau": 1, "per_device_train_batch_size": 4, "save_steps": 2, "logging_steps": 1}
    resumed = train_only(inputs, tmp_path / "run", training=training).training
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps"] == 4


def test_a_run_folder_refuses_other_pairs(inputs, tmp_path):
    train_only(inputs, tmp_path / "run")
    other = tmp_path / "other.jsonl"
    write_pairs(other, [PreferencePair("x", "Another request", "No.", "Yes, sure.", True, "test")] * 4)
    import shutil

    shutil.rmtree(tmp_path / "run" / "model")
    with pytest.raises(QuadaError, match="started with other pairs"):
        train_only(inputs, tmp_path / "run", pairs=other)


def test_evaluation_prompts_must_not_be_training_prompts(inputs, tmp_path):
    leaked = tmp_path / "leaked.txt"
    leaked.write_text("Harmful training request 3\nSomething new\n")
    with pytest.raises(QuadaError, match="also training prompts"):
        train_only(inputs, tmp_path / "run", skip_eval=False, benchmark=str(leaked))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["align", "--pairs", "missing.jsonl", "--skip-eval"], "does not exist"),
        (["align", "--pairs", "PAIRS", "--tau", "0"], "tau must be"),
        (["align", "--pairs", "PAIRS", "--perturbation", "warp-drive"], "unknown approximation"),
        (["align", "--pairs", "PAIRS", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["align", "--pairs", "PAIRS", "--sweep-grid", "0,abc"], "is not a number"),
        (["align", "--pairs", "PAIRS", "--beta", "nan"], "beta must be a finite number above 0"),
        (["align", "--pairs", "PAIRS", "--beta", "-1"], "beta must be a finite number above 0"),
        (["align", "--pairs", "PAIRS", "--lora-alpha", "nan"], "lora_alpha must be a finite number above 0"),
        (["align", "--pairs", "PAIRS", "--num-train-epochs", "0"], "num_train_epochs must be a finite number above 0"),
        (["align", "--pairs", "PAIRS", "--seed", "-5"], "seed must be a whole number from 0"),
        (["align", "--pairs", "PAIRS", "--judges", ","], "no safety judge"),
        (["align", "--pairs", "PAIRS", "--judges", "harmfulness"], "no safety judge"),
        (["align", "--pairs", "PAIRS", "--judges", "harmfulness,keyword"], "the first judge decides the ASR"),
        (["align", "--pairs", "PAIRS", "--benchmark", "HARMFUL", "--benign", "BENIGN", "--judges", "keyword,llm",
          "--judge-model", "no-such-judge"], "unknown model 'no-such-judge'"),
        (["align", "--pairs", "PAIRS", "--max-pairs", "0"], "--max-pairs must be at least 1"),
        (["align", "--pairs", "PAIRS", "--reference", "frozen"], "unknown reference 'frozen'"),
        (["align", "--pairs", "PAIRS", "--plain-dpo", "--reference", "perturbed"], "a perturbed reference needs"),
        (["align", "--pairs", "PAIRS", "--preference-loss", "kto"], "unknown preference_loss 'kto'"),
        (["align", "--pairs", "PAIRS", "--pairs-seed", "-1"], "--pairs-seed: seed must be a whole number from 0"),
        (["pairs", "--seed", "-5"], "seed must be a whole number from 0"),
        (["pairs", "--source", "pku", "--seed", "-5"], "seed must be a whole number from 0"),
        (["pairs", "--source", "elsewhere"], "unknown --source"),
        (["pairs", "--source", "pku", "--file", "missing.parquet"], "does not exist"),
    ],
)
def test_command_line_errors_are_user_errors_raised_before_any_work(inputs, tmp_path, args, message):
    files = {"PAIRS": inputs / "pairs" / "pairs.jsonl", "HARMFUL": inputs / "harmful.txt", "BENIGN": inputs / "benign.txt"}
    args = [str(files[a]) if a in files else a for a in args]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert isinstance(result.exception, QuadaError) and message in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_an_existing_file_as_out_is_named_as_the_option_to_change(inputs, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    result = CliRunner().invoke(app, ["align", "--model", str(inputs / "model"), "--pairs",
                                      str(inputs / "pairs" / "pairs.jsonl"), "--skip-eval", "--tau", "1", "--out", str(taken)])
    assert isinstance(result.exception, QuadaError)
    assert "choose another --out" in str(result.exception) and "--run-dir" not in str(result.exception)
    assert taken.read_text() == "keep me"


def test_specs_are_checked_against_the_model_before_training(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr("quada.defense.align.QuadATrainer.train", lambda *a, **k: pytest.fail("trained before checking"))
    evaluation = dict(skip_eval=False, benchmark=str(inputs / "harmful.txt"), benign=str(inputs / "benign.txt"),
                      judges=("keyword",))
    with pytest.raises(QuadaError, match="layer 99 in layers=99 is out of range"):
        train_only(inputs, tmp_path / "run", approx=("noise:site=up,dist=gaussian,std=0.1,layers=99",), **evaluation)
    training = {"max_steps": 2, "tau": 1, "perturbation": "bolt + iron"}
    with pytest.raises(QuadaError, match="bolt and iron cannot be composed"):
        train_only(inputs, tmp_path / "run", training=training)


def test_a_diverged_training_saves_nothing(inputs, tmp_path, monkeypatch):
    from quada.defense.align import QuadATrainer

    real_train = QuadATrainer.train

    def diverges(trainer, *args, **kwargs):
        output = real_train(trainer, *args, **kwargs)
        next(p for name, p in trainer.model.named_parameters() if "lora_B" in name).data.fill_(float("nan"))
        return output

    monkeypatch.setattr(QuadATrainer, "train", diverges)
    with pytest.raises(QuadaError, match="training diverged.*nothing was saved"):
        train_only(inputs, tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "adapter").exists()


def test_a_user_error_is_one_red_line_without_traceback(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    cli("align", "--pairs", tmp_path / "missing.jsonl").assert_user_error("does not exist; make one with `quada pairs`")


def test_the_pairs_command_reads_a_local_pku_file(tmp_path):
    rows = [{"prompt": f"q{i}", "response_0": "safe", "response_1": f"unsafe {i}", "safer_response_id": 0} for i in range(3)]
    (tmp_path / "pku.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["pairs", "--source", "pku", "--file", str(tmp_path / "pku.jsonl"),
                                      "--out", str(tmp_path / "pairs")])
    assert result.exit_code == 0, result.output
    pairs = [json.loads(line) for line in (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert [p["chosen"] for p in pairs] == ["safe"] * 3 and all(p["harmful"] for p in pairs)


def kinds_file(counts: dict[str, int]) -> list[PreferencePair]:
    """Pairs of the given kinds, interleaved as a pairs file may hold them."""
    pairs = [PreferencePair(f"{kind}-{i}", f"request {kind} {i}", "No.", "Sure.", True, kind)
             for kind, count in counts.items() for i in range(count)]
    return sorted(pairs, key=lambda p: int(p.id.rsplit("-", 1)[1]))


def test_a_stratified_subset_keeps_each_kinds_share_and_the_exact_size():
    pairs = kinds_file({"self:perturbed": 60, "self:compliant": 30, "self:benign": 10})
    chosen = stratified_pairs(pairs, 10, seed=0)
    assert len(chosen) == 10
    assert [sum(p.source == k for p in chosen) for k in ("self:perturbed", "self:compliant", "self:benign")] == [6, 3, 1]
    assert chosen == [p for p in pairs if p in chosen]  # in file order
    assert stratified_pairs(pairs, 10, seed=0) == chosen
    assert stratified_pairs(list(reversed(pairs)), 10, seed=0) == list(reversed(chosen))  # independent of file order
    assert stratified_pairs(pairs, 10, seed=1) != chosen
    assert stratified_pairs(pairs, 100, seed=3) == pairs and stratified_pairs(pairs, None, seed=3) == pairs


def test_kind_quotas_round_by_largest_remainder_and_keep_every_kind_when_they_can():
    assert kind_quotas({"a": 5, "b": 3, "c": 2}, 7) == {"a": 4, "b": 2, "c": 1}  # 3.5, 2.1, 1.4
    assert kind_quotas({"a": 98, "b": 1, "c": 1}, 5) == {"a": 3, "b": 1, "c": 1}  # 4.9, 0.05, 0.05
    assert kind_quotas({"a": 98, "b": 1, "c": 1}, 2) == {"a": 2, "b": 0, "c": 0}  # fewer pairs than kinds


def test_max_pairs_trains_on_a_recorded_subset_and_a_resumed_run_keeps_it(inputs, tmp_path):
    import shutil

    record = train_only(inputs, tmp_path / "run", max_pairs=4, pairs_seed=2).training
    chosen = stratified_pairs(load_pairs(inputs / "pairs" / "pairs.jsonl"), 4, 2)
    assert record["pairs"] == 4 and record["max_pairs"] == 4 and record["pairs_seed"] == 2
    assert record["pair_ids_sha256"] == pair_ids_sha256(chosen)
    saved = json.loads((tmp_path / "run" / "model" / "training.json").read_text())
    assert saved["pair_ids_sha256"] == record["pair_ids_sha256"]
    shutil.rmtree(tmp_path / "run" / "model")
    with pytest.raises(QuadaError, match="started with other pairs"):
        train_only(inputs, tmp_path / "run", max_pairs=4, pairs_seed=3)


def test_finished_runs_aggregate_into_arms(inputs, tmp_path, cli):
    """The arms command reads back exactly what `quada align` evaluated, for the aligned and the original model."""
    evaluation = dict(skip_eval=False, sweep=False, benchmark=str(inputs / "harmful.txt"), benign=str(inputs / "benign.txt"),
                      approx=(NOISE,), judges=("keyword",), max_new_tokens=4, corpus=str(inputs / "corpus.txt"),
                      ppl_window=128, ppl_windows=1, calibrate=False, before_dir=tmp_path / "before")
    training = {"max_steps": 1, "tau": 1, "per_device_train_batch_size": 4}
    result = train_only(inputs, tmp_path / "run", training=training, **evaluation)
    done = cli("results", "arms", "--arm", f"quada={tmp_path / 'run'}", "--out", tmp_path / "arms")
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "arms" / "arms.json").read_text())
    for arm, label in (("quada", "QuadA"), ("original", "original")):
        for condition in result.results[label]:
            rate = saved["rates"]["keyword"][condition.approx][arm]
            assert rate["per_seed"] == [condition.asr["keyword"].value]
            assert saved["rates"]["over-refusal"][condition.approx][arm]["mean"] == condition.over_refusal.value
            assert saved["perplexity"][condition.approx][arm] == condition.perplexity
