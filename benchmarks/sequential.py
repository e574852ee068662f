"""The error rates, power and cost of `quada vet`'s sequential verdicts, by simulation.

Paired outcomes are simulated for every condition and deciding judge of a run (clean against
approximated, per prompt: P(only approximated) - P(only clean) = the condition's rise, P(only one
of the two) = the discordance) and decided look by look exactly as a vet decides them
(quada.stats.sequential.simulate). Printed:

- the family-wise error: the share of runs in which some condition with no rise is called "breaks
  safety" (at most alpha/2 by design), and in which some condition whose rates rose by the margin
  is called "no rise beyond the margin" (beta, at most alpha/2);
- the power at rises of 10, 15 and 25 points, and the prompts each condition used on average;
- the main job's case: three approximations with rises of 24, 16 and 2 points, against a fixed vet
  of 96 prompts (what `quada vet` did before its looks), with the harmful generations each needs.

    python benchmarks/sequential.py [--runs 4000] [--discordance 0.1,0.2,0.3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from quada.defaults import FAMILY_ALPHA, FIRST_LOOK, MARGIN_POINTS, MAX_PROMPTS
from quada.stats.sequential import Design, look_schedule, simulate

JUDGES, CONDITIONS = 3, 3  # the main job: keyword, refusal-keyword and llm decide on three approximations


def share(values: np.ndarray) -> str:
    return f"{100 * values.mean():.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4000, help="simulated runs per case")
    parser.add_argument("--discordance", default="0.1,0.2,0.3", help="shares of prompts whose outcome differs")
    args = parser.parse_args()
    margin = MARGIN_POINTS / 100
    design = Design(look_schedule(FIRST_LOOK, MAX_PROMPTS), FAMILY_ALPHA, JUDGES, CONDITIONS, margin)
    fixed = Design((96,), FAMILY_ALPHA, JUDGES, CONDITIONS, margin)
    print(f"design: {design.family_text()}; margin {MARGIN_POINTS:g} points; {args.runs} simulated runs per case")
    print(f"critical z per look, rise: {', '.join(f'{c:.2f}' for c in design.rise_critical)}; "
          f"no rise: {', '.join(f'{c:.2f}' for c in design.within_critical)}\n")
    started = time.perf_counter()
    print("| discordance | judges | false 'breaks safety' (no rise anywhere) | false 'no rise' (every rise 10 points) |")
    print("|---|---|---|---|")
    for discordance in map(float, args.discordance.split(",")):
        for identical in (False, True):
            null = simulate(design, (0.0,) * CONDITIONS, discordance, args.runs, identical, seed=1)
            edge = simulate(design, (margin,) * CONDITIONS, max(discordance, margin), args.runs, identical, seed=2)
            print(f"| {discordance:g} | {'identical' if identical else 'independent'} | "
                  f"{share((null['verdict'] == 'rise').any(axis=1))} | {share((edge['verdict'] == 'within').any(axis=1))} |")
    print(f"\n(bounds: {100 * FAMILY_ALPHA / 2:g}% each)\n")
    print("| rise (points) | discordance | breaks safety | no rise | undecided | mean prompts |")
    print("|---|---|---|---|---|---|")
    for rise in (0.0, 0.02, 0.10, 0.15, 0.25):
        for discordance in map(float, args.discordance.split(",")):
            if discordance < rise:
                continue
            result = simulate(design, (rise, 0.0, 0.0), discordance, args.runs, seed=3)
            verdict = result["verdict"][:, 0]
            print(f"| {100 * rise:g} | {discordance:g} | {share(verdict == 'rise')} | {share(verdict == 'within')} | "
                  f"{share(verdict == 'undecided')} | {result['prompts'][:, 0].mean():.0f} |")
    print("\nThe main job's case: rises of 24, 16 and 2 points (noise, TEAL, Iron), discordance 0.3, 0.25, 0.2")
    print("| design | condition | breaks safety | no rise | undecided | mean prompts |")
    print("|---|---|---|---|---|---|")
    for name, chosen in (("sequential", design), ("fixed, 96 prompts", fixed)):
        runs = [simulate(chosen, (rise, 0.0, 0.0), discordance, args.runs, seed=4 + i)
                for i, (rise, discordance) in enumerate(((0.24, 0.3), (0.16, 0.25), (0.02, 0.2)))]
        prompts = np.stack([r["prompts"][:, 0] for r in runs], axis=1)
        for label, r in zip(("noise +24", "TEAL +16", "Iron +2"), runs):
            verdict = r["verdict"][:, 0]
            print(f"| {name} | {label} | {share(verdict == 'rise')} | {share(verdict == 'within')} | "
                  f"{share(verdict == 'undecided')} | {r['prompts'][:, 0].mean():.0f} |")
        harmful = prompts.sum(axis=1) + prompts.max(axis=1)  # the clean model answers the longest-running one's
        print(f"| {name} | harmful generations (clean included) | | | | {harmful.mean():.0f} |")
    print(f"\nsimulated in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
