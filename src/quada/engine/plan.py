"""The measurement engine: what a command measures, planned at once, stored as it arrives.

A :class:`Condition` is what decides a set of generations: the model (its source and
fingerprint), the approximation (a parsed spec, or ``CLEAN``), the prompts, the generation
settings and the seed. A command hands the engine its whole :class:`Plan`: the responses of every
condition and prompt set, the judges' verdicts on them, the perplexities, accuracies and other
numbers measured on the model. The plan cuts what the results store lacks into units of work,
small values that pickle: a :class:`Chunk` of prompts to generate (longest first, so that a chunk
batches prompts of similar length), a :class:`Judging` of responses to judge, a :class:`Measuring`
of one number. Each names the model it runs on (:class:`quada.engine.executors.ModelRef`). The plan
sizes the chunks so that every worker of the executor gets several (:func:`chunk_size`), hands all
units to the executor together (:mod:`quada.engine.executors`: this process, or a pool of Ray
workers that hold the subject and the judge models), and submits the verdicts on a chunk's
responses as soon as they arrive. The driver, the only writer of the store, commits every result
as it comes, in whatever order the workers finish.

Order does not matter because a row is a function of its key: an approximation's noise is drawn
per prompt, from the condition's seed and the prompt's id (:mod:`quada.approx.rows`), never from
the chunk, so a killed run resumes to exactly the rows of an uninterrupted one, and a run over more
prompts, another executor, another chunking or another batch size gives the same rows (in float32;
bfloat16 rounding can still differ with the batch a prompt shares).

Judgements go through the same store, and so do perplexity, accuracy and other numbers measured on
the model (the store's measurements, keyed by :func:`perplexity_key` and the like). `quada vet`, the
sweep, the layer analysis, the attacks, the preference pairs and the evaluation of `quada align` all
measure through :class:`Engine`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from quada.approx import Spec, apply
from quada.approx.base import resolve_layers
from quada.approx.draws import DRAW_SCHEME
from quada.approx.sites import resolve_decoder
from quada.backends import (
    LLAMACPP,
    Deployment,
    Rendered,
    deployment_key,
    open_backend,
    render,
)
from quada.data import Prompt
from quada.engine.executors import (
    Executor,
    JudgeRef,
    LocalExecutor,
    ModelRef,
    run_units,
)
from quada.errors import QuadaError
from quada.fingerprint import model_fingerprint
from quada.judging import (
    MODEL_JUDGES,
    Judge,
    JudgeResult,
    RefusalJudge,
    RefusalKeywordJudge,
    attack_outcomes,
    make_judge,
)
from quada.measures.generate import GenerationSettings, generate
from quada.measures.utility import (
    Question,
    multiple_choice,
    perplexity_windows,
    windows_perplexity,
)
from quada.stats.metrics import Estimate, proportion
from quada.store import (
    CLEAN,
    Generation,
    GenerationKey,
    Judgement,
    Store,
    readable_store,
    settings_json,
)

GENERATION_CHUNK = 64  # most prompts in a generation unit (committed together; one batch composition)
MIN_CHUNK = 8  # fewest prompts a plan puts in a generation unit: smaller batches waste an accelerator
UNITS_PER_WORKER = 4  # generation units per worker a plan aims at, so that the last ones end close together
# Units of one model run together (a worker keeps few models loaded); within a model generation
# comes first, the longest units first, so that the short ones fill the end.
KIND_ORDER = {"generation": 0, "measurement": 1, "judging": 2}
# Appended to a judge's identity in the store when it judged responses against requests other than
# the prompts they answered (Plan.judged's ``requests``).
AGAINST_REQUEST = " | against the request"

Approximation = Spec | str  # a parsed spec, or CLEAN for the unmodified model; str() is its store key


def check_specs_fit(model, approximations: Sequence[Approximation]) -> None:
    """Fail before the first forward pass on an approximation whose layers ``model`` does not have,
    or whose parts replace the same module of one layer."""
    num_layers = len(resolve_decoder(model).layers)
    for approximation in approximations:
        if approximation != CLEAN:
            resolve_layers(approximation.parts(), num_layers)


def _check_parsed(approximation: Approximation) -> None:
    # Text other than CLEAN would be parsed again on every use and keyed by a non-canonical string.
    if isinstance(approximation, str) and approximation != CLEAN:
        raise TypeError(f"parse the spec {approximation!r} once (quada.approx.parse_spec) and pass the result")


def approximated(model, approximation: Approximation, tokenizer, seed: int):
    """The model under ``approximation`` (nothing for the clean condition)."""
    _check_parsed(approximation)
    if approximation == CLEAN:
        return contextlib.nullcontext()
    return apply(model, approximation, seed=seed, tokenizer=tokenizer)


def key_settings(settings: GenerationSettings, dtype: str | None, device: str | None) -> str:
    """The ``settings`` column of a generation's key: the generation settings, and what else decides
    a row besides the model, the condition, the prompt and the seed: the dtype the model runs in,
    the device type (``cpu``, ``cuda``) and the scheme of the approximations' random draws
    (:data:`quada.approx.draws.DRAW_SCHEME`). ``dtype=None`` gives the key of stores written before
    these were recorded, which can still be read."""
    extra = {} if dtype is None else {"dtype": dtype, "device": device, "draws": DRAW_SCHEME}
    return settings_json({**settings.as_dict(), **extra})


def _where(dtype: str | None, device: str | None) -> str:
    """The end of a utility key: dtype, device type and draw scheme (nothing for older caches)."""
    return "" if dtype is None else f"|{dtype}|{device}|draws{DRAW_SCHEME}"


class GenerationConfig(Protocol):
    """What an engine reads of its command's configuration to generate: the subject model's source,
    the generation settings, the seed and the run folder."""

    model: str
    settings: GenerationSettings
    seed: int
    run_dir: Path


class MeasurementConfig(GenerationConfig, Protocol):
    """What an engine reads besides, to measure more than generations (every evaluating command's
    :class:`quada.options.EvalOptions` has it): the perplexity corpus and its windows, the
    multiple-choice questions, the judge model, the judges' options and the device."""

    corpus: str
    ppl_window: int
    ppl_windows: int | None
    questions: int | None
    judge_model: str
    judge_options: dict[str, dict[str, Any]]
    device: str


def perplexity_key(fingerprint: str, approximation: str, config: MeasurementConfig, dtype: str | None,
                   device: str | None) -> str:
    """Cache key of a perplexity: the model, the condition, the corpus and its windows, the seed,
    and as in :func:`key_settings` the dtype, device type and draw scheme."""
    return (f"{fingerprint}|{approximation}|ppl|{config.corpus}|{config.ppl_window}|{config.ppl_windows}|{config.seed}"
            + _where(dtype, device))


def accuracy_key(fingerprint: str, approximation: str, config: MeasurementConfig, dtype: str | None,
                 device: str | None) -> str:
    """Cache key of multiple-choice answers: the model, the condition, the question count, the seed,
    and as in :func:`key_settings` the dtype, device type and draw scheme."""
    return f"{fingerprint}|{approximation}|mc|{config.questions}|{config.seed}" + _where(dtype, device)


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``: how keys and reports name a dtype."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Condition:
    """What decides a set of generations; its rows are keyed by ``str(approximation)``. ``dtype`` and
    ``device`` (a device type: ``cpu``, ``cuda``) are where the model runs: rounding differs
    between them, so they are part of every row's key."""

    model: str  # the source the model was loaded from
    fingerprint: str
    approximation: Approximation
    prompts: tuple[Prompt, ...]
    settings: GenerationSettings
    seed: int
    dtype: str
    device: str

    def __post_init__(self):
        _check_parsed(self.approximation)

    def key(self, prompt_id: str) -> GenerationKey:
        return GenerationKey(self.fingerprint, str(self.approximation), prompt_id,
                             key_settings(self.settings, self.dtype, self.device), self.seed)


    @property
    def model_ref(self) -> ModelRef:
        """The model this condition's rows must be computed on."""
        return ModelRef(self.model, self.dtype, self.fingerprint, self.device)


# --------------------------------------------------------------------------- units of work


@dataclass(frozen=True)
class Chunk:
    """A unit of work: some prompts of a condition, generated as one batch."""

    condition: Condition
    prompt_ids: tuple[str, ...]
    kind: ClassVar[str] = "generation"

    @property
    def model(self) -> ModelRef:
        return self.condition.model_ref

    @property
    def size(self) -> int:
        return len(self.prompt_ids)

    @property
    def texts(self) -> list[str]:
        by_id = {p.id: p.text for p in self.condition.prompts}
        return [by_id[i] for i in self.prompt_ids]

    def run(self, models) -> list[str]:
        return generate_chunk(*models.get(self.model), self)

    def __str__(self) -> str:
        """How errors name the chunk: its condition and its first prompt."""
        condition = self.condition
        return (f"the chunk of {len(self.prompt_ids)} prompts from {self.prompt_ids[0]!r} under "
                f"{str(condition.approximation)!r} on {condition.model} (seed {condition.seed})")


def generate_chunk(model, tokenizer, chunk: Chunk) -> list[str]:
    """The work of one chunk, on a worker holding ``model`` and ``tokenizer``: its responses. The
    approximation draws each prompt's noise from the condition's seed and the prompt's id, so a
    response does not depend on the chunk it was generated in."""
    condition = chunk.condition
    with approximated(model, condition.approximation, tokenizer, condition.seed):
        return generate(model, tokenizer, chunk.texts, condition.settings, progress=False, prompt_ids=chunk.prompt_ids)


@dataclass(frozen=True)
class Measuring:
    """A unit of work: one number measured on a model under an approximation (seeded with ``seed``),
    ``measure(model, tokenizer)``, stored under ``key``. ``measure`` is a module-level function or a
    ``functools.partial`` of one, so that it travels by reference; ``what`` names it in errors."""

    key: str
    what: str
    model: ModelRef
    approximation: Approximation
    seed: int
    measure: Callable[[Any, Any], Any]
    kind: ClassVar[str] = "measurement"
    size: ClassVar[int] = 1

    def run(self, models) -> Any:
        model, tokenizer = models.get(self.model)
        with approximated(model, self.approximation, tokenizer, self.seed):
            return self.measure(model, tokenizer)

    def __str__(self) -> str:
        return f"the {self.what} under {str(self.approximation)!r} on {self.model.source} (seed {self.seed})"


def window_perplexity(model, tokenizer, windows: torch.Tensor) -> float:
    """The perplexity of ``model`` on the token-id ``windows`` (:func:`quada.measures.utility.perplexity_windows`)."""
    return windows_perplexity(model, windows).perplexity


def answers_right(model, tokenizer, questions: tuple[Question, ...]) -> list[bool]:
    """Whether ``model`` answers each multiple-choice question right."""
    return multiple_choice(model, tokenizer, list(questions)).correct


@dataclass(frozen=True)
class Judging:
    """A unit of work: one judge's verdicts on responses, each read against its request. The judge is
    a :class:`quada.engine.executors.JudgeRef` built where the unit runs, or a judge that needs no
    model (a rule judge), which travels as it is; ``about`` names the responses in errors."""

    judge: JudgeRef | Judge
    requests: tuple[str, ...]
    responses: tuple[str, ...]
    about: str
    kind: ClassVar[str] = "judging"

    @property
    def model(self) -> ModelRef | None:
        return self.judge.model if isinstance(self.judge, JudgeRef) else None

    @property
    def size(self) -> int:
        return len(self.responses)

    def run(self, models) -> list[JudgeResult]:
        judge = models.judge(self.judge) if isinstance(self.judge, JudgeRef) else self.judge
        return judge.judge(list(self.requests), list(self.responses))

    def __str__(self) -> str:
        return f"the {getattr(self.judge, 'name', 'judge')} verdicts on {len(self.responses)} {self.about}"


@dataclass(frozen=True)
class JudgeFacts:
    """What the driver must know of a judge built elsewhere: what it is keyed by and measures, and
    whether its model is behind a server (its verdicts then come one request each, and each is
    committed as it arrives, so an interrupted run loses none it received)."""

    identity: str
    measure: str
    label_is_attack: bool
    threshold: float | None
    served: bool = False


@dataclass(frozen=True)
class Describing:
    """A unit of work: build a model judge where the units run, and tell what it is."""

    judge: JudgeRef
    kind: ClassVar[str] = "judging"
    size: ClassVar[int] = 1

    @property
    def model(self) -> ModelRef:
        return self.judge.model

    def run(self, models) -> JudgeFacts:
        judge = models.judge(self.judge)
        return JudgeFacts(judge.identity, judge.measure, judge.label_is_attack, getattr(judge, "threshold", None),
                          getattr(judge, "tokenizer", True) is None)

    def __str__(self) -> str:
        return f"loading the {self.judge.name} judge from {self.judge.model.source}"


class PooledJudge(Judge):
    """A model judge whose model stays where ``executor`` runs units: it holds no model here, and its
    verdicts are computed as :class:`Judging` units there (several at once on a pool)."""

    def __init__(self, ref: JudgeRef, facts: JudgeFacts, executor: Executor):
        self.ref, self.executor = ref, executor
        self.name, self.measure, self.label_is_attack = ref.name, facts.measure, facts.label_is_attack
        self.threshold, self.served = facts.threshold, facts.served

    @property
    def identity(self) -> str:
        return self.ref.identity

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[JudgeResult]:
        parts = balanced(list(range(len(responses))), chunk_size(len(responses), self.executor.workers))
        units = [Judging(self.ref, tuple(prompts[i] for i in part), tuple(responses[i] for i in part), "responses")
                 for part in parts]
        return [result for results in run_units(self.executor, units) for result in results]


# --------------------------------------------------------------------------- deployments


@dataclass(frozen=True)
class ServedFacts:
    """What the driver must know of a deployment opened elsewhere: the condition its rows are stored
    under and its identity (:class:`quada.backends.Backend`), the parts of their key."""

    condition: str
    identity: dict


@dataclass(frozen=True)
class BackendRef:
    """A deployment as a unit names it (:mod:`quada.backends`): what to open where the unit runs, with
    the tokenizer of ``subject`` (the reference model, whose token ids its prompts must give), how to
    reach a server, how many requests of a unit may be in flight at once, and the facts the opened
    backend must show (``None`` until the driver learns them, as for a judge)."""

    deployment: Deployment
    subject: ModelRef
    api_key_env: str = "OPENAI_API_KEY"
    request_timeout: float = 300.0
    retries: int = 6
    max_concurrency: int = 1
    facts: ServedFacts | None = None

    @property
    def slot(self) -> tuple[str, str]:
        """What makes two references one opened backend."""
        return "deployment", str(self.deployment)

    @property
    def concurrency(self) -> int:
        """Prompts a unit asks at once: a server takes ``max_concurrency``, llama.cpp in process one."""
        return 1 if self.deployment.kind == LLAMACPP else self.max_concurrency

    def open(self, tokenizer):
        """The deployment opened here, checked to be the one the run's rows are keyed by."""
        backend = open_backend(self.deployment, tokenizer, self.api_key_env, self.request_timeout, self.retries)
        if self.facts is not None and ServedFacts(backend.condition, backend.identity) != self.facts:
            backend.close()
            raise QuadaError(
                f"{self.deployment} opened here is {backend.condition} {backend.identity}, but the run's rows are keyed "
                f"by {self.facts.condition} {self.facts.identity}: every worker must reach the same deployment (the "
                "same file, llama.cpp build and CPU features, or the same server)"
            )
        return backend


@dataclass(frozen=True)
class Opening:
    """A unit of work: open a deployment where the units run, and tell what it is."""

    backend: BackendRef
    kind: ClassVar[str] = "generation"
    size: ClassVar[int] = 1

    @property
    def model(self) -> BackendRef:
        return self.backend

    def run(self, models) -> ServedFacts:
        backend = models.backend(self.backend)
        return ServedFacts(backend.condition, backend.identity)

    def __str__(self) -> str:
        return f"opening the deployment {self.backend.deployment}"


@dataclass(frozen=True)
class Asking:
    """A unit of work: prompts answered by a deployment, each as the only sequence of its request (a
    row must not depend on its neighbours), up to ``max_concurrency`` of them in flight at once."""

    backend: BackendRef
    prompts: tuple[Rendered, ...]
    settings: GenerationSettings
    first_id: str
    kind: ClassVar[str] = "generation"

    @property
    def model(self) -> BackendRef:
        return self.backend

    @property
    def size(self) -> int:
        return len(self.prompts)

    def run(self, models) -> list[str]:
        backend = models.backend(self.backend)

        def ask(prompt: Rendered) -> str:
            return backend.complete(prompt, self.settings).text

        if self.backend.concurrency == 1 or len(self.prompts) == 1:
            return [ask(p) for p in self.prompts]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.backend.concurrency) as pool:
            return list(pool.map(ask, self.prompts))

    def __str__(self) -> str:
        return f"the {len(self.prompts)} prompts from {self.first_id!r} asked of {self.backend.deployment}"


@dataclass(frozen=True)
class Probing:
    """A unit of work: one number measured on a deployment, ``measure(backend)``, stored under ``key``
    (a module-level function or a ``functools.partial`` of one, so that it travels by reference)."""

    key: str
    what: str
    backend: BackendRef
    measure: Callable[[Any], Any]
    kind: ClassVar[str] = "measurement"
    size: ClassVar[int] = 1

    @property
    def model(self) -> BackendRef:
        return self.backend

    def run(self, models) -> Any:
        return self.measure(models.backend(self.backend))

    def __str__(self) -> str:
        return f"the {self.what} of {self.backend.deployment}"


# --------------------------------------------------------------------------- sizing


def chunk_size(prompts: int, workers: int) -> int:
    """Prompts per generation unit for a plan that generates ``prompts`` on ``workers``: enough units
    for :data:`UNITS_PER_WORKER` per worker, with at least :data:`MIN_CHUNK` and at most
    :data:`GENERATION_CHUNK` prompts each."""
    return min(GENERATION_CHUNK, max(MIN_CHUNK, math.ceil(prompts / (workers * UNITS_PER_WORKER))))


def balanced(items: Sequence, size: int) -> list[list]:
    """``items`` in consecutive chunks of at most ``size``, as even as can be (96 by 64: 48 and 48)."""
    if not items:
        return []
    count = math.ceil(len(items) / size)
    bounds = [round(i * len(items) / count) for i in range(count + 1)]
    return [list(items[a:b]) for a, b in zip(bounds, bounds[1:])]


# --------------------------------------------------------------------------- stored measurements


LEGACY_UTILITY_FILE = "utility.json"  # where run folders kept their measurements before the store held them


def legacy_measurements(run_dir: Path) -> dict[str, Any]:
    """The measurements a run folder of an earlier quada kept in its ``utility.json`` (none if it has
    no such file), by the keys the store uses."""
    path = run_dir / LEGACY_UTILITY_FILE
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise QuadaError(f"cannot read the measurements of an earlier run in {path} ({err}); move the file aside") from err
    if not isinstance(values, dict):
        raise QuadaError(f"{path} does not hold measurements by key; move the file aside")
    return values


def stored_measurements(run_dir: Path) -> dict[str, Any]:
    """Every measurement of the run folder ``run_dir``: its store's, over those an earlier quada
    kept beside it. The store is only read."""
    values = legacy_measurements(run_dir)
    with Store(readable_store(run_dir / "results.sqlite"), readonly=True) as store:
        return values | store.measurements()


# --------------------------------------------------------------------------- the plan


def _ignore(_count: int) -> None:
    pass


class _Claims:
    """The keys a plan computes, by store: a key two requests need is computed once."""

    def __init__(self):
        self._keys: set[tuple[int, Any]] = set()

    def claim(self, engine: Engine, key) -> bool:
        """Whether ``key`` of ``engine``'s store was free (it is this caller's now)."""
        entry = (id(engine.store), key)
        if entry in self._keys:
            return False
        self._keys.add(entry)
        return True


class _Request:
    """One thing a plan measures. The plan calls :meth:`prepare` (claim what is missing; return the
    prompts to generate), then :meth:`start` (the first units, each with what its result commits
    to), :meth:`commit` with each result (returning new generations, whose verdicts may follow),
    and :meth:`finish` (read the result back from the store)."""

    def __init__(self, engine: Engine, on_done: Callable[[int], None]):
        self.engine, self.on_done = engine, on_done
        self.claims = _Claims()
        self.awaited: list[GenerationKey] = []  # generations the plan computes, to be told of when they arrive

    def prepare(self, claims: _Claims) -> int:
        self.claims = claims
        return 0

    def start(self, size: int) -> list[tuple[Any, Any]]:
        return []

    def commit(self, payload, result) -> list[Generation]:
        return []

    def finish(self) -> None:
        pass


class _Generating(_Request):
    """Generations a plan computes: ``ordered_keys`` in the order of the prompts, ``rows`` in that order
    once the plan ran. Every key the plan claims is committed as its unit's result arrives."""

    def __init__(self, engine: Engine, keys: list[GenerationKey], on_done: Callable[[int], None]):
        super().__init__(engine, on_done)
        self.ordered_keys = keys
        self.rows: list[Generation] = []
        self._todo: list[GenerationKey] = []

    def prepare(self, claims: _Claims) -> int:
        super().prepare(claims)
        self._todo = [key for key in self.engine.store.missing(self.ordered_keys) if claims.claim(self.engine, key)]
        return len(self._todo)

    def commit(self, keys: list[GenerationKey], responses: list[str]) -> list[Generation]:
        rows = [Generation(k, self.requests[k.prompt_id], r) for k, r in zip(keys, responses, strict=True)]
        self.engine.store.put(rows)
        self.on_done(len(rows))
        return rows

    def finish(self) -> None:
        found = self.engine.store.get_many(self.ordered_keys)
        self.rows = [found[key] for key in self.ordered_keys]


class Responses(_Generating):
    """The responses of one condition of the model in a plan."""

    def __init__(self, engine: Engine, condition: Condition, on_done: Callable[[int], None]):
        super().__init__(engine, [condition.key(p.id) for p in condition.prompts], on_done)
        self.condition = condition
        self.requests = {p.id: p.text for p in condition.prompts}
        # Longest prompts first, so each chunk batches prompts of similar length.
        self._lengths = {p.id: len(engine.tokenizer(p.text)["input_ids"]) for p in condition.prompts}

    def start(self, size: int) -> list[tuple[Chunk, list[GenerationKey]]]:
        todo = sorted(self._todo, key=lambda k: (-self._lengths[k.prompt_id], k.prompt_id))
        return [(Chunk(self.condition, tuple(k.prompt_id for k in keys)), keys) for keys in balanced(todo, size)]


class Served(_Generating):
    """The responses of one deployment (:class:`BackendRef`, opened where the units run) to prompts in
    a plan, stored under its facts (:func:`quada.backends.deployment_key`); a unit asks
    :attr:`BackendRef.concurrency` prompts, so a run stopped by a failing server keeps what it received."""

    def __init__(self, engine: Engine, backend: BackendRef, prompts: Sequence[Prompt], on_done: Callable[[int], None]):
        config = engine.config
        self.backend, self.settings = backend, config.settings
        self.rendered = {p.id: render(engine.tokenizer, p.text, config.settings.prompt_format) for p in prompts}
        keys = [deployment_key(backend.facts, engine.fingerprint, p.id, self.rendered[p.id].text, config.settings,
                               config.seed) for p in prompts]
        super().__init__(engine, keys, on_done)
        self.requests = {p.id: p.text for p in prompts}

    def start(self, size: int) -> list[tuple[Asking, list[GenerationKey]]]:
        return [(Asking(self.backend, tuple(self.rendered[k.prompt_id] for k in keys), self.settings, keys[0].prompt_id),
                 keys) for keys in balanced(self._todo, self.backend.concurrency)]


class Verdicts(_Request):
    """One judge's verdicts on the responses of a :class:`Responses` or :class:`Served` of the plan
    (judged as they arrive) or on given generations; each response is read against the prompt it answered, or
    against ``requests`` (one per response, in order) when given. ``rows`` once the plan ran."""

    def __init__(self, engine: Engine, judge: Judge, generations: _Generating | Sequence[Generation],
                 requests: Sequence[str] | None, on_done: Callable[[int], None]):
        super().__init__(engine, on_done)
        self.given = None if isinstance(generations, _Generating) else list(generations)
        keys = [g.key for g in self.given] if self.given is not None else list(generations.ordered_keys)
        if requests is not None and len(requests) != len(keys):
            raise ValueError(f"{len(requests)} requests for {len(keys)} generations")
        self.judge, self.keys = judge, keys
        self.requests = None if requests is None else dict(zip(keys, requests))
        self.identity = judge.identity if requests is None else judge.identity + AGAINST_REQUEST
        self.rows: list[Judgement] = []

    def start(self, size: int) -> list[tuple[Judging, list]]:
        if self.given is not None:
            known = {g.key: g for g in self.given}
        else:
            known = self.engine.store.get_many(self.keys)
        self.awaited = [k for k in self.keys if k not in known]
        return self.arrived([known[k] for k in dict.fromkeys(self.keys) if k in known], size)

    def arrived(self, generations: Sequence[Generation], size: int) -> list[tuple[Judging, list]]:
        """Units for the verdicts on ``generations`` that the store lacks."""
        wanted = {g.key.judged_by(self.identity): g for g in generations}
        todo = [k for k in self.engine.store.missing(wanted) if self.claims.claim(self.engine, k)]
        judge = self.judge.ref if isinstance(self.judge, PooledJudge) else self.judge
        if isinstance(self.judge, PooledJudge) and self.judge.served:
            size = 1  # each answer of a server committed as it comes
        units = []
        for keys in balanced(todo, size):
            first = wanted[keys[0]].key
            about = f"responses from {first.prompt_id!r} under {first.approx!r}"
            requests = tuple(self.requests[wanted[k].key] if self.requests else wanted[k].prompt for k in keys)
            units.append((Judging(judge, requests, tuple(wanted[k].response for k in keys), about), keys))
        return units

    def commit(self, keys: list, results: list[JudgeResult]) -> list[Generation]:
        rows = [Judgement(k, r.label, r.score, r.raw) for k, r in zip(keys, results, strict=True)]
        self.engine.store.put(rows)
        self.on_done(len(rows))
        return []

    def finish(self) -> None:
        keys = [k.judged_by(self.identity) for k in self.keys]
        found = self.engine.store.get_many(keys)
        self.rows = [found[k] for k in keys]


class Measured(_Request):
    """One number measured on the model (:class:`Measuring`) or a deployment (:class:`Probing`);
    ``value`` once the plan ran."""

    def __init__(self, engine: Engine, unit: Measuring | Probing, on_done: Callable[[int], None]):
        super().__init__(engine, on_done)
        self.unit = unit
        self.value: Any = None
        self._missing = False

    def prepare(self, claims: _Claims) -> int:
        super().prepare(claims)
        key = self.unit.key
        self._missing = self.engine.store.measurement(key) is None and claims.claim(self.engine, key)
        return 0

    def start(self, size: int) -> list[tuple[Measuring | Probing, None]]:
        return [(self.unit, None)] if self._missing else []

    def commit(self, payload, value) -> list[Generation]:
        self.engine.store.put_measurement(self.unit.key, value)
        self.on_done(1)
        return []

    def finish(self) -> None:
        self.value = self.engine.store.measurement(self.unit.key)


class Plan:
    """Everything a command measures, computed together: requests added with :meth:`responses`,
    :meth:`served` (a deployment's), :meth:`judged`, :meth:`measured` and :meth:`probed` (each on an
    :class:`Engine`: a plan may span several models and run folders that share one executor), then
    :meth:`run`. Each request holds its result
    (``rows``, ``value``) once the plan ran.

    ``run`` hands every missing unit to the executor at once, grouped by model and longest first,
    and the verdicts on each chunk of responses as soon as it arrives; it commits every result the
    moment it comes back, in any order, so a run stopped at any point keeps all it received and the
    same plan carries on from there."""

    def __init__(self):
        self.requests: list[_Request] = []

    def responses(self, engine: Engine, condition: Condition, on_done: Callable[[int], None] = _ignore) -> Responses:
        """The responses of ``condition``; ``on_done`` counts the prompts generated."""
        return self._add(Responses(engine, condition, on_done))

    def judged(self, engine: Engine, judge: Judge, generations: _Generating | Sequence[Generation],
               requests: Sequence[str] | None = None, on_done: Callable[[int], None] = _ignore) -> Verdicts:
        """``judge``'s verdicts on ``generations`` (a request of this plan, or stored rows); against
        ``requests`` when given (an attack's behaviours behind its prompts), stored apart
        (:data:`AGAINST_REQUEST`). ``on_done`` counts the verdicts reached."""
        return self._add(Verdicts(engine, judge, generations, requests, on_done))

    def measured(self, engine: Engine, key: str, what: str, approximation: Approximation,
                 measure: Callable[[Any, Any], Any], on_done: Callable[[int], None] = _ignore) -> Measured:
        """``measure(model, tokenizer)`` of ``engine``'s model under ``approximation``, cached as ``key``
        (``what`` names it in errors); ``on_done`` counts 1 when it is measured."""
        _check_parsed(approximation)
        unit = Measuring(key, what, engine.subject, approximation, engine.config.seed, measure)
        return self._add(Measured(engine, unit, on_done))

    def served(self, engine: Engine, backend: BackendRef, prompts: Sequence[Prompt],
               on_done: Callable[[int], None] = _ignore) -> Served:
        """The responses of the deployment ``backend`` (from :meth:`Engine.deployment`) to ``prompts``,
        rendered with the model's chat template; ``on_done`` counts the prompts answered."""
        return self._add(Served(engine, backend, prompts, on_done))

    def probed(self, engine: Engine, key: str, what: str, backend: BackendRef,
               measure: Callable[[Any], Any]) -> Measured:
        """``measure(backend)`` of the deployment ``backend``, stored under ``key`` in ``engine``'s store."""
        return self._add(Measured(engine, Probing(key, what, backend, measure), _ignore))

    def perplexity(self, engine: Engine, approximation: Approximation,
                   on_done: Callable[[int], None] = _ignore) -> Measured:
        """The perplexity of ``engine``'s model under ``approximation`` on the run's corpus."""
        measure = functools.partial(window_perplexity, windows=engine.windows)
        return self.measured(engine, engine.key_of("perplexity", approximation), "perplexity", approximation, measure,
                             on_done)

    def accuracy(self, engine: Engine, approximation: Approximation, questions: Sequence[Question],
                 on_done: Callable[[int], None] = _ignore) -> Measured:
        """Whether ``engine``'s model under ``approximation`` answers each multiple-choice question right."""
        measure = functools.partial(answers_right, questions=tuple(questions))
        return self.measured(engine, engine.key_of("accuracy", approximation), "accuracy", approximation, measure,
                             on_done)

    def _add(self, request):
        self.requests.append(request)
        return request

    def run(self) -> None:
        if not self.requests:
            return
        executors = {id(r.engine.executor): r.engine.executor for r in self.requests}
        if len(executors) > 1:
            raise ValueError("a plan runs on one executor: give every engine of the plan the same one")
        [executor] = executors.values()
        claims = _Claims()
        size = chunk_size(sum(r.prepare(claims) for r in self.requests), executor.workers)
        owners: dict[int, tuple[Any, _Request, Any]] = {}  # by id(unit); the entry keeps the unit (and its id) alive
        waiting: dict[tuple[int, GenerationKey], list[Verdicts]] = defaultdict(list)

        def owned(request: _Request, units: list[tuple[Any, Any]]) -> list:
            for unit, payload in units:
                owners[id(unit)] = (unit, request, payload)
            return [unit for unit, _ in units]

        first = [unit for request in self.requests for unit in owned(request, request.start(size))]
        for request in self.requests:
            for key in request.awaited:
                waiting[id(request.engine.store), key].append(request)
        models: dict = {}
        for unit in first:
            models.setdefault(unit.model and unit.model.slot, len(models))
        for unit in sorted(first, key=lambda u: (models[u.model and u.model.slot], KIND_ORDER[u.kind], -u.size)):
            executor.submit(unit)
        for unit, result in executor.completed():
            _, request, payload = owners.pop(id(unit))
            arrived: dict[int, tuple[Verdicts, list[Generation]]] = {}
            for row in request.commit(payload, result):
                for verdicts in waiting.pop((id(request.engine.store), row.key), ()):
                    arrived.setdefault(id(verdicts), (verdicts, []))[1].append(row)
            for verdicts, rows in arrived.values():
                for follow in owned(verdicts, verdicts.arrived(rows, size)):
                    executor.submit(follow)
        for request in self.requests:
            request.finish()


def run_jobs(jobs: Sequence) -> None:
    """Run jobs that measure in rounds together, each round one plan: ``job.next_round(plan)`` adds the
    job's next requests to the plan (after reading the results of its last round) and says whether
    it added any. A sweep refines around what its last round found; `quada align` runs the vets and
    sweeps of several models in the same plans."""
    pending = list(jobs)
    while pending:
        plan = Plan()
        pending = [job for job in pending if job.next_round(plan)]
        plan.run()


# --------------------------------------------------------------------------- the engine


@dataclass
class Measurement:
    """One condition measured: responses to its prompts, each judge's verdicts on them (keyed by
    the requested judge name) and the perplexity."""

    condition: Condition
    generations: list[Generation]
    judgements: dict[str, list[Judgement]]
    perplexity: float

    def asr(self, judge: str) -> Estimate:
        """The attack success rate by ``judge`` (not refused, or harmful; see :func:`attack_outcomes`),
        with its Wilson interval."""
        return proportion(attack_outcomes(judge, [j.label for j in self.judgements[judge]]))


class Engine:
    """Stored, resumable measurements of one subject model under any condition, in one run folder.

    Generations, judgements and numbers measured on the model go through the results store, each
    keyed by everything that decides it; so `quada vet`, the sweeps and the layer analysis share
    one another's work in a run folder and a killed run resumes where it stopped. ``config`` is a
    :class:`GenerationConfig`, and a :class:`MeasurementConfig` for anything besides generations
    (perplexity, accuracy, model judges). Units run on ``executor`` (default: this process), which
    is handed ``model``: the engine keeps only what keys its rows (fingerprint, dtype, device type).
    """

    def __init__(self, store: Store, model, tokenizer, config: GenerationConfig | MeasurementConfig,
                 corpus_text: str = "", executor: Executor | None = None):
        self.store, self.tokenizer, self.config = store, tokenizer, config
        self.corpus_text = corpus_text
        self.executor = executor if executor is not None else LocalExecutor(getattr(config, "device", "auto"))
        self.fingerprint = model_fingerprint(model)
        self.dtype, self.device = dtype_name(model.dtype), model.device.type
        self.subject = ModelRef(config.model, self.dtype, self.fingerprint, self.device)
        self.executor.provide(self.subject, model, tokenizer)
        for key, value in legacy_measurements(config.run_dir).items():  # a run folder of an earlier quada
            store.put_measurement(key, value)

    def condition(self, approximation: Approximation, prompts: Sequence[Prompt], seed: int | None = None) -> Condition:
        """The condition of ``prompts`` under ``approximation`` on this model, with the run's
        generation settings and seed (or ``seed``)."""
        config = self.config
        return Condition(config.model, self.fingerprint, approximation, tuple(prompts), config.settings,
                         config.seed if seed is None else seed, self.dtype, self.device)

    def release_model(self) -> None:
        """No unit will need the subject model any more: the executor lets it go."""
        self.executor.release(self.subject)

    def stored(self, key: str, measure: Callable[[], Any]) -> Any:
        """The stored measurement ``key``, else ``measure()``, stored (also for numbers measured on
        something other than the subject model, such as a deployment's)."""
        stored = self.store.measurement(key)
        return stored if stored is not None else self.store.put_measurement(key, measure())

    @functools.cached_property
    def windows(self) -> torch.Tensor:
        """The token windows of the run's corpus that perplexity is measured on."""
        config = self.config
        return perplexity_windows(self.tokenizer, self.corpus_text, config.ppl_window, config.ppl_windows)

    def key_of(self, measurement: str, approximation: Approximation | str) -> str:
        """The store key of this model's ``perplexity`` or ``accuracy`` under ``approximation``."""
        key = {"perplexity": perplexity_key, "accuracy": accuracy_key}[measurement]
        return key(self.fingerprint, str(approximation), self.config, self.dtype, self.device)

    def judge(self, name: str, **options) -> Judge:
        """The judge ``name`` of this run: a rule judge as it is, a model judge (its model
        ``config.judge_model``, in the run's dtype; ``options`` for :func:`make_judge`) built where
        the executor runs units, as a :class:`PooledJudge`. ``refusal`` falls back to
        ``refusal-keyword``, with a warning, when its model cannot be loaded. The run's judge options
        (``config.judge_options``: the prompted judge's prompt, answer words) come first."""
        options = {**getattr(self.config, "judge_options", {}).get(name, {}), **options}
        if name not in MODEL_JUDGES:
            return make_judge(name, **options)
        ref = JudgeRef(name, ModelRef(self.config.judge_model, self.dtype, classifier_ok=True), tuple(sorted(options.items())))
        try:
            [facts] = run_units(self.executor, [Describing(ref)])
        except QuadaError as err:
            if name != RefusalJudge.name:
                raise
            warnings.warn(f"refusal judge model unavailable ({err}); using the refusal-keyword judge", stacklevel=2)
            return RefusalKeywordJudge()
        return PooledJudge(replace(ref, identity=facts.identity), facts, self.executor)

    def deployment(self, deployment: Deployment, api_key_env: str = "OPENAI_API_KEY", request_timeout: float = 300.0,
                   retries: int = 6, max_concurrency: int = 1) -> BackendRef:
        """The deployment ``deployment`` of this model, opened where the executor runs units (a bad
        GGUF or an unreachable server fails here), with the facts its rows are keyed by."""
        ref = BackendRef(deployment, self.subject, api_key_env, request_timeout, retries, max_concurrency)
        [facts] = run_units(self.executor, [Opening(ref)])
        return replace(ref, facts=facts)

    # One request, one plan: the measurements a command needs one at a time.

    def responses(self, condition: Condition, on_chunk=_ignore) -> list[Generation]:
        """Stored-or-generated responses of ``condition``, in the order of its prompts;
        ``on_chunk`` counts the prompts generated."""
        plan = Plan()
        request = plan.responses(self, condition, on_chunk)
        plan.run()
        return request.rows

    def judged(self, judge: Judge, generations: Sequence[Generation], on_chunk=_ignore,
               requests: Sequence[str] | None = None) -> list[Judgement]:
        """Stored-or-computed verdicts of ``judge`` on ``generations``, in their order (see :meth:`Plan.judged`)."""
        plan = Plan()
        request = plan.judged(self, judge, generations, requests, on_chunk)
        plan.run()
        return request.rows

    def perplexity(self, approximation: Approximation) -> float:
        """Stored-or-measured perplexity of the model under ``approximation`` on the run's corpus."""
        plan = Plan()
        request = plan.perplexity(self, approximation)
        plan.run()
        return request.value

    def accuracy(self, approximation: Approximation, questions: Sequence[Question]) -> list[bool]:
        """Stored-or-measured multiple-choice answers (right or wrong) under ``approximation``."""
        plan = Plan()
        request = plan.accuracy(self, approximation, questions)
        plan.run()
        return request.value

    def measure(self, condition: Condition, judges: Mapping[str, Judge], on_chunk=_ignore) -> Measurement:
        """Generate (``on_chunk`` counts prompts done), judge and measure perplexity, in one plan."""
        plan = Plan()
        generations = plan.responses(self, condition, on_chunk)
        verdicts = {name: plan.judged(self, judge, generations) for name, judge in judges.items()}
        perplexity = plan.perplexity(self, condition.approximation)
        plan.run()
        return Measurement(condition, generations.rows, {name: v.rows for name, v in verdicts.items()}, perplexity.value)
