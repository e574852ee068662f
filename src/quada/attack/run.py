"""`quada attack`: build each attack's adversarial prompts against the model as served, answer
and judge them, and report the attack success rates.

For every approximation (the clean model is ``none``) and every attack, each behaviour gets its
adversarial prompt (:data:`BUILDERS`), stored as soon as it is found (:mod:`quada.attack.records`;
GCG stores every step); the responses are generated and judged through the measurement engine
(:class:`quada.engine.plan.Engine`), so a rerun computes only what is missing.

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
from quada.approx.draws import DRAW_SCHEME
from quada.approx.rows import prompt_rows
from quada.attack import sources
from quada.attack.autodan import (
    MUTATION_TEMPERATURE,
    MUTATION_TOP_P,
    AutoDanSettings,
    accept_rephrasing,
    autodan,
    mutation_request,
)
from quada.attack.dra import dra_attack
from quada.attack.gcg import (
    GcgSettings,
    adversarial_request,
    gcg,
    reaches_target,
    suffix_problem,
)
from quada.attack.llm import sample_reply
from quada.attack.loss import prompt_losses, token_ids
from quada.attack.many_shot import many_shot_prompt
from quada.attack.options import AUTO_TARGET, FALLBACK_TARGET, AttackConfig
from quada.attack.past_tense import (
    REWRITE_MAX_NEW_TOKENS,
    REWRITE_TEMPERATURE,
    REWRITE_TOP_P,
    parse_reformulation,
    rewrite_instruction,
)
from quada.attack.records import (
    AttackKey,
    AttackPrompt,
    AttackRecords,
    attack_identity,
    attack_prompt_id,
)
from quada.attack.report import (
    RESULTS_FILE,
    AttackCell,
    merge_cells,
    write_attack_report,
)
from quada.attack.templates import template_prompt
from quada.attack.transfer import transfer_prompt
from quada.data import Prompt, load_benchmark, subset
from quada.engine.executors import make_executor
from quada.engine.plan import Approximation, Engine, Plan, approximated, check_specs_fit
from quada.judging import attack_outcomes, check_judge_model, refusal_phrase
from quada.judging.calibration import JudgeInfo, judge_infos
from quada.measures.generate import generate
from quada.models import check_source, load
from quada.runs import check_apart, jsonable, open_run_dir, progress_bar, write_json
from quada.seeds import derived_seed
from quada.stats.metrics import proportion
from quada.store import CLEAN, Store


@dataclass
class Context:
    """What building one attack's prompts needs: the model as loaded, the approximation it is
    served under, the run's options, the attack's identity, where its progress is stored, the
    attacker's own model (the mutator or rewriter; the subject, run clean, when none is named), and
    ``advance``, called after each step of a search (see :meth:`AttackConfig.search_units`)."""

    model: object
    tokenizer: object
    config: AttackConfig
    approximation: Approximation
    identity: str
    fingerprint: str
    records: AttackRecords
    attacker: Callable[[str], tuple[object, object]]
    advance: Callable[[], None] = lambda: None

    def key(self, behaviour: Prompt) -> AttackKey:
        return AttackKey(self.fingerprint, str(self.approximation), self.identity, behaviour.id, self.config.seed)

    def seed(self, behaviour: Prompt, *parts) -> int:
        """A seed fixed by the run's seed, the attack, the behaviour and ``parts``."""
        return derived_seed(self.config.seed, self.identity, behaviour.id, *parts)

    def rng(self, behaviour: Prompt, *parts) -> random.Random:
        return random.Random(self.seed(behaviour, *parts))

    def target(self, behaviour: Prompt) -> str:
        """What GCG and AutoDAN optimise for: the behaviour's own target under ``--target auto``
        where the benchmark ships one, else the fixed target."""
        if self.config.target != AUTO_TARGET:
            return self.config.target
        return behaviour.target or FALLBACK_TARGET

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

    def answer(self, behaviour: Prompt, prompt: str) -> str:
        """The model's answer to ``prompt`` as served, generated exactly as the behaviour's stored
        response will be (the run's settings and seed, the adversarial prompt's id for the draws),
        so a loop that reads it reads what the judges will read for the same prompt."""
        with self.generating():
            return generate(self.model, self.tokenizer, [prompt], self.config.settings, progress=False,
                            prompt_ids=[attack_prompt_id(behaviour.id, self.identity)])[0]


def _direct(context: Context, behaviour: Prompt) -> AttackPrompt:
    return AttackPrompt(behaviour.text)


def _gcg(context: Context, behaviour: Prompt) -> AttackPrompt:
    config, tokenizer, key = context.config, context.tokenizer, context.key(behaviour)
    settings = GcgSettings(config.steps, config.candidates, config.topk, config.suffix_tokens)
    target = context.target(behaviour)
    problem = suffix_problem(tokenizer, behaviour.text, target, config.prompt_format, context.model.device)
    prompt_id = attack_prompt_id(behaviour.id, context.identity)

    def reached(suffix) -> bool:
        with context.generating():
            return reaches_target(context.model, tokenizer, problem, suffix, prompt_id)

    parts = () if context.approximation == CLEAN else context.approximation.parts()

    def on_step(step) -> None:
        context.records.put_step(key, step)
        context.advance()

    steps = gcg(context.model, tokenizer, problem, settings, context.serving(behaviour, "step"),
                lambda n: context.seed(behaviour, "candidates", n), context.records.steps(key), on_step, reached,
                reuse_prefix=not any(part.per_call for part in parts))
    last = steps[-1]
    return AttackPrompt(
        adversarial_request(behaviour.text, tokenizer.decode(list(last.suffix))),
        sum(s.forward_passes for s in steps), sum(s.seconds for s in steps),
        {"steps": len(steps), "first_loss": steps[0].loss, "loss": last.loss, "reached": last.success,
         "target": target},
    )


def _autodan(context: Context, behaviour: Prompt) -> AttackPrompt:
    config = context.config
    serving = context.serving(behaviour, "generation")
    target = context.target(behaviour)
    mutator, mutator_tokenizer = context.attacker(config.mutator)

    def losses(templates: list[str], generation: int) -> list[float]:
        with serving(generation):
            return prompt_losses(context.model, context.tokenizer, [sources.fill(t, behaviour.text) for t in templates],
                                 target, config.prompt_format)

    def mutate(template: str, seed: int) -> str:
        limit = int(1.25 * len(token_ids(mutator_tokenizer, template))) + 16
        reply = sample_reply(mutator, mutator_tokenizer, mutation_request(template), "plain", limit,
                             MUTATION_TEMPERATURE, MUTATION_TOP_P, seed)
        return accept_rephrasing(template, reply)

    def succeeded(template: str, _generation: int) -> bool:
        return refusal_phrase(context.answer(behaviour, sources.fill(template, behaviour.text))) is None

    settings = AutoDanSettings(config.generations, config.population, config.elite)
    start = time.perf_counter()
    found = autodan(sources.autodan_templates(), losses, settings, context.seed(behaviour), mutate, sources.synonyms,
                    succeeded, lambda _generation: context.advance())
    return AttackPrompt(sources.fill(found.template, behaviour.text), found.evaluations + found.checks,
                        time.perf_counter() - start,
                        {"loss": found.loss, "history": list(found.history), "generations": len(found.history),
                         "stopped": found.stopped, "mutations": found.mutations, "target": target})


def _dra(context: Context, behaviour: Prompt) -> AttackPrompt:
    letters, flagged, templates = sources.dra_material()
    start = time.perf_counter()
    trace = dra_attack(behaviour.text, letters, flagged, templates, lambda prompt: context.answer(behaviour, prompt),
                       context.config.queries, lambda k: context.rng(behaviour, k), lambda _query: context.advance())
    last = trace[-1]
    return AttackPrompt(last.prompt, len(trace), time.perf_counter() - start,
                        {"template": last.template, "queries": len(trace), "stopped": last.succeeded,
                         "toxic_cut": last.settings.toxic_cut, "benign_cut": last.settings.benign_cut})


def _past_tense(context: Context, behaviour: Prompt) -> AttackPrompt:
    rewriter, tokenizer = context.attacker(context.config.rewriter)
    start = time.perf_counter()
    attempts = [
        parse_reformulation(sample_reply(rewriter, tokenizer, rewrite_instruction(behaviour.text), "plain",
                                         REWRITE_MAX_NEW_TOKENS, REWRITE_TEMPERATURE, REWRITE_TOP_P,
                                         context.seed(behaviour, "attempt", k)), behaviour.text)
        for k in range(context.config.attempts)
    ]
    return AttackPrompt(attempts[0], 0, time.perf_counter() - start, {"attempts": attempts})


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
    "past-tense": _past_tense,
}
# The attacks that search through the model (the approximation active) or read its answers: their
# prompts depend on how it computes.
OPTIMISED = ("gcg", "autodan", "dra")
# The offline material each attack reads: loaded before the model, so a missing package fails at once.
MATERIAL: dict[str, Callable[[], object]] = {
    "gcg-transfer": sources.gcg_suffixes,
    "autodan": lambda: (sources.autodan_templates(), sources.wordnet_synonyms()),
    "dra": sources.dra_material,
    "templates": lambda: sources.pyrit_templates("named"),
    "in-the-wild": lambda: sources.pyrit_templates("in_the_wild"),
    "many-shot": lambda: (sources.many_shot_layout(), sources.many_shot_examples()),
}


@dataclass
class AttackResult:
    config: AttackConfig
    cells: list[AttackCell]  # this run's (approximation, attack) results
    judges: dict[str, JudgeInfo]  # each judge's identity and held-out agreement (empty without --calibrate)
    report_md: Path
    report_html: Path


def behaviours_of(config: AttackConfig) -> list[Prompt]:
    """The seeded subset of behaviours every attack runs on."""
    return subset(load_benchmark(config.benchmark), config.limit, config.seed)


def adversarial_prompts(context: Context, behaviours: list[Prompt], finished: Callable[[int], None]) -> list[AttackPrompt]:
    """Each behaviour's stored adversarial prompt, or a new one, stored as soon as it is built;
    ``finished(n)`` once the first ``n`` behaviours have theirs."""
    found = []
    for done, behaviour in enumerate(behaviours, 1):
        key = context.key(behaviour)
        prompt = context.records.prompt(key)
        if prompt is None:
            prompt = BUILDERS[context.identity.split()[0]](context, behaviour)
            context.records.put_prompt(key, prompt)
        found.append(prompt)
        finished(done)
    return found


def answered_prompts(behaviours: list[Prompt], found: list[AttackPrompt], identity: str) -> list[list[Prompt]]:
    """Per behaviour, the prompts the model answers: the adversarial prompt, or every attempt of a
    best-of-N attack (ids ``<adversarial prompt id>#<attempt>``)."""
    answered = []
    for behaviour, prompt in zip(behaviours, found):
        base = attack_prompt_id(behaviour.id, identity)
        texts = prompt.answered
        ids = [base] if len(texts) == 1 and not prompt.details.get("attempts") else [f"{base}#{k}" for k in range(len(texts))]
        answered.append([Prompt(i, text, behaviour.category) for i, text in zip(ids, texts)])
    return answered


def attack(config: AttackConfig, progress: bool = True) -> AttackResult:
    """Run every attack of ``config`` under every approximation; store, judge, report."""
    check_apart(config.inputs(), run_dirs=[("--run-dir", config.run_dir)])
    behaviours = behaviours_of(config)
    config.check_cost(len(behaviours))
    for name in config.attack:
        MATERIAL.get(name, lambda: None)()
    check_judge_model(config.judges, config.judge_model)
    for name, source in (("autodan", config.mutator), ("past-tense", config.rewriter)):
        if name in config.attack and source:  # loaded only when the attack starts: checked now
            check_source(source)
    model, tokenizer = load(config.model, dtype=config.dtype, device=config.device)
    check_specs_fit(model, config.approximations)
    open_run_dir(config.run_dir)
    attackers = {"": (model, tokenizer), str(config.model): (model, tokenizer)}

    def attacker(source: str):
        """The mutator or rewriter named ``source`` (loaded once), or the subject for '' or its own name."""
        if source not in attackers:
            attackers[source] = load(source, dtype=config.dtype, device=config.device)
        return attackers[source]

    with make_executor(config) as executor, Store(config.run_dir / "results.sqlite") as store, \
            AttackRecords(store.path) as records, progress_bar(progress) as bar:
        engine = Engine(store, model, tokenizer, config, executor=executor)
        built = []  # (approximation, attack, identity, adversarial prompts, answered prompts): built here, on the model
        for approximation in config.approximations:
            for name in config.attack:
                identity = attack_identity(name, {**config.parameters(name), **_drawn(name, engine)})
                # A search's progress counts its steps, each behaviour's budget in all (one that stops early
                # skips the rest of its budget); another attack's counts its behaviours.
                unit, units = config.search_units(name) or ("", 1)
                task = bar.add_task(f"build {name} under {spec_label(str(approximation))}" + (f", {unit}" if unit else ""),
                                    total=len(behaviours) * units)
                context = Context(model, tokenizer, config, approximation, identity, engine.fingerprint, records, attacker,
                                  lambda task=task: bar.advance(task, 1))
                found = adversarial_prompts(context, behaviours,
                                            lambda n, task=task, units=units: bar.update(task, completed=n * units))
                built.append((approximation, name, identity, found, answered_prompts(behaviours, found, identity)))
        attackers.clear()  # a mutator or rewriter model is no longer needed
        # Then every response and verdict in one plan, each response judged against its behaviour,
        # not the adversarial prompt (as HarmBench and JailbreakBench judge): the question is whether
        # the response does what was asked.
        judges = {name: engine.judge(name) for name in config.judges}
        total = sum(len(group) for *_, groups in built for group in groups)
        generating = bar.add_task("generate", total=total)
        judging = {name: bar.add_task(f"judge {name}", total=total) for name in judges}
        plan = Plan()
        runs = []
        for approximation, name, identity, found, groups in built:
            responses = plan.responses(engine, engine.condition(approximation, [p for g in groups for p in g]),
                                       lambda n: bar.advance(generating, n))
            requests = [b.text for b, group in zip(behaviours, groups) for _ in group]
            verdicts = {j: plan.judged(engine, judge, responses, requests,
                                       lambda n, task=judging[j]: bar.advance(task, n)) for j, judge in judges.items()}
            runs.append((str(approximation), name, identity, found, groups, verdicts))
        plan.run()
        outcomes = {}
        for approximation, name, _, _, groups, verdicts in runs:
            for j in judges:
                successes = _regroup(attack_outcomes(j, [v.label for v in verdicts[j].rows]), groups)
                # A best-of-N attack succeeds on a behaviour when any of its attempts does.
                outcomes[approximation, name, j] = [any(group) for group in successes]
        info = judge_infos(judges, config.calibrate, bar)
        fingerprint = engine.fingerprint
    cells = [
        AttackCell(
            model=config.model, fingerprint=fingerprint, approx=approximation, attack=name, identity=identity,
            benchmark=config.benchmark, seed=config.seed, n=len(found),
            asr={j: proportion(outcomes[approximation, name, j]) for j in config.judges},
            forward_passes=sum(f.forward_passes for f in found), seconds=sum(f.seconds for f in found),
            target_reached=_share(found, "reached"),
            queries=[f.forward_passes + len(group) for f, group in zip(found, groups)],
            search_seconds=[round(f.seconds, 3) for f in found],
            budget=config.budget_text(name), stopped=_share(found, "stopped"),
            behaviours=[b.id for b in behaviours],
            outcomes={j: [int(o) for o in outcomes[approximation, name, j]] for j in config.judges},
        )
        for approximation, name, identity, found, groups, _ in runs
    ]
    path = config.run_dir / RESULTS_FILE
    saved = merge_cells(path, [jsonable(asdict(c)) for c in cells])
    write_json(path, {"config": jsonable(asdict(config)), "cells": saved,
                      "judges": {name: asdict(i) for name, i in info.items()}})
    md, html = write_attack_report(config.run_dir)
    return AttackResult(config, cells, info, md, html)


def _regroup(flat: list, groups: list[list]) -> list[list]:
    """``flat`` cut into lists of the lengths of ``groups``."""
    out, at = [], 0
    for group in groups:
        out.append(flat[at : at + len(group)])
        at += len(group)
    return out


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
