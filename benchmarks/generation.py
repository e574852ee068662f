"""Speed of quada's generation against the naive way, on the same model and prompts in one run.

First, quada's generation in bfloat16 and in float32 on the same prompts: tokens per second, their
ratio, which one ``--dtype auto`` picks on this CPU (named with its flags), and whether a response
depends on the batch it was generated in (automatic batch size against --batch-size). Then the
naive way, what the source paper's code does: transformers' generate() over fixed batches in file
order, against quada's (prompts sorted by length, finished rows leaving the batch, memory-aware
batch size), in the dtype ``auto`` picks. Prints the speed ratios and whether the responses are
identical.

    python benchmarks/generation.py --model qwen2.5-coder-0.5b-instruct --limit 520
"""

from __future__ import annotations

import time

import torch
import typer

from quada.chat import format_prompt
from quada.data import load_benchmark
from quada.devices import cpu_name, resolve_dtype
from quada.measures.generate import GenerationSettings, generate
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


def count_tokens(tokenizer, responses) -> int:
    return sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(
    model: str = typer.Option(DEFAULT_MODEL, help="Model to generate with."),
    prompts: str = typer.Option("advbench", help="Benchmark name or prompt file."),
    limit: int = typer.Option(128, help="Number of prompts (AdvBench has 520)."),
    batch_size: int = typer.Option(8, help="The fixed batch size (the naive run's, and quada's second batching)."),
    max_new_tokens: int = typer.Option(128),
    prompt_format: str = typer.Option("plain"),
    naive: bool = typer.Option(True, help="Also time the naive way (in the dtype --dtype auto picks)."),
) -> None:
    texts = [p.text for p in load_benchmark(prompts)][:limit]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, prompt_format=prompt_format)
    auto = resolve_dtype("auto", torch.device("cpu"))
    print(f"CPU: {cpu_name()}; {torch.get_num_threads()} threads; torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"model {model}, {len(texts)} prompts, {max_new_tokens} new tokens, prompt format {prompt_format}")

    # Both dtypes on the same prompts, each at the automatic batch size and at --batch-size: the speed,
    # and whether a response depends on the batch it was generated in.
    speeds, by_dtype = {}, {}
    for dtype in (torch.bfloat16, torch.float32):
        lm, tokenizer = load(model, dtype=dtype)
        automatic, seconds = timed(lambda: generate(lm, tokenizer, texts, settings, progress=False))
        fixed = generate(lm, tokenizer, texts, settings, batch_size=batch_size, progress=False)
        speeds[dtype] = count_tokens(tokenizer, automatic) / seconds
        by_dtype[dtype] = automatic
        same = sum(a == b for a, b in zip(automatic, fixed))
        print(f"{str(dtype).removeprefix('torch.')}: {seconds:.1f} s, {speeds[dtype]:.1f} tokens/s (automatic batch); "
              f"responses identical at batch {batch_size}: {same}/{len(texts)}")
        del lm
    ratio = speeds[torch.float32] / speeds[torch.bfloat16]
    agree = sum(a == b for a, b in zip(by_dtype[torch.bfloat16], by_dtype[torch.float32]))
    print(f"float32 / bfloat16 speed: {ratio:.2f}x; responses identical across dtypes: {agree}/{len(texts)}; "
          f"--dtype auto picks {str(auto).removeprefix('torch.')} here")
    if not naive:
        return

    lm, tokenizer = load(model, dtype=auto)
    naive_responses, t_naive = timed(lambda: naive_generate(lm, tokenizer, texts, settings, batch_size))
    same_batch, t_same = timed(lambda: generate(lm, tokenizer, texts, settings, batch_size=batch_size, progress=False))
    automatic, t_auto = timed(lambda: generate(lm, tokenizer, texts, settings, progress=False))
    print(f"naive (file order, batch {batch_size}, {str(auto).removeprefix('torch.')}): {t_naive:.1f} s")
    for label, seconds, responses in (
        (f"quada (sorted, batch {batch_size})", t_same, same_batch),
        ("quada (sorted, automatic batch)", t_auto, automatic),
    ):
        identical = sum(a == b for a, b in zip(responses, naive_responses))
        print(f"{label}: {seconds:.1f} s, speed-up x{t_naive / seconds:.2f}, identical responses {identical}/{len(texts)}")


if __name__ == "__main__":
    typer.run(main)
