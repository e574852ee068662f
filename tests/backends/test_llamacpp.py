"""llama.cpp in process, on the tiny model written as a GGUF file: the same prompt tokens as the
reference, perplexity against transformers as an independent reference, rows that do not depend
on what ran before, and requantization with llama.cpp's own quantizer."""

import json

import pytest

from quada.backends import LLAMACPP, Deployment, render
from quada.backends.llamacpp import LlamaCppBackend, quant_type, requantize
from quada.errors import QuadaError
from quada.measures.generate import GenerationSettings
from quada.measures.utility import perplexity, perplexity_windows
from quada.testing import save_tiny_gguf, tiny_model

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "Ünïcödé and emoji 😀 too"]
CORPUS = "The quick brown fox jumps over the lazy dog, and then it rests in the shade. " * 12


@pytest.fixture(scope="module")
def reference():
    """The tiny model of the GGUF in fp32, with its tokenizer."""
    return tiny_model("qwen2", seed=0)


@pytest.fixture(scope="module")
def backend(tiny_gguf, reference):
    opened = LlamaCppBackend(Deployment(LLAMACPP, str(tiny_gguf)), reference[1], threads=1)
    yield opened
    opened.close()


def test_llama_cpp_reads_the_reference_tokens_and_names_what_it_runs(backend, reference, tiny_gguf):
    tokenizer = reference[1]
    for prompt in PROMPTS:
        text = render(tokenizer, prompt, "paper").text
        assert backend.tokenize(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert backend.identity["quant"] == "F32"
    assert backend.identity["version"].startswith("llama-cpp-python ")
    assert "AVX" in backend.identity["cpu"] or "NEON" in backend.identity["cpu"]
    assert backend.condition.startswith("llamacpp:F32:")


def test_perplexity_agrees_with_transformers_on_the_same_windows(backend, reference):
    model, tokenizer = reference
    expected = perplexity(model, tokenizer, CORPUS, window=128, max_windows=3).perplexity
    windows = perplexity_windows(tokenizer, CORPUS, 128, 3).tolist()
    # Same F32 weights: only the f16 KV cache and the kernels' summation order differ.
    assert backend.perplexity(windows) == pytest.approx(expected, rel=2e-3)


def test_a_response_does_not_depend_on_what_ran_before(backend, reference):
    settings = GenerationSettings(max_new_tokens=12, prompt_format="paper")
    prompts = [render(reference[1], p, "paper") for p in PROMPTS]
    alone = backend.complete(prompts[0], settings)
    for other in prompts[1:]:
        backend.complete(other, settings)
    again = backend.complete(prompts[0], settings)
    assert again == alone
    assert alone.tokens == 12 and alone.finish == "length"


def test_greedy_llama_cpp_follows_transformers_on_f32_weights(backend, reference):
    """The first tokens of a greedy response match the fp32 reference's (the f16 KV cache may move a
    near tie later on)."""
    from quada.measures.generate import generate

    model, tokenizer = reference
    settings = GenerationSettings(max_new_tokens=4, prompt_format="plain")
    expected = generate(model, tokenizer, PROMPTS, settings, progress=False)
    got = [backend.complete(render(tokenizer, p, "plain"), settings).text for p in PROMPTS]
    assert got == expected


def test_a_gguf_whose_tokenizer_adds_a_bos_token_is_refused(tmp_path, reference):
    gguf = save_tiny_gguf(tmp_path / "bos.gguf", add_bos=True)
    opened = LlamaCppBackend(Deployment(LLAMACPP, str(gguf)), reference[1])
    try:
        with pytest.raises(QuadaError, match="reads .* prompt tokens .* where the reference tokenizer reads"):
            opened.complete(render(reference[1], PROMPTS[0], "plain"), GenerationSettings(max_new_tokens=2))
    finally:
        opened.close()


def test_requantize_writes_a_gguf_of_the_asked_type_that_llama_cpp_runs(tiny_gguf, tmp_path, reference):
    out = requantize(str(tiny_gguf), tmp_path / "tiny-q8.gguf", "Q8_0", threads=1)
    assert not list(tmp_path.glob("*.partial"))
    opened = LlamaCppBackend(Deployment(LLAMACPP, str(out)), reference[1])
    try:
        assert opened.identity["quant"] == "Q8_0"
        assert opened.condition.startswith("llamacpp:Q8_0:")
        response = opened.complete(render(reference[1], PROMPTS[1], "paper"), GenerationSettings(max_new_tokens=3))
        assert response.tokens == 3
    finally:
        opened.close()
    with pytest.raises(QuadaError, match="unknown quantization type 'Q9'"):
        requantize(str(tiny_gguf), tmp_path / "x.gguf", "Q9")
    with pytest.raises(QuadaError, match="must end in .gguf"):
        requantize(str(tiny_gguf), tmp_path / "x.bin", "Q8_0")


def test_quant_type_names():
    assert quant_type(15) == "Q4_K_M"
    assert quant_type(12) == "Q3_K_M"
    assert quant_type(10) == "Q2_K"
    assert quant_type(0) == "F32"
    assert quant_type(9999) == "file type 9999"


def test_vet_compares_a_llama_cpp_deployment_with_the_reference(cli, model_dir, tiny_gguf, run_inputs):
    run = run_inputs["tmp"] / "run"
    args = ["vet", "-m", model_dir, "--deployment", f"llamacpp:{tiny_gguf}", "--benchmark", run_inputs["harmful"],
            "--benign", run_inputs["benign"], "--judges", "keyword", "--no-calibrate", "--corpus", run_inputs["corpus"],
            "--ppl-windows", "1", "--max-new-tokens", "6", "--run-dir", run]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    saved = json.loads((run / "results.json").read_text())
    [deployment] = saved["deployments"]
    assert [c["approx"] for c in saved["conditions"]] == ["none", deployment]  # no approximation by default
    checks = saved["deployments"][deployment]
    assert checks["deterministic"] and checks["repeats_equal"] == [True, True]
    assert checks["perplexity"] == pytest.approx(saved["conditions"][0]["perplexity"], rel=0.02)  # bf16 reference
    assert saved["conditions"][1]["verdict"]["kind"]
    report = (run / "report.md").read_text()
    assert "## Deployments" in report and deployment in report
    rows = _generations(run)
    by_condition = {}
    for row in rows:
        by_condition.setdefault(row.key.approx, {})[row.key.prompt_id] = row.response
    assert checks["same_as_clean"] == sum(by_condition["none"][p] == r for p, r in by_condition[deployment].items())
    assert checks["responses"] == len(by_condition[deployment])
    assert f"| {checks['same_as_clean']} of {checks['responses']} |" in report
    # A second run finds every row stored and generates nothing.
    assert len(rows) == 2 * (len(run_inputs["harmful_prompts"]) + len(run_inputs["benign_prompts"]))
    assert cli(*args).returncode == 0
    assert _generations(run) == rows


def _generations(run):
    from quada.store import Generation, Store

    with Store(run / "results.sqlite") as store:
        return store.rows(Generation)
