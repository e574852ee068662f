"""Model-level behaviour of ``apply`` on tiny Llama-, Qwen2- and Gemma-style models."""

import pytest
import torch

from quada.approx import NoiseConfig, TealConfig, apply, list_specs, parse_spec
from quada.approx import activation_stats as calibration_module
from quada.approx import noise as noise_module
from quada.approx.base import HANDLERS, REGISTRY, Installation
from quada.approx.noise import install_noise
from quada.approx.poly import ApproxActivation
from quada.chat import format_prompt
from quada.errors import QuadaError
from quada.measures.generate import GenerationSettings, generate
from quada.testing import tiny_model

TEXT = "Explain, step by step, how a refrigerator keeps food cold."

SPECS = [
    "paper:iron",
    "paper:teal-50",
    "noise:site=down,dist=laplace,scale=0.05",
    "noise:site=norm_all,dist=gaussian,std=0.05",
    "noise:site=act,dist=gaussian,std=0.05",
    "bolt",
    "bumblebee",
    "bumblebee2",
    "nexus",
    "puma",
    "iron",
    "teal:sparsity=0.5",
    "cats:sparsity=0.5",
    "smoothquant:bits=8",
    "smoothquant:bits=4,alpha=0.8,weight_bits=8",
    "omniquant:bits=4,steps=5",
    "bolt + teal:sparsity=0.3 + smoothquant:bits=8",
]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma"])
def tiny(request):
    return tiny_model(request.param)


def logits(model, tokenizer, text=TEXT):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_pristine(model, params, act_fns, clean):
    tokenizer = tiny_model_tokenizer()
    assert torch.equal(logits(model, tokenizer), clean)
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
    assert [layer.mlp.act_fn for layer in model.model.layers] == act_fns
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def tiny_model_tokenizer():
    return tiny_model("llama", layers=1, hidden=16)[1]


@pytest.mark.parametrize("text", SPECS)
def test_every_spec_changes_the_logits_and_exit_restores_the_model_exactly(tiny, text):
    model, tokenizer = tiny
    clean, params = logits(model, tokenizer), snapshot(model)
    act_fns = [layer.mlp.act_fn for layer in model.model.layers]
    with apply(model, text, tokenizer=tokenizer):
        approximated = logits(model, tokenizer)
    assert not torch.equal(approximated, clean)
    assert torch.isfinite(approximated).all()
    assert_pristine(model, params, act_fns, clean)


def listed_specs() -> list[str]:
    """Every technique (by its example spec) and every preset that ``quada approx list`` shows."""
    return [REGISTRY[name].example if name in REGISTRY else name for name, _ in list_specs()]


@pytest.fixture(scope="module", params=[torch.float32, torch.float16, torch.bfloat16], ids=str)
def tiny_in_dtype(request):
    model, tokenizer = tiny_model("llama")
    return model.to(request.param), tokenizer


def spy_on_transforms(monkeypatch) -> list[tuple]:
    """Record ``(input dtype, input device, output dtype, output device)`` of every hook transform."""
    seen = []

    def spying(install):
        def wrapped(self, module, fn, prepend=False):
            def recorded(x):
                y = fn(x)
                seen.append((x.dtype, x.device, y.dtype, y.device))
                return y

            return install(self, module, recorded, prepend)

        return wrapped

    monkeypatch.setattr(Installation, "transform_output", spying(Installation.transform_output))
    monkeypatch.setattr(Installation, "transform_input", spying(Installation.transform_input))
    return seen


@pytest.mark.parametrize("text", listed_specs())
def test_every_listed_approximation_keeps_the_activations_dtype_and_device(tiny_in_dtype, text, monkeypatch):
    model, tokenizer = tiny_in_dtype
    dtype, device = model.dtype, model.device
    seen = spy_on_transforms(monkeypatch)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"].to(device)
    with apply(model, text, tokenizer=tokenizer) as applied, torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        held = [*applied.installation.counters.values(), *applied.installation.input_scales.values()]
    assert all(x_dtype == y_dtype and x_device == y_device for x_dtype, x_device, y_dtype, y_device in seen)
    assert {(h.dtype, h.device) for h in out.hidden_states} == {(dtype, device)}  # module swaps too
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all()
    assert all(t.device == device for t in held)
    assert {(p.dtype, p.device) for p in model.parameters()} == {(dtype, device)}


def test_noise_is_drawn_with_a_generator_on_the_activations_device(monkeypatch):
    model, tokenizer = tiny_model("llama")
    draws = []

    def recording(draw):
        def recorded(x, amount, generator):
            draws.append((x.device, generator.device))
            return draw(x, amount, generator)

        return recorded

    for name in ("gaussian_noise", "laplace_noise"):
        monkeypatch.setattr(noise_module, name, recording(getattr(noise_module, name)))
    with apply(model, "paper:bolt", seed=1):
        logits(model, tokenizer)
    assert len(draws) == 3 * len(model.model.layers)  # q/k/v and gate/up inputs, down_proj input
    assert all(x_device == g_device for x_device, g_device in draws)


@pytest.mark.parametrize("text", ["paper:bolt", "smoothquant:bits=4", "nexus", "teal:sparsity=0.5"])
def test_exit_by_exception_restores_the_model_exactly(tiny, text):
    model, tokenizer = tiny
    clean, params = logits(model, tokenizer), snapshot(model)
    act_fns = [layer.mlp.act_fn for layer in model.model.layers]
    with pytest.raises(RuntimeError, match="boom"):
        with apply(model, text, tokenizer=tokenizer):
            logits(model, tokenizer)
            raise RuntimeError("boom")
    assert_pristine(model, params, act_fns, clean)


def test_a_failing_install_undoes_the_parts_already_installed(monkeypatch):
    model, tokenizer = tiny_model("llama")
    clean, params = logits(model, tokenizer), snapshot(model)
    act_fns = [layer.mlp.act_fn for layer in model.model.layers]

    def broken(config, decoder, layers, ctx, prepared):
        install_noise(config, decoder, layers, ctx, prepared)
        raise RuntimeError("install failed half way")

    monkeypatch.setitem(HANDLERS, NoiseConfig, (broken, None))
    # bolt swaps act_fn, smoothquant folds weights, then noise hooks and fails: nothing may remain.
    with pytest.raises(RuntimeError, match="half way"):
        with apply(model, "bolt + smoothquant:bits=4 + paper:iron", tokenizer=tokenizer):
            pass
    assert_pristine(model, params, act_fns, clean)


def test_calibrated_specs_need_the_tokenizer():
    model, _ = tiny_model("llama", seed=7)
    with pytest.raises(QuadaError, match="tokenizer=tokenizer"):
        with apply(model, "teal:sparsity=0.5"):
            pass


def test_smoothing_alone_is_an_equivalent_transformation(tiny):
    """With 16-bit fake quantization only the folding acts; it must not change the function
    (this covers Gemma's (1 + w) norm as well)."""
    model, tokenizer = tiny
    clean = logits(model, tokenizer)
    before = snapshot(model)
    with apply(model, "smoothquant:bits=16,alpha=0.8", tokenizer=tokenizer):
        folded = logits(model, tokenizer)
        norms_changed = [n for n, p in model.named_parameters() if "layernorm" in n and not torch.equal(p, before[n])]
    assert len(norms_changed) == 2 * len(model.model.layers)  # scales were folded into every norm...
    assert torch.allclose(folded, clean, atol=1e-3)  # ...and the model computes the same function


def test_polynomials_follow_the_models_activation():
    for arch, kind in [("llama", "silu"), ("gemma", "gelu_tanh")]:
        model, tokenizer = tiny_model(arch)
        with apply(model, "nexus", tokenizer=tokenizer):
            acts = [layer.mlp.act_fn for layer in model.model.layers]
            assert all(isinstance(a, ApproxActivation) and a.label == f"nexus {kind}" for a in acts)


def test_same_seed_same_generations_different_seed_differs():
    model, tokenizer = tiny_model("qwen2")
    prompts = ["Tell me a story about a dog.", "What is two plus two?", "List three colours."]
    settings = GenerationSettings(max_new_tokens=12)
    spec = "noise:site=up,dist=gaussian,std=0.3 + noise:site=down,dist=laplace,scale=0.3"
    runs = {}
    for seed in (0, 0, 1):
        with apply(model, spec, seed=seed):
            runs.setdefault(seed, []).append(generate(model, tokenizer, prompts, settings, progress=False))
    clean = generate(model, tokenizer, prompts, settings, progress=False)
    assert runs[0][0] == runs[0][1]
    assert runs[0][0] != runs[1][0]
    assert runs[0][0] != clean


def test_only_the_selected_layers_are_approximated():
    model, tokenizer = tiny_model("llama", layers=3)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]

    def hidden():
        with torch.no_grad():
            return model(input_ids=ids, output_hidden_states=True).hidden_states

    clean = hidden()
    for layers, spec in [([1], "noise:site=up,dist=gaussian,std=0.1"), (None, "noise:site=up,dist=gaussian,std=0.1,layers=1")]:
        with apply(model, spec, layers=layers) as applied:
            noisy = hidden()
        assert str(applied) == "noise:site=up,dist=gaussian,std=0.1,layers=1"
        assert torch.equal(noisy[1], clean[1])  # output of layer 0: untouched
        assert not torch.equal(noisy[2], clean[2])  # output of layer 1: perturbed
    with pytest.raises(QuadaError, match="out of range for a model with 3 decoder layers"):
        with apply(model, "bolt", layers="0:5"):
            pass


def test_teal_and_cats_zero_the_calibrated_fraction():
    model, tokenizer = tiny_model("llama")
    prompts = [f"Question {i}: describe the weather in a city you like, and why." for i in range(8)]
    for text, sites in [("teal:sparsity=0.4", {"qkv", "o", "gate_up", "down"}), ("cats:sparsity=0.6", {"act"})]:
        target = parse_spec(text).sparsity
        with apply(model, text, tokenizer=tokenizer, calibration_prompts=prompts) as applied:
            for prompt in prompts:  # the calibration prompts as calibration saw them
                logits(model, tokenizer, format_prompt(tokenizer, prompt))
            report = applied.sparsity()
        assert {site for _, site in report} == sites and {layer for layer, _ in report} == {0, 1}
        for key, achieved in report.items():
            assert abs(achieved - target) < 0.02, (text, key, achieved)


def test_teal_sparsity_grows_with_the_target_and_leaves_early_prompt_tokens_alone():
    model, tokenizer = tiny_model("qwen2")
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    seen = {}
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.update(x=a[0]))
    try:
        with torch.no_grad():
            model(input_ids=ids)
        clean = seen["x"]
        fractions = []
        for sparsity in (0.25, 0.5, 0.75):
            with apply(model, TealConfig(sparsity=sparsity), tokenizer=tokenizer), torch.no_grad():
                model(input_ids=ids)
            half = ids.shape[1] // 2
            assert torch.equal(seen["x"][:, :half], clean[:, :half])
            fractions.append((seen["x"][:, half:] == 0).float().mean().item())
    finally:
        handle.remove()
    assert fractions[0] < fractions[1] < fractions[2]


def test_calibration_is_cached_on_disk_per_model(monkeypatch, tmp_path):
    monkeypatch.setenv("QUADA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibration_module, "_MEMORY", {})
    model, tokenizer = tiny_model("llama", seed=5)
    with apply(model, "teal:sparsity=0.5", tokenizer=tokenizer):
        first = logits(model, tokenizer)
    assert list((tmp_path / "approx").rglob("*.pt"))
    monkeypatch.setattr(calibration_module, "_MEMORY", {})
    monkeypatch.setattr(calibration_module, "capture", lambda *a, **k: pytest.fail("recalibrated despite the cache"))
    with apply(model, "teal:sparsity=0.5", tokenizer=tokenizer):
        assert torch.equal(logits(model, tokenizer), first)


def calibration_files(root):
    """Every calibration cache file under ``root``: its path (model fingerprint and key hash) and content."""
    return {path.relative_to(root): torch.load(path, weights_only=True) for path in (root / "approx").rglob("*.pt")}


@pytest.mark.parametrize("outer", ["noise:site=up,dist=gaussian,std=1.0", "bolt", "smoothquant:bits=4,alpha=0.8"])
@pytest.mark.parametrize("inner", ["teal:sparsity=0.5", "cats:sparsity=0.5", "smoothquant:bits=8", "omniquant:bits=4,steps=2"])
def test_calibrating_inside_another_approximation_calibrates_the_clean_model(monkeypatch, tmp_path, outer, inner):
    model, tokenizer = tiny_model("llama", seed=5)

    def fresh_cache(name):
        monkeypatch.setenv("QUADA_CACHE_DIR", str(tmp_path / name))
        monkeypatch.setattr(calibration_module, "_MEMORY", {})
        return tmp_path / name

    clean = fresh_cache("clean")
    with apply(model, outer, tokenizer=tokenizer, seed=1):
        expected_outer = logits(model, tokenizer)
    with apply(model, inner, tokenizer=tokenizer):
        expected_inner = logits(model, tokenizer)

    nested = fresh_cache("nested")
    with apply(model, outer, tokenizer=tokenizer, seed=1):
        with apply(model, inner, tokenizer=tokenizer):
            pass
        assert torch.equal(logits(model, tokenizer), expected_outer)  # lifted for calibration, then restored as it was

    written = calibration_files(nested)
    assert written.keys() == calibration_files(clean).keys()
    for path, content in calibration_files(clean).items():
        assert written[path]["key"] == content["key"]
        assert written[path]["tensors"].keys() == content["tensors"].keys()
        for name, tensor in content["tensors"].items():
            assert torch.equal(written[path]["tensors"][name], tensor), (path, name)
    monkeypatch.setattr(calibration_module, "_MEMORY", {})
    with apply(model, inner, tokenizer=tokenizer):  # a later run reads the nested calibration
        assert torch.equal(logits(model, tokenizer), expected_inner)


def test_hook_points_that_do_not_resolve_raise():
    with pytest.raises(QuadaError, match="cannot find the decoder layers"):
        with apply(torch.nn.Linear(4, 4), "bolt"):
            pass
    model, _ = tiny_model("llama")
    model.model.layers[1].mlp.down_proj = None
    with pytest.raises(QuadaError, match="cannot find the down module of decoder layer 1"):
        with apply(model, "paper:bolt"):
            pass


def test_two_polynomial_activations_on_one_layer_fail_before_touching_the_model():
    model, _ = tiny_model("qwen2")
    act_fns = [layer.mlp.act_fn for layer in model.model.layers]
    with pytest.raises(QuadaError, match="bolt and iron cannot be composed on layer 0"):
        with apply(model, "bolt + iron"):
            pass
    assert [layer.mlp.act_fn for layer in model.model.layers] == act_fns
    with pytest.raises(QuadaError, match="seed must be a whole number from 0"):
        with apply(model, "noise:site=up,dist=gaussian,std=0.1", seed=-5):
            pass
