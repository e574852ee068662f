"""Which prompt each row of a forward pass belongs to, and where each of its tokens sits.

An approximation's random draws and its per-row rules (TEAL's "last half of the prompt") must not
depend on the batch a prompt runs in. So every forward pass of an approximated model is read as
:class:`Rows`: per row a 64-bit key naming what the row is, and per token its position within the
row's own sequence (padding excluded).

- Generation names its rows by prompt id, inside :func:`prompt_rows` (and follows rows that leave
  the batch with :meth:`PromptRows.keep`), so the draws of a prompt are those of its id whatever
  runs beside it, however long the others are and whenever they stop.
- Any other forward pass (perplexity windows, scoring, training) keys each row by its own tokens,
  so the same sequence gets the same draws in any batch. A pass given only embeddings, without
  prompt ids, keys rows by their index.

Positions come from the attention mask when there is one (the count of the row's own tokens
before each one, so left padding shifts nothing), else from the position ids, else from the
length of the KV cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from quada.approx.draws import key64, split64

PADDING = -1  # the position of a padding token


@dataclass(frozen=True)
class Rows:
    """One forward pass: ``keys`` (batch, 2) int64, each row's 64-bit key as two 32-bit words;
    ``positions`` (batch, seq) int64, each token's position in its row's own sequence, or
    :data:`PADDING`. Both live on the activations' device."""

    keys: torch.Tensor
    positions: torch.Tensor

    @property
    def own(self) -> torch.Tensor:
        """(batch, seq) booleans: the rows' own tokens (not padding)."""
        return self.positions != PADDING

    def to(self, device: torch.device) -> Rows:
        if self.positions.device == device:
            return self
        return Rows(self.keys.to(device), self.positions.to(device))


def words(keys: Sequence[int], device: torch.device) -> torch.Tensor:
    """(n, 2) int64 tensor of 64-bit ``keys`` split into 32-bit words."""
    return torch.tensor([split64(k) for k in keys], dtype=torch.int64, device=device).reshape(-1, 2)


def prompt_key(prompt_id: str) -> int:
    """The row key of the prompt ``prompt_id``."""
    return key64("prompt", prompt_id)


def tokens_key(ids: Sequence[int]) -> int:
    """The row key of a row named by its own token ids."""
    return key64("tokens", *ids)


class PromptRows:
    """The prompt ids of the rows of the forward passes run inside :func:`prompt_rows`: one per
    row, or one id that ``every`` row shares (candidates scored under one draw)."""

    def __init__(self, ids: Sequence[str] = (), every: str | None = None):
        self.ids, self.every = list(ids), every
        self._keys: dict[torch.device, torch.Tensor] = {}

    def keep(self, indices: Sequence[int]) -> None:
        """Only the rows at ``indices`` (in that order) stay in the batch."""
        if self.every is None:
            self.ids = [self.ids[i] for i in indices]
            self._keys.clear()

    def keys(self, batch: int, device: torch.device) -> torch.Tensor:
        """(batch, 2) words of the rows' keys."""
        if self.every is not None:
            return words([prompt_key(self.every)], device).expand(batch, 2)
        if len(self.ids) != batch:
            raise ValueError(f"{len(self.ids)} prompt ids name the rows of a batch of {batch}")
        if device not in self._keys:
            self._keys[device] = words([prompt_key(i) for i in self.ids], device)
        return self._keys[device]


_PROMPT_ROWS: ContextVar[PromptRows | None] = ContextVar("quada_prompt_rows", default=None)


@contextlib.contextmanager
def prompt_rows(ids: Sequence[str] = (), every: str | None = None) -> Iterator[PromptRows]:
    """Inside, the rows of every approximated forward pass are the prompts ``ids``, in order (call
    ``keep`` on the yielded object when rows leave the batch), or all the one prompt ``every``: each
    row then draws what that prompt draws at the same positions."""
    rows = PromptRows(ids, every)
    token = _PROMPT_ROWS.set(rows)
    try:
        yield rows
    finally:
        _PROMPT_ROWS.reset(token)


def _positions(kwargs: Mapping[str, Any], batch: int, seq: int, device: torch.device) -> torch.Tensor:
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= seq:
        own = mask[:, -seq:].bool()
        counted = mask.long().cumsum(-1)[:, -seq:] - 1
        return torch.where(own, counted, torch.full_like(counted, PADDING)).to(device)
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[1] == seq:
        return position_ids.long().expand(batch, seq).to(device)
    offset = 0
    cache_position = kwargs.get("cache_position")
    cache = kwargs.get("past_key_values")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        offset = int(cache_position.reshape(-1)[0])
    elif cache is not None and hasattr(cache, "get_seq_length"):
        offset = int(cache.get_seq_length())
    return (offset + torch.arange(seq, device=device)).expand(batch, seq)


def rows_of_forward(args: tuple, kwargs: Mapping[str, Any]) -> Rows | None:
    """The :class:`Rows` of a decoder's forward call (its ``args`` and ``kwargs``), or None when the
    call has neither token ids nor embeddings."""
    input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    embeds = kwargs.get("inputs_embeds")
    shaped = input_ids if isinstance(input_ids, torch.Tensor) else embeds
    if not isinstance(shaped, torch.Tensor) or shaped.dim() < 2:
        return None
    batch, seq, device = shaped.shape[0], shaped.shape[1], shaped.device
    positions = _positions(kwargs, batch, seq, device)
    named = _PROMPT_ROWS.get()
    if named is not None:
        return Rows(named.keys(batch, device), positions)
    if isinstance(input_ids, torch.Tensor):
        own = (positions != PADDING).tolist()
        keys = [tokens_key([t for t, mine in zip(row, kept) if mine]) for row, kept in zip(input_ids.tolist(), own)]
    else:
        keys = [key64("row", i) for i in range(batch)]
    return Rows(words(keys, device), positions)


def rows_of_shape(x: torch.Tensor) -> Rows:
    """Rows for a tensor reached without a decoder forward call (a layer run on its own): keyed by
    row index, positions 0, 1, ..."""
    batch, seq = x.shape[0], x.shape[1]
    return Rows(words([key64("row", i) for i in range(batch)], x.device),
                torch.arange(seq, device=x.device).expand(batch, seq))
