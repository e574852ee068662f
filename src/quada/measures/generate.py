"""Batched greedy generation, faster than fixed batches in file order and with the same outputs.

Three things make it fast on a CPU:
- prompts are sorted by token length, so a batch holds prompts of similar length and pads little;
- a sequence leaves the batch (and the KV cache) as soon as it emits end-of-sequence, so short
  answers such as refusals stop costing compute while long answers finish;
- the batch size follows the memory the KV cache and activations need, up to a cap.
Outputs are the ids generated after the prompt (sliced at the prompt length), decoded without
special tokens: the text is never split on template markers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from quada.approx.rows import prompt_rows
from quada.chat import PROMPT_FORMATS, format_prompt
from quada.data import Prompt
from quada.errors import QuadaError
from quada.judging import refusal_phrase
from quada.measures.batching import padded_batch, position_ids
from quada.measures.scoring import pad_id_of
from quada.runs import progress_bar

MAX_BATCH_SIZE = 64
MEMORY_FRACTION = 0.5


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides a greedy generation besides the model and the prompt."""

    max_new_tokens: int = 128
    prompt_format: str = "plain"
    # End a response as soon as it contains one of the paper's refusal phrases. Lossless for the
    # keyword judge (one phrase anywhere already makes the response a failed attack), not for
    # the model judges, which read the whole response.
    stop_on_refusal: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise QuadaError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise QuadaError(
                f"unknown prompt format {self.prompt_format!r}; choose one of: {', '.join(PROMPT_FORMATS)}"
            )

    def as_dict(self) -> dict:
        return {"decoding": "greedy", **asdict(self)}


def available_memory() -> int:
    """Bytes of memory the OS can still give us (MemAvailable), or total memory as a fallback."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_memory(device: torch.device) -> int:
    """Bytes that computing on ``device`` may still take: a GPU's free memory (``torch.cuda.mem_get_info``,
    which counts every process on it), or the memory the OS can still give for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()


def auto_batch_size(model: PreTrainedModel, prompt_tokens: int, max_new_tokens: int, cap: int = MAX_BATCH_SIZE) -> int:
    """The largest batch (up to ``cap``) whose generation fits in half of the free memory of the
    model's device (:func:`free_memory`; a model spread over GPUs: the first, where the inputs go).

    Per sequence it counts the KV cache at full length, one layer's prefill activations (hidden
    states, MLP intermediates and attention scores) and one row of logits.
    """
    cfg = model.config.get_text_config()
    itemsize = model.dtype.itemsize
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    length = prompt_tokens + max_new_tokens
    kv_cache = 2 * cfg.num_hidden_layers * kv_heads * head_dim * length * itemsize
    activations = prompt_tokens * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * itemsize
    attention = heads * prompt_tokens * prompt_tokens * itemsize
    per_sequence = kv_cache + activations + attention + cfg.vocab_size * 4
    return max(1, min(cap, int(free_memory(model.device) * MEMORY_FRACTION // per_sequence)))


def context_length(model: PreTrainedModel) -> int | None:
    """The positions the model was made for (its configuration's ``max_position_embeddings``), or
    ``None`` where the configuration does not say."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def check_room(lengths: Mapping[str, int], new_tokens: int, context: int | None) -> None:
    """Fail when the longest prompt (``lengths``: its name and its templated token count) followed by
    ``new_tokens`` generated tokens does not fit in ``context`` positions: generation would run
    beyond what the model was made for, on a prompt that may be any size."""
    if context is None or not lengths:
        return
    name = max(lengths, key=lengths.__getitem__)
    longest = lengths[name]
    if longest >= context:
        raise QuadaError(
            f"prompt {name} is {longest} tokens long in its chat template, which leaves no room in the model's "
            f"context of {context} tokens; shorten it or remove it from the prompt file"
        )
    if longest + new_tokens > context:
        raise QuadaError(
            f"--max-new-tokens {new_tokens} does not fit in the model's context of {context} tokens after the "
            f"longest prompt ({name}, {longest} tokens); give --max-new-tokens {context - longest} or less"
        )


def check_prompts_fit(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                      prompt_format: str, new_tokens: int) -> None:
    """Fail before any work on a prompt that, in its chat template in ``prompt_format`` and followed by
    ``new_tokens`` generated tokens, does not fit in the model's context (see :func:`check_room`)."""
    lengths = {
        p.id: len(tokenizer(format_prompt(tokenizer, p.text, prompt_format), add_special_tokens=False)["input_ids"])
        for p in prompts
    }
    check_room(lengths, new_tokens, context_length(model))


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The ids that end a response, on the model's device: the generation config's end tokens and
    the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(sorted(set(ids)), device=model.device)


@torch.inference_mode()
def greedy_batch(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_ids: torch.Tensor,
    stop: Callable[[list[int]], bool] | None = None,
    row_ids: Sequence[str] | None = None,
) -> list[list[int]]:
    """Greedy-decode a left-padded batch; return each row's new ids without the end token.

    Rows that emit an end token, or whose new ids make ``stop`` true, leave the batch and the
    KV cache at once. ``row_ids`` name the rows' prompts for an approximation's draws (see
    :func:`quada.approx.rows.prompt_rows`; default: each row's own prompt tokens), so a row draws
    the same noise whatever else is in the batch and whenever the others stop.
    """
    batch = input_ids.shape[0]
    generated: list[list[int]] = [[] for _ in range(batch)]
    rows = torch.arange(batch, device=input_ids.device)
    cache = DynamicCache(config=model.config)
    positions = position_ids(attention_mask)
    step_ids = input_ids
    if row_ids is None:
        row_ids = [f"tokens:{ids}" for ids in _own_ids(input_ids, attention_mask)]
    with prompt_rows(row_ids) as named:
        for step in range(max_new_tokens):
            logits = model(
                input_ids=step_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            next_ids = logits.argmax(-1)
            finished = torch.isin(next_ids, eos_ids)
            for i, (row, token, done) in enumerate(zip(rows.tolist(), next_ids.tolist(), finished.tolist())):
                if not done:
                    generated[row].append(token)
                    if stop is not None and stop(generated[row]):
                        finished[i] = True
            if finished.all() or step == max_new_tokens - 1:
                break
            if finished.any():
                keep = (~finished).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                named.keep(keep.tolist())
                rows, next_ids = rows[keep], next_ids[keep]
                attention_mask, positions = attention_mask[keep], positions[keep]
            step_ids = next_ids[:, None]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1
    return generated


def _own_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Each row's own token ids (without its padding)."""
    return [[t for t, m in zip(row, mask) if m] for row, mask in zip(input_ids.tolist(), attention_mask.tolist())]


def _stop_on_refusal(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[int]], bool]:
    def contains_refusal(ids: list[int]) -> bool:
        return refusal_phrase(tokenizer.decode(ids, skip_special_tokens=True)) is not None

    return contains_refusal


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: GenerationSettings = GenerationSettings(),
    batch_size: int | None = None,
    progress: bool = True,
    prompt_ids: Sequence[str] | None = None,
) -> list[str]:
    """Greedy responses to ``prompts`` (in their order), each formatted with the chat template.

    ``prompt_ids`` (one per prompt) name the prompts for an approximation's random draws, so that
    a prompt draws the same noise in any batch (the results store passes its prompt ids); by
    default a prompt is named by its tokens."""
    if prompt_ids is not None and len(prompt_ids) != len(prompts):
        raise ValueError(f"{len(prompt_ids)} prompt ids for {len(prompts)} prompts")
    if batch_size is not None and batch_size < 1:
        raise QuadaError(f"batch size must be at least 1, got {batch_size}")
    encoded = [
        tokenizer(format_prompt(tokenizer, p, settings.prompt_format), add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    check_room({f"{p[:40]!r}": len(ids) for p, ids in zip(prompts, encoded)}, settings.max_new_tokens,
               context_length(model))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    end_ids = eos_token_ids(model, tokenizer)
    stop = _stop_on_refusal(tokenizer) if settings.stop_on_refusal else None
    pad_id = pad_id_of(tokenizer)
    responses: list[str] = [""] * len(prompts)
    with progress_bar(progress) as bar:
        task = bar.add_task("generating", total=len(prompts))
        start = 0
        while start < len(order):
            # Longest first: the first batch is the most memory-hungry, so a bad fit shows at once.
            size = batch_size or auto_batch_size(model, len(encoded[order[start]]), settings.max_new_tokens)
            chunk = order[start : start + size]
            input_ids, attention_mask = padded_batch([encoded[i] for i in chunk], pad_id)
            new_ids = greedy_batch(
                model, input_ids.to(model.device), attention_mask.to(model.device), settings.max_new_tokens, end_ids, stop,
                None if prompt_ids is None else [prompt_ids[i] for i in chunk],
            )
            for i, ids in zip(chunk, new_ids):
                responses[i] = tokenizer.decode(ids, skip_special_tokens=True)
            bar.advance(task, len(chunk))
            start += len(chunk)
    return responses
