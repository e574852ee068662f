"""Units of work on a pool of Ray workers: :class:`RayExecutor`, the executor of ``--executor ray``.

Each worker is a Ray actor with its own :class:`quada.engine.executors.Models`: it loads the subject
model as it starts (and shows its fingerprint before it gets any work), and any other model a unit
names (a judge model) on first use, keeping two at a time. Its torch computes on as many threads as
the CPUs Ray reserves for it (``cpus_per_worker``). Optionally a second pool of ``judge_workers``
takes the verdicts, so the first only generates.

The driver keeps one unit in flight per worker, gives an idle worker the next unit of a model it
holds when there is one, and hands each result back as it comes, in any order: the engine, the only
writer of the results store, commits it. Failures:

- a worker or its node that dies (killed, out of memory, a lost machine) loses its unit, which goes
  back to the queue for the next free worker; Ray restarts the worker (it loads its models again)
  when the cluster has room for it. A unit lost :data:`RETRIES` + 1 times stops the run;
- a unit whose work raises (a bad spec, a model that does not load, a judge of another identity)
  would raise again: it stops the run at once, with one message that names it and the error;
- workers that cannot be placed (a cluster without the resources they ask for) fail the start
  within ``placement_timeout`` seconds instead of waiting for ever, and so does a run whose lost
  workers do not come back within that time.

Without an address the executor starts a local Ray instance (with a small object store: units and
results are text and a few token ids) and stops it when closed or dropped; with one it joins that
cluster and leaves it running. Ray is imported here, and this module only where Ray is asked for
(:func:`quada.engine.executors.make_executor`), so the command line stays light.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from quada.engine.executors import ModelRef, Models, Usage
from quada.errors import QuadaError, cleanup_after

LOCAL_OBJECT_STORE_BYTES = 128 * 2**20  # Ray's minimum is 75 MiB; units and results are a few kB
# A local instance talks over the loopback only. Ray swaps 127.0.0.1 for the machine's network
# address (except on macOS, whose loopback has no other address), but keeps the rest of 127/8.
LOCAL_ADDRESS = "127.0.0.1" if sys.platform == "darwin" else "127.0.0.2"
# What Ray's own processes start with when this executor starts them: no usage reports, and the
# cloud-metadata probes of Ray's API server (plain http to 169.254.169.254) end at a closed local port.
LOCAL_RAY_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0", "http_proxy": "http://127.0.0.1:9"}
RETRIES = 2  # tries of a unit lost with its worker, after its first; and restarts of a dead worker
PLACEMENT_TIMEOUT = 30.0  # seconds to wait for room for the workers (at the start, and after losing some)
POLL_SECONDS = 1.0  # how often the driver looks up from waiting for results, to check on lost workers
JUDGING = "judging"


class ModelWorker:
    """One Ray actor: the models of the units it runs, and the units' work."""

    def __init__(self, device: str, threads: int, preload: ModelRef | None):
        import torch

        torch.set_num_threads(threads)
        self.models = Models(device)
        if preload is not None:
            self.models.get(preload)

    def ready(self) -> dict:
        """What the worker is: its torch threads and its node."""
        import torch

        return {"threads": torch.get_num_threads(), "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def run(self, unit) -> tuple[Any, float, float]:
        """The unit's result, the seconds it took and of them the seconds spent loading models."""
        loading, started = self.models.loading_seconds, time.perf_counter()
        result = unit.run(self.models)
        return result, time.perf_counter() - started, self.models.loading_seconds - loading

    def release(self, ref: ModelRef) -> None:
        self.models.release(ref)


class _Worker:
    """The driver's view of one actor: whether it is free, what it judges, which models it holds."""

    def __init__(self, actor, judges_only: bool, preload: ModelRef | None):
        self.actor, self.judges_only = actor, judges_only
        self.preload = preload
        self.idle = True
        self.holds = self._fresh()

    def _fresh(self) -> set:
        return {None} | ({self.preload.slot} if self.preload else set())

    def restarted(self) -> None:
        """A restarted actor holds only what it loads as it starts."""
        self.holds = self._fresh()


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """This process's environment with ``values`` set, for the processes it starts meanwhile."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def failure(err: RayError) -> str:
    """A Ray failure in one line: the exception the work raised, or why its worker died."""
    if isinstance(err, RayTaskError) and err.cause is not None:
        return f"{type(err.cause).__name__}: {err.cause}"
    # Ray's first lines say that a worker died; its last names the error that ended it.
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def torch_threads(cpus_per_worker: float) -> int:
    """Torch threads of a worker that Ray reserves ``cpus_per_worker`` CPUs for (one at least)."""
    return max(1, math.floor(cpus_per_worker))


class RayExecutor:
    """Runs units of work on ``workers`` Ray actors (and ``judge_workers`` that only judge), each
    reserving ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs and loading models on ``device``.
    The actors start on the first unit, so a run whose rows are all stored starts no Ray at all."""

    def __init__(self, *, device: str = "auto", workers: int = 2, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, judge_workers: int = 0, address: str | None = None,
                 retries: int = RETRIES, placement_timeout: float = PLACEMENT_TIMEOUT):
        self.device, self.address = device, address
        self.generators, self.judge_workers = workers, judge_workers
        self.cpus_per_worker, self.gpus_per_worker = cpus_per_worker, gpus_per_worker
        self.retries, self.placement_timeout = retries, placement_timeout
        self.workers = workers + judge_workers
        self.usage = Usage(self.workers)
        self._preload: ModelRef | None = None
        self._pool: list[_Worker] = []
        self._group = None
        self._queue: deque = deque()
        self._running: dict[ray.ObjectRef, tuple[Any, _Worker]] = {}
        self._recovering: dict[ray.ObjectRef, tuple[_Worker, float]] = {}
        self._lost: dict[int, int] = {}  # times each queued unit (by id) was lost with its worker
        self._start_seconds = 0.0  # how long the workers took to start and load their model
        self._disconnect: weakref.finalize | None = None

    def provide(self, ref: ModelRef, model, tokenizer) -> None:
        """The workers load the first model provided as they start (the driver's copy stays here)."""
        if self._preload is None:
            self._preload = ref

    def release(self, ref: ModelRef) -> None:
        for worker in self._pool:
            worker.actor.release.remote(ref)
            worker.holds.discard(ref.slot)

    def submit(self, unit) -> None:
        self._queue.append(unit)

    def completed(self) -> Iterator[tuple[Any, Any]]:
        """Each unit's result as it comes, while one unit runs on every worker that has one to do."""
        if not self._queue:
            return
        self.start()
        began = time.perf_counter()
        try:
            while self._queue or self._running:
                self._dispatch()
                if not self._running:
                    self._await_workers()
                    continue
                ready, _ = ray.wait([*self._running, *self._recovering], num_returns=1, timeout=POLL_SECONDS)
                for ref in ready:
                    if ref in self._recovering:
                        self._recovered(ref)
                    elif (done := self._finished(ref)) is not None:
                        yield done
        finally:
            self.usage.wall += time.perf_counter() - began
            # Stopped early (an error, or the caller stopped): what was queued or running is dropped.
            self._queue.clear()
            self._running.clear()
            recovering = {id(worker) for worker, _ in self._recovering.values()}
            for worker in self._pool:
                worker.idle = id(worker) not in recovering

    def _dispatch(self) -> None:
        """Give every idle worker a unit: the first queued one of a model it holds, else the first it may take."""
        for worker in self._pool:
            if not worker.idle or not self._queue:
                continue
            eligible = [u for u in self._queue if self._takes(worker, u)]
            if not eligible:
                continue
            unit = next((u for u in eligible if (u.model and u.model.slot) in worker.holds), eligible[0])
            self._queue.remove(unit)
            worker.idle = False
            self._running[worker.actor.run.remote(unit)] = (unit, worker)

    def _takes(self, worker: _Worker, unit) -> bool:
        """Judge workers take only verdicts; the others take everything else, and verdicts too when no
        judge worker is left."""
        judging = unit.kind == JUDGING
        if worker.judges_only:
            return judging
        return not judging or not any(w.judges_only for w in self._pool)

    def _finished(self, ref) -> tuple[Any, Any] | None:
        """The unit and its result, or ``None`` when its worker was lost (the unit is queued again)."""
        unit, worker = self._running.pop(ref)
        try:
            result, busy, loading = ray.get(ref)
        except RayTaskError as err:
            raise QuadaError(
                f"{unit} failed on a Ray worker: {failure(err)}. A failure of the work itself is not retried (it would "
                "fail again); its rows were not stored: fix the cause and run the command again to continue"
            ) from err
        except RayError as err:
            lost = self._lost[id(unit)] = self._lost.get(id(unit), 0) + 1
            if lost > self.retries:
                raise QuadaError(
                    f"{unit} was lost with its Ray worker {lost} times (last: {failure(err)}); its rows were not "
                    "stored: check the workers' memory and nodes, then run the command again to continue"
                ) from err
            self._queue.appendleft(unit)
            self._recover(worker)
            return None
        self._lost.pop(id(unit), None)
        worker.idle = True
        worker.holds.add(unit.model and unit.model.slot)
        self.usage.record(unit.kind, busy, loading)
        return unit, result

    def _recover(self, worker: _Worker) -> None:
        """Wait for a lost worker to be restarted by Ray (it answers once it has loaded its model)."""
        worker.restarted()
        self._recovering[worker.actor.ready.remote()] = (worker, time.monotonic())

    def _recovered(self, ref) -> None:
        worker, _ = self._recovering.pop(ref)
        try:
            ray.get(ref)
        except RayError:  # out of restarts, or it cannot load its model any more: gone for good
            self._pool.remove(worker)
            return
        worker.idle = True

    def _await_workers(self) -> None:
        """Units wait and no worker runs one: wait for lost workers to come back, as long as a restart
        takes (the placement timeout and twice the time the workers took to load their model)."""
        if not self._recovering:
            raise QuadaError(
                f"no Ray worker is left to run {self._queue[0]} and {len(self._queue) - 1} more units (every worker was "
                "lost); the rows done so far are stored: check the cluster's nodes, then run the command again to continue"
            )
        patience = self.placement_timeout + 2 * self._start_seconds
        oldest = min(since for _, since in self._recovering.values())
        ready, _ = ray.wait(list(self._recovering), num_returns=1, timeout=max(patience - (time.monotonic() - oldest), 0))
        if not ready:
            raise QuadaError(
                f"the lost Ray workers did not come back within {patience:.0f} s (the cluster has no room to restart "
                f"them), and {len(self._queue)} units wait; the rows done so far are stored: add nodes or lower "
                "--workers, then run the command again to continue"
            )
        for ref in ready:
            self._recovered(ref)

    def start(self) -> list:
        """The actors, started now if they are not (:meth:`completed` starts them for its first unit),
        and Ray joined or started with them; on any failure nothing that was started stays behind."""
        if self._pool:
            return [w.actor for w in self._pool]
        with cleanup_after(self.close, on_success=False):  # a failure to clean up must not hide why it failed
            self._connect()
            self._place()
            actor = ray.remote(ModelWorker)
            threads = torch_threads(self.cpus_per_worker)
            for index in range(self.workers):
                judges_only = index >= self.generators
                preload = None if judges_only else self._preload
                placed = actor.options(
                    num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, max_restarts=self.retries,
                    max_task_retries=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=index))
                self._pool.append(_Worker(placed.remote(self.device, threads, preload), judges_only, preload))
            started = time.monotonic()
            self._check_workers()
            self._start_seconds = time.monotonic() - started
        return [w.actor for w in self._pool]

    def describe(self) -> list[dict]:
        """Each worker's torch threads, node and process (starting the workers if they are not)."""
        self.start()
        return ray.get([w.actor.ready.remote() for w in self._pool])

    def _check_workers(self) -> None:
        """Wait until every worker has loaded its model (and shown its fingerprint)."""
        try:
            ray.get([w.actor.ready.remote() for w in self._pool])
        except RayError as err:
            source = self._preload.source if self._preload else "its model"
            raise QuadaError(
                f"a Ray worker could not load the model {source} ({failure(err)}); each worker loads it itself, so it "
                "must be there on every node: a built-in installed there, a folder at the same path, or a hub id the "
                "nodes can fetch"
            ) from err

    def _place(self) -> None:
        """Reserve every worker's resources at once, spread over the nodes, or fail within the timeout."""
        bundle = {"CPU": self.cpus_per_worker} | ({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {})
        self._group = placement_group([bundle] * self.workers, strategy="SPREAD")
        if not self._group.wait(self.placement_timeout):
            have, free = ray.cluster_resources(), ray.available_resources()
            # A pending group would take its resources whenever they free up, long after this run failed.
            remove_placement_group(self._group)
            self._group = None
            raise QuadaError(
                f"the Ray cluster could not place {self.workers} workers of {self.cpus_per_worker:g} CPUs and "
                f"{self.gpus_per_worker:g} GPUs each within {self.placement_timeout:g} s (it has "
                f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs, {free.get('CPU', 0):g} and "
                f"{free.get('GPU', 0):g} free); lower --workers, --judge-workers, --cpus-per-worker or "
                "--gpus-per-worker, add nodes, or on a cluster that scales up give it time with --placement-timeout"
            )

    def _connect(self) -> None:
        """Join the cluster at the address, or start a local instance; the one already joined in
        this process is used as it is (and left to whoever joined it)."""
        if ray.is_initialized():
            return
        if self.address is None:
            with environment(LOCAL_RAY_ENVIRONMENT):
                ray.init(object_store_memory=LOCAL_OBJECT_STORE_BYTES, include_dashboard=False,
                         _node_ip_address=LOCAL_ADDRESS, logging_level=logging.WARNING, log_to_driver=False)
        else:
            try:
                ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise QuadaError(
                    f"cannot join the Ray cluster at {self.address} ({err}); start it (ray start --head) or omit "
                    "--ray-address to run on a local Ray instance"
                ) from err
        self._disconnect = weakref.finalize(self, ray.shutdown)
        if self.address is None:
            self._check_local_resources()

    def _check_local_resources(self) -> None:
        """Fail now on workers that the local instance could never place."""
        have = ray.cluster_resources()
        cpus, gpus = have.get("CPU", 0), have.get("GPU", 0)
        if self.workers * self.cpus_per_worker > cpus or self.workers * self.gpus_per_worker > gpus:
            raise QuadaError(
                f"{self.workers} Ray workers with {self.cpus_per_worker:g} CPUs and {self.gpus_per_worker:g} GPUs "
                f"each do not fit this machine ({cpus:g} CPUs, {gpus:g} GPUs); lower --workers, --judge-workers, "
                "--cpus-per-worker or --gpus-per-worker, or join a cluster with --ray-address"
            )

    def close(self) -> None:
        """Stop the workers, and the Ray instance this executor started (or leave the cluster it joined)."""
        for worker in self._pool:
            ray.kill(worker.actor, no_restart=True)
        self._pool, self._queue, self._running, self._recovering = [], deque(), {}, {}
        if self._group is not None:
            remove_placement_group(self._group)
            self._group = None
        if self._disconnect is not None:
            self._disconnect()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
