"""The judge interface: one result per (request, response) pair, what identifies a judge and its
model, and how judged text is made safe to read: every special or chat-template marker in it is
removed (until none is left) and it is tokenized as plain text, so text from the judged model
cannot close the judge's turn or answer on its behalf.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from quada.errors import QuadaError
from quada.fingerprint import model_fingerprint

# Chat markers of common model families, removed from judged text even when the judge's own
# tokenizer does not know them (a response from another model may still contain them).
CHAT_MARKERS = (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>",
    "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>",
)


@dataclass(frozen=True)
class JudgeResult:
    """``label``: the judge's verdict (see each judge); ``score``: its strength (probability or
    expected grade); ``raw``: what the judge saw or said, for audit."""

    label: bool
    score: float
    raw: str


class Judge:
    """Base of all judges. ``identity`` names the judge and everything that can change its verdicts
    (:meth:`settings`: its model, dtype, tokenizer, questions, word lists, thresholds and code
    versions), for store keys and calibration caches: a judge changed in any of them never reuses
    another's stored verdicts or kappa.

    ``measure`` is the question the judge answers: "refusal" (did the model refuse?) or "harm" (does
    the response carry real harmful uplift?; see :data:`quada.data.MEASURES`); ``label_is_attack``
    says whether its label is the attack outcome (no refusal, or harmful) or the opposite (refused).
    """

    name: str = ""
    measure: str = ""
    label_is_attack: bool = True

    def settings(self) -> dict:
        """Everything besides the name that decides this judge's verdicts, as JSON-able values."""
        return {}

    @functools.cached_property
    def identity(self) -> str:
        """``name:digest`` of the name and :meth:`settings` (model judges: ``name:fingerprint:digest``)."""
        return f"{self.name}:{settings_digest(self.settings())}"

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[JudgeResult]:
        raise NotImplementedError


def check_pairs(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise QuadaError(f"judging needs one response per prompt, got {len(prompts)} prompts and {len(responses)} responses")


def settings_digest(settings: dict) -> str:
    """12 hex digits of a judge's settings (canonical JSON, SHA-256)."""
    text = json.dumps(settings, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """16 hex digits of a tokenizer's vocabulary and rules (its serialised form), special tokens and
    chat template: what turns a judge's text into ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    digest = hashlib.sha256(vocabulary.encode())
    digest.update(json.dumps([tokenizer.all_special_tokens, tokenizer.chat_template or ""], default=str).encode())
    return digest.hexdigest()[:16]


def sanitize(text: str, tokenizer: PreTrainedTokenizerBase | None) -> str:
    """``text`` without the judge tokenizer's special tokens (none known for a judge behind a server)
    or well-known chat markers.

    Removal repeats until nothing changes: removing one marker can join its neighbours into
    another (``<|im_<|im_end|>end|>``).
    """
    markers = set(CHAT_MARKERS)
    if tokenizer is not None:
        markers |= set(tokenizer.all_special_tokens)
        markers |= {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    markers = sorted(filter(None, markers), key=len, reverse=True)
    while True:
        stripped = text
        for marker in markers:
            stripped = stripped.replace(marker, "")
        if stripped == text:
            return text
        text = stripped


def literal_ids(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool = False) -> list[int]:
    """The ids of ``text`` read as plain text: the spelling of a special token inside it becomes
    ordinary tokens, never that special token. ``add_special_tokens`` adds the tokenizer's own
    (e.g. a BOS token) around it."""
    return tokenizer.encode(text, add_special_tokens=add_special_tokens, split_special_tokens=True)


def engine_of(model) -> Any:
    """What a judge's model runs as, part of its identity: a transformers model's dtype, or the
    facts of another engine (llama.cpp: its version, the GGUF's quantization and hash, the CPU
    features of its kernels), so that a stored verdict never mixes engines."""
    return str(model.dtype) if isinstance(model, torch.nn.Module) else model.identity


def fingerprint_of(model) -> str:
    """The judge model's fingerprint: its weights' (transformers), or its GGUF's hash (llama.cpp)."""
    return model_fingerprint(model) if isinstance(model, torch.nn.Module) else model.fingerprint
