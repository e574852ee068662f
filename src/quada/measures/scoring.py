"""Score answers by the model's next-token distribution instead of sampling text.

Judges (yes/no, a 1-5 grade) and multiple-choice accuracy (a letter) all ask one question: at the
position right after the prompt, how likely is each candidate answer token? Reading the
probabilities is deterministic, needs one forward pass per prompt and never fails to parse.
Prompts built from one template share their opening tokens (chat frame, question); those run
once and their key-value cache serves every batch.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from quada.errors import QuadaError
from quada.measures.batching import padded_batch, position_ids


@torch.inference_mode()
def next_token_logprobs(
    model: PreTrainedModel,
    sequences: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 8,
    share_prefix: bool = True,
) -> list[list[float]]:
    """Log-probabilities of ``candidates[i]`` tokens as the next token after ``sequences[i]``.

    Sequences are sorted by length and run in left-padded batches with explicit position ids, so
    each row scores as it would alone (up to float rounding). With ``share_prefix``, the tokens
    that open every sequence run once and each batch continues from their key-value cache.
    """
    if batch_size < 1:
        raise QuadaError(f"batch size must be at least 1, got {batch_size}")
    results: list[list[float]] = [[] for _ in sequences]
    prefix_cache = shared_prefix_cache(model, sequences) if share_prefix else None
    skip = prefix_cache.get_seq_length() if prefix_cache is not None else 0
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        logits = last_logits(model, [sequences[i][skip:] for i in chunk], pad_id, prefix_cache)
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, i in enumerate(chunk):
            results[i] = logprobs[row, list(candidates[i])].tolist()
    return results


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading ids all ``sequences`` share, leaving every sequence at least one id of its own
    (the next-token scores are read after a sequence's own last id)."""
    if not sequences:
        return 0
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0]
    length = 0
    while length < limit and all(s[length] == first[length] for s in sequences):
        length += 1
    return length


def shared_prefix_cache(model: PreTrainedModel, sequences: Sequence[Sequence[int]]) -> DynamicCache | None:
    """The key-value cache of the ids common to all ``sequences`` (see :func:`common_prefix_length`),
    on the model's device; None when they share nothing or the model's cache has sliding-window
    layers (those drop old positions, which the batches' attention masks still count)."""
    length = common_prefix_length(sequences)
    cache = DynamicCache(config=model.config)
    if length == 0 or any(layer.is_sliding for layer in cache.layers):
        return None
    prefix = torch.tensor([list(sequences[0][:length])], device=model.device)
    model(input_ids=prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


def last_logits(model: PreTrainedModel, rows: Sequence[Sequence[int]], pad_id: int,
                prefix_cache: DynamicCache | None = None) -> torch.Tensor:
    """The model's logits after the last id of each of ``rows`` (one left-padded batch), each row
    continuing ``prefix_cache`` when given. The prefix is copied for every row, so the rows' pads
    sit between it and their own ids: the mask hides them and the positions skip them."""
    input_ids, attention_mask = padded_batch(rows, pad_id)
    positions = position_ids(attention_mask)
    cache = None
    if prefix_cache is not None:
        cache = copy.deepcopy(prefix_cache)  # the forward pass appends to the cache it is given
        cache.batch_repeat_interleave(len(rows))
        prefix_length = cache.get_seq_length()
        prefix_mask = torch.ones(len(rows), prefix_length, dtype=attention_mask.dtype)
        attention_mask = torch.cat([prefix_mask, attention_mask], 1)
        positions = positions + prefix_length
    return model(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        position_ids=positions.to(model.device),
        past_key_values=cache,
        use_cache=cache is not None,
        logits_to_keep=1,
    ).logits[:, -1]


def answer_group_probabilities(logprobs: Sequence[float], groups: Sequence[Sequence[int]]) -> list[float]:
    """The probability of each answer group (the sum over its tokens), from the log-probabilities of
    all groups' tokens in group order, as :func:`next_token_logprobs` returns them."""
    values = iter(logprobs)
    return [sum(math.exp(next(values)) for _ in group) for group in groups]


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for padding (any id works under the attention mask; pad or eos preferred)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def answer_group_ids(tokenizer: PreTrainedTokenizerBase, groups: Sequence[Sequence[str]]) -> list[list[int]]:
    """For each group of answer spellings (e.g. "yes", " Yes"), the ids of their first tokens.

    An answer's first token decides it at the answer position; an id that starts answers of two
    groups (such as a bare space in a byte-level vocabulary) tells them apart by nothing and is
    dropped from both.
    """
    firsts = [
        list(dict.fromkeys(tokenizer.encode(word, add_special_tokens=False)[0] for word in group)) for group in groups
    ]
    shared = {i for a, b in itertools.combinations(firsts, 2) for i in set(a) & set(b)}
    ids = [[i for i in group if i not in shared] for group in firsts]
    if not all(ids):
        raise QuadaError(
            f"the tokenizer cannot tell the answers {[list(g) for g in groups]} apart by their first "
            "token, so they cannot be scored by logits; choose another judge model"
        )
    return ids


def answer_token_split(tokenizer: PreTrainedTokenizerBase, prompt: str, answers: Sequence[str]) -> tuple[list[int], list[int]]:
    """Split ``prompt + answer`` tokenizations into a shared prefix and one distinct token per answer.

    Tokenizing each full string (as plain text, with a BOS token where the tokenizer adds one)
    and taking the common prefix handles both vocabularies with ``" A"`` as one token and
    byte-level ones where the space is a token of its own.
    """
    encodings = [tokenizer(prompt + answer)["input_ids"] for answer in answers]
    prefix_length = 0
    while all(len(e) > prefix_length for e in encodings) and len({e[prefix_length] for e in encodings}) == 1:
        prefix_length += 1
    tails = [e[prefix_length:] for e in encodings]
    if any(len(tail) != 1 for tail in tails) or len({tail[0] for tail in tails}) != len(tails):
        raise QuadaError(
            f"the tokenizer does not encode the answers {list(answers)} as one distinct token each "
            "after the prompt, so they cannot be scored by logits; use a model with a standard vocabulary"
        )
    return encodings[0][:prefix_length], [tail[0] for tail in tails]
