"""Speed of quada's generation against the naive way, on the same model and prompts in one run.

Naive = what the source paper's code does: transformers' generate() over fixed batches in file
order. quada = prompts sorted by length, finished rows leaving the batch, memory-aware batch
size. Prints the speed ratios and whether the responses are identical.

    python benchmarks/generation.py --model qwen2.5-coder-0.5b-instruct --limit 520
"""

from __future__ import annotations

import time

import torch
import typer

from quada.chat import format_prompt
from quada.data import load_benchmark
from quada.eval.generate import GenerationSettings, generate
from quada.models import DEFAULT_MODEL, load


def naive_generate(model, tokenizer, prompts, settings, batch_size):
    responses = []
    for start in range(0, len(prompts), batch_size):
        texts = [format_prompt(tokenizer, p, settings.prompt_format) for p in prompts[start : start + batch_size]]
        batch = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**batch, do_sample=False, max_new_tokens=settings.max_new_tokens)
        new = out[:, batch["input_ids"].shape[1] :]
        responses += tokenizer.batch_decode(new, skip_special_tokens=True)
    return responses


def main(
    model: str = typer.Option(DEFAULT_MODEL, help="Model to generate with."),
    prompts: str = typer.Option("advbench", help="Benchmark name or prompt file."),
    limit: int = typer.Option(128, help="Number of prompts (AdvBench has 520)."),
    batch_size: int = typer.Option(8, help="The naive run's fixed batch size."),
    max_new_tokens: int = typer.Option(128),
    prompt_format: str = typer.Option("plain"),
) -> None:
    lm, tokenizer = load(model)
    texts = [p.text for p in load_benchmark(prompts)][:limit]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, prompt_format=prompt_format)

    def timed(fn):
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start

    naive, t_naive = timed(lambda: naive_generate(lm, tokenizer, texts, settings, batch_size))
    same_batch, t_same = timed(lambda: generate(lm, tokenizer, texts, settings, batch_size=batch_size, progress=False))
    auto, t_auto = timed(lambda: generate(lm, tokenizer, texts, settings, progress=False))

    print(f"model {model}, {len(texts)} prompts, {max_new_tokens} new tokens, prompt format {prompt_format}")
    print(f"naive (file order, batch {batch_size}): {t_naive:.1f} s")
    for label, seconds, responses in (
        (f"quada (sorted, batch {batch_size})", t_same, same_batch),
        ("quada (sorted, automatic batch)", t_auto, auto),
    ):
        identical = sum(a == b for a, b in zip(responses, naive))
        print(f"{label}: {seconds:.1f} s, speed-up x{t_naive / seconds:.2f}, identical responses {identical}/{len(texts)}")


if __name__ == "__main__":
    typer.run(main)
