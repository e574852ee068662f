"""Batches of token-id rows of different lengths, and pooling hidden states over a batch's mask.

Generation, next-token scoring, the refusal proxy, activation capture and QuadA's regularizer all
run prompts of different lengths together; they pad them here, with the pad id of
:func:`quada.measures.scoring.pad_id_of` (any id works under the attention mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from quada.errors import QuadaError

POOLINGS = ("last", "mean")


def padded_batch(rows: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"] = "left",
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``rows`` padded with ``pad_id`` to the longest row, on the CPU.

    Left padding ends every row at the last column, where generation continues and next-token
    scores are read; it needs :func:`position_ids`. Right padding keeps each row at positions
    0, 1, ... so the model's default positions are right. The mask is 1 on the rows' own tokens.
    """
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(list(row))
        attention_mask[i, span] = 1
    return input_ids, attention_mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position of every token of a left-padded batch: 0 at each row's first own token (pads get 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def pool_prompt_activations(hidden: torch.Tensor, prompt_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per row from ``hidden`` (batch, tokens, dim) over the positions where ``prompt_mask``
    (batch, tokens) is true: the last such position (``last``) or their mean (``mean``)."""
    if pooling not in POOLINGS:
        raise QuadaError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    mask = prompt_mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    positions = torch.arange(prompt_mask.shape[1], device=hidden.device)
    last = (positions * prompt_mask.long()).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
