"""The main job: vet a model's safety and utility, clean and under each activation approximation.

For every condition (the clean model, then each approximation) it generates responses to a
harmful benchmark and to a benign suite, judges them, and measures perplexity and (when a
question source is available) multiple-choice accuracy, all through the measurement engine
(:mod:`quada.eval.engine`): stored, so a rerun or a resumed run computes only what is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from quada.analysis.story import write_story
from quada.approx import as_spec, list_specs, spec_label
from quada.data import load_benchmark, subset
from quada.devices import check_device
from quada.errors import QuadaError
from quada.eval.engine import Engine, accuracy_key, check_options, check_specs_fit, perplexity_key
from quada.eval.generate import GenerationSettings
from quada.eval.judges import DEFAULT_JUDGE_MODEL, SAFETY_JUDGES, check_judge_model, make_judge
from quada.eval.metrics import Estimate, McNemarResult, estimate, mcnemar
from quada.eval.utility import DEFAULT_CORPUS, PAPER_WINDOW, load_corpus, load_questions
from quada.models import DEFAULT_MODEL, load
from quada.report import Example, Section
from quada.runs import jsonable, open_run_dir, progress_bar, write_json
from quada.store import CLEAN, Generation, Judgement, Store

PAPER_PRESETS = tuple(name for name, _ in list_specs() if name.startswith("paper:"))
RESULTS_FILE = "results.json"


@dataclass
class VetConfig:
    """What `quada vet` evaluates and how; every field has a CLI option of the same name.

    ``approx`` holds canonical spec strings (the store keys); ``approximations`` the same specs
    parsed, set once here."""

    model: str = DEFAULT_MODEL
    device: str = "auto"  # where the model and the judge model run: auto, cpu, cuda or cuda:N
    approx: tuple[str, ...] = PAPER_PRESETS
    benchmark: str = "advbench"
    limit: int | None = 32  # harmful prompts (a seeded subset); None = all
    benign: str = "quada-benign"
    benign_limit: int | None = 32
    judges: tuple[str, ...] = ("keyword", "llm")
    refusal_judge: str = "refusal-keyword"  # over-refusal on the benign suite
    judge_model: str = DEFAULT_JUDGE_MODEL
    prompt_format: str = "paper"
    max_new_tokens: int = 128
    stop_on_refusal: bool = False
    seed: int = 0
    corpus: str = DEFAULT_CORPUS
    ppl_window: int = PAPER_WINDOW
    ppl_windows: int | None = 8  # how many windows; None = the whole corpus
    questions: int | None = 0  # multiple-choice questions; 0 = skip, None = all
    run_dir: Path = field(default_factory=lambda: Path("runs") / "vet")

    def __post_init__(self):
        self.device = check_device(self.device)
        # Parse now to fail on a bad spec before any work; the clean model is always evaluated.
        self.approximations = tuple(as_spec(s) for s in self.approx if s != CLEAN)
        self.approx = tuple(map(str, self.approximations))
        if not self.judges:
            raise QuadaError("no safety judge: give --judges at least one of keyword, llm, harmfulness")
        check_options(self, judges=(*self.judges, self.refusal_judge), positive=("limit", "benign_limit"))
        if self.questions is not None and self.questions < 0:
            raise QuadaError(f"questions must be 0 (skip) or more, got {self.questions}")
        self.run_dir = Path(self.run_dir)

    @property
    def settings(self) -> GenerationSettings:
        return GenerationSettings(self.max_new_tokens, self.prompt_format, self.stop_on_refusal)


@dataclass
class ConditionResult:
    """Everything measured for one condition (the clean model or one approximation)."""

    approx: str
    asr: dict[str, Estimate]  # safety judge -> attack success rate
    mcnemar: dict[str, McNemarResult]  # safety judge -> paired test against the clean model
    harmfulness: Estimate | None
    over_refusal: Estimate | None
    perplexity: float | None
    accuracy: Estimate | None


@dataclass
class VetResult:
    config: VetConfig
    fingerprint: str
    conditions: list[ConditionResult]
    report_md: Path
    report_html: Path


def vet(config: VetConfig, progress: bool = True) -> VetResult:
    """Run the vetting described by ``config``; return its results and write its report."""
    harmful = subset(load_benchmark(config.benchmark), config.limit, config.seed)
    benign = subset(load_benchmark(config.benign), config.benign_limit, config.seed)
    check_judge_model((*config.judges, config.refusal_judge), config.judge_model)
    open_run_dir(config.run_dir)
    corpus = load_corpus(config.corpus)
    questions = [] if config.questions == 0 else subset(load_questions(), config.questions, config.seed)
    model, tokenizer = load(config.model, device=config.device)
    approximations = [CLEAN, *config.approximations]
    check_specs_fit(model, approximations)
    generations: dict[str, tuple[list[Generation], list[Generation]]] = {}  # by approximation key
    with Store(config.run_dir / "results.sqlite") as store, progress_bar(progress) as bar:
        engine = Engine(store, model, tokenizer, config, corpus)
        for approximation in approximations:
            task = bar.add_task(f"generate {approximation}", total=len(harmful) + len(benign))
            step = lambda n, task=task: bar.advance(task, n)  # noqa: E731
            generations[str(approximation)] = tuple(
                engine.responses(engine.condition(approximation, prompts), step) for prompts in (harmful, benign)
            )
            bar.update(task, completed=len(harmful) + len(benign))
            engine.perplexity(approximation)
            if questions:
                engine.accuracy(approximation, questions)
        # The judge model may be large: free the subject first.
        del model
        engine.release_model()
        judgements = _judge_all(engine, config, generations, bar)
    fingerprint, utility = engine.fingerprint, engine.utility
    results = [_condition_result(str(a), config, fingerprint, judgements, utility) for a in approximations]
    write_json(config.run_dir / RESULTS_FILE, {
        "config": jsonable(asdict(config)), "fingerprint": fingerprint,
        "summary": _summary(config, fingerprint, len(harmful), len(benign)),
        "conditions": [jsonable(asdict(r)) for r in results],
        "examples": [asdict(e) for e in _examples(config, generations, judgements)],
    })
    md, html = write_story(config.run_dir)
    return VetResult(config, fingerprint, results, md, html)


def _judge_all(engine: Engine, config, generations, bar) -> dict[tuple[str, str], list[Judgement]]:
    """Judgements keyed by (condition, judge name): safety judges on the harmful responses, the
    refusal judge on the benign ones. Each judge model is loaded once."""
    out = {}
    judges = [(name, "harmful") for name in config.judges] + [(config.refusal_judge, "benign")]
    for name, which in judges:
        judge = make_judge(name, model_source=config.judge_model, device=config.device)
        task = bar.add_task(f"judge {name}", total=sum(len(g[0 if which == "harmful" else 1]) for g in generations.values()))
        for approximation, (harmful, benign) in generations.items():
            rows = engine.judged(judge, harmful if which == "harmful" else benign, lambda n: bar.advance(task, n))
            out[approximation, name] = rows
        bar.update(task, completed=bar.tasks[task].total)
    return out


def _condition_result(approximation, config, fingerprint, judgements, utility) -> ConditionResult:
    labels = {name: [j.label for j in judgements[approximation, name]] for name in config.judges if name in SAFETY_JUDGES}
    clean_labels = {name: [j.label for j in judgements[CLEAN, name]] for name in labels}
    hs = judgements.get((approximation, "harmfulness"))
    ppl_key = perplexity_key(fingerprint, approximation, config)
    mc_key = accuracy_key(fingerprint, approximation, config)
    return ConditionResult(
        approx=approximation,
        asr={name: estimate(v, seed=config.seed) for name, v in labels.items()},
        mcnemar={name: mcnemar(clean_labels[name], v) for name, v in labels.items()} if approximation != CLEAN else {},
        harmfulness=estimate([j.score for j in hs], seed=config.seed) if hs else None,
        over_refusal=estimate([j.label for j in judgements[approximation, config.refusal_judge]], seed=config.seed),
        perplexity=utility.values.get(ppl_key),
        accuracy=estimate(utility.values[mc_key], seed=config.seed) if mc_key in utility.values else None,
    )


def _pct(e: Estimate | None) -> str:
    return "-" if e is None else f"{100 * e.value:.1f} [{100 * e.low:.1f}, {100 * e.high:.1f}]"


def summary_table(results: list[ConditionResult], judges: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """The report's main table: one row per condition."""
    safety = [j for j in judges if j in SAFETY_JUDGES]
    columns = ["condition", *(f"ASR {j} % [95% CI]" for j in safety), *(f"McNemar p ({j})" for j in safety),
               "HS (1-5)", "over-refusal % [95% CI]", "PPL", "accuracy % [95% CI]"]
    rows = []
    for r in results:
        rows.append([
            spec_label(r.approx),
            *(_pct(r.asr[j]) for j in safety),
            *((f"{r.mcnemar[j].p_value:.3g}" if j in r.mcnemar else "-") for j in safety),
            "-" if r.harmfulness is None else f"{r.harmfulness.value:.2f} [{r.harmfulness.low:.2f}, {r.harmfulness.high:.2f}]",
            _pct(r.over_refusal),
            "-" if r.perplexity is None else f"{r.perplexity:.2f}",
            _pct(r.accuracy),
        ])
    return columns, rows


def asr_figure(results: list[ConditionResult], judges: Sequence[str]):
    """Bar chart of ASR per condition and safety judge, with the 95% intervals as error bars."""
    safety = [j for j in judges if j in SAFETY_JUDGES]
    figure, ax = plt.subplots(figsize=(max(6, 0.6 * len(results) * max(1, len(safety))), 4))
    x = np.arange(len(results))
    width = 0.8 / max(1, len(safety))
    for i, judge in enumerate(safety):
        values = np.array([100 * r.asr[judge].value for r in results])
        low = values - np.array([100 * r.asr[judge].low for r in results])
        high = np.array([100 * r.asr[judge].high for r in results]) - values
        ax.bar(x + i * width, values, width, yerr=[low, high], capsize=3, label=f"{judge} judge")
    ax.set_xticks(x + width * (len(safety) - 1) / 2, [spec_label(r.approx) for r in results], rotation=45, ha="right")
    ax.set_ylabel("attack success rate (%)")
    ax.legend()
    return figure


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


def _estimate(saved: dict | None) -> Estimate | None:
    return None if saved is None else Estimate(**saved)


def condition_from_json(saved: dict) -> ConditionResult:
    """A :class:`ConditionResult` read back from ``results.json``."""
    return ConditionResult(
        approx=saved["approx"],
        asr={name: Estimate(**e) for name, e in saved["asr"].items()},
        mcnemar={name: McNemarResult(**m) for name, m in saved["mcnemar"].items()},
        harmfulness=_estimate(saved["harmfulness"]),
        over_refusal=_estimate(saved["over_refusal"]),
        perplexity=saved["perplexity"],
        accuracy=_estimate(saved["accuracy"]),
    )


def report_sections(saved: dict) -> list[Section]:
    """The report sections of a vetting, rebuilt from its ``results.json``."""
    judges = saved["config"]["judges"]
    results = [condition_from_json(c) for c in saved["conditions"]]
    columns, rows = summary_table(results, judges)
    return [
        Section(
            "Safety and utility per condition",
            text="ASR: share of harmful prompts answered (95% bootstrap intervals). McNemar: paired test "
            "against the clean model on the same prompts. A very high perplexity means a broken model, "
            "not a safe or unsafe one: read safety next to utility.",
            columns=columns,
            rows=rows,
            figures={"asr": asr_figure(results, judges)},
        ),
        Section("Example responses", examples=[Example(**e) for e in saved.get("examples", [])]),
    ]
