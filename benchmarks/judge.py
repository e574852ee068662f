"""Speed of the model judges against scoring every item from scratch, on one workload in one run.

A vet run judges each prompt's response under 13 conditions (clean and the paper's twelve
presets), one judge call per condition, and approximations often leave a response unchanged.
The workload is that: the stored generations of a results store (``--store``, every condition of
the first prompts), or, without a store, AdvBench prompts with made-up responses of which a
fraction ``--unchanged`` repeat the clean one under each other condition.

Ways, each timed on the whole workload after a warm-up:
- baseline: every item of every call rendered and scored on its own (the judge before sharing);
- shared prefix: the ids that open all items of a call run once, batches reuse their cache;
- quada: shared prefix plus the judge's memo (an input scored once is never scored again), at
  each of ``--batch-sizes``;
- llama.cpp: the same judge with its model in llama.cpp (``--judge-model llamacpp:...``, the
  judge's own prefix kept in the KV cache, and the memo), on the built-in's GGUF as it ships
  (Q4_K_M weights, 8-bit activations), where llama-cpp-python is installed; its speed-up is given
  against the quada way too, and its labels against both.
Prints seconds, the speed-up against the baseline, whether every label equals the baseline's, and
the scores of any item whose label differs. The judge models run in bf16, where the batch a row runs
in already moves its score by a few hundredths (on the main job's store, the baseline at batch 1
against batch 8: up to 0.03); an item that close to the threshold can flip under any change of the
computation.

    python benchmarks/judge.py --store runs/vet/results.sqlite --limit 48
    python benchmarks/judge.py --limit 48            # AdvBench prompts, made-up responses
    python benchmarks/judge.py --tiny                # a tiny random judge: checks the plumbing
"""

from __future__ import annotations

import importlib.util
import math
import random
import time
from pathlib import Path

import torch
import typer

from quada.data import load_benchmark
from quada.devices import cpu_name
from quada.errors import QuadaError
from quada.judging import DEFAULT_JUDGE_MODEL, LogitJudge, make_judge
from quada.measures.scoring import (
    answer_group_probabilities,
    next_token_logprobs,
    pad_id_of,
)
from quada.store import CLEAN, Generation, Store

Call = tuple[list[str], list[str]]  # one judge call: prompts and responses of one condition

REFUSAL = (
    "I'm sorry, but I can't help with that request. {request} could put people at real risk and "
    "may be against the law where you live. If you are interested in this topic for research or "
    "safety reasons, I can point you to general resources on how such problems are recognised, "
    "reported and prevented, or help with a related question that does not involve causing harm."
)
COMPLIANCE = (
    "Sure, here is a plan for the task \"{request}\". Step 1: gather the materials and tools you "
    "need, and write down a timeline so that nothing is forgotten. Step 2: prepare a quiet place "
    "to work and check every item twice. Step 3: carry out the main part carefully, one piece at "
    "a time, and keep notes of what worked. Step 4: review the result and fix what is missing."
)


def stored_workload(path: Path, limit: int) -> list[Call]:
    """One call per stored condition (clean first) over the first prompts that give about ``limit`` items."""
    if not path.is_file():
        raise QuadaError(f"no results store at {path}; give the results.sqlite of a run folder")
    with Store(path) as store:
        generations = store.rows(Generation)
    conditions = sorted({g.key.approx for g in generations}, key=lambda a: (a != CLEAN, a))
    prompt_ids = sorted({g.key.prompt_id for g in generations})[: max(1, math.ceil(limit / len(conditions)))]
    return [
        ([g.prompt for g in rows], [g.response for g in rows])
        for approx in conditions
        if (rows := [g for g in generations if g.key.approx == approx and g.key.prompt_id in prompt_ids])
    ]


def made_up_workload(limit: int, conditions: int, unchanged: float, seed: int) -> list[Call]:
    """AdvBench prompts under ``conditions`` conditions: a clean response per prompt (a refusal or
    a compliance), kept by each other condition with probability ``unchanged``, else cut at a
    random word and continued differently (approximations change a response from some token on)."""
    rng = random.Random(seed)
    prompts = [p.text for p in load_benchmark("advbench")][: max(1, math.ceil(limit / conditions))]
    clean = [rng.choice((REFUSAL, COMPLIANCE)).format(request=p) for p in prompts]
    calls = [(prompts, clean)]
    for condition in range(1, conditions):
        responses = []
        for text in clean:
            words = text.split()
            cut = rng.randrange(1, len(words))
            changed = " ".join(words[:cut] + [f"but condition {condition} goes on differently:"] + words[cut:][::-1])
            responses.append(text if rng.random() < unchanged else changed)
        calls.append((prompts, responses))
    return calls


def score_items(judge, calls: list[Call], share_prefix: bool) -> list:
    """Results of every item of every call, each scored on its own (no memo); the judge's refusal
    pre-check answers the items it rules on, as in the judge itself."""
    candidates = [i for group in judge.answer_ids for i in group]
    results = []
    for prompts, responses in calls:
        ruled = judge.ruled(responses) if hasattr(judge, "ruled") else [None] * len(responses)
        asked = [i for i, verdict in enumerate(ruled) if verdict is None]
        sequences = [judge.render(prompts[i], responses[i]) for i in asked]
        rows = iter(next_token_logprobs(judge.model, sequences, [candidates] * len(sequences),
                                        pad_id_of(judge.tokenizer), judge.batch_size, share_prefix=share_prefix))
        results += [judge.decide(answer_group_probabilities(next(rows), judge.answer_ids)) if verdict is None else verdict
                    for verdict in ruled]
    return results


def load_judge(name: str, judge_model: str, tiny: bool):
    """A factory of fresh judges (an empty memo each) at a given batch size, and the model's label."""
    if tiny:
        from quada.testing import tiny_model

        model, tokenizer = tiny_model("qwen2", layers=4, hidden=256)
        return (lambda batch: make_judge(name, model, tokenizer, batch_size=batch)), "tiny-qwen2"
    if not isinstance(make_judge(name, model_source=judge_model), LogitJudge):  # loads the model once
        raise QuadaError(f"judge model {judge_model!r} is unavailable; pass --tiny to check the plumbing")
    return (lambda batch: make_judge(name, model_source=judge_model, batch_size=batch)), judge_model


def main(
    store: Path | None = typer.Option(None, help="results.sqlite of a run folder; default: made-up responses."),
    limit: int = typer.Option(48, help="About this many judged items (whole prompts, every condition)."),
    conditions: int = typer.Option(13, help="Conditions of the made-up workload (clean and 12 approximations)."),
    unchanged: float = typer.Option(0.5, help="Made-up workload: chance that a condition keeps the clean response."),
    judge: str = typer.Option("llm", help="Model judge: llm, uplift, harmfulness or refusal."),
    judge_model: str = typer.Option(DEFAULT_JUDGE_MODEL),
    batch_sizes: str = typer.Option("8", help="Comma-separated batch sizes of the quada way; the first one is also the baseline's."),
    tiny: bool = typer.Option(False, help="Use a tiny random judge model instead."),
    seed: int = typer.Option(0),
) -> None:
    sizes = [int(b) for b in batch_sizes.split(",")]
    calls = stored_workload(store, limit) if store else made_up_workload(limit, conditions, unchanged, seed)
    new_judge, label = load_judge(judge, judge_model, tiny)
    baseline_judge = new_judge(sizes[0])
    at_threshold = f", threshold {baseline_judge.threshold}" if hasattr(baseline_judge, "threshold") else ""
    items = [(p, r) for prompts, responses in calls for p, r in zip(prompts, responses)]
    distinct = len({tuple(baseline_judge.render(p, r)) for p, r in items})
    new_judge(sizes[0]).judge(calls[0][0][:1], calls[0][1][:1])  # warm-up

    source = f"store {store}" if store else f"made-up responses, {unchanged:.0%} unchanged per condition"
    print(f"judge {judge} on {label}, {torch.get_num_threads()} threads, CPU: {cpu_name()}; {len(items)} items in "
          f"{len(calls)} calls (one per condition), {distinct} distinct judge inputs; {source}")
    print(f"{'way':42s} {'seconds':>8s} {'speed-up':>9s}  labels as baseline  max |score diff|", flush=True)
    start = time.perf_counter()
    baseline = score_items(baseline_judge, calls, share_prefix=False)
    t_base = time.perf_counter() - start
    print(f"{f'baseline (batch {sizes[0]})':42s} {t_base:8.1f} {1:8.2f}x  {len(items)}/{len(items)}", flush=True)
    ways = [("shared prefix", lambda: score_items(baseline_judge, calls, share_prefix=True))]
    for size in sizes:
        fresh = new_judge(size)
        ways.append((f"quada (prefix + memo, batch {size})",
                     lambda fresh=fresh: [r for call in calls for r in fresh.judge(*call)]))
    timed = {}
    for name, way in ways:
        start = time.perf_counter()
        results = way()
        seconds = time.perf_counter() - start
        timed[name] = results, seconds
        same = sum(a.label == b.label for a, b in zip(results, baseline))
        diff = max(abs(a.score - b.score) for a, b in zip(results, baseline))
        print(f"{name:42s} {seconds:8.1f} {t_base / seconds:8.2f}x  {same}/{len(items)}{'':13s}{diff:.2g}", flush=True)
        for a, b in zip(baseline, results):
            if a.label != b.label:
                print(f"{'':44s}a label differs: score {a.score:.4f} -> {b.score:.4f}{at_threshold}")
    if not tiny and importlib.util.find_spec("llama_cpp") is not None:
        quada_results, quada_seconds = timed[ways[-1][0]]
        in_llama = make_judge(judge, model_source=f"llamacpp:{judge_model}")
        in_llama.judge(calls[0][0][:1], calls[0][1][:1])  # warm-up (and the judge's prefix cached)
        in_llama = make_judge(judge, model_source=f"llamacpp:{judge_model}")  # an empty memo
        start = time.perf_counter()
        results = [r for call in calls for r in in_llama.judge(*call)]
        seconds = time.perf_counter() - start
        same = sum(a.label == b.label for a, b in zip(results, baseline))
        as_quada = sum(a.label == b.label for a, b in zip(results, quada_results))
        diff = max(abs(a.score - b.score) for a, b in zip(results, quada_results))
        print(f"{'llama.cpp (GGUF as shipped, prefix + memo)':42s} {seconds:8.1f} {t_base / seconds:8.2f}x  "
              f"{same}/{len(items)}; against the quada way: speed-up {quada_seconds / seconds:.2f}x, labels "
              f"{as_quada}/{len(items)} ({100 * as_quada / len(items):.1f}%), max |score diff| {diff:.2g}", flush=True)
        for a, b in zip(quada_results, results):
            if a.label != b.label:
                print(f"{'':44s}a label differs from the quada way's: score {a.score:.4f} -> {b.score:.4f}{at_threshold}")


if __name__ == "__main__":
    typer.run(main)
