"""The main job: vet a model's safety and utility, clean and under each activation approximation.

For every condition (the clean model, then each approximation) it generates responses to a
harmful benchmark and to a benign suite, judges them, and measures perplexity and (when a
question source is available) multiple-choice accuracy, all through the measurement engine
(:mod:`quada.eval.engine`): stored, so a rerun or a resumed run computes only what is missing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from quada.approx import spec_label
from quada.data import Prompt, load_benchmark, subset
from quada.eval.engine import Engine, Plan, Verdicts, check_specs_fit, run_jobs
from quada.eval.executors import Executor, Usage, make_executor
from quada.eval.generate import check_prompts_fit
from quada.eval.judges import SAFETY_JUDGES, Judge, attack_outcomes, check_judge_model
from quada.eval.metrics import Estimate, estimate, proportion
from quada.eval.utility import check_corpus, load_corpus, load_questions
from quada.eval.verdict import compare, verdict
from quada.judge_calibration import JudgeInfo, judge_infos
from quada.models import load
from quada.options import VetConfig
from quada.report.render import Example
from quada.report.story import write_story
from quada.report.vet import RESULTS_FILE, ConditionResult
from quada.runs import jsonable, open_run_dir, progress_bar, write_json
from quada.store import CLEAN, Store


HARMFUL, BENIGN = "harmful", "benign"  # which prompts a judgement is of


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
    inputs checked and its model loaded when made, its whole work (every condition's responses to
    both prompt sets, their verdicts, perplexity and accuracy) added to one plan, its report written
    by :meth:`report`. `quada align` runs the vettings of several models in one plan."""

    def __init__(self, config: VetConfig, executor: Executor, bar, label: str = ""):
        self.config, self.bar, self.label = config, bar, label
        self.harmful, self.benign = prompt_sets(config)
        check_judge_model((*config.judges, config.refusal_judge), config.judge_model)
        corpus = load_corpus(config.corpus)
        self.questions = [] if config.questions == 0 else subset(load_questions(), config.questions, config.seed)
        model, tokenizer = load(config.model, dtype=config.dtype, device=config.device)
        self.approximations = [CLEAN, *config.approximations]
        check_specs_fit(model, self.approximations)
        check_prompts_fit(model, tokenizer, [*self.harmful, *self.benign], config.prompt_format, config.max_new_tokens)
        check_corpus(tokenizer, corpus, config.ppl_window)
        open_run_dir(config.run_dir)
        self.store = Store(config.run_dir / "results.sqlite")
        self.engine = Engine(self.store, model, tokenizer, config, corpus, executor)
        self.judges: dict[str, Judge] = {}
        self.usage = executor.usage
        self._planned = False

    def next_round(self, plan: Plan) -> bool:
        """Add the whole vetting to ``plan`` (once: it needs one round)."""
        if self._planned:
            return False
        self._planned = True
        config, engine, bar = self.config, self.engine, self.bar
        names = list(dict.fromkeys([*config.judges, config.refusal_judge]))
        self.judges = {name: engine.judge(name) for name in names}
        counting = {name: bar.add_task(f"{self.label}judge {name}", total=0) for name in names}
        self.generations: dict[str, tuple] = {}  # by approximation key: the harmful and the benign responses
        self.verdicts: dict[tuple[str, str, str], Verdicts] = {}
        for approximation in self.approximations:
            task = bar.add_task(f"{self.label}generate {approximation}", total=len(self.harmful) + len(self.benign))
            step = lambda n, task=task: bar.advance(task, n)  # noqa: E731
            responses = tuple(plan.responses(engine, engine.condition(approximation, prompts), step)
                              for prompts in (self.harmful, self.benign))
            self.generations[str(approximation)] = responses
            # Safety judges read the harmful responses, the refusal judge the benign ones.
            for name, which in [(name, HARMFUL) for name in config.judges] + [(config.refusal_judge, BENIGN)]:
                prompts = responses[which == BENIGN]
                bar.update(counting[name], total=bar.tasks[counting[name]].total + len(prompts.condition.prompts))
                self.verdicts[str(approximation), name, which] = plan.judged(
                    engine, self.judges[name], prompts, on_done=lambda n, task=counting[name]: bar.advance(task, n))
            plan.perplexity(engine, approximation)
            if self.questions:
                plan.accuracy(engine, approximation, self.questions)
        return True

    def report(self) -> VetResult:
        """The results of the plan that ran, written to the run folder with the report."""
        config, engine = self.config, self.engine
        for task in self.bar.tasks:
            self.bar.update(task.id, completed=task.total)
        generations = {a: tuple(r.rows for r in pair) for a, pair in self.generations.items()}
        judgements = {key: v.rows for key, v in self.verdicts.items()}
        info = judge_infos(self.judges, config.calibrate, self.bar)
        fingerprint = engine.fingerprint
        measurements = self.store.measurements()
        results = [_condition_result(str(a), config, engine, measurements, judgements, info, self.harmful)
                   for a in self.approximations]
        write_json(config.run_dir / RESULTS_FILE, {
            "config": jsonable(asdict(config)), "fingerprint": fingerprint, "dtype": engine.dtype, "device": engine.device,
            "summary": _summary(config, fingerprint, len(self.harmful), len(self.benign)),
            "judges": {name: asdict(i) for name, i in info.items()},
            "conditions": [jsonable(asdict(r)) for r in results],
            "examples": [asdict(e) for e in _examples(config, generations, judgements)],
        })
        md, html = write_story(config.run_dir)
        return VetResult(config, fingerprint, results, info, md, html, self.usage)

    def __enter__(self) -> Vetting:
        return self

    def __exit__(self, *exc) -> None:
        self.store.close()


def _condition_result(approximation, config, engine: Engine, measured, judgements, info, harmful) -> ConditionResult:
    def attacks(condition: str, name: str) -> list[bool]:
        return attack_outcomes(name, [j.label for j in judgements[condition, name, HARMFUL]])

    safety = [name for name in config.judges if name in SAFETY_JUDGES]
    labels = {name: attacks(approximation, name) for name in safety}
    clean_labels = {name: attacks(CLEAN, name) for name in safety}
    hs = judgements.get((approximation, "harmfulness", HARMFUL))
    mc_key = engine.key_of("accuracy", approximation)
    perplexity = measured.get(engine.key_of("perplexity", approximation))
    clean_perplexity = measured.get(engine.key_of("perplexity", CLEAN))
    comparisons = {} if approximation == CLEAN else {
        name: compare(name, info[name].measure, info[name].kappa, clean_labels[name], labels[name])
        for name in safety
    }
    ratio = perplexity / clean_perplexity if perplexity and clean_perplexity else None
    return ConditionResult(
        approx=approximation,
        asr={name: proportion(v) for name, v in labels.items()},
        asr_by_category={name: _by_category(harmful, v) for name, v in labels.items()},
        mcnemar={name: c.mcnemar for name, c in comparisons.items()},
        verdict=None if approximation == CLEAN else verdict(list(comparisons.values()), ratio, config.ppl_bound),
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
    judge = "llm" if "llm" in safety else safety[0]
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
