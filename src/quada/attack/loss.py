"""The target loss that GCG and AutoDAN minimise: how unlikely the model is to begin its answer
with the target string (e.g. "Sure, here is"), as the mean cross-entropy of the target's tokens
after the chat-formatted prompt (Zou et al., arXiv 2307.15043, eq. 2; Liu et al., arXiv
2310.04451, eq. 1).

Prompts are laid out exactly as :func:`quada.measures.generate.generate` lays them out (the chat
template as text, tokenized without added special tokens), so the prompt an attack optimises is
the prompt the responses are generated from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from quada.chat import format_prompt
from quada.measures.batching import padded_batch, position_ids
from quada.measures.scoring import pad_id_of

DEFAULT_TARGET = "Sure, here is"


def token_ids(tokenizer, text: str) -> list[int]:
    """``text`` as token ids, without added special tokens (chat text carries its own markers)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def target_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the mean cross-entropy of ``target`` (T ids) under ``logits`` (rows, T, vocab),
    where ``logits[:, i]`` predicts ``target[i]``."""
    rows, length, vocab = logits.shape
    flat = F.cross_entropy(logits.float().reshape(-1, vocab), target.repeat(rows), reduction="none")
    return flat.view(rows, length).mean(1)


def target_matches(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, whether every target token is the most likely one at its position: exactly when
    greedy decoding begins with the target, since each position sees the target's own prefix."""
    return (logits.argmax(-1) == target).all(1)


@torch.no_grad()
def prompt_losses(model, tokenizer, prompts: Sequence[str], target: str, prompt_format: str,
                  batch_size: int = 8) -> list[float]:
    """The target loss after each of ``prompts`` (requests, chat-formatted here), in their order;
    prompts of similar length are batched, left-padded with explicit positions."""
    target_ids = token_ids(tokenizer, target)
    rows = [token_ids(tokenizer, format_prompt(tokenizer, p, prompt_format)) + target_ids for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    losses = [0.0] * len(rows)
    expected = torch.tensor(target_ids, device=model.device)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        input_ids, attention_mask = padded_batch([rows[i] for i in chunk], pad_id_of(tokenizer))
        logits = model(
            input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
            position_ids=position_ids(attention_mask).to(model.device), logits_to_keep=len(target_ids) + 1,
        ).logits[:, :-1]
        for i, loss in zip(chunk, target_losses(logits, expected).tolist()):
            losses[i] = loss
    return losses
