"""Tiny random models built from configs, for tests and smoke runs (no downloads, no hub).

The tokenizer is byte-level (every UTF-8 byte is a token, no merges) with a ChatML-style chat
template, so any text round-trips and chat formatting behaves like a real instruct model's.
:func:`save_tiny_gguf` writes the same model as a GGUF file that llama.cpp runs (written with the
``gguf`` package), so a test can serve one model's weights with transformers and with llama.cpp.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GemmaConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ARCHITECTURES = ("llama", "qwen2", "gemma")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens plus the ChatML special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_config(arch: str = "llama", layers: int = 2, hidden: int = 64, vocab_size: int = 259):
    """A small decoder config in the style of ``arch`` (Llama, Qwen2: SiLU; Gemma: GELU-tanh)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,  # the default 0.02 gives models that repeat one token
        bos_token_id=None,
        eos_token_id=257,
        pad_token_id=256,
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    if arch == "gemma":
        return GemmaConfig(**common, head_dim=hidden // 4, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=False)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def tiny_model(arch: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 64):
    """Return ``(model, tokenizer)``: a randomly initialised fp32 model in eval mode."""
    tokenizer = tiny_tokenizer()
    config = tiny_config(arch, layers=layers, hidden=hidden, vocab_size=len(tokenizer))
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def save_tiny_model(folder: Path, arch: str = "qwen2", seed: int = 0, layers: int = 2) -> Path:
    """:func:`tiny_model` saved with its tokenizer in ``folder``, loadable by path like any model folder."""
    model, tokenizer = tiny_model(arch, seed=seed, layers=layers)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_classifier(folder: Path, labels: tuple[str, ...] = ("safe", "unsafe"), seed: int = 0) -> Path:
    """A tiny random Qwen2-style sequence classifier with the label names ``labels``, saved with
    its tokenizer in ``folder`` (a judge model given by path)."""
    tokenizer = tiny_tokenizer()
    config = tiny_config("qwen2", vocab_size=len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_run_inputs(root: Path, harmful: list[str], benign: list[str], layers: int = 2) -> Path:
    """Everything a run needs, as files under ``root``: a saved tiny Qwen2-style model folder
    (``model``), ``harmful.txt`` and ``benign.txt`` prompt files and a perplexity ``corpus.txt``."""
    save_tiny_model(root / "model", "qwen2", seed=3, layers=layers)
    (root / "harmful.txt").write_text("\n".join(harmful))
    (root / "benign.txt").write_text("\n".join(benign))
    (root / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog. " * 30)
    return root


def decisive(model, tokenizer, channel: int, positive: str = "y", negative: str = "n", gain: float = 1000.0):
    """``model`` (a tiny model) changed in place so that its next token is nearly always ``positive`` or
    ``negative``, as a real judge's answer dominates its distribution: the final norm passes one
    hidden ``channel``, amplified, and the output rows of the two tokens read it with opposite
    signs, so which of them wins depends on the input. Returns the model."""
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
        model.config.tie_word_embeddings = False
        kept = float(model.model.norm.weight[channel])
        model.model.norm.weight.zero_()
        model.model.norm.weight[channel] = gain * kept
        model.lm_head.weight[tokenizer.convert_tokens_to_ids(positive), channel] = 1.0
        model.lm_head.weight[tokenizer.convert_tokens_to_ids(negative), channel] = -1.0
    return model


def save_tiny_gguf(path: Path, seed: int = 0, layers: int = 2, add_bos: bool = False, model=None) -> Path:
    """The tiny Qwen2-style model of :func:`tiny_model` (or ``model``, one of them changed) written as an F32 GGUF file at ``path``:
    its weights under llama.cpp's tensor names (Qwen2 needs no rotary permutation), its byte-level
    vocabulary as a GPT-2 style BPE vocabulary, the special tokens as control tokens and the ChatML
    template, so llama.cpp tokenizes and renders prompts as the model's own tokenizer does
    (``add_bos``: unlike it, ask for a BOS token before every prompt). Written to a temporary name
    and renamed when complete."""
    made, tokenizer = tiny_model("qwen2", seed=seed, layers=layers)
    model = made if model is None else model
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    writer.add_name("quada tiny qwen2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL for token, _ in vocab])
    # llama.cpp needs a merge list; a merge whose result is no token changes no tokenization.
    writer.add_token_merges(["Ġ Ġ"])
    writer.add_bos_token_id(tokenizer.pad_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(tokenizer.chat_template)
    for name, parameter in model.state_dict().items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), parameter.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(path)
    return path


class StopsAfter:
    """An executor that hands over the results of ``inner`` until ``chunks`` generation units have
    come back, then raises KeyboardInterrupt, as a killed driver does; everything else is ``inner``'s
    (a resumed run must then store exactly the rows of an uninterrupted one)."""

    def __init__(self, inner, chunks: int):
        self.inner, self.left = inner, chunks

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def completed(self):
        for unit, result in self.inner.completed():
            if self.left == 0:
                raise KeyboardInterrupt
            self.left -= unit.kind == "generation"
            yield unit, result
