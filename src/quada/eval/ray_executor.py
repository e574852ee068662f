"""Generation on a pool of Ray workers: :class:`RayExecutor`, the executor of ``--executor ray``.

Each worker is a Ray actor that loads the subject model once, from the source the driver loaded
it from, and shows that it holds the driver's weights (their fingerprint) before it gets any
work. The driver keeps one unit in flight per worker, a few units ahead at most, and yields the
results in the order of the units, so the engine, the only writer of the results store, commits
each chunk as before. A unit whose worker raised or died is run again (a dead worker is
restarted by Ray and loads the model again); one that keeps failing stops the run with a
``QuadaError`` that names it.

Without an address the executor starts a local Ray instance (with a small object store: the
units and results are text) and stops it when closed or dropped; with one it joins that cluster
and leaves it running. Ray is imported here, and this module only where Ray is asked for
(:func:`quada.eval.engine.make_executor`), so the command line stays light.
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from quada.errors import QuadaError
from quada.fingerprint import model_fingerprint
from quada.models import load

LOCAL_OBJECT_STORE_BYTES = 128 * 2**20  # Ray's minimum is 75 MiB; chunks and responses are a few kB
# A local instance talks over the loopback only. Ray swaps 127.0.0.1 for the machine's network
# address (except on macOS, whose loopback has no other address), but keeps the rest of 127/8.
LOCAL_ADDRESS = "127.0.0.1" if sys.platform == "darwin" else "127.0.0.2"
# What Ray's own processes start with when this executor starts them: no usage reports, and the
# cloud-metadata probes of Ray's API server (plain http to 169.254.169.254) end at a closed local port.
LOCAL_RAY_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0", "http_proxy": "http://127.0.0.1:9"}
RETRIES = 2  # tries of a failed unit after its first, and restarts of a dead worker
AHEAD = 2  # units started beyond the next one to yield, per worker: bounds what a killed driver loses


class ModelWorker:
    """One Ray actor: the subject model, loaded once, and the work run on it."""

    def __init__(self, source: str, dtype, device: str):
        self.model, self.tokenizer = load(source, dtype=dtype, device=device)

    def fingerprint(self) -> str:
        return model_fingerprint(self.model)

    @ray.method(retry_exceptions=True)
    def run(self, work: Callable, unit: Any) -> Any:
        return work(self.model, self.tokenizer, unit)


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


def check_fingerprints(source: str, driver: str, workers: Sequence[str]) -> None:
    """Fail unless every worker loaded the weights the driver holds."""
    for found in workers:
        if found != driver:
            raise QuadaError(
                f"a Ray worker loaded {source} with fingerprint {found}, but the driver's model has {driver}: every "
                "node must read the same model (the same files at the same path, the same quada and transformers)"
            )


class RayExecutor:
    """Runs units of work on ``workers`` Ray actors, each holding the model loaded from ``source``
    (``dtype``, ``device``) whose fingerprint must be ``fingerprint``. The actors start on the
    first unit, so a run whose rows are all stored starts no Ray at all."""

    def __init__(self, source: str, fingerprint: str, *, dtype, device: str, workers: int = 2,
                 cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, address: str | None = None,
                 retries: int = RETRIES):
        self.source, self.fingerprint, self.dtype, self.device = source, fingerprint, dtype, device
        self.workers, self.cpus_per_worker, self.gpus_per_worker = workers, cpus_per_worker, gpus_per_worker
        self.address, self.retries = address, retries
        self._actors: list = []
        self._disconnect: weakref.finalize | None = None

    def run(self, units: Sequence[Any], work: Callable[[Any, Any, Any], Any]) -> Iterator[Any]:
        """Each unit's result, in the order of ``units``, while up to one unit per worker runs."""
        if not units:
            return
        idle = list(self.start())
        horizon = AHEAD * len(idle)
        running: dict[ray.ObjectRef, tuple[int, Any]] = {}
        done: dict[int, Any] = {}
        started = 0
        for index in range(len(units)):
            while index not in done:
                while idle and started < min(len(units), index + horizon):
                    actor = idle.pop()
                    running[actor.run.remote(work, units[started])] = (started, actor)
                    started += 1
                [ready], _ = ray.wait(list(running), num_returns=1)
                finished, actor = running.pop(ready)
                idle.append(actor)
                try:
                    done[finished] = ray.get(ready)
                except RayError as err:
                    raise QuadaError(
                        f"{units[finished]} failed {self.retries + 1} times on the Ray workers: {failure(err)}. "
                        "Its rows were not stored; fix the cause and run the command again to continue"
                    ) from err
            yield done.pop(index)

    def start(self) -> list:
        """The actors, started now if they are not (:meth:`run` starts them on its first unit), and
        Ray joined or started with them; on any failure nothing that was started stays behind."""
        if self._actors:
            return self._actors
        try:
            self._connect()
            # Ray runs a unit again when its worker raised or died (and restarts a dead worker).
            actor = ray.remote(ModelWorker).options(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker,
                                                    max_restarts=self.retries, max_task_retries=self.retries)
            self._actors = [actor.remote(self.source, self.dtype, self.device) for _ in range(self.workers)]
            self._check_workers()
        except BaseException:
            self.close()
            raise
        return self._actors

    def _check_workers(self) -> None:
        """Wait until every worker has loaded the model; fail unless each holds the driver's weights."""
        try:
            found = ray.get([a.fingerprint.remote() for a in self._actors])
        except RayError as err:
            raise QuadaError(
                f"a Ray worker could not load the model {self.source} ({failure(err)}); each worker loads it "
                "itself, so it must be there on every node: a built-in installed there, a folder at the same path, "
                "or a hub id the nodes can fetch"
            ) from err
        check_fingerprints(self.source, self.fingerprint, found)

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
        """Fail now on workers that the local instance could never place (Ray would wait forever)."""
        have = ray.cluster_resources()
        cpus, gpus = have.get("CPU", 0), have.get("GPU", 0)
        if self.workers * self.cpus_per_worker > cpus or self.workers * self.gpus_per_worker > gpus:
            raise QuadaError(
                f"{self.workers} Ray workers with {self.cpus_per_worker:g} CPUs and {self.gpus_per_worker:g} GPUs "
                f"each do not fit this machine ({cpus:g} CPUs, {gpus:g} GPUs); lower --workers, --cpus-per-worker "
                "or --gpus-per-worker, or join a cluster with --ray-address"
            )

    def close(self) -> None:
        """Stop the workers, and the Ray instance this executor started (or leave the cluster it joined)."""
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._disconnect is not None:
            self._disconnect()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
