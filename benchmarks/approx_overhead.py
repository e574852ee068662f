"""Generation throughput under each approximation family, as a ratio to the clean model, in one run.

Every run decodes the same batch for exactly ``--new-tokens`` steps (end-of-sequence ignored), so
each does the same work and the ratio is pure overhead. Calibration happens before timing. The
clean model is timed before and after the approximations; the ratio uses their mean.
Target: at most 1.3x slower for noise, TEAL, CATS and the polynomials.

    python benchmarks/approx_overhead.py --model qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import time

import torch
import typer

from quada.approx import apply
from quada.approx.activation_stats import CALIBRATION_PROMPTS
from quada.chat import format_prompt
from quada.errors import QuadaError
from quada.measures.generate import greedy_batch

FAMILIES = {
    "noise (paper:bolt)": "paper:bolt",
    "noise (paper:teal-50)": "paper:teal-50",
    "teal": "teal:sparsity=0.5",
    "cats": "cats:sparsity=0.5",
    "bolt": "bolt",
    "bumblebee": "bumblebee",
    "nexus": "nexus",
    "puma": "puma",
    "iron": "iron",
    "smoothquant A8": "smoothquant:bits=8",
    "omniquant A8": "omniquant:bits=8",
}
TARGETED = {"noise (paper:bolt)", "noise (paper:teal-50)", "teal", "cats", "bolt", "bumblebee", "nexus", "puma", "iron"}


def load_model(name: str):
    from quada.models import load

    try:
        return load(name), name
    except QuadaError as err:
        from quada.testing import tiny_model

        print(f"note: cannot load {name} ({err}); falling back to a tiny random Qwen2 model, whose ratios overstate overhead")
        return tiny_model("qwen2", layers=4, hidden=256), "tiny-qwen2"


def main(
    model: str = typer.Option("qwen2.5-coder-0.5b-instruct", help="Model to benchmark (built-in name, folder or file)."),
    batch: int = typer.Option(4, help="Prompts decoded together."),
    new_tokens: int = typer.Option(32, help="Decode steps per run."),
    repeats: int = typer.Option(2, help="Timed runs per setting; the fastest counts."),
) -> None:
    (lm, tokenizer), label = load_model(model)
    texts = [format_prompt(tokenizer, p) for p in CALIBRATION_PROMPTS[:batch]]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    never = torch.tensor([], dtype=torch.long)  # no end token: every run decodes new_tokens steps

    def timed() -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            greedy_batch(lm, enc["input_ids"], enc["attention_mask"], new_tokens, never)
            best = min(best, time.perf_counter() - start)
        return best

    timed()  # warm-up
    clean_before = timed()
    results = {}
    for family, spec in FAMILIES.items():
        with apply(lm, spec, tokenizer=tokenizer):  # calibrates (cached) before the timed runs
            results[family] = timed()
    clean = (clean_before + timed()) / 2
    tokens = batch * new_tokens
    print(f"model {label}, {torch.get_num_threads()} threads, batch {batch} x {new_tokens} new tokens")
    print(f"{'clean':24s} {tokens / clean:8.1f} tok/s   1.00x")
    for family, seconds in results.items():
        ratio = seconds / clean
        verdict = ("ok" if ratio <= 1.3 else "SLOWER THAN TARGET") if family in TARGETED else "(no target)"
        print(f"{family:24s} {tokens / seconds:8.1f} tok/s   {ratio:.2f}x  {verdict}")


if __name__ == "__main__":
    typer.run(main)
