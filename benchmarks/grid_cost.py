"""The paper's vetting grid as a cost model: its wall time on a pool of W workers, from unit costs
measured by ``benchmarks/executor.py``.

The grid (docs/scale-out.md): ``--models`` models x ``--conditions`` conditions (the clean model
and the paper's approximations) x ``--prompts`` AdvBench prompts of at most ``--new-tokens`` new
tokens, and one perplexity of ``--ppl-windows`` windows per condition. Each model is one command
whose whole plan goes to the pool at once; this script cuts that plan into units exactly as the
engine does (:func:`quada.engine.plan.chunk_size`, :func:`quada.engine.plan.balanced`) and
schedules them as the pool does (largest first, each to the worker that frees up first), so the
only modelled quantity is the cost of one unit:

- a generation unit of n prompts costs ``n x new tokens x`` the measured seconds per prompt-token
  (the measured unit's seconds over its prompts x its new tokens: linear in both, which holds on a
  CPU, where decoding is compute-bound, and overestimates a GPU, whose larger batches cost little
  more per step);
- a perplexity unit costs the measured seconds per 1024-token window times its windows;
- each worker first loads its model (the measured start seconds).

    python benchmarks/grid_cost.py --unit-seconds 40.2 --unit-prompts 16 --unit-tokens 32 \
        --window-seconds 9.8 --start-seconds 15
"""

from __future__ import annotations

import heapq

import typer

from quada.engine.plan import balanced, chunk_size

WORKERS = (8, 32, 128)


def unit_costs(conditions: int, prompts: int, new_tokens: int, ppl_windows: int, workers: int,
               prompt_token_seconds: float, window_seconds: float) -> list[float]:
    """The seconds of every unit of one model's plan on ``workers`` workers."""
    size = chunk_size(conditions * prompts, workers)
    chunks = [len(chunk) for chunk in balanced(range(prompts), size)]
    generation = [n * new_tokens * prompt_token_seconds for n in chunks] * conditions
    return generation + [ppl_windows * window_seconds] * conditions


def wall_seconds(costs: list[float], workers: int, start_seconds: float) -> float:
    """The plan's wall time when every unit is handed over at once, largest first, each to the
    worker that frees up first (the pool's schedule), after the workers load their model."""
    free = [start_seconds] * workers
    for cost in sorted(costs, reverse=True):
        heapq.heappush(free, heapq.heappop(free) + cost)
    return max(free)


def main(
    unit_seconds: float = typer.Option(..., help="Measured seconds of one generation unit (benchmarks/executor.py)."),
    unit_prompts: int = typer.Option(..., help="Prompts of that unit."),
    unit_tokens: int = typer.Option(..., help="New tokens of that unit's responses."),
    window_seconds: float = typer.Option(..., help="Measured seconds of a perplexity of one 1024-token window."),
    start_seconds: float = typer.Option(0.0, help="Measured seconds for a worker to start and load its model."),
    models: int = typer.Option(10, help="Models of the grid, vetted one after another."),
    conditions: int = typer.Option(13, help="Conditions per model: the clean model and the paper's 12 approximations."),
    prompts: int = typer.Option(520, help="Harmful prompts per condition (all of AdvBench)."),
    new_tokens: int = typer.Option(128, help="New tokens per response."),
    ppl_windows: int = typer.Option(4, help="1024-token windows of each perplexity (`quada vet`'s default)."),
) -> None:
    per_prompt_token = unit_seconds / (unit_prompts * unit_tokens)
    print(f"grid: {models} models x {conditions} conditions x {prompts} prompts x {new_tokens} new tokens, "
          f"{ppl_windows} perplexity windows per condition")
    print(f"unit costs: {per_prompt_token * 1e3:.2f} ms per prompt-token ({unit_seconds:g} s for {unit_prompts} "
          f"prompts x {unit_tokens} tokens), {window_seconds:g} s per window, {start_seconds:g} s to start a worker")
    one = sum(unit_costs(conditions, prompts, new_tokens, ppl_windows, 1, per_prompt_token, window_seconds))
    print(f"{'workers':>8}{'units/model':>13}{'wall/model h':>14}{'grid h':>9}{'x 1 worker':>12}{'busy':>7}")
    for workers in (1, *WORKERS):
        costs = unit_costs(conditions, prompts, new_tokens, ppl_windows, workers, per_prompt_token, window_seconds)
        wall = wall_seconds(costs, workers, start_seconds)
        print(f"{workers:>8}{len(costs):>13}{wall / 3600:>14.2f}{models * wall / 3600:>9.2f}"
              f"{(one + start_seconds) / wall:>12.1f}{sum(costs) / (workers * wall):>7.0%}")


if __name__ == "__main__":
    typer.run(main)
