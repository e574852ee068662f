"""The Ray executor on a local Ray instance it starts itself: started only for work, refused when it
cannot fit the machine, stopped when closed; and each command's executor options reach it (the
behaviour on a cluster is in test_ray_cluster.py)."""

import os

import pytest
import ray

import quada.analysis.layers
import quada.analysis.sweep
import quada.attack.run
import quada.vet
from quada.data import Prompt
from quada.engine.executors import LocalExecutor, make_executor, run_units
from quada.engine.plan import Chunk, Condition, dtype_name, generate_chunk
from quada.engine.ray_executor import RayExecutor, torch_threads
from quada.errors import QuadaError
from quada.fingerprint import model_fingerprint
from quada.measures.generate import GenerationSettings
from quada.models import load
from quada.options import EvalOptions
from quada.store import CLEAN


def test_the_executor_starts_ray_for_work_only_and_stops_what_it_started(model_dir):
    source = str(model_dir)
    model, tokenizer = load(source, dtype="float32", device="cpu")
    condition = Condition(source, model_fingerprint(model), CLEAN, (Prompt("p0", "Hello there"),),
                          GenerationSettings(max_new_tokens=3), 0, dtype_name(model.dtype), "cpu")
    too_many = os.cpu_count() + 1
    with pytest.raises(QuadaError, match=rf"{too_many} Ray workers with 1 CPUs and 0 GPUs each do not fit this machine"):
        RayExecutor(device="cpu", workers=too_many).start()  # at once, not after a wait
    assert not ray.is_initialized()  # the instance it started is stopped again
    executor = RayExecutor(device="cpu", workers=1)
    executor.provide(condition.model_ref, model, tokenizer)
    assert list(executor.completed()) == [] and not ray.is_initialized()  # nothing to run starts nothing
    chunk = Chunk(condition, ("p0",))
    assert run_units(executor, [chunk]) == [generate_chunk(model, tokenizer, chunk)]
    assert ray.is_initialized()
    executor.close()
    assert not ray.is_initialized()


def test_torch_threads_of_a_worker():
    assert [torch_threads(c) for c in (0.5, 1, 1.5, 2, 8)] == [1, 1, 1, 2, 8]


def test_make_executor_builds_the_executor_the_options_name(model_dir):
    assert isinstance(make_executor(EvalOptions(model=str(model_dir))), LocalExecutor)
    options = EvalOptions(model=str(model_dir), device="cpu", executor="ray", ray_address="auto", workers=3,
                          cpus_per_worker=0.5, gpus_per_worker=1, judge_workers=2, placement_timeout=90)
    executor = make_executor(options)
    assert isinstance(executor, RayExecutor) and executor.workers == 5
    assert (executor.device, executor.generators, executor.judge_workers, executor.cpus_per_worker,
            executor.gpus_per_worker, executor.address, executor.placement_timeout) == ("cpu", 3, 2, 0.5, 1, "auto", 90)


@pytest.mark.parametrize("command", ["vet --judges keyword", "sweep", "layers --spec bolt",
                                     "attack --attack direct --judges keyword"])
def test_the_executor_options_of_each_command_reach_its_engine(command, cli, model_dir, tmp_path, monkeypatch):
    seen = []

    def stop(config):
        seen.append(tuple(getattr(config, name) for name in (
            "executor", "ray_address", "workers", "cpus_per_worker", "gpus_per_worker", "judge_workers", "placement_timeout")))
        raise QuadaError("stopped before generating")

    for module in quada.vet, quada.analysis.sweep, quada.analysis.layers, quada.attack.run:
        monkeypatch.setattr(module, "make_executor", stop)
    result = cli(*command.split(), "-m", model_dir, "--device", "cpu", "--run-dir", tmp_path / "run", "--executor", "ray",
                 "--ray-address", "auto", "--workers", "3", "--cpus-per-worker", "0.5", "--gpus-per-worker", "1",
                 "--judge-workers", "1", "--placement-timeout", "45")
    result.assert_user_error("stopped before generating")
    assert seen == [("ray", "auto", 3, 0.5, 1.0, 1, 45.0)]

