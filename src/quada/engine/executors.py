"""Where units of work run: the models a worker holds, the executors that run units, what they cost.

A unit of work (:mod:`quada.engine.plan` defines them: a chunk of generations, a batch of verdicts,
a perplexity) is a small value that pickles. It names the model it needs by a :class:`ModelRef`
(``None`` when it needs none) and computes its result with ``unit.run(models)``, where ``models``
(:class:`Models`) holds the models of the process it runs in, loaded once on first use. So the same
unit runs unchanged in this process (:class:`LocalExecutor`) or on a Ray worker
(:class:`quada.engine.ray_executor.RayExecutor`), and a unit of one model can follow a unit of
another on the same worker.

An :class:`Executor` takes units as they are submitted and hands back ``(unit, result)`` pairs as
they finish, in any order: the engine (:class:`quada.engine.plan.Plan`), the only writer of the
results store, commits each result as it arrives and submits the units that depend on it (the
verdicts on a chunk of responses). Every executor keeps a :class:`Usage`: how busy its workers
were while units were pending.
"""

from __future__ import annotations

import gc
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from quada.errors import QuadaError
from quada.fingerprint import model_fingerprint
from quada.judging import Judge, load_judge_model, make_judge

MODELS_PER_WORKER = 2  # models a worker keeps loaded: the subject and a judge model


@dataclass(frozen=True)
class ModelRef:
    """A model as a unit names it: the source and dtype a worker loads it from (on the worker's own
    device), and what the loaded model must show: its weights' ``fingerprint`` and its ``device``
    type, the ones the unit's rows are keyed by (``None``: not checked; a judge model's judge
    identity is checked instead). ``classifier_ok``: a sequence classifier may stand there (a judge)."""

    source: str
    dtype: str
    fingerprint: str | None = None
    device: str | None = None
    classifier_ok: bool = False

    @property
    def slot(self) -> tuple[str, str]:
        """What makes two references one loaded model: the source and the dtype."""
        return self.source, self.dtype


@dataclass(frozen=True)
class JudgeRef:
    """How to build a model judge where it runs: the judge's name, its model, the options of
    :func:`quada.judging.make_judge` and the identity the built judge must have (``None`` until
    it is known: the driver learns it from a worker before any verdict is keyed by it)."""

    name: str
    model: ModelRef
    options: tuple[tuple[str, Any], ...] = ()
    identity: str | None = None

    def build(self, model, tokenizer) -> Judge:
        judge = make_judge(self.name, model, tokenizer, **dict(self.options))
        if self.identity is not None and judge.identity != self.identity:
            raise QuadaError(
                f"the {self.name} judge built here from {self.model.source} has the identity {judge.identity}, but the "
                f"run's verdicts are keyed by {self.identity}: every worker must read the same judge model (the same "
                "files, quada and transformers) on the same kind of device"
            )
        return judge


def release_memory() -> None:
    """Give the memory of dropped models back (a GPU's cached blocks too)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Models:
    """The models of one worker (or of this process, for the local executor), each loaded on first use
    on ``device`` and kept; beyond ``capacity`` models the least recently used is let go. A model
    whose fingerprint or device type differs from what its reference says is refused: the unit's
    rows would be keyed by another model than the one that computed them."""

    def __init__(self, device: str = "auto", capacity: int = MODELS_PER_WORKER):
        self.device, self.capacity = device, capacity
        self._loaded: OrderedDict[tuple[str, str], tuple[Any, Any]] = OrderedDict()
        self._judges: dict[JudgeRef, Judge] = {}
        self._backend: tuple[tuple[str, str], Any] | None = None  # the one deployment kept open: (slot, backend)
        self.loading_seconds = 0.0  # spent loading models, in all

    def add(self, ref: ModelRef, model, tokenizer) -> None:
        """A model already loaded here (the driver's copy): used as it is, never loaded again while kept."""
        self.release(ref)  # a copy loaded before, and the judges built on it
        self._loaded[ref.slot] = (model, tokenizer)
        self._loaded.move_to_end(ref.slot)
        self._make_room(self.capacity)

    def get(self, ref: ModelRef) -> tuple[Any, Any]:
        """``(model, tokenizer)`` of ``ref``, loaded now if it is not (a judge's model may run in
        another engine: :func:`quada.judging.load_judge_model`)."""
        from quada.models import load

        if ref.slot not in self._loaded:
            self._make_room(self.capacity - 1)
            started = time.perf_counter()
            if ref.classifier_ok:
                model, tokenizer = load_judge_model(ref.source, device=self.device, dtype=ref.dtype)
            else:
                model, tokenizer = load(ref.source, dtype=ref.dtype, device=self.device)
            self.loading_seconds += time.perf_counter() - started
            _check_loaded(ref, model)
            self._loaded[ref.slot] = (model, tokenizer)
        self._loaded.move_to_end(ref.slot)
        return self._loaded[ref.slot]

    def judge(self, ref: JudgeRef) -> Judge:
        """The judge ``ref`` describes, built once on its model."""
        model, tokenizer = self.get(ref.model)
        if ref not in self._judges:
            self._judges[ref] = ref.build(model, tokenizer)
        return self._judges[ref]

    def backend(self, ref):
        """The deployment ``ref`` (a :class:`quada.engine.plan.BackendRef`) opened here with its subject
        model's tokenizer; one is kept open at a time (a GGUF takes as much memory as a model), and the
        units of one deployment run together."""
        if self._backend is None or self._backend[0] != ref.slot:
            self.close_backend()
            _, tokenizer = self.get(ref.subject)
            self._backend = ref.slot, ref.open(tokenizer)
        return self._backend[1]

    def close_backend(self) -> None:
        """Close the deployment kept open, if any."""
        if self._backend is not None:
            backend, self._backend = self._backend[1], None
            backend.close()

    def release(self, ref: ModelRef) -> None:
        """Let go of ``ref``'s model and the judges built on it."""
        if self._loaded.pop(ref.slot, None) is not None:
            self._judges = {j: judge for j, judge in self._judges.items() if j.model.slot != ref.slot}
            release_memory()

    def _make_room(self, limit: int) -> None:
        """Let the least recently used models go until at most ``limit`` are kept."""
        while len(self._loaded) > limit:
            self.release(ModelRef(*next(iter(self._loaded))))


def _check_loaded(ref: ModelRef, model) -> None:
    if ref.fingerprint is None and ref.device is None:  # a judge's model: its judge identity is checked instead
        return
    if ref.fingerprint is not None and (found := model_fingerprint(model)) != ref.fingerprint:
        raise QuadaError(
            f"{ref.source} loaded here has the fingerprint {found}, but the run's model has {ref.fingerprint}: every "
            "node must read the same model (the same files at the same path, the same quada and transformers)"
        )
    if ref.device is not None and model.device.type != ref.device:
        raise QuadaError(
            f"{ref.source} runs on {model.device.type} here, but the run's rows are keyed as computed on {ref.device}: "
            "start the command on a machine with the workers' kind of device (and the same --device), so that "
            "each row's key says where it was computed"
        )


@dataclass
class Usage:
    """What an executor's ``workers`` did: ``wall`` seconds with units pending, and per kind of unit
    the units run and the worker-seconds they took (``loading`` of them loading models)."""

    workers: int
    wall: float = 0.0
    loading: float = 0.0
    units: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)

    def record(self, kind: str, busy: float, loading: float) -> None:
        self.units[kind] += 1
        self.seconds[kind] += busy
        self.loading += loading

    @property
    def busy(self) -> float:
        """Worker-seconds spent running units."""
        return sum(self.seconds.values())

    @property
    def share(self) -> float | None:
        """The workers' busy share: busy worker-seconds over the worker-seconds units were pending."""
        return self.busy / (self.wall * self.workers) if self.wall > 0 else None

    def line(self) -> str:
        """One line for a log: the busy share, the span, and the units with their mean seconds."""
        share = "-" if self.share is None else f"{self.share:.0%}"
        units = "; ".join(f"{n} {kind} units, {self.seconds[kind] / n:.1f} s each" for kind, n in sorted(self.units.items()))
        return (f"{self.workers} worker{'s' * (self.workers != 1)} busy {share} of {self.wall:.0f} s "
                f"({units or 'no units'}; {self.loading:.0f} s of the busy time loading models)")


class Executor(Protocol):
    """Runs units of work where their models are. ``workers``: how many units it runs at once."""

    workers: int
    usage: Usage

    def provide(self, ref: ModelRef, model, tokenizer) -> None:
        """A model the driver has loaded: this process computes on it, a pool's workers load their own."""

    def release(self, ref: ModelRef) -> None:
        """No unit will need ``ref``'s model any more: let it go."""

    def submit(self, unit) -> None:
        """Queue ``unit`` (a small value that pickles, with ``model``, ``kind``, ``size`` and ``run(models)``)."""

    def completed(self) -> Iterator[tuple[Any, Any]]:
        """``(unit, result)`` of every queued unit as soon as it finishes, in any order, until none is
        left (units submitted meanwhile included). A unit that fails stops the iteration with an error
        that names it; the caller stores each result before asking for the next."""

    def close(self) -> None:
        """Stop whatever the executor started."""


def run_units(executor: Executor, units: Sequence) -> list:
    """The results of ``units``, in their order, computed on ``executor`` (all at once)."""
    for unit in units:
        executor.submit(unit)
    results = {id(unit): result for unit, result in executor.completed()}
    return [results[id(unit)] for unit in units]


class LocalExecutor:
    """Runs every unit in this process, one after the other in the order submitted, on models loaded
    on ``device`` (the driver's own copy where it provides one)."""

    workers = 1

    def __init__(self, device: str = "auto"):
        self.models = Models(device)
        self.usage = Usage(self.workers)
        self._queue: deque = deque()

    def provide(self, ref: ModelRef, model, tokenizer) -> None:
        self.models.add(ref, model, tokenizer)

    def release(self, ref: ModelRef) -> None:
        self.models.release(ref)

    def submit(self, unit) -> None:
        self._queue.append(unit)

    def completed(self) -> Iterator[tuple[Any, Any]]:
        began = time.perf_counter()
        try:
            while self._queue:
                unit = self._queue.popleft()
                loading, started = self.models.loading_seconds, time.perf_counter()
                result = unit.run(self.models)
                self.usage.record(unit.kind, time.perf_counter() - started, self.models.loading_seconds - loading)
                yield unit, result
        finally:
            self._queue.clear()  # an interrupted run leaves nothing queued for the next
            self.usage.wall += time.perf_counter() - began

    def close(self) -> None:
        self._queue.clear()
        self.models.close_backend()

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_executor(config) -> Executor:
    """The executor that ``config.executor`` names: this process, or a pool of Ray workers that load
    each model a unit names on ``config.device``. Ray is imported only when it is asked for."""
    if config.executor == "local":
        return LocalExecutor(config.device)
    from quada.engine.ray_executor import RayExecutor

    return RayExecutor(device=config.device, workers=config.workers, cpus_per_worker=config.cpus_per_worker,
                       gpus_per_worker=config.gpus_per_worker, judge_workers=config.judge_workers,
                       address=config.ray_address, placement_timeout=config.placement_timeout)
