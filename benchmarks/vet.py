"""What the opt-in early stop on refusal buys and costs, measured in one run.

Generates the same AdvBench prompts with and without `stop_on_refusal`, then judges both sets
with every judge. Prints the generation speed-up and, per judge, how often its verdicts agree
with and without the early stop (the keyword judge must agree 100%: the stop is lossless for it).

    python benchmarks/vet.py --model qwen2.5-coder-0.5b-instruct --limit 64
"""

from __future__ import annotations

import time

import typer

from quada.data import load_benchmark, subset
from quada.judging import DEFAULT_JUDGE_MODEL, agreement, make_judge
from quada.measures.generate import GenerationSettings, generate
from quada.models import DEFAULT_MODEL, load


def main(
    model: str = typer.Option(DEFAULT_MODEL, help="Model whose responses are generated."),
    limit: int = typer.Option(64, help="AdvBench prompts (seeded subset)."),
    judges: str = typer.Option("keyword,llm,harmfulness", help="Judges to compare with the stop on and off."),
    judge_model: str = typer.Option(DEFAULT_JUDGE_MODEL),
    max_new_tokens: int = typer.Option(128),
    prompt_format: str = typer.Option("paper"),
) -> None:
    lm, tokenizer = load(model)
    prompts = [p.text for p in subset(load_benchmark("advbench"), limit, seed=0)]
    timings, responses = {}, {}
    for stop in (False, True):
        settings = GenerationSettings(max_new_tokens, prompt_format, stop_on_refusal=stop)
        start = time.perf_counter()
        responses[stop] = generate(lm, tokenizer, prompts, settings, progress=False)
        timings[stop] = time.perf_counter() - start
    del lm
    print(f"model {model}, {len(prompts)} AdvBench prompts, format {prompt_format}, {max_new_tokens} new tokens")
    print(f"generation: full {timings[False]:.1f} s, stop on refusal {timings[True]:.1f} s, "
          f"speed-up x{timings[False] / timings[True]:.2f}")
    for name in judges.split(","):
        judge = make_judge(name.strip(), model_source=judge_model)
        start = time.perf_counter()
        full = judge.judge(prompts, responses[False])
        elapsed = time.perf_counter() - start
        early = judge.judge(prompts, responses[True])
        result = agreement([r.label for r in full], [r.label for r in early])
        rate_full = sum(r.label for r in full) / len(full)
        rate_early = sum(r.label for r in early) / len(early)
        print(f"judge {name}: positive rate full {100 * rate_full:.1f}% vs early stop {100 * rate_early:.1f}%, "
              f"agreement {result.percent:.1f}% (kappa {result.kappa:.3f}); {elapsed / len(prompts):.2f} s per item")


if __name__ == "__main__":
    typer.run(main)
