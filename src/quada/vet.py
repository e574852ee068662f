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
from quada.eval.engine import Engine, check_specs_fit, make_executor
from quada.eval.generate import check_prompts_fit
from quada.eval.judges import SAFETY_JUDGES, Judge, attack_outcomes, check_judge_model, make_judge
from quada.eval.metrics import Estimate, estimate, proportion
from quada.eval.utility import check_corpus, load_corpus, load_questions, perplexity_windows
from quada.eval.verdict import compare, verdict
from quada.judge_calibration import JudgeInfo, judge_infos
from quada.models import load
from quada.options import VetConfig
from quada.report.render import Example
from quada.report.story import write_story
from quada.report.vet import RESULTS_FILE, ConditionResult
from quada.runs import jsonable, open_run_dir, progress_bar, write_json
from quada.store import CLEAN, Generation, Judgement, Store


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


def prompt_sets(config) -> tuple[list[Prompt], list[Prompt]]:
    """The harmful and benign prompts a vet run with ``config`` evaluates (a :class:`VetConfig`, or
    the configuration saved in a run's results file)."""
    return (subset(load_benchmark(config.benchmark), config.limit, config.seed),
            subset(load_benchmark(config.benign), config.benign_limit, config.seed))


def vet(config: VetConfig, progress: bool = True) -> VetResult:
    """Run the vetting described by ``config``; return its results and write its report.

    Every input is checked (prompts, judges, corpus, approximations against the model, the room in
    its context) before the run folder is made or anything is generated."""
    harmful, benign = prompt_sets(config)
    check_judge_model((*config.judges, config.refusal_judge), config.judge_model)
    corpus = load_corpus(config.corpus)
    questions = [] if config.questions == 0 else subset(load_questions(), config.questions, config.seed)
    for deployment in config.deployments:  # an unreachable server fails in seconds, before the model loads
        check_deployment(deployment, config.api_key_env)
    model, tokenizer = load(config.model, dtype=config.dtype, device=config.device)
    approximations = [CLEAN, *config.approximations]
    check_specs_fit(model, approximations)
    check_prompts_fit(model, tokenizer, [*harmful, *benign], config.prompt_format, config.max_new_tokens)
    check_corpus(tokenizer, corpus, config.ppl_window)
    open_run_dir(config.run_dir)
    generations: dict[str, tuple[list[Generation], list[Generation]]] = {}  # by condition (approximation key)
    perplexities: dict[str, float | None] = {}
    deployments: dict[str, dict] = {}  # by condition: what each deployment is and how it behaved
    with Store(config.run_dir / "results.sqlite") as store, progress_bar(progress) as bar:
        engine = Engine(store, model, tokenizer, config, corpus, executor=make_executor(config, model, tokenizer))
        for approximation in approximations:
            task = bar.add_task(f"generate {approximation}", total=len(harmful) + len(benign))
            step = lambda n, task=task: bar.advance(task, n)  # noqa: E731
            generations[str(approximation)] = tuple(
                engine.responses(engine.condition(approximation, prompts), step) for prompts in (harmful, benign)
            )
            bar.update(task, completed=len(harmful) + len(benign))
            perplexities[str(approximation)] = engine.perplexity(approximation)
            if questions:
                engine.accuracy(approximation, questions)
        for deployment in config.deployments:
            with contextlib.closing(open_backend(deployment, tokenizer, config.api_key_env, config.request_timeout,
                                                 config.retries)) as backend:
                task = bar.add_task(f"generate {backend.condition}", total=len(harmful) + len(benign))
                generations[backend.condition] = tuple(
                    deployment_responses(store, backend, prompts, config.settings, tokenizer, engine.fingerprint,
                                         config.seed, lambda n, task=task: bar.advance(task, n))
                    for prompts in (harmful, benign)
                )
                bar.update(task, completed=len(harmful) + len(benign))
                checks = _deployment_checks(engine, backend, config, harmful, tokenizer, corpus)
                served, reference = (sum(pair, []) for pair in (generations[backend.condition], generations[CLEAN]))
                checks["same_as_clean"] = sum(a.response == b.response for a, b in zip(served, reference, strict=True))
                checks["responses"] = len(served)
                deployments[backend.condition] = checks
                perplexities[backend.condition] = checks["perplexity"]
        # The judge model may be large: free the subject first, unless it judges too (it is clean again here).
        judge_model = (model, tokenizer) if config.judge_model == config.model else (None, None)
        del model
        engine.release_model()
        judges, judgements = _judge_all(engine, config, generations, bar, *judge_model)
        info = judge_infos(judges, config.calibrate, bar)
        measurements = store.measurements()
    fingerprint = engine.fingerprint
    results = [_condition_result(condition, config, engine, measurements, judgements, info, harmful, perplexities,
                                 deployments.get(condition)) for condition in generations]
    write_json(config.run_dir / RESULTS_FILE, {
        "config": jsonable(asdict(config)), "fingerprint": fingerprint, "dtype": engine.dtype, "device": engine.device,
        "summary": _summary(config, fingerprint, len(harmful), len(benign)),
        "judges": {name: asdict(i) for name, i in info.items()},
        "conditions": [jsonable(asdict(r)) for r in results],
        "deployments": deployments,
        "examples": [asdict(e) for e in _examples(config, generations, judgements)],
    })
    md, html = write_story(config.run_dir)
    return VetResult(config, fingerprint, results, info, md, html)


def _judge_all(engine: Engine, config, generations, bar, model=None, tokenizer=None):
    """The judges by name, and their judgements keyed by (condition, judge name, "harmful" or
    "benign"): safety judges on the harmful responses, the refusal judge on the benign ones. Model
    judges use ``model`` when given, else load the judge model once."""
    out: dict[tuple[str, str, str], list[Judgement]] = {}
    judges: dict[str, Judge] = {}
    for name, which in [(name, HARMFUL) for name in config.judges] + [(config.refusal_judge, BENIGN)]:
        if name not in judges:
            judges[name] = make_judge(name, model, tokenizer, model_source=config.judge_model, device=config.device,
                                      dtype=config.dtype)
        task = bar.add_task(f"judge {name}", total=sum(len(g[which == BENIGN]) for g in generations.values()))
        for approximation, responses in generations.items():
            out[approximation, name, which] = engine.judged(judges[name], responses[which == BENIGN], lambda n: bar.advance(task, n))
        bar.update(task, completed=bar.tasks[task].total)
    return judges, out


def _deployment_checks(engine: Engine, backend, config, harmful: list[Prompt], tokenizer, corpus: str) -> dict:
    """What a deployment is (its identity in the store key), whether it answered a repeat of
    :data:`DETERMINISM_PROMPTS` prompts the same way, and its perplexity on the run's windows
    (``None`` where the backend cannot score given tokens); both measured once per run folder."""
    probes = harmful[:DETERMINISM_PROMPTS]
    settings = config.settings
    repeats_equal = engine.stored(
        backend_cache_key(backend, "determinism", *(p.id for p in probes), settings.as_dict(), config.seed),
        lambda: determinism(backend, [render(tokenizer, p.text, settings.prompt_format) for p in probes], settings),
    )
    windows = perplexity_windows(tokenizer, corpus, config.ppl_window, config.ppl_windows).tolist()
    perplexity = engine.stored(
        backend_cache_key(backend, "ppl", config.corpus, config.ppl_window, config.ppl_windows),
        lambda: backend.perplexity(windows),
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
