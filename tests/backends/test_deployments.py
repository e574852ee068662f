"""Deployment specs, their store keys, and the pure rules every backend shares."""

import pytest

from quada.backends import (
    LLAMACPP,
    OPENAI,
    OPENAI_CHAT,
    Deployment,
    deployment_key,
    parse_deployment,
    prompt_sha256,
    refusal_cut,
    render,
)
from quada.backends.openai import rendering_mismatch
from quada.errors import QuadaError
from quada.measures.generate import GenerationSettings
from quada.testing import tiny_tokenizer


def test_deployment_specs_parse_to_their_parts():
    assert parse_deployment("llamacpp:runs/q3.gguf") == Deployment(LLAMACPP, "runs/q3.gguf")
    assert parse_deployment("openai:http://127.0.0.1:8000/v1@Qwen/Qwen2.5-1.5B") == Deployment(
        OPENAI, "http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-1.5B")
    # A URL without a path gets the usual API root; a trailing slash goes.
    assert parse_deployment("openai-chat:https://host:443@m").target == "https://host:443/v1"
    assert parse_deployment("openai:http://h:1/api/v1/@m").target == "http://h:1/api/v1"
    assert str(parse_deployment("openai:http://h:1@m")) == "openai:http://h:1/v1@m"
    assert parse_deployment("openai-chat:http://h:1/v1@m").kind == OPENAI_CHAT


@pytest.mark.parametrize("text, fragment", [
    ("vllm:http://h/v1@m", "cannot read the deployment"),
    ("llamacpp:", "cannot read the deployment"),
    ("openai:http://h:1/v1", "names no model"),
    ("openai:http://h:1/v1@", "names no model"),
    ("openai:ftp://h/v1@m", "not a server URL"),
    ("openai:http://user:secret@h:1/v1@m", "carries credentials"),
    ("openai:http://h:1/v1?x=1@m", "query"),
])
def test_a_malformed_deployment_is_one_message(text, fragment):
    with pytest.raises(QuadaError, match=fragment) as caught:
        parse_deployment(text)
    assert "secret" not in str(caught.value)


class Named:
    def __init__(self, condition, identity):
        self.condition, self.identity = condition, identity


def test_the_key_names_backend_version_quantization_served_name_and_prompt_text():
    settings = GenerationSettings(max_new_tokens=8, prompt_format="paper")
    backend = Named("openai:http://h:1/v1@m", {"backend": "openai", "version": "1", "quant": "Q4_K_M", "model": "m"})
    key = deployment_key(backend, "fp", "p0", "rendered text", settings, 0)
    assert (key.model, key.approx, key.prompt_id, key.seed) == ("fp", "openai:http://h:1/v1@m", "p0", 0)
    for fragment in ('"backend":"openai"', '"quant":"Q4_K_M"', '"model":"m"', '"version":"1"',
                     f'"prompt_sha256":"{prompt_sha256("rendered text")}"', '"max_new_tokens":8'):
        assert fragment in key.settings
    # Any part of the identity, or another rendering of the same request, is another row.
    other = Named(backend.condition, {**backend.identity, "model": "n"})
    assert deployment_key(other, "fp", "p0", "rendered text", settings, 0) != key
    assert deployment_key(backend, "fp", "p0", "rendered text ", settings, 0) != key


def test_every_arm_reads_the_reference_rendering():
    tokenizer = tiny_tokenizer()
    rendered = render(tokenizer, "How do I bake bread?", "paper")
    assert rendered.text == tokenizer.apply_chat_template(list(rendered.messages), tokenize=False, add_generation_prompt=True)
    assert rendered.messages[1]["content"] == "Instruction: How do I bake bread?"


def test_the_refusal_cut_ends_at_the_token_that_completes_the_first_phrase():
    pieces = ["Sure", ",", " I", " am", " sorry", " but", " no", "."]
    cut = refusal_cut(lambda n: "".join(pieces[:n]), len(pieces))
    assert "".join(pieces[:cut]) == "Sure, I am sorry"  # "I am sorry" is one of the paper's phrases
    assert refusal_cut(lambda n: "".join(["Here", " is", " how"][:n]), 3) is None


def test_a_rendering_mismatch_names_where_it_starts():
    assert rendering_mismatch("<|im_start|>user\nhi", "<|im_start|>user\nhi") is None
    assert rendering_mismatch([1, 2, 3], [1, 2, 3]) is None
    text = rendering_mismatch("<|im_start|>system\nYou are", "<|im_start|>user\nhi")
    assert "first differing at character 12" in text
    assert "first differing at token 2" in rendering_mismatch([1, 2, 3], [1, 2, 4, 5])
    assert "first differing at token 2" in rendering_mismatch([1, 2], [1, 2, 7])
