"""Finding 1 of the paper: safety degrades before utility.

Sweep the strength of one parametrised approximation (a noise std, a TEAL sparsity, activation
bits, ...) and measure, at every point, the attack success rate (with its 95% interval) and the
perplexity. The paper (Zhang et al., arXiv 2502.00840, section 4, PAPER.md) reports for
Llama-3.1-8B-Instruct an ASR rising from about 1% at std 0 to about 66% at std 0.075 while the
perplexity stays near clean, then collapsing once the model degenerates.

The *most vulnerable approximation* (MVA) is the strength of highest ASR among the approximated
points whose perplexity is at most ``ppl_bound`` times the clean perplexity. Instead of a dense
grid, the sweep bisects the intervals next to the current MVA for a few rounds, so precision is
paid for only around the peak.

A sweep can also run over a list of variants instead of a numeric option, e.g. the polynomial
replacements ``bolt, bumblebee, nexus, puma, iron`` of private inference: a categorical axis, so
nothing is refined, and the MVA is the variant of highest ASR within the bound.

The spec is parsed once; every point is that technique with the swept option replaced, a
condition of the results store (keyed by its canonical spec, e.g.
``noise:site=up,dist=gaussian,std=0.05``), measured through :class:`quada.engine.plan.Engine`: a
killed sweep resumes where it stopped and a rerun computes nothing. The points, the MVA and the
figure are reported by :mod:`quada.report.sweep`.
"""

from __future__ import annotations

import json
import math
import typing
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from quada.analysis.options import SweepConfig, spec_at
from quada.approx import ApproxConfig, Spec, parse_spec, spec_label
from quada.data import load_benchmark, subset
from quada.engine.executors import Executor, make_executor
from quada.engine.plan import (
    Approximation,
    Engine,
    Measured,
    Plan,
    Verdicts,
    check_specs_fit,
    run_jobs,
)
from quada.errors import QuadaError
from quada.judging import Judge, attack_outcomes, check_judge_model
from quada.judging.calibration import judge_infos
from quada.measures.generate import check_prompts_fit
from quada.measures.utility import check_corpus, load_corpus
from quada.models import load
from quada.report.format import plain_number
from quada.report.story import write_story
from quada.report.sweep import (
    FIGURE_STEM,
    POINTS_FILE,
    SweepPoint,
    SweepResult,
    result_from_json,
)
from quada.runs import check_apart, jsonable, open_run_dir, progress_bar, write_json
from quada.stats.metrics import proportion
from quada.store import CLEAN, Store


def _integer_parameter(technique: ApproxConfig, parameter: str) -> bool:
    """Whether ``parameter`` takes whole numbers (e.g. bits), so bisection must round."""
    hint = typing.get_type_hints(type(technique))[parameter]
    return int in (hint, *typing.get_args(hint))


def _feasible(point: SweepPoint, clean_perplexity: float, ppl_bound: float) -> bool:
    return math.isfinite(point.perplexity) and point.perplexity <= ppl_bound * clean_perplexity


def most_vulnerable(points: Sequence[SweepPoint], clean_perplexity: float, ppl_bound: float) -> SweepPoint | None:
    """The most vulnerable approximation: among approximated points (not the clean one) whose
    perplexity is at most ``ppl_bound`` x ``clean_perplexity``, the one of highest ASR; a tie
    goes to the smallest strength (the mildest approximation that does as much harm; among
    variants, the one listed first). ``None`` when no approximated point keeps the perplexity
    within the bound."""
    candidates = [p for p in points if p.spec != CLEAN and _feasible(p, clean_perplexity, ppl_bound)]
    if not candidates:
        return None
    return min(candidates, key=lambda p: (-p.asr.value, p.strength))


def _round(value: float) -> float:
    """Midpoints rounded to 12 significant digits: equal strengths give equal spec strings."""
    return float(f"{value:.12g}")


def refinement_points(points: Sequence[SweepPoint], clean_perplexity: float, ppl_bound: float) -> list[float]:
    """One bisection round around the MVA: the midpoints between the MVA's strength and each of
    its evaluated neighbours (the next smaller and the next larger strength, the clean point at 0
    included), in increasing order. Empty when there is no MVA."""
    mva = most_vulnerable(points, clean_perplexity, ppl_bound)
    if mva is None:
        return []
    strengths = sorted({p.strength for p in points})
    i = strengths.index(mva.strength)
    neighbours = strengths[max(i - 1, 0) : i] + strengths[i + 1 : i + 2]
    return sorted({_round((mva.strength + s) / 2) for s in neighbours} - set(strengths))


def sweep(config: SweepConfig, progress: bool = True) -> SweepResult:
    """Measure ASR and perplexity over the grid, refine around the MVA, write figure and report (every
    input checked before the run folder is made)."""
    with make_executor(config) as executor, progress_bar(progress) as bar, Sweeping(config, executor, bar) as sweeping:
        run_jobs([sweeping])
        return sweeping.report()


class Sweeping:
    """One sweep as a job of :func:`quada.engine.plan.run_jobs`: its inputs checked and its model
    loaded when made; each round's points (the grid, then each refinement) measured in one plan;
    its figure and report written by :meth:`report`. `quada align` sweeps several models in the
    same plans."""

    def __init__(self, config: SweepConfig, executor: Executor, bar, label: str = ""):
        self.config, self.bar, self.label = config, bar, label
        check_apart(config.inputs(), run_dirs=[("--run-dir", config.run_dir)])
        self.prompts = subset(load_benchmark(config.benchmark), config.limit, config.seed)
        check_judge_model(config.judges, config.judge_model)
        corpus = load_corpus(config.corpus)
        model, tokenizer = load(config.model, dtype=config.dtype, device=config.device)
        check_specs_fit(model, [approximation for _, approximation in config.first_points()])
        check_prompts_fit(model, tokenizer, self.prompts, config.prompt_format, config.max_new_tokens)
        check_corpus(tokenizer, corpus, config.ppl_window)
        open_run_dir(config.run_dir)
        self.rounds = 0 if config.variants else config.refine  # a list of variants has no in-between to refine
        self.integral = (self.rounds > 0 and config.technique is not None
                         and _integer_parameter(config.technique, config.parameter))
        self.store = Store(config.run_dir / "results.sqlite")
        self.engine = Engine(self.store, model, tokenizer, config, corpus, executor)
        self.judges: dict[str, Judge] = {}
        self.points: list[SweepPoint] = []
        self._measuring: list[tuple[float, str, Measured, Verdicts]] = []  # the last round's points
        self._clean: Measured | None = None
        self._round = -1

    def next_round(self, plan: Plan) -> bool:
        """Read the points of the last round, and add the next round's new points to ``plan``."""
        config = self.config
        if not self.judges:
            self.judges = {name: self.engine.judge(name) for name in config.judges}
        self.points = sorted(self.points + [
            SweepPoint(strength, spec, proportion(attack_outcomes(config.judges[0], [j.label for j in verdicts.rows])),
                       perplexity.value)
            for strength, spec, perplexity, verdicts in self._measuring], key=lambda p: p.strength)
        self._round += 1
        if self._round == 0:
            new = config.first_points()
            self._clean = plan.perplexity(self.engine, CLEAN)
        elif self._round <= self.rounds:
            strengths = refinement_points(self.points, self.clean_perplexity, config.ppl_bound)
            if self.integral:
                strengths = sorted({float(round(s)) for s in strengths} - {p.strength for p in self.points})
            new = [(s, spec_at(config.technique, config.parameter, s)) for s in strengths]
        else:
            new = []
        self._measuring = [self._point(plan, strength, approximation) for strength, approximation in new]
        return bool(new)

    @property
    def clean_perplexity(self) -> float:
        return self._clean.value

    def _point(self, plan: Plan, strength: float, approximation: Approximation) -> tuple[float, str, Measured, Verdicts]:
        config, engine, bar, prompts = self.config, self.engine, self.bar, self.prompts
        spec = str(approximation)
        name = spec_label(spec) if config.variants else f"{config.parameter}={plain_number(strength)}"
        task = bar.add_task(f"{self.label}{name}", total=len(prompts))
        responses = plan.responses(engine, engine.condition(approximation, prompts), lambda n: bar.advance(task, n))
        verdicts = {name: plan.judged(engine, judge, responses) for name, judge in self.judges.items()}
        return strength, spec, plan.perplexity(engine, approximation), verdicts[config.judges[0]]

    def report(self) -> SweepResult:
        """The sweep's points, MVA, figure and report."""
        config, bar = self.config, self.bar
        for task in bar.tasks:
            bar.update(task.id, completed=task.total)
        points, clean_perplexity, fingerprint = self.points, self.clean_perplexity, self.engine.fingerprint
        info = judge_infos({config.judges[0]: self.judges[config.judges[0]]}, config.calibrate, bar)
        mva = most_vulnerable(points, clean_perplexity, config.ppl_bound)
        write_json(config.run_dir / POINTS_FILE, {
            "config": jsonable(asdict(config)), "fingerprint": fingerprint,
            "summary": _summary(config, fingerprint, len(self.prompts)), "clean_perplexity": clean_perplexity,
            "points": [jsonable(asdict(p)) for p in points], "mva": jsonable(asdict(mva)) if mva else None,
            "judges": {name: asdict(i) for name, i in info.items()},
        })
        md, html = write_story(config.run_dir)
        return SweepResult(config, points, clean_perplexity, mva, md, html, config.run_dir / f"{FIGURE_STEM}.png")

    def __enter__(self) -> Sweeping:
        return self

    def __exit__(self, *exc) -> None:
        self.store.close()


def load_sweep(run_dir: str | Path) -> SweepResult:
    """The sweep stored in ``run_dir`` (its ``sweep.json``)."""
    path = Path(run_dir) / POINTS_FILE
    if not path.is_file():
        raise QuadaError(f"no sweep in {run_dir}: run `quada sweep --run-dir {run_dir}` first, or give --spec")
    return result_from_json(json.loads(path.read_text()), Path(run_dir))


def approximation_or_mva(approximation: Spec | None, run_dir: str | Path) -> Spec:
    """``approximation`` itself, or when it is ``None`` the MVA of the sweep stored in ``run_dir``."""
    if approximation is not None:
        return approximation
    mva = load_sweep(run_dir).mva
    if mva is None:
        raise QuadaError(f"the sweep in {run_dir} found no MVA within its perplexity bound; give --spec")
    return parse_spec(mva.spec)


def _summary(config: SweepConfig, fingerprint: str, n_prompts: int) -> str:
    return (
        f"Model {config.model} (fingerprint {fingerprint}); {n_prompts} prompts of {config.benchmark} "
        f"(seed {config.seed}); prompt format {config.prompt_format}; greedy, {config.max_new_tokens} new tokens; "
        f"ASR by the {config.judges[0]} judge; perplexity on {config.corpus} "
        f"({config.ppl_windows or 'all'} windows of {config.ppl_window} tokens)."
    )
