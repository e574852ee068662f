"""`quada attack`: build each attack's adversarial prompts against the model as served, answer
and judge them, and report the attack success rates.

For every approximation (the clean model is ``none``) and every attack, each behaviour gets its
adversarial prompt (:data:`BUILDERS`), stored as soon as it is found (:mod:`quada.attack.records`;
GCG stores every step); the responses are generated and judged through the measurement engine
(:class:`quada.eval.engine.Engine`), so a rerun computes only what is missing.

Randomness. Every draw is seeded by what it belongs to (``quada.seeds.derived_seed``), never by run
history, so a resumed run equals an uninterrupted one:
- template-like attacks draw their template, suffix or examples from (seed, attack, behaviour):
  every approximation sees the same prompts, and ASRs compare pairwise;
- GCG and AutoDAN optimise through the approximation. Its noise is resampled at every step (GCG)
  or generation (AutoDAN) from a seed fixed by (seed, attack, behaviour, step), and all
  candidates of a step are scored under that step's one draw (every row draws what the
  behaviour's prompt draws at the same position). Whether GCG reached its target is checked
  under the draw the response is then generated with (the run's seed and the adversarial
  prompt's id). Fixing one draw for the whole search
  would let the optimiser fit that draw (a suffix that works for one noise pattern), while the
  served model draws new noise for every request; resampling makes the search minimise the
  expected loss over the noise (as expectation over transformation does), at the price of
  noisier step-to-step losses. Deterministic approximations (TEAL, quantisation, polynomials)
  are unaffected.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from quada.approx import spec_label
from quada.approx.base import DRAW_SCHEME
from quada.approx.rows import prompt_rows
from quada.attack import sources
from quada.attack.autodan import AutoDanSettings, autodan
from quada.attack.dra import dra_prompt
from quada.attack.gcg import GcgSettings, adversarial_request, gcg, reaches_target, suffix_problem
from quada.attack.loss import prompt_losses
from quada.attack.many_shot import many_shot_prompt
from quada.attack.options import AttackConfig
from quada.attack.past_tense import past_tense_behaviours
from quada.attack.records import AttackKey, AttackPrompt, AttackRecords, attack_identity, attack_prompt_id
from quada.attack.report import RESULTS_FILE, AttackCell, merge_cells, write_attack_report
from quada.attack.templates import template_prompt
from quada.attack.transfer import transfer_prompt
from quada.data import Prompt, load_benchmark, subset
from quada.eval.engine import Approximation, Engine, Plan, approximated, check_specs_fit
from quada.eval.executors import make_executor
from quada.eval.judges import attack_outcomes, check_judge_model
from quada.judge_calibration import judge_infos
from quada.eval.metrics import proportion
from quada.models import load
from quada.runs import jsonable, open_run_dir, progress_bar, write_json
from quada.seeds import derived_seed
from quada.store import CLEAN, Store


@dataclass
class Context:
    """What building one attack's prompts needs: the model as loaded, the approximation it is
    served under, the run's options, the attack's identity and where its progress is stored."""

    model: object
    tokenizer: object
    config: AttackConfig
    approximation: Approximation
    identity: str
    fingerprint: str
    records: AttackRecords

    def key(self, behaviour: Prompt) -> AttackKey:
        return AttackKey(self.fingerprint, str(self.approximation), self.identity, behaviour.id, self.config.seed)

    def seed(self, behaviour: Prompt, *parts) -> int:
        """A seed fixed by the run's seed, the attack, the behaviour and ``parts``."""
        return derived_seed(self.config.seed, self.identity, behaviour.id, *parts)

    def rng(self, behaviour: Prompt) -> random.Random:
        return random.Random(self.seed(behaviour))

    def serving(self, behaviour: Prompt, stage: str) -> Callable[[int], object]:
        """The model as served at step ``n`` of ``stage``, its noise drawn afresh for every step and
        shared by every row of the step (each candidate sees the draw of the behaviour's prompt)."""

        @contextlib.contextmanager
        def step(n: int):
            with approximated(self.model, self.approximation, self.tokenizer, self.seed(behaviour, stage, n)), \
                    prompt_rows(every=behaviour.id):
                yield

        return step

    def generating(self):
        """The model as the responses are generated (the run's seed)."""
        return approximated(self.model, self.approximation, self.tokenizer, self.config.seed)


def _direct(context: Context, behaviour: Prompt) -> AttackPrompt:
    return AttackPrompt(behaviour.text)


def _gcg(context: Context, behaviour: Prompt) -> AttackPrompt:
    config, tokenizer, key = context.config, context.tokenizer, context.key(behaviour)
    settings = GcgSettings(config.steps, config.candidates, config.topk, config.suffix_tokens)
    problem = suffix_problem(tokenizer, behaviour.text, config.target, config.prompt_format, context.model.device)
    prompt_id = attack_prompt_id(behaviour.id, context.identity)

    def reached(suffix) -> bool:
        with context.generating():
            return reaches_target(context.model, tokenizer, problem, suffix, prompt_id)

    parts = () if context.approximation == CLEAN else context.approximation.parts()
    steps = gcg(context.model, tokenizer, problem, settings, context.serving(behaviour, "step"),
                lambda n: context.seed(behaviour, "candidates", n), context.records.steps(key),
                lambda step: context.records.put_step(key, step), reached,
                reuse_prefix=not any(part.per_call for part in parts))
    last = steps[-1]
    return AttackPrompt(
        adversarial_request(behaviour.text, tokenizer.decode(list(last.suffix))),
        sum(s.forward_passes for s in steps), sum(s.seconds for s in steps),
        {"steps": len(steps), "first_loss": steps[0].loss, "loss": last.loss, "reached": last.success},
    )


def _autodan(context: Context, behaviour: Prompt) -> AttackPrompt:
    config = context.config
    pool = sources.autodan_templates() + tuple(t for _, t in sources.pyrit_templates("named"))
    serving = context.serving(behaviour, "generation")

    def losses(templates: list[str], generation: int) -> list[float]:
        with serving(generation):
            return prompt_losses(context.model, context.tokenizer, [sources.fill(t, behaviour.text) for t in templates],
                                 config.target, config.prompt_format)

    start = time.perf_counter()
    found = autodan(pool, losses, AutoDanSettings(config.steps, config.population, config.elite), context.seed(behaviour))
    return AttackPrompt(sources.fill(found.template, behaviour.text), found.evaluations, time.perf_counter() - start,
                        {"loss": found.loss, "history": list(found.history)})


def _dra(context: Context, behaviour: Prompt) -> AttackPrompt:
    letters, flagged, templates = sources.dra_material()
    prompt, index = dra_prompt(behaviour.text, letters, flagged, templates, context.rng(behaviour))
    return AttackPrompt(prompt, details={"template": index})


def _transfer(context: Context, behaviour: Prompt) -> AttackPrompt:
    prompt, index = transfer_prompt(behaviour.text, sources.gcg_suffixes(), context.rng(behaviour))
    return AttackPrompt(prompt, details={"suffix": index})


def _templates(group: str) -> Callable[[Context, Prompt], AttackPrompt]:
    def build(context: Context, behaviour: Prompt) -> AttackPrompt:
        prompt, name = template_prompt(behaviour.text, sources.pyrit_templates(group), context.rng(behaviour))
        return AttackPrompt(prompt, details={"template": name})

    return build


def _many_shot(context: Context, behaviour: Prompt) -> AttackPrompt:
    prompt = many_shot_prompt(behaviour.text, sources.many_shot_layout(), sources.many_shot_examples(),
                              context.config.shots, context.rng(behaviour))
    return AttackPrompt(prompt)


BUILDERS: dict[str, Callable[[Context, Prompt], AttackPrompt]] = {
    "direct": _direct,
    "gcg": _gcg,
    "gcg-transfer": _transfer,
    "autodan": _autodan,
    "dra": _dra,
    "templates": _templates("named"),
    "in-the-wild": _templates("in_the_wild"),
    "many-shot": _many_shot,
    "past-tense": _direct,  # its behaviours are the reformulated requests themselves
}
# The attacks that search through the model (the approximation active): their prompts depend on how it computes.
OPTIMISED = ("gcg", "autodan")
# The offline material each attack reads: loaded before the model, so a missing package fails at once.
MATERIAL: dict[str, Callable[[], object]] = {
    "gcg-transfer": sources.gcg_suffixes,
    "autodan": lambda: (sources.autodan_templates(), sources.pyrit_templates("named")),
    "dra": sources.dra_material,
    "templates": lambda: sources.pyrit_templates("named"),
    "in-the-wild": lambda: sources.pyrit_templates("in_the_wild"),
    "many-shot": lambda: (sources.many_shot_layout(), sources.many_shot_examples()),
    "past-tense": sources.past_tense_requests,
}


@dataclass
class AttackResult:
    config: AttackConfig
    cells: list[AttackCell]  # this run's (approximation, attack) results
    report_md: Path
    report_html: Path


def behaviours_of(config: AttackConfig, attack: str) -> list[Prompt]:
    """The seeded subset of behaviours ``attack`` runs on."""
    prompts = past_tense_behaviours(sources.past_tense_requests()) if attack == "past-tense" else load_benchmark(config.benchmark)
    return subset(prompts, config.limit, config.seed)


def adversarial_prompts(context: Context, behaviours: list[Prompt], advance: Callable[[int], None]) -> list[AttackPrompt]:
    """Each behaviour's stored adversarial prompt, or a new one, stored as soon as it is built."""
    found = []
    for behaviour in behaviours:
        key = context.key(behaviour)
        prompt = context.records.prompt(key)
        if prompt is None:
            prompt = BUILDERS[context.identity.split()[0]](context, behaviour)
            context.records.put_prompt(key, prompt)
        found.append(prompt)
        advance(1)
    return found


def attack(config: AttackConfig, progress: bool = True) -> AttackResult:
    """Run every attack of ``config`` under every approximation; store, judge, report."""
    plans = {name: behaviours_of(config, name) for name in config.attack}
    for name in config.attack:
        MATERIAL.get(name, lambda: None)()
    check_judge_model(config.judges, config.judge_model)
    open_run_dir(config.run_dir)
    model, tokenizer = load(config.model, dtype=config.dtype, device=config.device)
    check_specs_fit(model, config.approximations)
    with make_executor(config) as executor, Store(config.run_dir / "results.sqlite") as store, \
            AttackRecords(store.path) as records, progress_bar(progress) as bar:
        engine = Engine(store, model, tokenizer, config, executor=executor)
        built = []  # (approximation, attack, identity, behaviours, adversarial prompts): built here, on the model
        for approximation in config.approximations:
            for name, behaviours in plans.items():
                identity = attack_identity(name, {**config.parameters(name), **_drawn(name, engine)})
                context = Context(model, tokenizer, config, approximation, identity, engine.fingerprint, records)
                task = bar.add_task(f"build {name} under {spec_label(str(approximation))}", total=len(behaviours))
                found = adversarial_prompts(context, behaviours, lambda n, task=task: bar.advance(task, n))
                built.append((approximation, name, identity, behaviours, found))
        # Then every response and verdict in one plan, each response judged against its behaviour,
        # not the adversarial prompt (as HarmBench and JailbreakBench judge): the question is whether
        # the response does what was asked.
        judges = {name: engine.judge(name) for name in config.judges}
        generating = bar.add_task("generate", total=sum(len(b) for *_, b, _ in built))
        judging = {name: bar.add_task(f"judge {name}", total=sum(len(b) for *_, b, _ in built)) for name in judges}
        plan = Plan()
        runs = []
        for approximation, name, identity, behaviours, found in built:
            prompts = [Prompt(attack_prompt_id(b.id, identity), f.prompt, b.category) for b, f in zip(behaviours, found)]
            responses = plan.responses(engine, engine.condition(approximation, prompts),
                                       lambda n: bar.advance(generating, n))
            verdicts = {j: plan.judged(engine, judge, responses, [b.text for b in behaviours],
                                       lambda n, task=judging[j]: bar.advance(task, n)) for j, judge in judges.items()}
            runs.append((str(approximation), name, identity, found, verdicts))
        plan.run()
        labels = {(approximation, name, j): attack_outcomes(j, [v.label for v in verdicts[j].rows])
                  for approximation, name, _, _, verdicts in runs for j in judges}
        info = judge_infos(judges, config.calibrate, bar)
        fingerprint = engine.fingerprint
    cells = [
        AttackCell(
            model=config.model, fingerprint=fingerprint, approx=approximation, attack=name, identity=identity,
            benchmark="past-tense" if name == "past-tense" else config.benchmark, seed=config.seed, n=len(found),
            asr={j: proportion(labels[approximation, name, j]) for j in config.judges},
            forward_passes=sum(f.forward_passes for f in found), seconds=sum(f.seconds for f in found),
            target_reached=_share(found, "reached"),
        )
        for approximation, name, identity, found, _ in runs
    ]
    path = config.run_dir / RESULTS_FILE
    saved = merge_cells(path, [jsonable(asdict(c)) for c in cells])
    write_json(path, {"config": jsonable(asdict(config)), "cells": saved,
                      "judges": {name: asdict(i) for name, i in info.items()}})
    md, html = write_attack_report(config.run_dir)
    return AttackResult(config, cells, md, html)


def _drawn(attack: str, engine: Engine) -> dict:
    """What else decides the prompts of an attack that optimises through the model: the dtype and
    device type it ran in and the draw scheme of the approximation's noise."""
    if attack not in OPTIMISED:
        return {}
    return {"dtype": engine.dtype, "device": engine.device, "draws": DRAW_SCHEME}


def _share(found: list[AttackPrompt], flag: str) -> float | None:
    """The share of prompts whose details set ``flag`` (None when the attack does not report it)."""
    flags = [f.details[flag] for f in found if f.details and flag in f.details]
    return sum(flags) / len(flags) if flags else None
