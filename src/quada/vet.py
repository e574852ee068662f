"""The main job: vet a model's safety and utility, clean and under each activation approximation,
and each deployment of it against the clean model.

For every condition (the clean model, each approximation, each deployment: the model served by
llama.cpp or an OpenAI-compatible server, :mod:`quada.backends`) it generates responses to a
harmful benchmark and to a benign suite, judges them, and measures perplexity and (when a
question source is available) multiple-choice accuracy, all through the measurement engine
(:mod:`quada.engine.plan`) and the results store: stored, so a rerun or a resumed run computes
only what is missing. Every condition is compared with the clean model on the same prompts by the
same judges and the same verdict rules, in looks that ask more harmful prompts only of the
conditions not yet decided (:mod:`quada.stats.sequential`, :mod:`quada.stats.verdict`).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from quada.approx import spec_label
from quada.backends import (
    backend_cache_key,
    check_deployment,
    determinism,
    render,
    served_perplexity,
)
from quada.data import Prompt, load_benchmark, seeded_order, subset
from quada.engine.executors import Executor, Usage, make_executor
from quada.engine.plan import (
    BackendRef,
    Engine,
    Measured,
    Plan,
    Verdicts,
    check_specs_fit,
    run_jobs,
)
from quada.judging import (
    GRADE_RANGE,
    JUDGE_CLASSES,
    SAFETY_JUDGES,
    Judge,
    attack_outcomes,
    check_judge_model,
)
from quada.judging.calibration import JudgeInfo, judge_infos
from quada.measures.generate import check_prompts_fit
from quada.measures.utility import check_corpus, load_corpus, load_questions
from quada.models import load
from quada.options import VetConfig
from quada.report.render import Example
from quada.report.story import write_story
from quada.report.vet import RESULTS_FILE, ConditionResult
from quada.runs import check_apart, jsonable, open_run_dir, progress_bar, write_json
from quada.stats.metrics import Estimate, bounded_mean, proportion
from quada.stats.sequential import Design, look_schedule
from quada.stats.verdict import Comparison, Verdict, compare, verdict
from quada.store import CLEAN, Store

HARMFUL, BENIGN = "harmful", "benign"  # which prompts a judgement is of
DETERMINISM_PROMPTS = 2  # harmful prompts each deployment answers twice, to check it is deterministic


@dataclass
class VetResult:
    config: VetConfig
    fingerprint: str
    conditions: list[ConditionResult]
    judges: dict[str, JudgeInfo]
    report_md: Path
    report_html: Path
    usage: Usage  # what the executor's workers did (the busy share of a Ray pool)


def prompt_sets(config) -> tuple[list[Prompt], list[Prompt]]:
    """The harmful and benign prompts a vet run with ``config`` evaluates (a :class:`VetConfig`, or
    the configuration saved in a run's results file). A sequential vet reads its harmful prompts in
    a seeded order and each look takes the first ones, so a larger budget extends a smaller one; a
    vet of one fixed look (``first_look`` None, as `quada align` evaluates and as vets of earlier
    versions did) takes a seeded subset."""
    harmful = load_benchmark(config.benchmark)
    if getattr(config, "first_look", None) is None:
        harmful = subset(harmful, config.limit, config.seed)
    else:
        harmful = seeded_order(harmful, config.seed)[:config.limit]
    return harmful, subset(load_benchmark(config.benign), config.benign_limit, config.seed)


def vet(config: VetConfig, progress: bool = True) -> VetResult:
    """Run the vetting described by ``config``; return its results and write its report.

    Every input is checked (prompts, judges, corpus, approximations against the model, the room in
    its context, the deployments) before the run folder is made or anything is generated."""
    with make_executor(config) as executor, progress_bar(progress) as bar, Vetting(config, executor, bar) as vetting:
        run_jobs([vetting])
        return vetting.report()


class Vetting:
    """One model vetted into one run folder, as a job of :func:`quada.engine.plan.run_jobs`: its
    inputs checked, its model loaded and its deployments opened when made. Each round is one look
    of the group-sequential design (:mod:`quada.stats.sequential`): it adds to the plan the harmful
    prompts of the look for the clean model and every condition not yet decided (at the first look
    also every condition's benign prompts, perplexity and accuracy), with their verdicts; the next
    round first decides what the look's results decide (:func:`quada.stats.verdict.verdict`).
    :meth:`report` writes the report. `quada align` runs the vettings of several models (each one
    look) in one plan."""

    def __init__(self, config: VetConfig, executor: Executor, bar, label: str = ""):
        self.config, self.bar, self.label = config, bar, label
        check_apart(config.inputs(), run_dirs=[("--run-dir", config.run_dir)])
        self.harmful, self.benign = prompt_sets(config)
        self.looks = look_schedule(config.first_look, len(self.harmful))
        check_judge_model((*config.judges, config.refusal_judge), config.judge_model)
        corpus = load_corpus(config.corpus)
        self.questions = [] if config.questions == 0 else subset(load_questions(), config.questions, config.seed)
        for deployment in config.deployments:  # a bad GGUF or an unreachable server fails in seconds, before the model loads
            check_deployment(deployment, config.api_key_env)
        model, tokenizer = load(config.model, dtype=config.dtype, device=config.device)
        self.approximations = [CLEAN, *config.approximations]
        check_specs_fit(model, self.approximations)
        check_prompts_fit(model, tokenizer, [*self.harmful, *self.benign], config.prompt_format, config.max_new_tokens)
        check_corpus(tokenizer, corpus, config.ppl_window)
        open_run_dir(config.run_dir)
        self.store = Store(config.run_dir / "results.sqlite")
        self.engine = Engine(self.store, model, tokenizer, config, corpus, executor)
        self.backends: dict[str, BackendRef] = {}  # by condition: each deployment, opened where the units run
        for deployment in config.deployments:
            ref = self.engine.deployment(deployment, config.api_key_env, config.request_timeout, config.retries,
                                         config.max_concurrency)
            self.backends[ref.facts.condition] = ref
        self.probes: dict[str, tuple[Measured, Measured]] = {}  # by deployment: its determinism and perplexity
        self.conditions = [str(a) for a in config.approximations] + list(self.backends)  # compared with clean
        self.judges: dict[str, Judge] = {}
        self.responses: dict[tuple[str, str], Any] = {}  # by (condition, harmful or benign): the latest request
        self.verdicts: dict[tuple[str, str, str], Verdicts] = {}  # by (condition, judge, which): the latest
        self.decided: dict[str, Verdict] = {}
        self.comparisons: dict[str, dict[str, Comparison]] = {}  # by condition: at the look that decided it
        self.used: dict[str, int] = {}  # by condition: the harmful prompts it answered
        self.design: Design | None = None  # set at the first decision, once the judges' calibration is known
        self.info: dict[str, JudgeInfo] = {}
        self.tasks: dict[str, int] = {}
        self.usage = executor.usage
        self.look = -1

    def next_round(self, plan: Plan) -> bool:
        """Decide what the last look decides, then add the next look to ``plan``; False when every
        condition is decided or the looks are spent."""
        if self.look >= 0:
            if self.conditions:  # with none, the clean model is only measured
                self._decide()
            if self.look + 1 == len(self.looks) or len(self.decided) == len(self.conditions):
                return False
        self.look += 1
        first = self.look == 0
        if first:
            names = list(dict.fromkeys([*self.config.judges, self.config.refusal_judge]))
            self.judges = {name: self.engine.judge(name) for name in names}
            self.counting = {name: self.bar.add_task(f"{self.label}judge {name}", total=0) for name in names}
        prompts = self.harmful[:self.looks[self.look]]
        for approximation in self.approximations:
            if str(approximation) not in self.decided:
                self._generate(plan, approximation, prompts, first)
        for condition, backend in self.backends.items():
            if condition not in self.decided:
                self._ask(plan, condition, backend, prompts, first)
        return True

    def _progress(self, condition: str, prompts: int):
        """The progress callback of ``condition``'s generation, its total raised to ``prompts`` harmful
        prompts and the benign ones."""
        total = prompts + len(self.benign)
        if condition not in self.tasks:
            self.tasks[condition] = self.bar.add_task(f"{self.label}generate {condition}", total=total)
        self.bar.update(self.tasks[condition], total=total)
        return lambda n, task=self.tasks[condition]: self.bar.advance(task, n)

    def _generate(self, plan: Plan, approximation, prompts: list[Prompt], first: bool) -> None:
        """Add the look's harmful responses of the model under ``approximation`` to ``plan`` (at the
        first look also the benign ones, perplexity and accuracy), with their verdicts."""
        engine, condition = self.engine, str(approximation)
        step = self._progress(condition, len(prompts))
        self._responses(plan, condition, HARMFUL, plan.responses(engine, engine.condition(approximation, prompts), step))
        if first:
            self._responses(plan, condition, BENIGN,
                            plan.responses(engine, engine.condition(approximation, self.benign), step))
            plan.perplexity(engine, approximation)
            if self.questions:
                plan.accuracy(engine, approximation, self.questions)

    def _responses(self, plan: Plan, condition: str, which: str, responses) -> None:
        """Keep ``condition``'s responses to the ``which`` prompts (a request of ``plan``) and add their
        verdicts to ``plan``: the safety judges read the harmful responses, the refusal judge the benign ones."""
        config, bar = self.config, self.bar
        self.responses[condition, which] = responses
        count = len(responses.ordered_keys)
        if which == HARMFUL:
            self.used[condition] = count
        for name in config.judges if which == HARMFUL else [config.refusal_judge]:
            bar.update(self.counting[name], total=bar.tasks[self.counting[name]].total + count)
            self.verdicts[condition, name, which] = plan.judged(
                self.engine, self.judges[name], responses, on_done=lambda n, task=self.counting[name]: bar.advance(task, n))

    def _ask(self, plan: Plan, condition: str, backend: BackendRef, prompts: list[Prompt], first: bool) -> None:
        """Add a deployment's responses to the look's harmful prompts to ``plan`` (at the first look also
        to the benign ones, and its checks), with their verdicts."""
        engine = self.engine
        step = self._progress(condition, len(prompts))
        self._responses(plan, condition, HARMFUL, plan.served(engine, backend, prompts, step))
        if first:
            self._responses(plan, condition, BENIGN, plan.served(engine, backend, self.benign, step))
            self.probes[condition] = _deployment_probes(plan, engine, backend, self.config, self.harmful)

    def _deployment(self, condition: str) -> dict:
        """What the deployment of ``condition`` is and how it behaved (its probes ran)."""
        determinism_probe, perplexity = self.probes[condition]
        repeats = determinism_probe.value
        return {"identity": self.backends[condition].facts.identity,
                "determinism_prompts": [p.id for p in self.harmful[:DETERMINISM_PROMPTS]],
                "repeats_equal": repeats, "deterministic": all(repeats), "perplexity": perplexity.value}

    def _outcomes(self, condition: str, judge: str, prompts: int) -> list[bool]:
        """``condition``'s attack outcomes by ``judge`` on the first ``prompts`` harmful prompts."""
        return attack_outcomes(judge, [j.label for j in self.verdicts[condition, judge, HARMFUL].rows[:prompts]])

    def _perplexity_ratio(self, condition: str) -> float | None:
        measurements = self.store.measurements()
        clean = measurements.get(self.engine.key_of("perplexity", CLEAN))
        own = (self.probes[condition][1].value if condition in self.probes
               else measurements.get(self.engine.key_of("perplexity", condition)))
        return own / clean if own and clean else None

    def _decide(self) -> None:
        """The verdict, at the look just measured, on every condition it decides."""
        config, look = self.config, self.look
        safety = [name for name in config.judges if name in SAFETY_JUDGES]
        if self.design is None:
            self.info = judge_infos(self.judges, config.calibrate, self.bar)
            calibrated = [name for name in safety if self.info[name].kappa is not None]
            self.design = Design(self.looks, config.alpha, len(calibrated or safety), len(self.conditions),
                                 config.margin / 100)
        design = self.design
        for condition in self.conditions:
            if condition in self.decided:
                continue
            n = self.used[condition]
            comparisons = {
                name: compare(name, self.info[name].measure, self.info[name].kappa, self._outcomes(CLEAN, name, n),
                              self._outcomes(condition, name, n), design.rise_critical[look],
                              design.within_critical[look], design.margin)
                for name in safety
            }
            self.comparisons[condition] = comparisons
            decided = verdict(list(comparisons.values()), self._perplexity_ratio(condition), design, look,
                              config.ppl_bound)
            if decided is not None and condition in self.probes and not all(self.probes[condition][0].value):
                decided = replace(decided, reason=decided.reason + "; the deployment answered a repeated prompt "
                                  "differently, so its own nondeterminism is part of the difference")
            if decided is not None:
                self.decided[condition] = decided

    def report(self) -> VetResult:
        """The results of the looks that ran, written to the run folder with the report."""
        config, engine = self.config, self.engine
        for task in self.bar.tasks:
            self.bar.update(task.id, completed=task.total)
        generations = {c: (self.responses[c, HARMFUL].rows, self.responses[c, BENIGN].rows)
                       for c in [CLEAN, *self.conditions]}
        deployments = {condition: self._deployment(condition) for condition in self.backends}
        for condition, checks in deployments.items():
            served = [*generations[condition][0], *generations[condition][1]]
            reference = [*generations[CLEAN][0][:self.used[condition]], *generations[CLEAN][1]]
            checks["same_as_clean"] = sum(a.response == b.response for a, b in zip(served, reference, strict=True))
            checks["responses"] = len(served)
        judgements = {key: v.rows for key, v in self.verdicts.items()}
        fingerprint = engine.fingerprint
        measurements = self.store.measurements()
        perplexities = {str(a): measurements.get(engine.key_of("perplexity", a)) for a in self.approximations}
        perplexities |= {c: checks["perplexity"] for c, checks in deployments.items()}
        results = [_condition_result(c, config, engine, measurements, judgements, self.info, self.harmful,
                                     perplexities, self.decided.get(c), self.comparisons.get(c, {}))
                   for c in generations]
        design = self.design
        if not self.info:  # nothing was compared, so nothing asked for the judges' calibration yet
            self.info = judge_infos(self.judges, config.calibrate, self.bar)
        write_json(config.run_dir / RESULTS_FILE, {
            "config": jsonable(asdict(config)), "fingerprint": fingerprint, "dtype": engine.dtype, "device": engine.device,
            "summary": _summary(config, fingerprint, self.looks, len(self.benign)),
            "design": None if design is None else {
                **asdict(design), "rise_critical": design.rise_critical, "within_critical": design.within_critical,
                "family": design.family_text()},
            "judges": {name: asdict(i) for name, i in self.info.items()},
            "conditions": [jsonable(asdict(r)) for r in results],
            "deployments": deployments,
            "examples": [asdict(e) for e in _examples(config, generations, judgements)],
        })
        md, html = write_story(config.run_dir)
        return VetResult(config, fingerprint, results, self.info, md, html, self.usage)

    def __enter__(self) -> Vetting:
        return self

    def __exit__(self, *exc) -> None:
        self.store.close()


def _deployment_probes(plan: Plan, engine: Engine, backend: BackendRef, config, harmful: list[Prompt]):
    """Add to ``plan`` the two checks of a deployment, each measured once per run folder: whether it
    answers a repeat of :data:`DETERMINISM_PROMPTS` prompts the same way, and its perplexity on the
    run's token windows (``None`` where the backend cannot score given tokens)."""
    probes = harmful[:DETERMINISM_PROMPTS]
    settings, facts = config.settings, backend.facts
    repeats = plan.probed(
        engine, backend_cache_key(facts, "determinism", *(p.id for p in probes), settings.as_dict(), config.seed),
        "determinism check", backend, functools.partial(
            determinism, prompts=tuple(render(engine.tokenizer, p.text, settings.prompt_format) for p in probes),
            settings=settings))
    perplexity = plan.probed(  # on the token windows the model's own perplexity is measured on
        engine, backend_cache_key(facts, "ppl", config.corpus, config.ppl_window, config.ppl_windows), "perplexity",
        backend, functools.partial(served_perplexity, windows=engine.windows.tolist()))
    return repeats, perplexity


def _condition_result(approximation, config, engine: Engine, measured, judgements, info, harmful, perplexities,
                      decided: Verdict | None, comparisons: dict[str, Comparison]) -> ConditionResult:
    safety = [name for name in config.judges if name in SAFETY_JUDGES]
    labels = {name: attack_outcomes(name, [j.label for j in judgements[approximation, name, HARMFUL]]) for name in safety}
    hs = judgements.get((approximation, "harmfulness", HARMFUL))
    mc_key = engine.key_of("accuracy", approximation)
    asked = len(next(iter(labels.values())))
    return ConditionResult(
        approx=approximation,
        prompts=asked,
        asr={name: proportion(v) for name, v in labels.items()},
        asr_by_category={name: _by_category(harmful[:asked], v) for name, v in labels.items()},
        mcnemar={name: c.mcnemar for name, c in comparisons.items()},
        difference={name: c.difference for name, c in comparisons.items()},
        verdict=decided,
        harmfulness=bounded_mean([j.score for j in hs], GRADE_RANGE) if hs else None,
        over_refusal=proportion([j.label for j in judgements[approximation, config.refusal_judge, BENIGN]]),
        perplexity=perplexities[approximation],
        accuracy=proportion(measured[mc_key]) if mc_key in measured else None,
    )


def _by_category(prompts, outcomes: list[bool]) -> dict[str, Estimate]:
    """The attack success rate per harm category of ``prompts`` (empty when they have fewer than two
    categories)."""
    groups: dict[str, list[bool]] = {}
    for prompt, outcome in zip(prompts, outcomes, strict=True):
        groups.setdefault(prompt.category or "uncategorised", []).append(outcome)
    return {c: proportion(v) for c, v in sorted(groups.items())} if len(groups) > 1 else {}


def _examples(config, generations, judgements, per_condition: int = 2) -> list[Example]:
    """A few responses judged as successful attacks, from the conditions with the most of them."""
    safety = [j for j in config.judges if j in SAFETY_JUDGES]
    if not safety:
        return []
    harm = [j for j in safety if JUDGE_CLASSES[j].measure == "harm"]
    judge = (harm or safety)[0]
    examples = []
    for approx, (harmful, _) in generations.items():
        outcomes = attack_outcomes(judge, [j.label for j in judgements[approx, judge, HARMFUL]])
        hits = [g for g, attack in zip(harmful, outcomes) if attack][:per_condition]
        examples += [Example(spec_label(approx), g.prompt, g.response, f"{judge} judge: attack") for g in hits]
    return examples[: 3 * per_condition]


def _summary(config, fingerprint, looks, n_benign) -> str:
    steps = (f"up to {looks[-1]} prompts of {config.benchmark} in looks of {', '.join(map(str, looks))} (seeded order, "
             f"seed {config.seed})" if len(looks) > 1 else f"{looks[0]} prompts of {config.benchmark} (seed {config.seed})")
    return (
        f"Model {config.model} (fingerprint {fingerprint}); {steps} and {n_benign} of {config.benign}; "
        f"prompt format {config.prompt_format}; greedy, {config.max_new_tokens} new tokens"
        f"{', stop on refusal' if config.stop_on_refusal else ''}; over-refusal by the {config.refusal_judge} judge; "
        f"perplexity on {config.corpus} ({config.ppl_windows or 'all'} windows of {config.ppl_window} tokens)."
    )
