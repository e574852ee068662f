"""The shared evaluation options: declared once (EvalOptions), checked once, and turned into the
command-line options of every evaluating command under the fields' own names, help and defaults."""

import dataclasses
from pathlib import Path

import pytest
import typer
from rich.markup import escape

from quada.analysis.options import LayersConfig, SweepConfig
from quada.cli import app
from quada.cli_options import parse_names, parse_numbers
from quada.defaults import DEFAULT_JUDGE_MODEL, DEFAULT_MODEL, VET_MODEL
from quada.defense.options import AlignConfig
from quada.errors import QuadaError
from quada.options import EXECUTOR_OPTIONS, EvalOptions, VetConfig, flag

CONFIGS = {"vet": VetConfig, "sweep": SweepConfig, "layers": LayersConfig, "align": AlignConfig}
SHARED = [field.name for field in dataclasses.fields(EvalOptions)]


def make(config, **values):
    """A configuration with ``values``; `quada align` is configured to train only."""
    return config(**values, **({"skip_eval": True} if config is AlignConfig else {}))


def command_options(command: str) -> dict:
    """The options of ``quada COMMAND`` by parameter name, as click sees them."""
    return {param.name: param for param in typer.main.get_command(app).commands[command].params}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS)
def test_every_evaluating_config_extends_the_shared_options_and_documents_each_field(config):
    assert issubclass(config, EvalOptions)
    undocumented = [f.name for f in dataclasses.fields(config) if not f.metadata.get("help")]
    assert not undocumented


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS)
@pytest.mark.parametrize(
    "values, message",
    [
        (dict(max_new_tokens=0), "--max-new-tokens must be at least 1 (or omitted for all), got 0"),
        (dict(ppl_windows=0), "--ppl-windows must be at least 1"),
        (dict(limit=0), "must be at least 1 (or omitted for all), got 0"),  # spelled --max-prompts by vet
        (dict(seed=-1), "seed must be a whole number from 0"),
        (dict(judges=("keyword", "oracle")), "unknown judge 'oracle'"),
        (dict(prompt_format="chat"), "unknown prompt format 'chat'"),
        (dict(device="tpu"), "unknown device 'tpu'"),
        (dict(executor="spark"), "unknown executor 'spark'; choose one of: local, ray"),
        (dict(ray_address="auto"), "--ray-address is for the Ray executor: add --executor ray"),
        (dict(executor="ray", workers=0), "--workers must be at least 1, got 0"),
        (dict(executor="ray", cpus_per_worker=0), "--cpus-per-worker must be above 0"),
        (dict(executor="ray", gpus_per_worker=-1), "--gpus-per-worker must be 0 or more, got -1"),
        (dict(ppl_bound=float("inf")), "--ppl-bound is a multiple of the clean perplexity and must be a finite number"),
        (dict(ppl_bound=float("nan")), "must be a finite number of at least 1, got nan"),
        (dict(ppl_bound=0.5), "must be a finite number of at least 1, got 0.5"),
        (dict(ppl_window=1), "--ppl-window must be at least 2 tokens"),
    ],
)
def test_a_bad_shared_option_fails_the_same_way_in_every_config(config, values, message):
    with pytest.raises(QuadaError) as error:
        make(config, **values)
    assert message in str(error.value)


def test_the_safety_judges_the_message_names_are_those_the_rule_accepts(tmp_path):
    from quada.judging import JUDGE_CLASSES, JUDGES, SAFETY_JUDGES

    with pytest.raises(QuadaError) as error:
        VetConfig(judges=("harmfulness",))
    named = str(error.value).split("(")[1].split(")")[0].split(", ")
    assert named == list(SAFETY_JUDGES)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Behavior: {behavior}\nGeneration: {generation}\nYes or no?")
    for judge in JUDGES:
        if judge in named and JUDGE_CLASSES[judge].label_is_attack:
            assert VetConfig(judges=(judge,), judge_prompt=str(prompt)).judges == (judge,)
        elif judge in named:  # a refusal judge rates attacks only beside a judge that reads the answer
            with pytest.raises(QuadaError, match="holds only refusal judges"):
                VetConfig(judges=(judge,))
            assert VetConfig(judges=("keyword", judge)).judges == ("keyword", judge)
        else:
            with pytest.raises(QuadaError, match="no safety judge"):
                VetConfig(judges=(judge,))


def test_an_approximation_named_twice_in_any_spelling_is_refused():
    assert VetConfig(approx=("none", "teal:sparsity=0.5")).approx == ("teal:sparsity=0.5",)
    for twice in [("none", "none"), ("teal:sparsity=0.5", "teal:sparsity=0.50"), ("paper", "paper:bolt"),
                  ("bolt", "bolt")]:
        with pytest.raises(QuadaError, match="twice .*list each approximation once"):
            VetConfig(approx=twice)


def test_each_command_keeps_its_own_defaults():
    assert (VetConfig().limit, SweepConfig().limit, LayersConfig().limit, make(AlignConfig).limit) == (384, 64, 32, 64)
    assert VetConfig().first_look == 48 and make(AlignConfig).vet_config("m", Path("r")).first_look is None
    assert (VetConfig().max_new_tokens, SweepConfig().max_new_tokens, LayersConfig().max_new_tokens) == (64, 64, 64)
    assert SweepConfig().judges == LayersConfig().judges == ("keyword",)
    assert {make(c).model for c in CONFIGS.values() if c is not VetConfig} == {DEFAULT_MODEL}
    assert VetConfig().model == VET_MODEL  # the main job: the aligned built-in
    assert {make(c).judge_model for c in CONFIGS.values()} == {DEFAULT_JUDGE_MODEL}
    assert make(AlignConfig).sweep_grid == SweepConfig().grid


@pytest.mark.parametrize("command, config", CONFIGS.items())
def test_a_command_option_is_its_field_with_the_fields_help_and_default(command, config):
    options = command_options(command)
    fields = {f.name: f for f in dataclasses.fields(config)}
    exposed = [name for name in options if name in fields]
    # align evaluates its model in process only.
    assert set(SHARED) - (set(EXECUTOR_OPTIONS) if command == "align" else set()) <= set(exposed)
    for name in exposed:
        field, option = fields[name], options[name]
        assert flag(config, name) in option.opts, option.opts
        assert option.help == escape(field.metadata["help"])  # shown as plain text, not rich markup
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        if option.required or option.multiple:
            continue  # required, or repeated with the config's default (None or none)
        if isinstance(default, tuple):
            text = option.default
            assert (parse_numbers(text, name) if default and isinstance(default[0], float) else parse_names(text)) == default
        else:
            assert option.default == default, name


def test_the_align_training_options_are_named_after_the_trainer_fields():
    names = {opt for option in command_options("align").values() for opt in (*option.opts, *option.secondary_opts)}
    assert {"--learning-rate", "--num-train-epochs", "--use-lora", "--no-use-lora"} <= names
    assert not {"--lr", "--epochs", "--lora", "--full"} & names


def test_the_default_model_is_the_same_in_every_command_but_the_main_job():
    for command in ("sweep", "layers", "clusters", "pairs", "align"):
        assert command_options(command)["model"].default == DEFAULT_MODEL, command
    assert command_options("vet")["model"].default == VET_MODEL


@pytest.fixture
def configured(monkeypatch):
    """Stop `quada vet`, `sweep` and `align` at their configuration and keep it."""
    seen = []

    def stop(config, *args, **kwargs):
        seen.append(config)
        raise QuadaError("stopped before any work")

    for target in ("quada.vet.vet", "quada.analysis.sweep.sweep", "quada.defense.align.align"):
        monkeypatch.setattr(target, stop)
    return seen


def test_options_left_out_keep_the_config_defaults(cli, configured, tmp_path):
    cli("vet").assert_user_error("stopped before any work")
    cli("sweep", "--limit", "5", "--judges", "llm,keyword", "--grid", "clean,0.5").assert_user_error("stopped")
    assert configured == [VetConfig(), SweepConfig(limit=5, judges=("llm", "keyword"), grid=(0.0, 0.5))]


def test_the_align_command_hands_its_training_options_to_the_trainer(cli, configured, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "q", "chosen": "no", "rejected": "yes", "harmful": true}\n')
    cli("align", "--pairs", pairs, "--out", tmp_path / "run", "--skip-eval", "--learning-rate", "1e-4",
        "--num-train-epochs", "1", "--no-use-lora", "--seed", "3").assert_user_error("stopped")
    [config] = configured
    assert (config.out_dir, config.seed) == (tmp_path / "run", 3)
    trainer = config.quada
    assert (trainer.learning_rate, trainer.num_train_epochs, trainer.use_lora, trainer.seed) == (1e-4, 1.0, False, 3)


def test_the_ray_executor_needs_ray_installed(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    assert EvalOptions().executor == "local"  # the default needs no Ray
    with pytest.raises(QuadaError, match=r"--executor ray needs Ray, which is not installed: pip install 'quada\[ray\]'"):
        EvalOptions(executor="ray")
