import pytest
import torch

from quada.chat import PAPER_SYSTEM, format_prompt
from quada.data import Prompt
from quada.errors import QuadaError
from quada.measures.generate import (
    GenerationSettings,
    auto_batch_size,
    check_prompts_fit,
    check_room,
    context_length,
    free_memory,
    generate,
)
from quada.testing import tiny_model

PROMPTS = [
    "Hi",
    "Write a long poem about the sea and the sky and the wind",
    "What is 2+2?",
    "Tell me a story",
    "List three colours.",
    "Explain photosynthesis in detail, step by step, for a child",
    "ok",
]


def reference_one_by_one(model, tokenizer, prompts, settings):
    """Greedy generation one prompt at a time with transformers' own generate()."""
    out = []
    for prompt in prompts:
        text = format_prompt(tokenizer, prompt, settings.prompt_format)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            full = model.generate(
                **ids,
                do_sample=False,
                max_new_tokens=settings.max_new_tokens,
                eos_token_id=model.generation_config.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = full[0, ids["input_ids"].shape[1] :].tolist()
        ends = [i for i, token in enumerate(new) if token in model.generation_config.eos_token_id]
        out.append(tokenizer.decode(new[: ends[0]] if ends else new, skip_special_tokens=True))
    return out


def tokens_ending_rows_at_different_steps(model, tokenizer, prompts, settings):
    """Pick an extra end token whose first appearance differs most across the prompts' answers."""
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    answers = reference_one_by_one(model, tokenizer, prompts, settings)
    first_steps: dict[int, set[int]] = {}
    for answer in answers:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        for step, token in enumerate(ids):
            first_steps.setdefault(token, set())
        for token in set(ids):
            first_steps[token].add(ids.index(token))
    best = max(first_steps, key=lambda t: (len(first_steps[t] - {0}), -min(first_steps[t])))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, best]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("batch_size", [3, None])
def test_batched_sorted_generation_equals_one_by_one(arch, batch_size):
    model, tokenizer = tiny_model(arch, seed=1)
    settings = GenerationSettings(max_new_tokens=12, prompt_format="paper")
    tokens_ending_rows_at_different_steps(model, tokenizer, PROMPTS, settings)
    expected = reference_one_by_one(model, tokenizer, PROMPTS, settings)
    got = generate(model, tokenizer, PROMPTS, settings, batch_size=batch_size, progress=False)
    assert got == expected
    # The end token really cut some sequences short, so rows left the batch at different steps.
    lengths = {len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in got}
    assert len(lengths) > 1


def test_paper_prompt_format_is_applied_with_generation_prompt():
    _, tokenizer = tiny_model("qwen2")
    text = format_prompt(tokenizer, "Do X", "paper")
    assert PAPER_SYSTEM in text and "Instruction: Do X" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert format_prompt(tokenizer, "Do X", "plain") == "<|im_start|>user\nDo X<|im_end|>\n<|im_start|>assistant\n"


def test_bad_settings_are_user_errors():
    with pytest.raises(QuadaError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(QuadaError, match="prompt format"):
        GenerationSettings(prompt_format="fancy")
    model, tokenizer = tiny_model()
    with pytest.raises(QuadaError, match="batch size"):
        generate(model, tokenizer, ["hi"], batch_size=0, progress=False)


def test_auto_batch_size_shrinks_with_length(monkeypatch):
    model, _ = tiny_model()
    monkeypatch.setattr("quada.measures.generate.available_memory", lambda: 64 * 2**20)
    short = auto_batch_size(model, prompt_tokens=16, max_new_tokens=16, cap=10_000)
    long = auto_batch_size(model, prompt_tokens=1024, max_new_tokens=128, cap=10_000)
    assert short > long >= 1
    assert auto_batch_size(model, 16, 16, cap=4) == 4


def test_a_gpu_batch_is_sized_by_the_gpu_free_memory_not_the_host(monkeypatch):
    asked = []
    monkeypatch.setattr("torch.cuda.mem_get_info", lambda device: asked.append(device) or (3 * 2**30, 80 * 2**30))
    monkeypatch.setattr("quada.measures.generate.available_memory", lambda: pytest.fail("read the host's memory"))
    gpu = torch.device("cuda", 1)
    assert free_memory(gpu) == 3 * 2**30 and asked == [gpu]
    monkeypatch.setattr("quada.measures.generate.available_memory", lambda: 5 * 2**30)
    assert free_memory(torch.device("cpu")) == 5 * 2**30


def test_stop_on_refusal_cuts_at_the_phrase_and_keeps_the_keyword_verdict(monkeypatch):
    model, tokenizer = tiny_model("llama", seed=1)
    full = generate(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=24), progress=False)
    # Make a piece of one full answer count as a refusal phrase for this test.
    phrase = full[1][4:8]
    monkeypatch.setattr("quada.measures.generate.refusal_phrase", lambda text: phrase if phrase in text else None)
    early = generate(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=24, stop_on_refusal=True), progress=False)
    for whole, cut in zip(full, early):
        assert whole.startswith(cut)
        assert (phrase in whole) == (phrase in cut)
        assert cut == whole or cut.endswith(phrase)
    assert early[1].endswith(phrase) and len(early[1]) < len(full[1])


def test_a_prompt_and_its_new_tokens_must_fit_in_the_models_context():
    check_room({"p0": 100, "p1": 400}, 112, 512)  # exactly full
    with pytest.raises(QuadaError, match=r"--max-new-tokens 113 does not fit .* context of 512 tokens after the "
                                         r"longest prompt \(p1, 400 tokens\); give --max-new-tokens 112 or less"):
        check_room({"p0": 100, "p1": 400}, 113, 512)
    with pytest.raises(QuadaError, match="prompt p1 is 512 tokens long .* leaves no room .* context of 512"):
        check_room({"p0": 100, "p1": 512}, 1, 512)
    check_room({"p0": 10**6}, 10**9, None)  # a model that does not say how long its context is


def test_prompts_are_measured_in_their_chat_template_and_generation_refuses_what_does_not_fit():
    model, tokenizer = tiny_model("qwen2")
    assert context_length(model) == 512
    short, long = Prompt("short", "Hi"), Prompt("long", "x" * 480)  # one token per byte
    check_prompts_fit(model, tokenizer, [short], "plain", 400)
    with pytest.raises(QuadaError, match="longest prompt \\(long, 5\\d\\d tokens\\)|prompt long is"):
        check_prompts_fit(model, tokenizer, [short, long], "paper", 8)
    with pytest.raises(QuadaError, match="does not fit in the model's context of 512"):
        generate(model, tokenizer, ["Hi"], GenerationSettings(max_new_tokens=10**9))
