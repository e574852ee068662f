"""The ``device`` option: its checks, ``quada.models.load`` and ``--device`` on every command that loads a model."""

import sys

import pytest
import torch

import quada.analysis.clusters
import quada.analysis.layers
import quada.analysis.sweep
import quada.devices
import quada.models
import quada.vet
from quada import judging as judges
from quada.judging import registry
from quada.cli import main
from quada.devices import check_device, check_dtype, resolve_device, resolve_dtype
from quada.errors import QuadaError
from quada.models import load
from quada.testing import save_tiny_model, tiny_model

# Modules that import ``load`` by name; the others look it up on quada.models when they run.
LOADERS = (quada.models, quada.vet, quada.analysis.sweep, quada.analysis.layers, quada.analysis.clusters)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_device_names_are_checked_by_spelling():
    assert [check_device(d) for d in ("auto", "CPU", " cuda ", "cuda:1", "Balanced")] == [
        "auto", "cpu", "cuda", "cuda:1", "balanced"]
    for bad in ("tpu", "cuda:", "cuda:x", "gpu", ""):
        with pytest.raises(QuadaError, match="choose auto, cpu, cuda or cuda:N"):
            check_device(bad)


def test_auto_takes_the_cpu_without_cuda_and_cuda_must_exist(no_cuda):
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(QuadaError, match=f"device '{name}' was asked for, but .*--device cpu"):
            resolve_device(name)


def test_a_cuda_index_beyond_the_gpus_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(QuadaError, match="there is no cuda:2: this machine has 2 CUDA device"):
        resolve_device("cuda:2")


def test_load_puts_the_model_on_the_device(model_dir, no_cuda):
    for device in ("auto", "cpu"):
        model, _ = load(str(model_dir), dtype=torch.float32, device=device)
        assert {p.device for p in model.parameters()} == {torch.device("cpu")}


def test_balanced_hands_the_placement_to_accelerate_and_inputs_start_like_auto(model_dir, no_cuda, monkeypatch):
    device_maps = []
    real = quada.models.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(quada.models.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: device_maps.append(kwargs["device_map"]) or real(*args, **kwargs))
    balanced, tokenizer = load(str(model_dir), dtype=torch.float32, device="balanced")
    single, _ = load(str(model_dir), dtype=torch.float32, device="cpu")
    assert device_maps == ["auto", None]
    assert resolve_device("balanced") == torch.device("cpu")  # without a GPU accelerate keeps every layer here
    assert {p.device for p in balanced.parameters()} == {torch.device("cpu")}
    ids = tokenizer("Say hi", return_tensors="pt")["input_ids"]
    assert torch.equal(balanced(ids).logits, single(ids).logits)


def test_load_on_absent_cuda_fails_first_with_a_user_error(no_cuda):
    with pytest.raises(QuadaError, match="device 'cuda' was asked for"):
        load("no-such-model", device="cuda")  # the device is checked before the source


def test_the_judge_model_loads_on_the_given_device(monkeypatch):
    calls = []

    def fake(source, device="auto", dtype="auto"):
        calls.append((source, device))
        return tiny_model("llama")

    monkeypatch.setattr(registry, "load_judge_model", fake)
    judges.make_judge("llm", model_source="judge-folder", device="cpu")
    assert calls == [("judge-folder", "cpu")]


def command_line(name: str, tmp_path) -> list[str]:
    """The arguments of one model-loading command, everything written under ``tmp_path / "run"``."""
    run = str(tmp_path / "run")
    (tmp_path / "prompts.txt").write_text("Say hi\n")
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}\n')
    if name == "pairs":  # pairs checks that its model exists before it loads it: a real folder
        return ["pairs", "-m", str(save_tiny_model(tmp_path / "tiny")), "--out", run]
    return {
        "generate": ["generate", "-m", "tiny", "-p", str(tmp_path / "prompts.txt"), "-o", f"{run}/out.jsonl"],
        "vet": ["vet", "--judges", "keyword", "--run-dir", run],
        "approx profile": ["approx", "profile", "-m", "tiny", "-s", "bolt"],
        "sweep": ["sweep", "--run-dir", run],
        "layers": ["layers", "--spec", "bolt", "--run-dir", run],
        "clusters": ["clusters", "--spec", "bolt", "--run-dir", run],
        "align": ["align", "--pairs", str(tmp_path / "pairs.jsonl"), "--out", run, "--skip-eval"],
    }[name]


COMMANDS = ("generate", "vet", "approx profile", "sweep", "layers", "clusters", "pairs", "align")


def run_main(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    """Run the real entry point in-process; return its exit code and what it printed to stderr."""
    monkeypatch.setattr(sys, "argv", ["quada", *args])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name", COMMANDS)
def test_a_bogus_device_exits_2_before_any_work(name, tmp_path, monkeypatch, capsys):
    for module in LOADERS:
        monkeypatch.setattr(module, "load", lambda *a, **k: pytest.fail("loaded a model despite a bad --device"))
    code, err = run_main(monkeypatch, capsys, [*command_line(name, tmp_path), "--device", "tpu"])
    assert code == 2
    assert "unknown device 'tpu'; choose auto, cpu, cuda or cuda:N" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", COMMANDS)
def test_the_device_option_reaches_the_model_loader(name, tmp_path, monkeypatch, capsys):
    devices = []

    def fake_load(source, dtype=None, device="auto"):
        devices.append(str(device))
        raise QuadaError("stopped at loading")

    for module in LOADERS:
        monkeypatch.setattr(module, "load", fake_load)
    code, err = run_main(monkeypatch, capsys, [*command_line(name, tmp_path), "--device", "cpu"])
    assert (code, devices) == (2, ["cpu"]) and "stopped at loading" in err


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma", "f16c"}, torch.float32),  # AMD Zen 3 and other AVX2-only CPUs: bf16 is emulated, slow
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),
    ({"avx2", "amx_tile", "amx_bf16"}, torch.bfloat16),
    ({"fp", "asimd", "bf16"}, torch.bfloat16),  # Arm with the BF16 extension
    (set(), torch.float32),  # flags unreadable
])
def test_auto_dtype_follows_the_cpus_native_bf16(monkeypatch, flags, expected):
    monkeypatch.setattr(quada.devices, "cpu_flags", lambda: frozenset(flags))
    assert resolve_dtype("auto", torch.device("cpu")) == expected


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_dtype_on_a_gpu_follows_its_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_dtype("auto", torch.device("cuda:0")) == expected


def test_named_dtypes_and_their_spelling():
    assert [check_dtype(d) for d in ("auto", "BFloat16", " float32 ", "torch.float16")] == [
        "auto", "bfloat16", "float32", "float16"]
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    for bad in ("fp32", "int8", ""):
        with pytest.raises(QuadaError, match="unknown dtype .*; choose one of auto, bfloat16, float16, float32"):
            check_dtype(bad)


def test_load_takes_the_dtype_auto_picks(model_dir, no_cuda, monkeypatch):
    monkeypatch.setattr(quada.devices, "cpu_flags", lambda: frozenset({"avx2"}))
    assert load(str(model_dir))[0].dtype == torch.float32
    monkeypatch.setattr(quada.devices, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert load(str(model_dir))[0].dtype == torch.bfloat16
    assert load(str(model_dir), dtype="float32")[0].dtype == torch.float32


@pytest.mark.parametrize("name", COMMANDS)
def test_a_bogus_dtype_exits_2_before_any_work(name, tmp_path, monkeypatch, capsys):
    for module in LOADERS:
        monkeypatch.setattr(module, "load", lambda *a, **k: pytest.fail("loaded a model despite a bad --dtype"))
    code, err = run_main(monkeypatch, capsys, [*command_line(name, tmp_path), "--dtype", "fp8"])
    assert code == 2
    assert "unknown dtype 'fp8'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", [c for c in COMMANDS if c != "align"])  # align trains in float32 master weights
def test_the_dtype_option_reaches_the_model_loader(name, tmp_path, monkeypatch, capsys):
    dtypes = []

    def fake_load(source, dtype=None, device="auto"):
        dtypes.append(str(dtype))
        raise QuadaError("stopped at loading")

    for module in LOADERS:
        monkeypatch.setattr(module, "load", fake_load)
    code, err = run_main(monkeypatch, capsys, [*command_line(name, tmp_path), "--dtype", "float16"])
    assert (code, dtypes) == (2, ["float16"]) and "stopped at loading" in err
