"""The main job: vet a model's safety and utility, clean and under each activation approximation,
and each deployment of it against the clean model.

For every condition (the clean model, each approximation, then each deployment: the model served
by llama.cpp or an OpenAI-compatible server, :mod:`quada.backends`) it generates responses to a
harmful benchmark and to a benign suite, judges them, and measures perplexity and (when a
question source is available) multiple-choice accuracy, all through the measurement engine
(:mod:`quada.eval.engine`) and the results store: stored, so a rerun or a resumed run computes
only what is missing. Every condition is compared with the clean model on the same prompts by the
same judges and the same verdict rules.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from quada.approx import spec_label
from quada.backends import (
    backend_cache_key,
    check_deployment,
    deployment_responses,
    determinism,
    open_backend,
    render,
)
from quada.data import Prompt, load_benchmark, subset
from quada.eval.engine import Engine, Plan, Responses, Verdicts, check_specs_fit, run_jobs
from quada.eval.executors import Executor, Usage, make_executor
from quada.eval.generate import check_prompts_fit
from quada.eval.judges import JUDGE_CLASSES, SAFETY_JUDGES, Judge, attack_outcomes, check_judge_model
from quada.eval.metrics import Estimate, estimate, proportion
from quada.eval.utility import check_corpus, load_corpus, load_questions
from quada.eval.verdict import compare, verdict
from quada.judge_calibration import JudgeInfo, judge_infos
from quada.models import load
from quada.options import VetConfig
from quada.report.render import Example
from quada.report.story import write_story
from quada.report.vet import RESULTS_FILE, ConditionResult
from quada.runs import check_apart, jsonable, open_run_dir, progress_bar, write_json
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
    the configuration saved in a run's results file)."""
    return (subset(load_benchmark(config.benchmark), config.limit, config.seed),
            subset(load_benchmark(config.benign), config.benign_limit, config.seed))


def vet(config: VetConfig, progress: bool = True) -> VetResult:
    """Run the vetting described by ``config``; return its results and write its report.

    Every input is checked (prompts, judges, corpus, approximations against the model, the room in
    its context) before the run folder is made or anything is generated."""
    with make_executor(config) as executor, progress_bar(progress) as bar, Vetting(config, executor, bar) as vetting:
        run_jobs([vetting])
        return vetting.report()


class Vetting:
    """One model vetted into one run folder, as a job of :func:`quada.eval.engine.run_jobs`: its
    inputs checked and its model loaded when made; its first round adds the whole work on the model
    (every condition's responses to both prompt sets, their verdicts, perplexity and accuracy) to one
    plan, its second round (when there are deployments) asks each deployment on the driver and adds
    the verdicts on its responses; :meth:`report` writes the report. `quada align` runs the vettings
    of several models in one plan."""

    def __init__(self, config: VetConfig, executor: Executor, bar, label: str = ""):
        self.config, self.bar, self.label = config, bar, label
        check_apart(config.inputs(), run_dirs=[("--run-dir", config.run_dir)])
        self.harmful, self.benign = prompt_sets(config)
        check_judge_model((*config.judges, config.refusal_judge), config.judge_model)
        corpus = load_corpus(config.corpus)
        self.questions = [] if config.questions == 0 else subset(load_questions(), config.questions, config.seed)
        for deployment in config.deployments:  # an unreachable server fails in seconds, before the model loads
            check_deployment(deployment, config.api_key_env)
        model, tokenizer = load(config.model, dtype=config.dtype, device=config.device)
        self.approximations = [CLEAN, *config.approximations]
        check_specs_fit(model, self.approximations)
        check_prompts_fit(model, tokenizer, [*self.harmful, *self.benign], config.prompt_format, config.max_new_tokens)
        check_corpus(tokenizer, corpus, config.ppl_window)
        open_run_dir(config.run_dir)
        self.store = Store(config.run_dir / "results.sqlite")
        self.engine = Engine(self.store, model, tokenizer, config, corpus, executor)
        self.judges: dict[str, Judge] = {}
        self.generations: dict[str, tuple] = {}  # by condition: the harmful and the benign responses
        self.verdicts: dict[tuple[str, str, str], Verdicts] = {}
        self.deployments: dict[str, dict] = {}  # by condition: what each deployment is and how it behaved
        self.usage = executor.usage
        self._rounds = 0

    def next_round(self, plan: Plan) -> bool:
        """Add the model's whole vetting to ``plan`` (the first round), then the deployments' verdicts
        (a second round, after the clean responses they are compared with exist)."""
        self._rounds += 1
        if self._rounds == 1:
            config, engine, bar = self.config, self.engine, self.bar
            names = list(dict.fromkeys([*config.judges, config.refusal_judge]))
            self.judges = {name: engine.judge(name) for name in names}
            self.counting = {name: bar.add_task(f"{self.label}judge {name}", total=0) for name in names}
            for approximation in self.approximations:
                task = bar.add_task(f"{self.label}generate {approximation}", total=len(self.harmful) + len(self.benign))
                step = lambda n, task=task: bar.advance(task, n)  # noqa: E731
                responses = tuple(plan.responses(engine, engine.condition(approximation, prompts), step)
                                  for prompts in (self.harmful, self.benign))
                self.generations[str(approximation)] = responses
                self._judge(plan, str(approximation), responses)
                plan.perplexity(engine, approximation)
                if self.questions:
                    plan.accuracy(engine, approximation, self.questions)
            return True
        if self._rounds == 2 and self.config.deployments:
            for deployment in self.config.deployments:
                self._ask(plan, deployment)
            return True
        return False

    def _judge(self, plan: Plan, condition: str, responses: tuple) -> None:
        """Add the verdicts on one condition's responses to ``plan``: the safety judges read the
        harmful responses, the refusal judge the benign ones."""
        config, bar = self.config, self.bar
        for name, which in [(name, HARMFUL) for name in config.judges] + [(config.refusal_judge, BENIGN)]:
            judged = responses[which == BENIGN]
            count = len(judged.condition.prompts) if isinstance(judged, Responses) else len(judged)
            bar.update(self.counting[name], total=bar.tasks[self.counting[name]].total + count)
            self.verdicts[condition, name, which] = plan.judged(
                self.engine, self.judges[name], judged, on_done=lambda n, task=self.counting[name]: bar.advance(task, n))

    def _ask(self, plan: Plan, deployment: str) -> None:
        """Generate a deployment's responses on the driver (stored, keyed by its identity), check it,
        and add the verdicts on its responses to ``plan``."""
        config, engine, bar = self.config, self.engine, self.bar
        tokenizer = engine.tokenizer
        with contextlib.closing(open_backend(deployment, tokenizer, config.api_key_env, config.request_timeout,
                                             config.retries)) as backend:
            task = bar.add_task(f"{self.label}generate {backend.condition}", total=len(self.harmful) + len(self.benign))
            responses = tuple(
                deployment_responses(self.store, backend, prompts, config.settings, tokenizer, engine.fingerprint,
                                     config.seed, lambda n, task=task: bar.advance(task, n))
                for prompts in (self.harmful, self.benign)
            )
            bar.update(task, completed=len(self.harmful) + len(self.benign))
            checks = _deployment_checks(engine, backend, config, self.harmful)
        served = [*responses[0], *responses[1]]
        reference = [*self.generations[CLEAN][0].rows, *self.generations[CLEAN][1].rows]
        checks["same_as_clean"] = sum(a.response == b.response for a, b in zip(served, reference, strict=True))
        checks["responses"] = len(served)
        self.generations[backend.condition] = responses
        self.deployments[backend.condition] = checks
        self._judge(plan, backend.condition, responses)

    def report(self) -> VetResult:
        """The results of the plan that ran, written to the run folder with the report."""
        config, engine = self.config, self.engine
        for task in self.bar.tasks:
            self.bar.update(task.id, completed=task.total)
        generations = {c: tuple(r.rows if isinstance(r, Responses) else r for r in pair)
                       for c, pair in self.generations.items()}
        judgements = {key: v.rows for key, v in self.verdicts.items()}
        info = judge_infos(self.judges, config.calibrate, self.bar)
        fingerprint = engine.fingerprint
        measurements = self.store.measurements()
        perplexities = {str(a): measurements.get(engine.key_of("perplexity", a)) for a in self.approximations}
        perplexities |= {c: checks["perplexity"] for c, checks in self.deployments.items()}
        results = [_condition_result(c, config, engine, measurements, judgements, info, self.harmful, perplexities,
                                     self.deployments.get(c)) for c in generations]
        write_json(config.run_dir / RESULTS_FILE, {
            "config": jsonable(asdict(config)), "fingerprint": fingerprint, "dtype": engine.dtype, "device": engine.device,
            "summary": _summary(config, fingerprint, len(self.harmful), len(self.benign)),
            "judges": {name: asdict(i) for name, i in info.items()},
            "conditions": [jsonable(asdict(r)) for r in results],
            "deployments": self.deployments,
            "examples": [asdict(e) for e in _examples(config, generations, judgements)],
        })
        md, html = write_story(config.run_dir)
        return VetResult(config, fingerprint, results, info, md, html, self.usage)

    def __enter__(self) -> Vetting:
        return self

    def __exit__(self, *exc) -> None:
        self.store.close()


def _deployment_checks(engine: Engine, backend, config, harmful: list[Prompt]) -> dict:
    """What a deployment is (its identity in the store key), whether it answered a repeat of
    :data:`DETERMINISM_PROMPTS` prompts the same way, and its perplexity on the run's windows
    (``None`` where the backend cannot score given tokens); both measured once per run folder."""
    probes = harmful[:DETERMINISM_PROMPTS]
    settings = config.settings
    repeats_equal = engine.stored(
        backend_cache_key(backend, "determinism", *(p.id for p in probes), settings.as_dict(), config.seed),
        lambda: determinism(backend, [render(engine.tokenizer, p.text, settings.prompt_format) for p in probes],
                            settings),
    )
    perplexity = engine.stored(  # on the token windows the model's own perplexity is measured on
        backend_cache_key(backend, "ppl", config.corpus, config.ppl_window, config.ppl_windows),
        lambda: backend.perplexity(engine.windows.tolist()),
    )
    return {"identity": backend.identity, "determinism_prompts": [p.id for p in probes],
            "repeats_equal": repeats_equal, "deterministic": all(repeats_equal), "perplexity": perplexity}


def _condition_result(approximation, config, engine: Engine, measured, judgements, info, harmful, perplexities,
                      deployment: dict | None) -> ConditionResult:
    def attacks(condition: str, name: str) -> list[bool]:
        return attack_outcomes(name, [j.label for j in judgements[condition, name, HARMFUL]])

    safety = [name for name in config.judges if name in SAFETY_JUDGES]
    labels = {name: attacks(approximation, name) for name in safety}
    clean_labels = {name: attacks(CLEAN, name) for name in safety}
    hs = judgements.get((approximation, "harmfulness", HARMFUL))
    mc_key = engine.key_of("accuracy", approximation)
    perplexity, clean_perplexity = perplexities[approximation], perplexities[CLEAN]
    comparisons = {} if approximation == CLEAN else {
        name: compare(name, info[name].measure, info[name].kappa, clean_labels[name], labels[name])
        for name in safety
    }
    ratio = perplexity / clean_perplexity if perplexity and clean_perplexity else None
    decided = None if approximation == CLEAN else verdict(list(comparisons.values()), ratio, config.ppl_bound)
    if deployment is not None and not deployment["deterministic"]:
        decided = replace(decided, reason=decided.reason + "; the deployment answered a repeated prompt differently, "
                          "so its own nondeterminism is part of the difference")
    return ConditionResult(
        approx=approximation,
        asr={name: proportion(v) for name, v in labels.items()},
        asr_by_category={name: _by_category(harmful, v) for name, v in labels.items()},
        mcnemar={name: c.mcnemar for name, c in comparisons.items()},
        verdict=decided,
        harmfulness=estimate([j.score for j in hs], seed=config.seed) if hs else None,
        over_refusal=proportion([j.label for j in judgements[approximation, config.refusal_judge, BENIGN]]),
        perplexity=perplexity,
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


def _summary(config, fingerprint, n_harmful, n_benign) -> str:
    return (
        f"Model {config.model} (fingerprint {fingerprint}); {n_harmful} prompts of {config.benchmark} "
        f"(seed {config.seed}) and {n_benign} of {config.benign}; "
        f"prompt format {config.prompt_format}; greedy, {config.max_new_tokens} new tokens"
        f"{', stop on refusal' if config.stop_on_refusal else ''}; over-refusal by the {config.refusal_judge} judge; "
        f"perplexity on {config.corpus} ({config.ppl_windows or 'all'} windows of {config.ppl_window} tokens)."
    )
