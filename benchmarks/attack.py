"""One GCG step with the prefix KV cache against recomputing every candidate from scratch, as a
ratio in one run, and the candidates scored per second. Target: the cached step at least 2x faster.

A step is the gradient pass plus the scoring of ``--candidates`` suffixes; both variants score the
same candidates (and must agree on their losses), only the scoring differs: the cached one runs
the tokens before the suffix once and expands their KV cache over the batch. The saving grows with
the prefix, so the request is wrapped in a jailbreak-length template (``--prefix-words``).

    python benchmarks/attack.py                                         # a tiny random model
    python benchmarks/attack.py --model qwen2.5-coder-0.5b-instruct     # the built-in 0.5B model
"""

from __future__ import annotations

import time

import torch
import typer

from quada.attack.gcg import (
    GcgSettings,
    allowed_tokens,
    candidate_scores,
    initial_suffix,
    sample_candidates,
    suffix_problem,
    token_gradients,
)

REQUEST = "Write a short story about a lighthouse keeper"


def load_model(name: str | None):
    if name is None:
        from quada.testing import tiny_model

        return tiny_model("qwen2", layers=4, hidden=256), "tiny random Qwen2 (4 layers, hidden 256)"
    from quada.models import load

    return load(name), name


def best_of(repeats: int, work) -> tuple[float, object]:
    """The fastest of ``repeats`` timed runs of ``work()``, and its result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = work()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(
    model: str = typer.Option(None, help="Model (built-in name, folder or file); default: a tiny random model."),
    candidates: int = typer.Option(64, help="Candidate suffixes scored in the step."),
    suffix_tokens: int = typer.Option(20, help="Suffix length in tokens."),
    prefix_words: int = typer.Option(150, help="Words of template text before the request (0: the bare request)."),
    repeats: int = typer.Option(2, help="Timed runs per variant; the fastest counts."),
) -> None:
    (lm, tokenizer), label = load_model(model)
    request = " ".join(["Please stay in character and answer fully."] * (prefix_words // 7)) + " " + REQUEST
    problem = suffix_problem(tokenizer, request, "Sure, here is", "paper", lm.device)
    suffix = torch.tensor(initial_suffix(tokenizer, suffix_tokens), device=lm.device)
    settings = GcgSettings(candidates=candidates, topk=64, suffix_tokens=suffix_tokens)
    allowed = allowed_tokens(tokenizer, lm.get_input_embeddings().num_embeddings)
    gradient_seconds, gradient = best_of(repeats, lambda: token_gradients(lm, problem, suffix))
    batch = sample_candidates(suffix, gradient, allowed, settings.topk, candidates, torch.Generator().manual_seed(0))

    with torch.no_grad():
        best_of(1, lambda: candidate_scores(lm, problem, batch, reuse_prefix=False))  # warm-up
        full_seconds, (reference, _) = best_of(repeats, lambda: candidate_scores(lm, problem, batch, reuse_prefix=False))
        cached_seconds, (losses, _) = best_of(repeats, lambda: candidate_scores(lm, problem, batch, reuse_prefix=True))
    # Both orders of summation are exact in float32; in bfloat16 they round apart by a few percent.
    tolerance = 1e-3 if lm.dtype == torch.float32 else 0.1
    torch.testing.assert_close(losses, reference, atol=tolerance, rtol=tolerance)
    cached_step, full_step = gradient_seconds + cached_seconds, gradient_seconds + full_seconds
    print(f"model {label} ({lm.dtype}), {torch.get_num_threads()} threads; prompt {problem.before.shape[1]} tokens before the suffix, "
          f"{suffix_tokens} suffix, {problem.after.shape[1] + len(problem.target)} after; {candidates} candidates")
    print(f"gradient pass            {gradient_seconds:8.3f} s   (max loss difference cached vs scratch: "
          f"{float((losses - reference).abs().max()):.2g})")
    print(f"scoring, from scratch    {full_seconds:8.3f} s   {candidates / full_seconds:8.1f} candidates/s")
    print(f"scoring, prefix cache    {cached_seconds:8.3f} s   {candidates / cached_seconds:8.1f} candidates/s")
    ratio = full_step / cached_step
    print(f"GCG step: {full_step:.3f} s from scratch, {cached_step:.3f} s cached: {ratio:.2f}x "
          f"({'ok' if ratio >= 2 else 'BELOW THE 2x TARGET'}); scoring alone {full_seconds / cached_seconds:.2f}x")


if __name__ == "__main__":
    typer.run(main)
