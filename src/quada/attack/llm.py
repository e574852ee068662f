"""The attacker's own language model: sampled rewrites for AutoDAN's LLM mutation and the past-tense
reformulations.

The attacker's model runs clean (it is not the model being served), samples with a temperature,
and draws from a generator seeded by the caller, so the same seed gives the same rewrite.
"""

from __future__ import annotations

import torch

from quada.attack.loss import token_ids
from quada.chat import format_prompt
from quada.measures.generate import eos_token_ids


@torch.no_grad()
def sample_reply(model, tokenizer, request: str, prompt_format: str, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int) -> str:
    """One sampled reply of ``model`` to the user turn ``request`` (temperature and nucleus
    ``top_p``), drawn from a generator seeded by ``seed``."""
    ids = torch.tensor([token_ids(tokenizer, format_prompt(tokenizer, request, prompt_format))], device=model.device)
    ends = set(eos_token_ids(model, tokenizer).tolist())
    generator = torch.Generator(device=model.device).manual_seed(seed)
    past, new = None, []
    step_ids = ids
    for _ in range(max_new_tokens):
        output = model(input_ids=step_ids, past_key_values=past, use_cache=True, logits_to_keep=1)
        past = output.past_key_values
        probabilities = torch.softmax(output.logits[0, -1].float() / temperature, dim=-1)
        ordered, order = probabilities.sort(descending=True)
        outside = ordered.cumsum(0) - ordered > top_p  # the nucleus: the smallest set above top_p
        ordered[outside] = 0
        token = int(order[torch.multinomial(ordered, 1, generator=generator)])
        if token in ends:
            break
        new.append(token)
        step_ids = torch.tensor([[token]], device=model.device)
    return tokenizer.decode(new, skip_special_tokens=True)
