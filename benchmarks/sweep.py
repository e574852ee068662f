"""What the adaptive refinement of `quada sweep` saves against a dense grid, measured in one run.

Runs the sweep on the default grid with bisection rounds around the most vulnerable
approximation (MVA), reads the final bisection step (the distance from the MVA to its nearest
evaluated neighbour), then runs a dense grid with that step over the same range in a separate
run folder (so it reuses nothing) and prints both costs (points evaluated, wall time), their
ratios, and the MVA each one found.

    python benchmarks/sweep.py --model qwen2.5-coder-0.5b-instruct --limit 32
    python benchmarks/sweep.py --tiny      # a tiny random model: checks the plumbing in seconds
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import typer

from quada.analysis.sweep import SweepConfig, SweepResult, sweep
from quada.models import DEFAULT_MODEL


def final_step(result: SweepResult) -> float:
    """Distance from the MVA to its nearest evaluated strength: the precision the sweep reached."""
    strengths = sorted(p.strength for p in result.points)
    i = strengths.index(result.mva.strength)
    gap = min(abs(strengths[j] - result.mva.strength) for j in (i - 1, i + 1) if 0 <= j < len(strengths))
    return float(f"{gap:.12g}")  # 0.0125, not 0.012499999999999997


def dense_grid(low: float, high: float, step: float) -> tuple[float, ...]:
    return tuple(round(float(v), 10) for v in np.arange(low, high + step / 2, step))


def timed_sweep(config: SweepConfig) -> tuple[SweepResult, float]:
    start = time.perf_counter()
    result = sweep(config, progress=False)
    return result, time.perf_counter() - start


def tiny_model_folder(root: Path) -> str:
    from quada.testing import tiny_model

    model, tokenizer = tiny_model("qwen2", seed=3)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    return str(root / "tiny")


def main(
    model: str = typer.Option(DEFAULT_MODEL, help="Model to sweep (built-in name, folder, .gguf or hub id)."),
    tiny: bool = typer.Option(False, help="Use a tiny random model instead of --model (plumbing check, meaningless numbers)."),
    limit: int = typer.Option(32, help="AdvBench prompts per point (seeded subset)."),
    spec: str = typer.Option("noise:site=up,dist=gaussian", help="Base spec of the sweep."),
    parameter: str = typer.Option("std", help="Swept option."),
    grid: str = typer.Option("0,0.025,0.05,0.075,0.1,0.15,0.2", help="Coarse grid of the adaptive sweep."),
    refine: int = typer.Option(2, help="Bisection rounds of the adaptive sweep."),
    max_new_tokens: int = typer.Option(64),
    ppl_windows: int = typer.Option(4, help="Perplexity windows per point."),
) -> None:
    with tempfile.TemporaryDirectory(prefix="quada-sweep-benchmark-") as scratch:
        root = Path(scratch)
        source = tiny_model_folder(root) if tiny else model
        common = dict(model=source, spec=spec, parameter=parameter, limit=limit, max_new_tokens=max_new_tokens,
                      ppl_windows=ppl_windows, ppl_window=128 if tiny else 1024)
        coarse = tuple(float(v) for v in grid.split(","))
        adaptive, adaptive_time = timed_sweep(SweepConfig(grid=coarse, refine=refine, run_dir=root / "adaptive", **common))
        if adaptive.mva is None:
            raise SystemExit("the adaptive sweep found no MVA within the perplexity bound: nothing to compare")
        step = final_step(adaptive)
        dense, dense_time = timed_sweep(SweepConfig(grid=dense_grid(min(coarse), max(coarse), step), refine=0,
                                                    run_dir=root / "dense", **common))
    print(f"model {'tiny random qwen2' if tiny else model}, {limit} AdvBench prompts, {spec} over {parameter} "
          f"in [{min(coarse):g}, {max(coarse):g}], MVA precision (final bisection step) {step:g}")
    print(f"adaptive: {len(adaptive.points)} points, {adaptive_time:.1f} s, MVA {parameter}={adaptive.mva.strength:g} "
          f"(ASR {100 * adaptive.mva.asr.value:.1f}%)")
    dense_mva = f"{dense.mva.strength:g} (ASR {100 * dense.mva.asr.value:.1f}%)" if dense.mva else "none"
    print(f"dense:    {len(dense.points)} points, {dense_time:.1f} s, MVA {parameter}={dense_mva}")
    print(f"cost ratio dense / adaptive: points x{len(dense.points) / len(adaptive.points):.2f}, "
          f"wall time x{dense_time / adaptive_time:.2f}")


if __name__ == "__main__":
    typer.run(main)
