"""What the Ray executor costs and buys on this machine: the generation of one small vet, run with
the local executor, with Ray on 1 worker and with Ray on 2 workers.

Each run generates every condition's harmful and benign responses into a fresh store (judging and
perplexity stay in the driver whatever the executor, so they are left out). Every copy of the
model computes on one thread (the driver's, and each Ray worker's one CPU), so the local run and
Ray's one worker do the same work and differ only by what Ray adds, and two workers show what a
second copy buys. Prints each run's time to start its workers, its generation time and its
speed-up over the local executor, then per condition the seconds of each run and Ray's overhead
(1 worker minus local: shipping chunks and responses, scheduling).

    python benchmarks/executor.py                      # a tiny random model: the overhead alone
    python benchmarks/executor.py --model qwen2.5-coder-0.5b-instruct --limit 8
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
import typer

from quada.approx import PAPER_PRESETS
from quada.data import load_benchmark, subset
from quada.eval.engine import Engine, make_executor
from quada.models import load
from quada.options import VetConfig
from quada.store import CLEAN, Store
from quada.testing import tiny_model

TINY = "tiny"
RUNS = {"local": {}, "ray, 1 worker": {"executor": "ray", "workers": 1}, "ray, 2 workers": {"executor": "ray", "workers": 2}}


def tiny_model_folder(root: Path) -> str:
    """A tiny random Qwen2-style model saved under ``root``: generation cost near nothing."""
    model, tokenizer = tiny_model("qwen2", seed=3)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    return str(root / "tiny")


def timed_run(config: VetConfig, model, tokenizer, harmful, benign) -> tuple[float, dict[str, float]]:
    """Seconds to start the executor's workers, and the generation seconds of each condition."""
    executor = make_executor(config, model, tokenizer)
    start = time.perf_counter()
    if config.executor == "ray":
        executor.start()
    startup = time.perf_counter() - start
    seconds = {}
    with Store(config.run_dir / "results.sqlite") as store:
        engine = Engine(store, model, tokenizer, config, executor=executor)
        for approximation in (CLEAN, *config.approximations):
            start = time.perf_counter()
            for prompts in (harmful, benign):
                engine.responses(engine.condition(approximation, prompts))
            seconds[str(approximation)] = time.perf_counter() - start
    if config.executor == "ray":
        executor.close()
    return startup, seconds


def main(
    model: str = typer.Option(TINY, help="Subject model (a source `quada vet` takes), or 'tiny' for a tiny random one."),
    limit: int = typer.Option(8, help="Harmful and benign prompts each (seeded subsets)."),
    approx: list[str] = typer.Option(PAPER_PRESETS[:2], help="Approximations besides the clean model (repeat the option)."),
    max_new_tokens: int = typer.Option(32),
) -> None:
    torch.set_num_threads(1)  # as each Ray worker, which Ray gives OMP_NUM_THREADS=1 for its one CPU
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        source = tiny_model_folder(root) if model == TINY else model
        lm, tokenizer = load(source, device="cpu")
        harmful = subset(load_benchmark("advbench"), limit, 0)
        benign = subset(load_benchmark("quada-benign"), limit, 0)
        results = {}
        for name, executor in RUNS.items():
            config = VetConfig(model=source, device="cpu", approx=tuple(approx), limit=limit, benign_limit=limit,
                               max_new_tokens=max_new_tokens, judges=("keyword",), run_dir=root / name.replace(" ", ""),
                               **executor)
            config.run_dir.mkdir()
            results[name] = timed_run(config, lm, tokenizer, harmful, benign)
    local = sum(results["local"][1].values())
    print(f"model {model}; {limit} harmful + {limit} benign prompts under {1 + len(approx)} conditions; "
          f"{max_new_tokens} new tokens; one thread per model copy, {os.cpu_count()} CPUs")
    print(f"{'run':<16}{'start s':>9}{'generate s':>12}{'x local':>9}")
    for name, (startup, seconds) in results.items():
        total = sum(seconds.values())
        print(f"{name:<16}{startup:>9.1f}{total:>12.1f}{local / total:>9.2f}")
    print(f"{'condition':<40}{'local s':>9}{'ray 1 s':>9}{'ray 2 s':>9}{'overhead s':>12}")
    for condition, seconds in results["local"][1].items():
        one, two = results["ray, 1 worker"][1][condition], results["ray, 2 workers"][1][condition]
        print(f"{condition[:39]:<40}{seconds:>9.2f}{one:>9.2f}{two:>9.2f}{one - seconds:>12.2f}")


if __name__ == "__main__":
    typer.run(main)
