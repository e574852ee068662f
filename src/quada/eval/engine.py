"""The measurement engine: conditions in, stored rows out, resumable.

A :class:`Condition` is what decides a set of generations: the model (its source and
fingerprint), the approximation (a parsed spec, or ``CLEAN``), the prompts, the generation
settings and the seed. The engine generates its responses in chunks of :data:`GENERATION_CHUNK`
prompts (longest first, so a chunk batches prompts of similar length), each chunk a
:class:`Chunk`: a small value that pickles, so an :class:`Executor` may compute it in another
process. :class:`LocalExecutor` computes the chunks here, in order; ``RayExecutor``
(:mod:`quada.eval.ray_executor`, chosen by :func:`make_executor`) on a pool of Ray workers, several
at a time, handing them back in order. Whatever the executor, every chunk is committed to the
results store as its responses arrive and only missing rows are computed. An approximation's
noise is drawn per prompt, from the condition's seed and the prompt's id
(:mod:`quada.approx.rows`), never from the chunk: a row is a function of its key, so a killed run
resumes to exactly the rows of an uninterrupted one, and a run over more prompts, another executor
or another batch size gives the same rows (in float32; bfloat16 rounding can still differ with
the batch a prompt shares).

Judgements go through the same store, and so do perplexity, accuracy and other numbers measured on
the model (the store's measurements, keyed by :func:`perplexity_key` and the like). `quada vet`, the
sweep, the layer analysis and the preference pairs all measure through :class:`Engine`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from quada.approx import Spec, apply
from quada.approx.base import DRAW_SCHEME, resolve_layers
from quada.approx.sites import resolve_decoder
from quada.data import Prompt
from quada.errors import QuadaError
from quada.eval.generate import GenerationSettings, generate
from quada.eval.judges import Judge, attack_outcomes
from quada.eval.metrics import Estimate, proportion
from quada.eval.utility import multiple_choice, perplexity
from quada.fingerprint import model_fingerprint
from quada.store import CLEAN, Generation, GenerationKey, Judgement, Store, readable_store, settings_json

GENERATION_CHUNK = 64  # prompts generated and committed together (one batch composition)
JUDGEMENT_CHUNK = 16
# Appended to a judge's identity in the store when it judged responses against requests other than
# the prompts they answered (Engine.judged's ``requests``).
AGAINST_REQUEST = " | against the request"

Approximation = Spec | str  # a parsed spec, or CLEAN for the unmodified model; str() is its store key
Unit = TypeVar("Unit")
Result = TypeVar("Result")


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
    (:data:`quada.approx.base.DRAW_SCHEME`). ``dtype=None`` gives the key of stores written before
    these were recorded, which can still be read."""
    extra = {} if dtype is None else {"dtype": dtype, "device": device, "draws": DRAW_SCHEME}
    return settings_json({**settings.as_dict(), **extra})


def _where(dtype: str | None, device: str | None) -> str:
    """The end of a utility key: dtype, device type and draw scheme (nothing for older caches)."""
    return "" if dtype is None else f"|{dtype}|{device}|draws{DRAW_SCHEME}"


def perplexity_key(fingerprint: str, approximation: str, config, dtype: str | None, device: str | None) -> str:
    """Cache key of a perplexity: the model, the condition, the corpus and its windows, the seed,
    and as in :func:`key_settings` the dtype, device type and draw scheme."""
    return (f"{fingerprint}|{approximation}|ppl|{config.corpus}|{config.ppl_window}|{config.ppl_windows}|{config.seed}"
            + _where(dtype, device))


def accuracy_key(fingerprint: str, approximation: str, config, dtype: str | None, device: str | None) -> str:
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


@dataclass(frozen=True)
class Chunk:
    """The unit of work: some prompts of a condition, generated as one batch."""

    condition: Condition
    prompt_ids: tuple[str, ...]

    @property
    def texts(self) -> list[str]:
        by_id = {p.id: p.text for p in self.condition.prompts}
        return [by_id[i] for i in self.prompt_ids]

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


class Executor(Protocol):
    """Runs units of work where the model is: ``work(model, tokenizer, unit)`` for each unit."""

    def run(self, units: Sequence[Unit], work: Callable[[Any, Any, Unit], Result]) -> Iterator[Result]:
        """Each unit's result, in the order of ``units``, yielded as soon as it is ready (the caller
        stores it before asking for the next). ``work`` is a module-level function, ``units``
        picklable values."""
        ...


class LocalExecutor:
    """Runs every unit in this process on one model, one after the other."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def run(self, units: Sequence[Unit], work: Callable[[Any, Any, Unit], Result]) -> Iterator[Result]:
        for unit in units:
            yield work(self.model, self.tokenizer, unit)


def make_executor(config, model, tokenizer) -> Executor:
    """The executor that ``config.executor`` names: this process on ``model``, or a pool of Ray
    workers that each load ``config.model`` as ``model`` was loaded (its dtype, ``config.device``)
    and must find the same weights (its fingerprint). Ray is imported only when it is asked for."""
    if config.executor == "local":
        return LocalExecutor(model, tokenizer)
    from quada.eval.ray_executor import RayExecutor

    return RayExecutor(config.model, model_fingerprint(model), dtype=model.dtype, device=config.device,
                       workers=config.workers, cpus_per_worker=config.cpus_per_worker,
                       gpus_per_worker=config.gpus_per_worker, address=config.ray_address)


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


def _ignore(_count: int) -> None:
    pass


class Engine:
    """Stored, resumable measurements of one subject model under any condition, in one run folder.

    Generations, judgements and numbers measured on the model go through the results store, each
    keyed by everything that decides it; so `quada vet`, the sweeps and the layer analysis share
    one another's work in a run folder and a killed run resumes where it stopped. ``config`` provides ``model``, ``settings``, ``seed`` and ``run_dir``,
    and for perplexity ``corpus``, ``ppl_window`` and ``ppl_windows``, for accuracy ``questions``.
    Generation chunks run on ``executor`` (default: this process, on ``model``).
    """

    def __init__(self, store: Store, model, tokenizer, config, corpus_text: str = "",
                 executor: Executor | None = None):
        self.store, self.model, self.tokenizer, self.config = store, model, tokenizer, config
        self.corpus_text = corpus_text
        self.executor = executor or LocalExecutor(model, tokenizer)
        self.fingerprint = model_fingerprint(model)
        self.dtype, self.device = dtype_name(model.dtype), model.device.type
        for key, value in legacy_measurements(config.run_dir).items():  # a run folder of an earlier quada
            store.put_measurement(key, value)

    def condition(self, approximation: Approximation, prompts: Sequence[Prompt], seed: int | None = None) -> Condition:
        """The condition of ``prompts`` under ``approximation`` on this model, with the run's
        generation settings and seed (or ``seed``)."""
        config = self.config
        return Condition(config.model, self.fingerprint, approximation, tuple(prompts), config.settings,
                         config.seed if seed is None else seed, self.dtype, self.device)

    def release_model(self) -> None:
        """Let go of the subject model (a large judge model may need its memory); only stored
        rows and judging remain available."""
        self.model = self.executor = None

    def responses(self, condition: Condition, on_chunk=_ignore) -> list[Generation]:
        """Stored-or-generated responses of ``condition``, in the order of its prompts;
        ``on_chunk`` counts the prompts generated."""
        texts = {p.id: p.text for p in condition.prompts}
        # Longest prompts first, so each committed chunk batches prompts of similar length.
        lengths = {p.id: len(self.tokenizer(p.text)["input_ids"]) for p in condition.prompts}
        ordered = sorted(condition.prompts, key=lambda p: (-lengths[p.id], p.id))
        keys = [condition.key(p.id) for p in ordered]

        def compute_all(chunks: list[list[GenerationKey]]) -> Iterator[list[Generation]]:
            units = [Chunk(condition, tuple(k.prompt_id for k in chunk)) for chunk in chunks]
            for chunk, responses in zip(chunks, self.executor.run(units, generate_chunk)):
                on_chunk(len(chunk))
                yield [Generation(k, texts[k.prompt_id], r) for k, r in zip(chunk, responses)]

        rows = self.store.fill_chunks(keys, compute_all, GENERATION_CHUNK)
        found = {row.key.prompt_id: row for row in rows}
        return [found[p.id] for p in condition.prompts]

    def stored(self, key: str, measure: Callable[[], Any]) -> Any:
        """The stored measurement ``key``, else ``measure()``, stored (also for numbers measured on
        something other than the subject model, such as a deployment's)."""
        stored = self.store.measurement(key)
        return stored if stored is not None else self.store.put_measurement(key, measure())

    def cached(self, key: str, approximation: Approximation, measure: Callable[[Any, Any], Any]) -> Any:
        """The stored measurement ``key``, else ``measure(model, tokenizer)`` under ``approximation``
        (seeded with the run's seed), stored."""
        _check_parsed(approximation)

        def measure_approximated():
            with approximated(self.model, approximation, self.tokenizer, self.config.seed):
                return measure(self.model, self.tokenizer)

        return self.stored(key, measure_approximated)

    def key_of(self, measurement: str, approximation: Approximation | str) -> str:
        """The store key of this model's ``perplexity`` or ``accuracy`` under ``approximation``."""
        key = {"perplexity": perplexity_key, "accuracy": accuracy_key}[measurement]
        return key(self.fingerprint, str(approximation), self.config, self.dtype, self.device)

    def perplexity(self, approximation: Approximation) -> float:
        """Stored-or-measured perplexity of the model under ``approximation`` on the run's corpus."""
        config = self.config
        return self.cached(
            self.key_of("perplexity", approximation), approximation,
            lambda model, tokenizer: perplexity(model, tokenizer, self.corpus_text, config.ppl_window,
                                                config.ppl_windows).perplexity,
        )

    def accuracy(self, approximation: Approximation, questions) -> list[bool]:
        """Stored-or-measured multiple-choice answers (right or wrong) under ``approximation``."""
        return self.cached(self.key_of("accuracy", approximation), approximation,
                           lambda model, tokenizer: multiple_choice(model, tokenizer, questions).correct)

    def judged(self, judge: Judge, generations: Sequence[Generation], on_chunk=_ignore,
               requests: Sequence[str] | None = None) -> list[Judgement]:
        """Stored-or-computed verdicts of ``judge`` on ``generations``, in their order.

        The judge reads each response against the prompt it answered, or against ``requests`` (one
        per generation) when given: an attack's behaviour behind its adversarial prompt. Verdicts
        against requests are stored apart (:data:`AGAINST_REQUEST`), never mixed with the others."""
        if requests is not None and len(requests) != len(generations):
            raise ValueError(f"{len(requests)} requests for {len(generations)} generations")
        identity = judge.identity if requests is None else judge.identity + AGAINST_REQUEST
        keys = [g.key.judged_by(identity) for g in generations]
        texts = [g.prompt for g in generations] if requests is None else requests
        pending = {k: (text, g.response) for k, text, g in zip(keys, texts, generations)}

        def compute(chunk):
            asked, responses = zip(*(pending[k] for k in chunk))
            results = judge.judge(list(asked), list(responses))
            on_chunk(len(chunk))
            return [Judgement(k, r.label, r.score, r.raw) for k, r in zip(chunk, results)]

        return self.store.fill(keys, compute, chunk_size=JUDGEMENT_CHUNK)

    def measure(self, condition: Condition, judges: Mapping[str, Judge], on_chunk=_ignore) -> Measurement:
        """Generate (``on_chunk`` counts prompts done), judge and measure perplexity."""
        generations = self.responses(condition, on_chunk)
        ppl = self.perplexity(condition.approximation)
        return Measurement(condition, generations, {name: self.judged(j, generations) for name, j in judges.items()}, ppl)
