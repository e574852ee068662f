"""The Ray executor on a simulated multi-node cluster (``ray.cluster_utils.Cluster``: a head node and
a worker node, separate raylets on this machine's loopback): the rows of the local executor, a worker
killed and a node removed mid-run (their units run again, nothing lost or duplicated), a failing unit
named at once, missing resources refused in time, torch threads per worker, a judge pool, and
`quada vet` on the cluster."""

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.cloudpickle
from ray.cluster_utils import Cluster

from quada.approx import parse_spec
from quada.data import Prompt
from quada.engine.executors import LocalExecutor
from quada.engine.plan import Engine, Plan
from quada.engine.ray_executor import (
    LOCAL_ADDRESS,
    LOCAL_RAY_ENVIRONMENT,
    RayExecutor,
    environment,
)
from quada.errors import QuadaError
from quada.measures.generate import GenerationSettings
from quada.models import load
from quada.store import CLEAN, Generation, Judgement, Store
from quada.testing import StopsAfter

# The workers cannot import this test module: the units it defines travel to them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NOISE = parse_spec("noise:site=up,dist=gaussian,std=0.5")
PROMPTS = [Prompt(f"p{i}", f"Tell me about item {i}" + " please" * (i % 3)) for i in range(12)]
CORPUS = "The quick brown fox jumps over the lazy dog. " * 40
NODE = {"node_ip_address": LOCAL_ADDRESS, "object_store_memory": 80 * 2**20}


@dataclass
class Options:
    """What the engine reads from a command's configuration."""

    run_dir: Path
    model: str
    judge_model: str
    seed: int = 0
    corpus: str = "fox"
    ppl_window: int = 32
    ppl_windows: int = 2
    settings: GenerationSettings = GenerationSettings(max_new_tokens=4)


@pytest.fixture(scope="module")
def cluster():
    """A head node of 1 CPU and a worker node of 3, with this process as the driver."""
    with environment(LOCAL_RAY_ENVIRONMENT):
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, **NODE})
        nodes.add_node(num_cpus=3, **NODE)
    ray.init(address=nodes.address, _node_ip_address=LOCAL_ADDRESS, log_to_driver=False)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def subject(model_dir):
    """The tiny model as a command loads it (float32, where a row does not depend on its batch)."""
    return (str(model_dir), *load(str(model_dir), dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def pool(cluster):
    """Two workers of one CPU each, spread over the two nodes."""
    with RayExecutor(device="cpu", workers=2) as executor:
        yield executor


@pytest.fixture(scope="module")
def local_rows(subject, tmp_path_factory):
    """The rows of the plan on the local executor, the reference every pool must store."""
    return measure_all(subject, tmp_path_factory.mktemp("local"), LocalExecutor("cpu"))


def measure_all(subject, folder: Path, executor) -> tuple[list[Generation], list[Judgement], dict]:
    """A vet's plan in one run folder: two conditions' responses, a rule judge's and a model judge's
    verdicts, perplexity; every stored row back."""
    source, model, tokenizer = subject
    with Store(folder / "results.sqlite") as store:
        engine = Engine(store, model, tokenizer, Options(folder, source, source), CORPUS, executor)
        judges = [engine.judge("keyword"), engine.judge("llm")]
        plan = Plan()
        for approximation in CLEAN, NOISE:
            responses = plan.responses(engine, engine.condition(approximation, PROMPTS))
            for judge in judges:
                plan.judged(engine, judge, responses)
            plan.perplexity(engine, approximation)
        plan.run()
        return store.rows(Generation), store.rows(Judgement), store.measurements()


def assert_same_rows(found, expected) -> None:
    """Generations, rule verdicts and perplexities equal; a model judge's scores equal up to float
    rounding (its batches were composed otherwise), its labels exactly."""
    (generations, judgements, values), (want_generations, want_judgements, want_values) = found, expected
    assert len(generations) == 2 * len(PROMPTS) and generations == want_generations
    assert values == want_values
    assert [j.key for j in judgements] == [j.key for j in want_judgements]  # each once: nothing lost or duplicated
    assert [j.label for j in judgements] == [j.label for j in want_judgements]
    rule = [(j, w) for j, w in zip(judgements, want_judgements) if j.key.judge.startswith("keyword")]
    assert len(rule) == 2 * len(PROMPTS) and all(j == w for j, w in rule)
    assert [j.score for j in judgements] == pytest.approx([j.score for j in want_judgements], abs=1e-6)


class Rewriting:
    """An executor that hands ``inner`` every unit as ``wrap`` makes it, and the results back under
    the units it was given."""

    def __init__(self, inner, wrap):
        self.inner, self.wrap = inner, wrap
        self.workers, self.usage = inner.workers, inner.usage
        self.given: dict[int, tuple[Any, Any]] = {}

    def provide(self, ref, model, tokenizer):
        self.inner.provide(ref, model, tokenizer)

    def release(self, ref):
        self.inner.release(ref)

    def submit(self, unit):
        wrapped = self.wrap(unit)
        self.given[id(wrapped)] = (wrapped, unit)
        self.inner.submit(wrapped)

    def completed(self):
        for wrapped, result in self.inner.completed():
            yield self.given.pop(id(wrapped))[1], result


@dataclass(frozen=True)
class Wrapped:
    """A unit that runs as ``unit`` does, after ``before()``."""

    unit: Any

    @property
    def model(self):
        return self.unit.model

    @property
    def kind(self):
        return self.unit.kind

    @property
    def size(self):
        return self.unit.size

    def __str__(self):
        return str(self.unit)

    def run(self, models):
        self.before()
        return self.unit.run(models)


@dataclass(frozen=True)
class KillsItsWorker(Wrapped):
    """The first generation unit to run kills its worker's process (its marker says it did)."""

    marker: Path = Path()

    def before(self):
        if self.unit.kind == "generation" and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class StallsOnNode(Wrapped):
    """The first generation unit to run on ``node`` says so (its marker) and waits for the node to go."""

    node: str = ""
    marker: Path = Path()

    def before(self):
        if self.unit.kind == "generation" and ray.get_runtime_context().get_node_id() == self.node \
                and not self.marker.exists():
            self.marker.touch()
            time.sleep(600)


@dataclass(frozen=True)
class Fails(Wrapped):
    """A generation unit whose work raises, every time; each try is logged."""

    log: Path = Path()

    def before(self):
        if self.unit.kind == "generation":
            with self.log.open("a") as f:
                f.write(f"{self.unit}\n")
            raise ValueError("this chunk cannot be generated")


@dataclass(frozen=True)
class NotesItsWorker(Wrapped):
    """A unit that logs the kind of work and the process that ran it."""

    log: Path = Path()

    def before(self):
        with self.log.open("a") as f:
            f.write(f"{self.unit.kind} {os.getpid()}\n")


def test_a_pool_spread_over_two_nodes_stores_the_rows_of_the_local_executor(pool, subject, local_rows, tmp_path):
    workers = pool.describe()
    assert len({w["node"] for w in workers}) == 2 and [w["threads"] for w in workers] == [1, 1]
    assert_same_rows(measure_all(subject, tmp_path, pool), local_rows)
    assert pool.usage.units["generation"] >= 4 and pool.usage.units["judging"] >= 4
    assert 0 < pool.usage.share <= 1


def test_a_worker_killed_mid_run_has_its_unit_run_again(pool, subject, local_rows, tmp_path):
    marker = tmp_path / "killed"
    executor = Rewriting(pool, lambda unit: KillsItsWorker(unit, marker))
    assert_same_rows(measure_all(subject, tmp_path, executor), local_rows)
    assert marker.exists()  # a worker was killed; Ray restarted it, and its unit ran again


def test_a_unit_whose_work_fails_stops_the_run_at_once_named(pool, subject, tmp_path):
    log = tmp_path / "tries.log"
    with pytest.raises(QuadaError, match=(
            r"the chunk of \d+ prompts from 'p\d+' under '(none|noise:.*)' on .* failed on a Ray worker: ValueError: this "
            r"chunk cannot be generated\. A failure of the work itself is not retried .*its rows were not stored")):
        measure_all(subject, tmp_path, Rewriting(pool, lambda unit: Fails(unit, log)))
    tries = log.read_text().splitlines()
    assert tries and len(tries) == len(set(tries))  # no unit was tried twice
    with Store(tmp_path / "results.sqlite") as store:
        assert store.rows(Generation) == []


def test_missing_resources_fail_within_the_placement_timeout(cluster):
    executor = RayExecutor(device="cpu", workers=1, gpus_per_worker=1, placement_timeout=1)
    with pytest.raises(QuadaError, match=r"could not place 1 workers of 1 CPUs and 1 GPUs each within 1 s \(it has \d+ "
                                         r"CPUs and 0 GPUs.*--placement-timeout"):
        executor.start()


def test_torch_threads_follow_the_cpus_of_a_worker(cluster):
    with RayExecutor(device="cpu", workers=1, cpus_per_worker=2) as executor:
        assert [w["threads"] for w in executor.describe()] == [2]


def test_a_killed_run_resumes_on_the_pool_to_the_same_rows(pool, subject, local_rows, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        measure_all(subject, tmp_path, StopsAfter(pool, chunks=3))
    with Store(tmp_path / "results.sqlite") as store:
        assert 0 < len(store.rows(Generation)) < 2 * len(PROMPTS)
    assert_same_rows(measure_all(subject, tmp_path, pool), local_rows)


def test_a_judge_pool_takes_every_verdict(cluster, subject, local_rows, tmp_path):
    log = tmp_path / "workers.log"
    with RayExecutor(device="cpu", workers=1, judge_workers=1) as executor:
        generator, judge = (w["pid"] for w in executor.describe())
        assert_same_rows(measure_all(subject, tmp_path, Rewriting(executor, lambda u: NotesItsWorker(u, log))), local_rows)
    ran = {tuple(line.split()) for line in log.read_text().splitlines()}
    assert {kind for kind, _ in ran} == {"generation", "judging", "measurement"}
    assert {pid for kind, pid in ran if kind == "judging"} == {str(judge)}
    assert {pid for kind, pid in ran if kind != "judging"} == {str(generator)}


def test_vet_on_the_cluster_logs_its_workers_busy_share(cluster, cli, model_dir, tmp_path):
    result = cli("vet", "-m", model_dir, "--device", "cpu", "--dtype", "float32", "--judges", "keyword",
                 "--limit", 8, "--benign-limit", 8, "--max-new-tokens", 4, "--ppl-windows", 1, "--no-calibrate",
                 "--approx", "noise:site=up,dist=gaussian,std=0.5", "--run-dir", tmp_path / "run",
                 "--executor", "ray", "--workers", 2)
    assert result.returncode == 0, result.stderr
    assert "Ray workers: 2 workers busy" in result.stdout and "generation" in result.stdout


def test_a_node_removed_mid_run_has_its_units_run_again(cluster, pool, subject, local_rows, tmp_path):
    # The pool holds a CPU of each node; a third node of one CPU makes room for a second pool of
    # three workers, one of them there.
    doomed = cluster.add_node(num_cpus=1, **NODE)
    marker = tmp_path / "stalled"

    def remove_when_stalled():
        while not marker.exists():
            time.sleep(0.2)
        cluster.remove_node(doomed)

    remover = threading.Thread(target=remove_when_stalled, daemon=True)
    with RayExecutor(device="cpu", workers=3) as executor:
        assert doomed.node_id in {w["node"] for w in executor.describe()}
        remover.start()
        stalling = Rewriting(executor, lambda unit: StallsOnNode(unit, doomed.node_id, marker))
        assert_same_rows(measure_all(subject, tmp_path, stalling), local_rows)
    remover.join(timeout=60)
    assert marker.exists() and not remover.is_alive()  # the node was lost with a unit on it
