"""What a pool of Ray workers buys on this machine, measured in one run: the plan of a small vet
(by default the clean model and three approximations, each on 16 harmful and 16 benign prompts:
128 responses of up to 32 tokens, their keyword verdicts and 4 perplexities of one 1024-token
window) on

- Ray, 1 worker of 1 CPU (one torch thread): the baseline;
- Ray, 2 workers of 1 CPU each: what a second worker buys at equal threads per worker;
- the local executor with 2 torch threads: what the same two cores give in one process.

Each run fills a fresh results store. The plan is cut into units by the pool's size (4 units per
worker), so 2 workers have enough units to stay busy. Prints each run's line as it ends: the
seconds to start the workers (Ray starts them once, before the plan), the seconds of the plan, the
speed-up over the baseline, the workers' busy share and the load average then; at the end each
run's seconds per unit (the inputs of ``benchmarks/grid_cost.py``), whether the runs stored the
same responses (exactly in float32; in bfloat16 a prompt's batch neighbours can change a near-tied
token) and the load average before and after (the machine may be shared: read the ratios beside
it).

    python benchmarks/executor.py                   # the built-in 0.5B: a gain to see
    python benchmarks/executor.py --model tiny      # a tiny random model: what Ray costs per unit
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
import typer

from quada.data import load_benchmark, subset
from quada.defaults import VET_APPROXIMATIONS
from quada.devices import cpu_name
from quada.engine.executors import make_executor
from quada.engine.plan import Engine, Plan
from quada.measures.utility import load_corpus
from quada.models import load
from quada.options import VetConfig
from quada.store import CLEAN, Generation, Store
from quada.testing import save_tiny_model

TINY = "tiny"
# name: (executor options, torch threads of this process)
RUNS = {
    "ray, 1 worker x 1 thread": ({"executor": "ray", "workers": 1}, 1),
    "ray, 2 workers x 1 thread": ({"executor": "ray", "workers": 2}, 1),
    "local, 2 threads": ({"executor": "local"}, 2),
}
BASELINE = "ray, 1 worker x 1 thread"


def timed_run(config: VetConfig, threads: int, model, tokenizer, corpus: str, harmful, benign):
    """Seconds to start the workers, seconds of the plan, the executor's usage, the stored responses."""
    torch.set_num_threads(threads)
    with make_executor(config) as executor, Store(config.run_dir / "results.sqlite") as store:
        engine = Engine(store, model, tokenizer, config, corpus, executor)
        started = time.perf_counter()
        if config.executor == "ray":
            executor.start()
        startup = time.perf_counter() - started
        judge = engine.judge("keyword")
        plan = Plan()
        for approximation in (CLEAN, *config.approximations):
            for prompts in (harmful, benign):
                plan.judged(engine, judge, plan.responses(engine, engine.condition(approximation, prompts)))
            plan.perplexity(engine, approximation)
        started = time.perf_counter()
        plan.run()
        seconds = time.perf_counter() - started
        return startup, seconds, executor.usage, store.rows(Generation)


def main(
    model: str = typer.Option("qwen2.5-coder-0.5b-instruct", help="Subject model (a source `quada vet` takes), or "
                              "'tiny' for a tiny random one."),
    limit: int = typer.Option(16, help="Harmful and benign prompts each, per condition (seeded subsets)."),
    approx: list[str] = typer.Option(list(VET_APPROXIMATIONS), help="Approximations besides the clean model (repeat)."),
    max_new_tokens: int = typer.Option(32),
    ppl_windows: int = typer.Option(1, help="1024-token windows of each perplexity."),
    dtype: str = typer.Option("auto", help="float32 makes the runs' responses identical."),
) -> None:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        source = str(save_tiny_model(root / "tiny")) if model == TINY else model
        lm, tokenizer = load(source, dtype=dtype, device="cpu")
        harmful = subset(load_benchmark("advbench"), limit, 0)
        benign = subset(load_benchmark("quada-benign"), limit, 0)
        corpus = load_corpus("pydoc-topics")
        conditions = 1 + len(approx)
        print(f"model {model} ({lm.dtype}); {conditions} conditions x ({limit} harmful + {limit} benign prompts), "
              f"{max_new_tokens} new tokens, keyword verdicts, {conditions} perplexities of {ppl_windows} x 1024 "
              f"tokens; CPU: {cpu_name()}")
        print(f"{'run':<28}{'start s':>9}{'plan s':>9}{'x baseline':>12}{'busy':>7}{'load':>7}  units", flush=True)
        results = {}
        for name, (options, threads) in RUNS.items():
            config = VetConfig(model=source, device="cpu", dtype=dtype, approx=tuple(approx), limit=limit,
                               benign_limit=limit, max_new_tokens=max_new_tokens, ppl_windows=ppl_windows,
                               judges=("keyword",), run_dir=root / name.replace(" ", "").replace(",", "-"), **options)
            config.run_dir.mkdir()
            startup, seconds, usage, rows = results[name] = timed_run(config, threads, lm, tokenizer, corpus, harmful,
                                                                      benign)
            units = ", ".join(f"{n} {kind}" for kind, n in sorted(usage.units.items()))
            print(f"{name:<28}{startup:>9.1f}{seconds:>9.1f}{results[BASELINE][1] / seconds:>12.2f}"
                  f"{usage.share:>7.0%}{os.getloadavg()[0]:>7.2f}  {units}", flush=True)
    for name, (*_, usage, _) in results.items():
        print(f"{name}: {usage.line()}")
    reference = {g.key.prompt_id + g.key.approx: g.response for g in results[BASELINE][3]}
    for name, (*_, rows) in results.items():
        same = sum(reference[g.key.prompt_id + g.key.approx] == g.response for g in rows)
        print(f"{name}: {same}/{len(rows)} responses identical to the baseline's")
    after = os.getloadavg()
    print(f"load average (1, 5, 15 min) before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {after[0]:.2f} {after[1]:.2f} {after[2]:.2f} (the load column: 1 min, as each run ended)")


if __name__ == "__main__":
    typer.run(main)
