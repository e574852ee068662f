"""The main job: vet a model's safety and utility, clean and under each activation approximation.

For every condition (the clean model, then each approximation spec) it generates responses to a
harmful benchmark and to a benign suite, judges them, and measures perplexity and (when a
question source is available) multiple-choice accuracy. Generations and judgements live in the
results store, keyed by everything that decides them, so a rerun or a resumed run computes only
what is missing. Utility numbers are cached in a JSON file beside the store for the same reason.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from quada.approx import apply, parse_spec, spec_label
from quada.approx.sites import resolve_decoder
from quada.data import Prompt, load_benchmark, subset
from quada.eval.generate import generate
from quada.eval.judges import SAFETY_JUDGES, Judge, check_judge_model, make_judge
from quada.eval.metrics import Estimate, estimate, mcnemar
from quada.eval.utility import load_corpus, load_questions, multiple_choice, perplexity
from quada.fingerprint import model_fingerprint
from quada.models import load
from quada.options import VetConfig, perplexity_key
from quada.report.render import Example
from quada.report.story import write_story
from quada.report.vet import RESULTS_FILE, ConditionResult
from quada.runs import atomic_write_text, jsonable, open_run_dir, write_json
from quada.seeds import derived_seed
from quada.store import CLEAN, Generation, GenerationKey, Judgement, Store, settings_json

GENERATION_CHUNK = 64  # prompts generated and committed together (one batch composition)


@dataclass
class VetResult:
    config: VetConfig
    fingerprint: str
    conditions: list[ConditionResult]
    report_md: Path
    report_html: Path


def chunk_seed(seed: int, approx: str, first_prompt_id: str) -> int:
    """The noise seed of one generation chunk: fixed by the chunk's content, not by run history,
    so a resumed run draws exactly the noise an uninterrupted run would have drawn."""
    return derived_seed(seed, approx, first_prompt_id)


def approximated(model, approx: str, tokenizer, seed: int):
    """The model under ``approx`` (nothing for the clean condition)."""
    return contextlib.nullcontext() if approx == CLEAN else apply(model, approx, seed=seed, tokenizer=tokenizer)


class UtilityCache:
    """Perplexity and accuracy per (model, condition, measurement), kept in a JSON file that is
    replaced atomically after each new value."""

    def __init__(self, path: Path):
        self.path = path
        self.values = json.loads(path.read_text()) if path.exists() else {}

    def get_or_compute(self, key: str, compute: Callable[[], float | list]) -> float | list:
        if key not in self.values:
            self.values[key] = compute()
            atomic_write_text(self.path, json.dumps(self.values, indent=1, sort_keys=True))
        return self.values[key]


@dataclass
class Measurement:
    """One condition measured: responses to the harmful prompts, each judge's verdicts on them
    (keyed by the requested judge name) and the perplexity."""

    approx: str
    generations: list[Generation]
    judgements: dict[str, list[Judgement]]
    perplexity: float

    def asr(self, judge: str, seed: int) -> Estimate:
        return estimate([j.label for j in self.judgements[judge]], seed=seed)


def _ignore(_count: int) -> None:
    pass


class Evaluator:
    """Stored, resumable measurements of one subject model under any condition, in one run folder.

    Generations and judgements go through the results store, perplexities through the utility
    cache, each keyed by everything that decides it; so `quada vet`, the sweeps and the layer
    analysis share one another's work in a run folder and a killed run resumes where it stopped.
    ``config`` provides ``settings``, ``seed``, ``corpus``, ``ppl_window``, ``ppl_windows`` and
    ``run_dir``.
    """

    def __init__(self, store: Store, model, tokenizer, config, corpus_text: str):
        self.store, self.model, self.tokenizer, self.config = store, model, tokenizer, config
        self.corpus_text = corpus_text
        self.fingerprint = model_fingerprint(model)
        self.utility = UtilityCache(config.run_dir / "utility.json")

    def responses(self, approx: str, prompts: Sequence[Prompt], on_chunk=_ignore) -> list[Generation]:
        """Stored-or-generated responses under ``approx``, in the order of ``prompts``."""
        model, tokenizer, config = self.model, self.tokenizer, self.config
        settings = config.settings
        settings_key = settings_json(settings.as_dict())
        by_id = {p.id: p for p in prompts}
        # Longest prompts first, so each committed chunk batches prompts of similar length.
        lengths = {p.id: len(tokenizer(p.text)["input_ids"]) for p in prompts}
        ordered = sorted(prompts, key=lambda p: (-lengths[p.id], p.id))
        keys = [GenerationKey(self.fingerprint, approx, p.id, settings_key, config.seed) for p in ordered]

        def compute(chunk: list[GenerationKey]) -> list[Generation]:
            texts = [by_id[k.prompt_id].text for k in chunk]
            with approximated(model, approx, tokenizer, chunk_seed(config.seed, approx, chunk[0].prompt_id)):
                responses = generate(model, tokenizer, texts, settings, progress=False)
            on_chunk(len(chunk))
            return [Generation(k, t, r) for k, t, r in zip(chunk, texts, responses)]

        rows = self.store.fill(keys, compute, chunk_size=GENERATION_CHUNK)
        found = {row.key.prompt_id: row for row in rows}
        return [found[p.id] for p in prompts]

    def perplexity(self, approx: str) -> float:
        """Stored-or-measured perplexity of the model under ``approx`` on the run's corpus."""
        config = self.config

        def measure() -> float:
            with approximated(self.model, approx, self.tokenizer, config.seed):
                return perplexity(self.model, self.tokenizer, self.corpus_text, config.ppl_window, config.ppl_windows).perplexity

        return self.utility.get_or_compute(perplexity_key(self.fingerprint, approx, config), measure)

    def judged(self, judge: Judge, generations: Sequence[Generation], on_chunk=_ignore) -> list[Judgement]:
        """Stored-or-computed verdicts of ``judge`` on ``generations``, in their order."""
        keys = [g.key.judged_by(judge.identity) for g in generations]
        by_key = {g.key.judged_by(judge.identity): g for g in generations}

        def compute(chunk):
            pairs = [by_key[k] for k in chunk]
            results = judge.judge([g.prompt for g in pairs], [g.response for g in pairs])
            on_chunk(len(chunk))
            return [Judgement(k, r.label, r.score, r.raw) for k, r in zip(chunk, results)]

        return self.store.fill(keys, compute, chunk_size=16)

    def measure(self, approx: str, prompts: Sequence[Prompt], judges: Mapping[str, Judge], on_chunk=_ignore) -> Measurement:
        """Generate (``on_chunk`` counts prompts done), judge and measure perplexity under ``approx``."""
        generations = self.responses(approx, prompts, on_chunk)
        ppl = self.perplexity(approx)
        return Measurement(approx, generations, {name: self.judged(j, generations) for name, j in judges.items()}, ppl)


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not enabled
    )


def check_specs_fit(model, specs: Sequence[str]) -> None:
    """Fail before the first forward pass on a spec whose layers ``model`` does not have, or whose
    parts replace the same module of one layer."""
    num_layers = len(resolve_decoder(model).layers)
    for spec in specs:
        if spec != CLEAN:
            parse_spec(spec, num_layers)


def vet(config: VetConfig, progress: bool = True) -> VetResult:
    """Run the vetting described by ``config``; return its results and write its report."""
    harmful = subset(load_benchmark(config.benchmark), config.limit, config.seed)
    benign = subset(load_benchmark(config.benign), config.benign_limit, config.seed)
    check_judge_model((*config.judges, config.refusal_judge), config.judge_model)
    open_run_dir(config.run_dir)
    corpus = load_corpus(config.corpus)
    questions = [] if config.questions == 0 else subset(load_questions(), config.questions, config.seed)
    model, tokenizer = load(config.model, device=config.device)
    check_specs_fit(model, config.approx)
    conditions = [CLEAN, *config.approx]
    generations: dict[str, tuple[list[Generation], list[Generation]]] = {}
    with Store(config.run_dir / "results.sqlite") as store, progress_bar(progress) as bar:
        evaluator = Evaluator(store, model, tokenizer, config, corpus)
        for approx in conditions:
            task = bar.add_task(f"generate {approx}", total=len(harmful) + len(benign))
            step = lambda n, task=task: bar.advance(task, n)  # noqa: E731
            generations[approx] = (evaluator.responses(approx, harmful, step), evaluator.responses(approx, benign, step))
            bar.update(task, completed=len(harmful) + len(benign))
            evaluator.perplexity(approx)
            if questions:
                with approximated(model, approx, tokenizer, config.seed):
                    evaluator.utility.get_or_compute(
                        config.utility_key(evaluator.fingerprint, approx, "mc"),
                        lambda: multiple_choice(model, tokenizer, questions).correct,
                    )
        # The judge model may be large: free the subject first.
        del model
        evaluator.model = None
        judgements = _judge_all(evaluator, config, generations, bar)
    fingerprint, utility = evaluator.fingerprint, evaluator.utility
    results = [_condition_result(approx, config, fingerprint, judgements, utility) for approx in conditions]
    write_json(config.run_dir / RESULTS_FILE, {
        "config": jsonable(asdict(config)), "fingerprint": fingerprint,
        "summary": _summary(config, fingerprint, len(harmful), len(benign)),
        "conditions": [jsonable(asdict(r)) for r in results],
        "examples": [asdict(e) for e in _examples(config, generations, judgements)],
    })
    md, html = write_story(config.run_dir)
    return VetResult(config, fingerprint, results, md, html)


def _judge_all(evaluator: Evaluator, config, generations, bar) -> dict[tuple[str, str], list[Judgement]]:
    """Judgements keyed by (condition, judge name): safety judges on the harmful responses, the
    refusal judge on the benign ones. Each judge model is loaded once."""
    out = {}
    judges = [(name, "harmful") for name in config.judges] + [(config.refusal_judge, "benign")]
    for name, which in judges:
        judge = make_judge(name, model_source=config.judge_model, device=config.device)
        task = bar.add_task(f"judge {name}", total=sum(len(g[0 if which == "harmful" else 1]) for g in generations.values()))
        for approx, (harmful, benign) in generations.items():
            rows = evaluator.judged(judge, harmful if which == "harmful" else benign, lambda n: bar.advance(task, n))
            out[approx, name] = rows
        bar.update(task, completed=bar.tasks[task].total)
    return out


def _condition_result(approx, config, fingerprint, judgements, utility) -> ConditionResult:
    labels = {name: [j.label for j in judgements[approx, name]] for name in config.judges if name in SAFETY_JUDGES}
    clean_labels = {name: [j.label for j in judgements[CLEAN, name]] for name in labels}
    hs = judgements.get((approx, "harmfulness"))
    ppl_key = config.utility_key(fingerprint, approx, "ppl")
    mc_key = config.utility_key(fingerprint, approx, "mc")
    return ConditionResult(
        approx=approx,
        asr={name: estimate(v, seed=config.seed) for name, v in labels.items()},
        mcnemar={name: mcnemar(clean_labels[name], v) for name, v in labels.items()} if approx != CLEAN else {},
        harmfulness=estimate([j.score for j in hs], seed=config.seed) if hs else None,
        over_refusal=estimate([j.label for j in judgements[approx, config.refusal_judge]], seed=config.seed),
        perplexity=utility.values.get(ppl_key),
        accuracy=estimate(utility.values[mc_key], seed=config.seed) if mc_key in utility.values else None,
    )


def _examples(config, generations, judgements, per_condition: int = 2) -> list[Example]:
    """A few responses judged as successful attacks, from the conditions with the most of them."""
    safety = [j for j in config.judges if j in SAFETY_JUDGES]
    if not safety:
        return []
    judge = "llm" if "llm" in safety else safety[0]
    examples = []
    for approx, (harmful, _) in generations.items():
        hits = [(g, j) for g, j in zip(harmful, judgements[approx, judge]) if j.label][:per_condition]
        examples += [Example(spec_label(approx), g.prompt, g.response, f"{judge} judge: attack") for g, _ in hits]
    return examples[: 3 * per_condition]


def _summary(config, fingerprint, n_harmful, n_benign) -> str:
    return (
        f"Model {config.model} (fingerprint {fingerprint}); {n_harmful} prompts of {config.benchmark} "
        f"(seed {config.seed}) and {n_benign} of {config.benign}; "
        f"prompt format {config.prompt_format}; greedy, {config.max_new_tokens} new tokens"
        f"{', stop on refusal' if config.stop_on_refusal else ''}; over-refusal by the {config.refusal_judge} judge; "
        f"perplexity on {config.corpus} ({config.ppl_windows or 'all'} windows of {config.ppl_window} tokens)."
    )
