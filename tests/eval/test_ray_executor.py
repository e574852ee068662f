"""The Ray executor on a local Ray instance: the rows of the local executor, a killed run that
resumes, a dead worker replaced, a chunk that keeps failing named, and Ray stopped when closed."""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import ray.cloudpickle

import quada.analysis.layers
import quada.analysis.sweep
import quada.eval.engine as engine_module
import quada.vet
from quada.approx import apply, parse_spec
from quada.data import Prompt
from quada.errors import QuadaError
from quada.eval.engine import Chunk, Condition, Engine, LocalExecutor, dtype_name, generate_chunk, make_executor
from quada.eval.generate import GenerationSettings, generate
from quada.eval.ray_executor import RayExecutor, check_fingerprints
from quada.fingerprint import model_fingerprint
from quada.models import load
from quada.options import EvalOptions
from quada.store import CLEAN, Generation, Store

# The workers cannot import this test module: its work functions travel to them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NOISE = parse_spec("noise:site=up,dist=gaussian,std=0.5")
PROMPTS = [Prompt(f"p{i}", f"Tell me about item {i}" + " please" * (i % 3)) for i in range(7)]


@dataclass
class Options:
    """What the engine reads from a command's configuration."""

    run_dir: Path
    model: str
    seed: int = 0
    settings: GenerationSettings = GenerationSettings(max_new_tokens=4)


@pytest.fixture(scope="module")
def subject(model_dir):
    """The tiny model as a command loads it: its source, the model and its tokenizer (float32, where a
    row does not depend on the batch it was generated in)."""
    return (str(model_dir), *load(str(model_dir), dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def pool(subject):
    """Two Ray workers of one CPU each, on a local Ray instance the executor starts itself."""
    source, model, _ = subject
    executor = RayExecutor(source, model_fingerprint(model), dtype=model.dtype, device="cpu", workers=2)
    yield executor
    executor.close()


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(engine_module, "GENERATION_CHUNK", 2)  # 4 chunks of 7 prompts


def generate_all(path, subject, executor) -> list[Generation]:
    """Every stored response of the clean and the noisy condition, generated through ``executor``."""
    source, model, tokenizer = subject
    with Store(path) as store:
        engine = Engine(store, model, tokenizer, Options(path.parent, source), executor=executor)
        for approximation in (CLEAN, NOISE):
            engine.responses(engine.condition(approximation, PROMPTS))
        return store.rows(Generation)


class StopsAfter:
    """An executor that hands over ``chunks`` results of ``inner`` and then stops, as a killed driver does."""

    def __init__(self, inner, chunks: int):
        self.inner, self.left = inner, chunks

    def run(self, units, work):
        for result in self.inner.run(units, work):
            if self.left == 0:
                raise KeyboardInterrupt
            self.left -= 1
            yield result


def test_ray_stores_exactly_the_rows_of_the_local_executor(pool, subject, tmp_path, small_chunks):
    _, model, tokenizer = subject
    local = generate_all(tmp_path / "local.sqlite", subject, LocalExecutor(model, tokenizer))
    assert generate_all(tmp_path / "ray.sqlite", subject, pool) == local
    assert len(local) == 2 * len(PROMPTS)
    clean = [g for g in local if g.key.approx == CLEAN]
    noisy = [g for g in local if g.key.approx == str(NOISE)]
    assert [g.response for g in clean] != [g.response for g in noisy]  # the noise reached the workers
    # And each row is the prompt's response alone, with its own draws.
    settings = Options.settings
    for prompt in PROMPTS:
        with apply(model, NOISE, seed=0, tokenizer=tokenizer):
            alone = generate(model, tokenizer, [prompt.text], settings, progress=False, prompt_ids=[prompt.id])
        assert alone == [g.response for g in noisy if g.key.prompt_id == prompt.id]


def test_a_killed_run_resumes_on_ray_to_the_same_rows_without_duplicates(pool, subject, tmp_path, small_chunks):
    _, model, tokenizer = subject
    whole = generate_all(tmp_path / "whole.sqlite", subject, LocalExecutor(model, tokenizer))
    split = tmp_path / "split.sqlite"
    with pytest.raises(KeyboardInterrupt):
        generate_all(split, subject, StopsAfter(pool, chunks=5))  # the clean condition's 4 chunks, 1 noisy
    with Store(split) as store:
        assert len(store.rows(Generation)) == len(PROMPTS) + 2
    assert generate_all(split, subject, pool) == whole


def dies_once(model, tokenizer, unit):
    """A chunk's responses, but the first worker to meet ``marker`` missing creates it and dies."""
    marker, chunk = unit
    if not marker.exists():
        marker.touch()
        os._exit(1)
    return generate_chunk(model, tokenizer, chunk)


def noisy_chunks(subject, *prompt_ids: tuple[str, ...]) -> list[Chunk]:
    source, model, _ = subject
    condition = Condition(source, model_fingerprint(model), NOISE, tuple(PROMPTS), Options.settings, 0,
                          dtype_name(model.dtype), model.device.type)
    return [Chunk(condition, ids) for ids in prompt_ids]


def test_a_worker_that_dies_is_restarted_and_its_chunk_run_again(pool, subject, tmp_path):
    _, model, tokenizer = subject
    chunks = noisy_chunks(subject, ("p0", "p1"), ("p2", "p3"), ("p4", "p5"))
    markers = [tmp_path / f"seen-{i}" for i in range(3)]
    for marker in markers[0], markers[2]:
        marker.touch()
    results = list(pool.run(list(zip(markers, chunks)), dies_once))
    assert markers[1].exists()  # the second chunk's worker died once
    assert results == [generate_chunk(model, tokenizer, chunk) for chunk in chunks]


def test_a_chunk_that_keeps_failing_is_named_and_nothing_is_stored(pool, subject, tmp_path):
    source, model, tokenizer = subject
    beyond = parse_spec("noise:site=up,dist=gaussian,std=0.5,layers=7")  # the model has 2 layers
    with Store(tmp_path / "r.sqlite") as store:
        engine = Engine(store, model, tokenizer, Options(tmp_path, source), executor=pool)
        with pytest.raises(QuadaError, match=(
                r"the chunk of 7 prompts from 'p\d' under 'noise:.*layers=7' on .*tiny.* \(seed 0\) failed 3 times on "
                r"the Ray workers: QuadaError: layer 7 .* out of range .*Its rows were not stored")):
            engine.responses(engine.condition(beyond, PROMPTS))
        assert store.rows(Generation) == []


def test_closing_stops_the_ray_instance_the_executor_started(pool, subject):
    _, model, tokenizer = subject
    [chunk] = noisy_chunks(subject, ("p6",))
    assert list(pool.run([chunk], generate_chunk)) == [generate_chunk(model, tokenizer, chunk)]
    assert ray.is_initialized()
    pool.close()
    assert not ray.is_initialized()
    assert list(pool.run([], generate_chunk)) == []  # nothing to run starts nothing
    assert not ray.is_initialized()


def test_make_executor_builds_the_executor_the_options_name(subject):
    source, model, tokenizer = subject
    assert isinstance(make_executor(EvalOptions(model=source), model, tokenizer), LocalExecutor)
    options = EvalOptions(model=source, device="cpu", executor="ray", ray_address="auto", workers=3,
                          cpus_per_worker=0.5, gpus_per_worker=1)
    executor = make_executor(options, model, tokenizer)
    assert isinstance(executor, RayExecutor)
    assert (executor.source, executor.fingerprint, executor.dtype, executor.device) == (
        source, model_fingerprint(model), model.dtype, "cpu")
    assert (executor.workers, executor.cpus_per_worker, executor.gpus_per_worker, executor.address) == (3, 0.5, 1, "auto")


def test_a_worker_with_other_weights_is_refused():
    check_fingerprints("tiny", "abc", ["abc", "abc"])
    with pytest.raises(QuadaError, match="a Ray worker loaded tiny with fingerprint abd, but the driver's model has abc"):
        check_fingerprints("tiny", "abc", ["abc", "abd"])


@pytest.mark.parametrize("command", ["vet --judges keyword", "sweep", "layers --spec bolt"])
def test_the_executor_options_of_each_command_reach_its_engine(command, cli, model_dir, tmp_path, monkeypatch):
    seen = []

    def stop(config, model, tokenizer):
        seen.append((config.executor, config.ray_address, config.workers, config.cpus_per_worker, config.gpus_per_worker))
        raise QuadaError("stopped before generating")

    for module in quada.vet, quada.analysis.sweep, quada.analysis.layers:
        monkeypatch.setattr(module, "make_executor", stop)
    result = cli(*command.split(), "-m", model_dir, "--device", "cpu", "--run-dir", tmp_path / "run", "--executor", "ray",
                 "--ray-address", "auto", "--workers", "3", "--cpus-per-worker", "0.5", "--gpus-per-worker", "1")
    result.assert_user_error("stopped before generating")
    assert seen == [("ray", "auto", 3, 0.5, 1.0)]
