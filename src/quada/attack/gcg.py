"""GCG: greedy coordinate gradient search for an adversarial suffix.

Zou, Wang, Carlini, Nasr, Kolter, Fredrikson, "Universal and Transferable Adversarial Attacks on
Aligned Language Models", arXiv 2307.15043, Algorithm 1. The request is followed by a suffix of
``suffix_tokens`` tokens; each step
1. takes the gradient of the target loss with respect to the suffix's one-hot token matrix,
2. keeps, per suffix position, the ``topk`` tokens of most negative gradient,
3. draws ``candidates`` suffixes that each change one random position to one of its top tokens,
4. scores every candidate by the target loss and moves to the best one,
and the search ends early once greedy decoding of the current prompt produces the target (read
from the scoring pass itself: greedy decoding produces the target exactly when every target token
is the most likely one at its position).

Choices made here:
- the gradient and every loss run through the model *as served*, inside the approximation
  (``serving(step)``: a context opened once per step, so the gradient sees the approximated
  forward and backward passes);
- the tokens before the suffix (the template and the request) are the same for every
  candidate: their KV cache is computed once per step and expanded over the candidate batch
  (:class:`PrefixCache`), so a candidate costs only its suffix, the end of the user turn and the
  target (except under a rule that reads the length of a forward pass, such as TEAL's, where
  reusing the prefix would change the rule: there every candidate runs whole);
- under an approximation that draws noise, the gradient and every candidate of a step see one
  draw (the caller's ``serving``), and whether a suffix produces the target is checked as the
  response will be generated (``reached``: the generation's draw, prefill then one token per
  step), so a search stops on a suffix that works when served, not on one that fits a step's draw;
- suffixes are printable ASCII tokens (as in the paper), and a candidate is dropped unless its
  text re-tokenizes, inside the chat template, to exactly the ids that were scored: the prompt
  stored and answered later is then the prompt that was optimised;
- each step's random draws (candidate positions and tokens) come from a generator seeded by the
  step, and every step is handed to ``on_step`` as it completes (the caller stores it), so an
  interrupted search resumes from its last completed step and ends exactly as an uninterrupted one.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from quada.attack.loss import target_losses, target_matches, token_ids
from quada.chat import format_prompt
from quada.measures.generate import eos_token_ids, greedy_batch

SUFFIX_SLOT = "\u2063QUADA-SUFFIX\u2063"  # marks where the suffix goes while the template is laid out
CANDIDATE_BATCH = 64  # candidates run through the model together


@dataclass(frozen=True)
class GcgSettings:
    """The search budget: ``steps`` iterations, ``candidates`` suffixes scored per step, drawn from
    the ``topk`` best tokens per position, over a suffix of ``suffix_tokens`` tokens."""

    steps: int = 100
    candidates: int = 128
    topk: int = 64
    suffix_tokens: int = 20


@dataclass(frozen=True)
class GcgStep:
    """One completed step: the suffix it moved to, that suffix's target loss (under the step's
    approximation draw), whether greedy decoding then produces the target, and its cost."""

    step: int
    suffix: tuple[int, ...]
    loss: float
    success: bool
    forward_passes: int
    seconds: float


@dataclass(frozen=True)
class SuffixProblem:
    """The token layout ``before + suffix + after + target`` of one request in the chat template:
    ``before`` ends with the request and a space, ``after`` is the end of the user turn and the
    assistant's generation prompt. Ids are (1, n) tensors on the model's device, the target (T,)."""

    before_text: str
    after_text: str
    before: torch.Tensor
    after: torch.Tensor
    target: torch.Tensor

    def text(self, suffix_text: str) -> str:
        """The whole chat-formatted prompt with ``suffix_text`` in place."""
        return self.before_text + suffix_text + self.after_text


def suffix_problem(tokenizer, request: str, target: str, prompt_format: str, device) -> SuffixProblem:
    """The layout of ``request`` followed by a suffix in ``prompt_format``, with ``target`` as
    the wanted start of the answer."""
    before_text, after_text = format_prompt(tokenizer, adversarial_request(request, SUFFIX_SLOT), prompt_format).split(SUFFIX_SLOT)

    def ids(text):
        return torch.tensor([token_ids(tokenizer, text)], device=device)

    return SuffixProblem(before_text, after_text, ids(before_text), ids(after_text), ids(target)[0])


def adversarial_request(request: str, suffix_text: str) -> str:
    """The user turn: the request, a space, the suffix."""
    return f"{request} {suffix_text}"


def initial_suffix(tokenizer, length: int) -> list[int]:
    """The paper's starting suffix, "! ! ! ...", cut to ``length`` tokens."""
    ids = token_ids(tokenizer, " ".join(["!"] * length))
    return (ids * length)[:length]


@functools.cache
def allowed_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) booleans: the ids a suffix may use, those that decode to printable ASCII and
    are no special token (the embedding matrix may have more rows than the tokenizer has ids)."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    texts = tokenizer.batch_decode([[i] for i in range(min(len(tokenizer), vocab_size))])
    for i, text in enumerate(texts):
        allowed[i] = bool(text) and text.isascii() and text.isprintable()
    allowed[[i for i in tokenizer.all_special_ids if i < vocab_size]] = False
    return allowed


def full_scores(model, problem: SuffixProblem, suffixes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Target losses of ``suffixes`` (rows, L), each prompt run from its first token, and whether
    each makes greedy decoding produce the target."""
    rows = len(suffixes)
    ids = torch.cat([problem.before.expand(rows, -1), suffixes, problem.after.expand(rows, -1),
                     problem.target.expand(rows, -1)], dim=1)
    logits = model(input_ids=ids, logits_to_keep=len(problem.target) + 1).logits[:, :-1]
    return target_losses(logits, problem.target), target_matches(logits, problem.target)


class PrefixCache:
    """The KV cache of the tokens before the suffix, computed once and shared by every candidate.

    Exact under approximations that treat each token by its position alone (noise keyed by
    position, polynomials, per-token quantization); not under a rule that reads how many tokens a
    forward pass holds (TEAL's "last half", see ``ApproxConfig.per_call``), where the search scores
    every candidate from its first token instead."""

    def __init__(self, model, problem: SuffixProblem):
        self.model, self.problem = model, problem
        cache = DynamicCache(config=model.config)
        model(input_ids=problem.before, past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]

    def scores(self, suffixes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`full_scores` of ``suffixes`` (rows, L) from the cached prefix: equal up to rounding."""
        rows, problem = len(suffixes), self.problem
        # Expanded views of the one prefix: the forward pass appends to new tensors and never writes them.
        cache = DynamicCache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self.layers],
                             config=self.model.config)
        ids = torch.cat([suffixes, problem.after.expand(rows, -1), problem.target.expand(rows, -1)], dim=1)
        logits = self.model(input_ids=ids, past_key_values=cache, use_cache=True,
                            logits_to_keep=len(problem.target) + 1).logits[:, :-1]
        return target_losses(logits, problem.target), target_matches(logits, problem.target)


def candidate_scores(model, problem: SuffixProblem, suffixes: torch.Tensor,
                     reuse_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Target losses and target matches of ``suffixes`` in batches of :data:`CANDIDATE_BATCH` rows,
    from the shared prefix's KV cache when ``reuse_prefix`` (:class:`PrefixCache`)."""
    score = PrefixCache(model, problem).scores if reuse_prefix else functools.partial(full_scores, model, problem)
    batches = [score(suffixes[i : i + CANDIDATE_BATCH]) for i in range(0, len(suffixes), CANDIDATE_BATCH)]
    return torch.cat([losses for losses, _ in batches]), torch.cat([matches for _, matches in batches])


def reaches_target(model, tokenizer, problem: SuffixProblem, suffix: Sequence[int], prompt_id: str) -> bool:
    """Whether greedy generation from the prompt with ``suffix`` begins with the target: decoded
    exactly as :func:`quada.measures.generate.greedy_batch` decodes the response to the prompt
    ``prompt_id`` (prefill, then one token per step), so under an approximation it reads the draws
    that generation reads."""
    target = problem.target.tolist()
    ids = torch.cat([problem.before[0], torch.tensor(list(suffix), device=problem.before.device), problem.after[0]])
    generated = greedy_batch(model, ids[None], torch.ones_like(ids)[None], len(target), eos_token_ids(model, tokenizer),
                             stop=lambda new: new != target[: len(new)], row_ids=[prompt_id])
    return generated[0] == target


def token_gradients(model, problem: SuffixProblem, suffix: torch.Tensor) -> torch.Tensor:
    """(L, vocab): the gradient of the target loss with respect to the suffix's one-hot rows."""
    embedding = model.get_input_embeddings()
    one_hot = F.one_hot(suffix, embedding.num_embeddings).to(embedding.weight.dtype).requires_grad_(True)
    pieces = [embedding(problem.before), (one_hot @ embedding.weight)[None], embedding(problem.after),
              embedding(problem.target[None])]
    logits = model(inputs_embeds=torch.cat(pieces, dim=1), logits_to_keep=len(problem.target) + 1).logits[:, :-1]
    (gradient,) = torch.autograd.grad(target_losses(logits, problem.target).sum(), one_hot)
    return gradient


def sample_candidates(suffix: torch.Tensor, gradient: torch.Tensor, allowed: torch.Tensor, topk: int, count: int,
                      generator: torch.Generator) -> torch.Tensor:
    """(count, L) suffixes, each ``suffix`` with one random position set to one of that position's
    ``topk`` allowed tokens of most negative gradient."""
    scores = (-gradient.float()).masked_fill(~allowed.to(gradient.device), -torch.inf)
    top = scores.topk(min(topk, int(allowed.sum())), dim=1).indices.cpu()
    positions = torch.randint(len(suffix), (count,), generator=generator)
    choices = torch.randint(top.shape[1], (count,), generator=generator)
    candidates = suffix.cpu().repeat(count, 1)
    candidates[torch.arange(count), positions] = top[positions, choices]
    return candidates.to(suffix.device)


def retokenizes(tokenizer, problem: SuffixProblem, candidates: torch.Tensor) -> torch.Tensor:
    """(rows,) booleans: whether each candidate's prompt, as text, tokenizes back to the ids scored."""
    before, after = problem.before[0].tolist(), problem.after[0].tolist()
    rows = candidates.tolist()
    texts = [problem.text(tokenizer.decode(row)) for row in rows]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids == before + row + after for ids, row in zip(encoded, rows)], dtype=torch.bool)


def gcg_step(model, tokenizer, problem: SuffixProblem, suffix: torch.Tensor, settings: GcgSettings,
             generator: torch.Generator, reuse_prefix: bool = True) -> tuple[torch.Tensor, float, bool, int]:
    """One step of Algorithm 1 from ``suffix``: the next suffix, its loss, whether it produces the
    target in the scoring pass, and the number of sequences run forward."""
    allowed = allowed_tokens(tokenizer, model.get_input_embeddings().num_embeddings)
    gradient = token_gradients(model, problem, suffix)
    candidates = sample_candidates(suffix, gradient, allowed, settings.topk, settings.candidates, generator)
    candidates = candidates[retokenizes(tokenizer, problem, candidates).to(candidates.device)]
    if not len(candidates):  # nothing survives the filter: stay, and rescore where we are
        candidates = suffix[None]
    with torch.no_grad():
        losses, matches = candidate_scores(model, problem, candidates, reuse_prefix)
    best = int(losses.argmin())
    return candidates[best], float(losses[best]), bool(matches[best]), 1 + int(reuse_prefix) + len(candidates)


def gcg(model, tokenizer, problem: SuffixProblem, settings: GcgSettings,
        serving: Callable[[int], AbstractContextManager], step_seed: Callable[[int], int],
        done: Sequence[GcgStep] = (), on_step: Callable[[GcgStep], None] = lambda step: None,
        reached: Callable[[Sequence[int]], bool] | None = None, reuse_prefix: bool = True) -> list[GcgStep]:
    """Run the search to ``settings.steps`` steps or to the first step that produces the target,
    continuing after the completed steps ``done``; return every step. Step ``s`` runs inside
    ``serving(s)`` (the model as served, one draw for the gradient and every candidate) with
    candidates drawn from ``step_seed(s)``; whether a step's suffix produces the target is
    ``reached(suffix)`` (the model as the responses are generated) when given, else read from the
    scoring pass. ``on_step`` receives each new step as soon as it is complete."""
    steps = list(done)
    suffix = torch.tensor(steps[-1].suffix if steps else initial_suffix(tokenizer, settings.suffix_tokens),
                          device=problem.before.device)
    while len(steps) < settings.steps and not (steps and steps[-1].success):
        number = len(steps)
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(step_seed(number))
        with serving(number):
            suffix, loss, success, passes = gcg_step(model, tokenizer, problem, suffix, settings, generator, reuse_prefix)
        if reached is not None:
            success = reached(suffix.tolist())
            passes += 1
        step = GcgStep(number, tuple(suffix.tolist()), loss, success, passes, time.perf_counter() - start)
        on_step(step)
        steps.append(step)
    return steps
