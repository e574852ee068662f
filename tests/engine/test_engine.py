"""The measurement engine: conditions in, stored rows out; resumable; chunks run through an executor."""

import dataclasses
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest

import quada.engine.plan as engine_module
from quada.approx import apply, parse_spec
from quada.approx.draws import DRAW_SCHEME
from quada.data import Prompt
from quada.engine.executors import LocalExecutor, ModelRef, Models
from quada.engine.plan import (
    GENERATION_CHUNK,
    MIN_CHUNK,
    Chunk,
    Engine,
    Plan,
    PooledJudge,
    balanced,
    chunk_size,
    generate_chunk,
    key_settings,
)
from quada.errors import QuadaError
from quada.fingerprint import model_fingerprint
from quada.judging import make_judge
from quada.measures.generate import GenerationSettings, generate
from quada.store import CLEAN, Generation, Judgement, Store
from quada.testing import StopsAfter, save_tiny_model, tiny_model

NOISE = parse_spec("noise:site=up,dist=gaussian,std=0.5")
PROMPTS = [Prompt(f"p{i}", f"Tell me about item {i}" + " please" * (i % 3)) for i in range(7)]
CORPUS = "The quick brown fox jumps over the lazy dog. " * 20


@dataclass
class Options:
    """What the engine reads from a command's configuration."""

    run_dir: Path
    model: str = "tiny-llama"
    judge_model: str = "tiny-judge"
    seed: int = 0
    corpus: str = "fox"
    ppl_window: int = 64
    ppl_windows: int | None = 2
    settings: GenerationSettings = GenerationSettings(max_new_tokens=4)

    def __post_init__(self):
        self.run_dir.mkdir(exist_ok=True)  # a command opens its run folder before measuring


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=0)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(engine_module, "GENERATION_CHUNK", 2)


class PicklingExecutor(LocalExecutor):
    """Ships every unit and result as bytes, and hands the results back last first, as a pool of
    other processes may."""

    def completed(self):
        done = [(unit, pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(unit)).run(self.models))))
                for unit in self._queue]
        self._queue.clear()
        yield from reversed(done)


def measure_everything(engine: Engine) -> list:
    judges = {"keyword": make_judge("keyword")}
    return [engine.measure(engine.condition(a, PROMPTS), judges) for a in (CLEAN, NOISE)]


def stored(path):
    with Store(path) as store:
        return store.rows(Generation), store.rows(Judgement)


def test_a_killed_run_resumes_to_exactly_the_rows_of_an_uninterrupted_run(tiny, tmp_path, small_chunks, monkeypatch):
    model, tokenizer = tiny
    with Store(tmp_path / "whole.sqlite") as store:
        whole = measure_everything(Engine(store, model, tokenizer, Options(tmp_path / "whole"), CORPUS))

    split = tmp_path / "split.sqlite"
    with Store(split) as store, pytest.raises(KeyboardInterrupt):
        # 4 chunks of the clean condition (7 prompts, 2 a chunk), then 1 of the noisy one.
        measure_everything(Engine(store, model, tokenizer, Options(tmp_path / "split"), CORPUS,
                                  executor=StopsAfter(LocalExecutor("cpu"), chunks=5)))
    partial, _ = stored(split)
    assert len(partial) == 7 + 2
    with Store(split) as store:
        resumed = measure_everything(Engine(store, model, tokenizer, Options(tmp_path / "split"), CORPUS))
    assert stored(split) == stored(tmp_path / "whole.sqlite")
    assert [(m.generations, m.judgements, m.perplexity) for m in resumed] == [
        (m.generations, m.judgements, m.perplexity) for m in whole]
    clean, noisy = whole
    assert [g.response for g in clean.generations] != [g.response for g in noisy.generations]

    monkeypatch.setattr(engine_module, "generate", lambda *a, **k: pytest.fail("generated again"))
    monkeypatch.setattr(engine_module, "windows_perplexity", lambda *a, **k: pytest.fail("measured again"))
    with Store(split) as store:
        again = measure_everything(Engine(store, model, tokenizer, Options(tmp_path / "split"), CORPUS))
    assert [m.generations for m in again] == [m.generations for m in whole]


def alone_responses(model, tokenizer, approximation, settings) -> dict[str, str]:
    """Generation without the engine: every prompt alone, its noise drawn from the run's seed and its id."""
    out = {}
    for prompt in PROMPTS:
        with apply(model, approximation, seed=0, tokenizer=tokenizer):
            out[prompt.id] = generate(model, tokenizer, [prompt.text], settings, progress=False, prompt_ids=[prompt.id])[0]
    return out


@pytest.mark.parametrize("executor", [LocalExecutor, PicklingExecutor])
def test_executors_give_the_rows_of_direct_generation(tiny, tmp_path, small_chunks, executor):
    model, tokenizer = tiny
    options = Options(tmp_path)
    with Store(tmp_path / "results.sqlite") as store:
        engine = Engine(store, model, tokenizer, options, executor=executor("cpu"))
        condition = engine.condition(NOISE, PROMPTS)
        rows = engine.responses(condition)
    assert [row.key for row in rows] == [condition.key(p.id) for p in PROMPTS]
    assert [row.key.approx for row in rows] == [str(NOISE)] * len(PROMPTS)
    assert {row.key.prompt_id: row.response for row in rows} == alone_responses(model, tokenizer, NOISE, options.settings)


@pytest.mark.parametrize("spec", ["noise:site=up,dist=gaussian,std=0.5", "teal:sparsity=0.5"])
def test_a_run_over_more_prompts_gives_the_rows_a_fresh_run_gives(tiny, tmp_path, small_chunks, spec):
    # Raising --limit, or sharing a store with another command, computes only the missing prompts, in
    # chunks of other neighbours: the rows must not depend on that.
    model, tokenizer = tiny
    approximation = parse_spec(spec)
    with Store(tmp_path / "grown.sqlite") as store:
        engine = Engine(store, model, tokenizer, Options(tmp_path / "grown"))
        engine.responses(engine.condition(approximation, PROMPTS[1::2]))
        grown = engine.responses(engine.condition(approximation, PROMPTS))
    with Store(tmp_path / "fresh.sqlite") as store:
        engine = Engine(store, model, tokenizer, Options(tmp_path / "fresh"))
        fresh = engine.responses(engine.condition(approximation, PROMPTS))
    assert grown == fresh
    assert {g.key.prompt_id: g.response for g in fresh} == alone_responses(model, tokenizer, approximation, Options.settings)


def test_rows_of_an_older_draw_scheme_are_kept_but_never_reused(tiny, tmp_path):
    model, tokenizer = tiny
    with Store(tmp_path / "results.sqlite") as store:
        engine = Engine(store, model, tokenizer, Options(tmp_path))
        condition = engine.condition(NOISE, PROMPTS[:2])
        old_settings = key_settings(condition.settings, None, None)  # as stores before the scheme was keyed
        old = [Generation(dataclasses.replace(condition.key(p.id), settings=old_settings), p.text, "an old answer")
               for p in PROMPTS[:2]]
        store.put(old)
        rows = engine.responses(condition)
        assert all(row.response != "an old answer" for row in rows)
        assert json.loads(rows[0].key.settings)["draws"] == DRAW_SCHEME
        assert json.loads(rows[0].key.settings)["dtype"] == "float32" and json.loads(rows[0].key.settings)["device"] == "cpu"
        assert len(store.rows(Generation)) == 4 and len(store.records()) == 4  # both readable and exported


def test_a_unit_of_work_is_a_small_serializable_value(tiny, tmp_path):
    model, tokenizer = tiny
    with Store(tmp_path / "results.sqlite") as store:
        condition = Engine(store, model, tokenizer, Options(tmp_path)).condition(NOISE, PROMPTS[:3])
    chunk = Chunk(condition, ("p2", "p0"))
    assert pickle.loads(pickle.dumps(chunk)) == chunk
    assert pickle.loads(pickle.dumps(generate_chunk)) is generate_chunk  # sent by reference
    data = json.loads(json.dumps(dataclasses.asdict(chunk)))
    assert data["prompt_ids"] == ["p2", "p0"] and data["condition"]["approximation"]["std"] == 0.5
    assert data["condition"]["prompts"][0] == {"id": "p0", "text": PROMPTS[0].text, "category": "", "target": ""}
    assert chunk.texts == [PROMPTS[2].text, PROMPTS[0].text]
    assert generate_chunk(model, tokenizer, pickle.loads(pickle.dumps(chunk))) == generate_chunk(model, tokenizer, chunk)


def test_a_parsed_spec_is_never_parsed_again_and_text_is_refused(tiny, tmp_path, small_chunks, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr("quada.approx.base.parse_spec", lambda *a, **k: pytest.fail("parsed again"))
    with Store(tmp_path / "results.sqlite") as store:
        engine = Engine(store, model, tokenizer, Options(tmp_path), CORPUS)
        assert len(engine.responses(engine.condition(NOISE, PROMPTS))) == len(PROMPTS)  # 4 chunks
        engine.perplexity(NOISE)
        with pytest.raises(TypeError, match="parse the spec"):
            engine.condition(str(NOISE), PROMPTS)
        with pytest.raises(TypeError, match="parse the spec"):
            engine.perplexity(str(NOISE))


class RecordingJudge:
    """A rule judge that records the requests it was shown and calls every response an attack."""

    identity = "recording v1"

    def __init__(self):
        self.shown = []

    def judge(self, prompts, responses):
        self.shown += prompts
        return make_judge("keyword").judge(["-"] * len(responses), ["Sure, step one."] * len(responses))


def test_responses_judged_against_other_requests_are_stored_apart(tiny, tmp_path):
    model, tokenizer = tiny
    judge = RecordingJudge()
    requests = [f"behaviour {p.id}" for p in PROMPTS]
    with Store(tmp_path / "results.sqlite") as store:
        engine = Engine(store, model, tokenizer, Options(tmp_path))
        generations = engine.responses(engine.condition(CLEAN, PROMPTS))
        on_prompts = engine.judged(judge, generations)
        assert sorted(judge.shown) == sorted(p.text for p in PROMPTS)
        on_requests = engine.judged(judge, generations, requests=requests)
        assert judge.shown[len(PROMPTS):] == requests  # in the generations' order, not served from the first verdicts
        assert {j.key.judge for j in on_requests} != {j.key.judge for j in on_prompts}
        assert engine.judged(judge, generations, requests=requests) == on_requests and len(judge.shown) == 2 * len(PROMPTS)
        with pytest.raises(ValueError, match="requests for"):
            engine.judged(judge, generations, requests=requests[1:])


def test_two_runs_in_one_folder_keep_each_others_measurements(tiny, tmp_path):
    """Each run opens the folder's store; what one measures while the other runs is kept by both."""
    model, tokenizer = tiny
    options = Options(tmp_path / "run")
    with Store(options.run_dir / "results.sqlite") as one, Store(options.run_dir / "results.sqlite") as other:
        first = Engine(one, model, tokenizer, options, CORPUS)
        second = Engine(other, model, tokenizer, options, CORPUS)  # opened before the first measured anything
        clean = first.perplexity(CLEAN)
        noisy = second.perplexity(NOISE)
    with Store(options.run_dir / "results.sqlite") as store:
        values = store.measurements()
    assert values == {first.key_of("perplexity", CLEAN): clean, first.key_of("perplexity", NOISE): noisy}


def test_the_measurements_of_a_run_folder_of_an_earlier_quada_are_used(tiny, tmp_path, monkeypatch):
    """Run folders used to keep their measurements in utility.json: they are taken into the store,
    not measured again, and read by whoever reads the folder's measurements."""
    model, tokenizer = tiny
    options = Options(tmp_path / "run")
    with Store(options.run_dir / "results.sqlite") as store:
        key = Engine(store, model, tokenizer, options, CORPUS).key_of("perplexity", CLEAN)
    (options.run_dir / engine_module.LEGACY_UTILITY_FILE).write_text(json.dumps({key: 12.5}))
    assert engine_module.stored_measurements(options.run_dir) == {key: 12.5}
    monkeypatch.setattr(engine_module, "windows_perplexity", lambda *a, **k: pytest.fail("measured again"))
    with Store(options.run_dir / "results.sqlite") as store:
        assert Engine(store, model, tokenizer, options, CORPUS).perplexity(CLEAN) == 12.5
        assert store.measurements() == {key: 12.5}


def test_a_plan_cuts_units_for_every_worker_and_evenly():
    assert chunk_size(640, 1) == GENERATION_CHUNK  # the default vet on one process: as before
    assert chunk_size(640, 2) == 64 and chunk_size(640, 8) == 20 and chunk_size(640, 128) == MIN_CHUNK
    assert chunk_size(7, 1) == MIN_CHUNK
    assert [len(c) for c in balanced(list(range(96)), 64)] == [48, 48]
    assert [len(c) for c in balanced(list(range(7)), 2)] == [2, 2, 1, 2]
    assert sum(balanced(list(range(10)), 3), []) == list(range(10)) and balanced([], 5) == []


class Recording(LocalExecutor):
    """A local executor that logs what is submitted and what comes back, in order."""

    def __init__(self):
        super().__init__("cpu")
        self.log = []

    def submit(self, unit):
        self.log.append(("submit", unit, None))
        super().submit(unit)

    def completed(self):
        for unit, result in super().completed():
            self.log.append(("done", unit, result))
            yield unit, result


def test_a_plan_hands_over_all_its_work_at_once_and_verdicts_as_responses_arrive(tiny, tmp_path, small_chunks):
    model, tokenizer = tiny
    executor = Recording()
    with Store(tmp_path / "results.sqlite") as store:
        engine = Engine(store, model, tokenizer, Options(tmp_path), CORPUS, executor)
        plan = Plan()
        for approximation in CLEAN, NOISE:
            plan.judged(engine, engine.judge("keyword"), plan.responses(engine, engine.condition(approximation, PROMPTS)))
            plan.perplexity(engine, approximation)
        plan.run()
    first_done = next(i for i, (event, *_) in enumerate(executor.log) if event == "done")
    upfront = [unit for _, unit, _ in executor.log[:first_done]]
    assert [u.kind for u in upfront] == ["generation"] * 8 + ["measurement"] * 2  # all of it, generation first
    assert [u.size for u in upfront[:8]] == sorted((u.size for u in upfront[:8]), reverse=True)  # longest first
    arrived: list[tuple[str, ...]] = []
    for event, unit, result in executor.log:
        if event == "done" and unit.kind == "generation":
            arrived.append(tuple(result))
        if event == "submit" and unit.kind == "judging":
            assert unit.responses == arrived[-1]  # the verdicts on a chunk, as soon as it arrived
    assert sum(1 for event, unit, _ in executor.log if event == "submit" and unit.kind == "judging") == 8


def test_a_plan_spans_run_folders_on_one_executor_and_computes_a_shared_key_once(tiny, tmp_path, small_chunks):
    model, tokenizer = tiny
    executor = Recording()
    with Store(tmp_path / "a.sqlite") as a, Store(tmp_path / "b.sqlite") as b:
        first = Engine(a, model, tokenizer, Options(tmp_path / "a"), executor=executor)
        second = Engine(b, model, tokenizer, Options(tmp_path / "b"), executor=executor)
        plan = Plan()
        requests = [plan.responses(engine, engine.condition(NOISE, PROMPTS)) for engine in (first, first, second)]
        plan.run()
        assert requests[0].rows == requests[1].rows == requests[2].rows == a.rows(Generation) == b.rows(Generation)
        generated = [u for event, u, _ in executor.log if event == "submit" and u.kind == "generation"]
        assert sum(u.size for u in generated) == 2 * len(PROMPTS)  # once per store
        with pytest.raises(ValueError, match="one executor"):
            other = Engine(b, model, tokenizer, Options(tmp_path / "b"), executor=LocalExecutor("cpu"))
            plan = Plan()
            plan.responses(first, first.condition(CLEAN, PROMPTS))
            plan.responses(other, other.condition(CLEAN, PROMPTS))
            plan.run()


def test_a_model_judge_of_the_engine_judges_where_the_units_run_as_the_judge_itself_does(tiny, tmp_path):
    model, tokenizer = tiny
    with Store(tmp_path / "results.sqlite") as store:
        engine = Engine(store, model, tokenizer, Options(tmp_path, judge_model="tiny-llama"))
        pooled = engine.judge("llm")  # the judge model is the subject's: same source and dtype, one copy
        direct = make_judge("llm", model, tokenizer)
        assert isinstance(pooled, PooledJudge) and pooled.identity == direct.identity
        assert (pooled.measure, pooled.label_is_attack, pooled.threshold) == ("harm", True, direct.threshold)
        prompts, responses = [p.text for p in PROMPTS], [f"Sure, here is item {i}." for i in range(len(PROMPTS))]
        assert [r.label for r in pooled.judge(prompts, responses)] == [r.label for r in direct.judge(prompts, responses)]


def test_the_models_of_a_worker_are_loaded_once_kept_two_at_a_time_and_checked(tmp_path):
    folders = [str(save_tiny_model(tmp_path / name, seed=seed)) for seed, name in enumerate("abc")]
    models = Models("cpu", capacity=2)
    refs = [ModelRef(folder, "float32") for folder in folders]
    first = models.get(refs[0])
    assert models.get(refs[0]) is first  # loaded once
    models.get(refs[1])
    models.get(refs[0])  # now the most recently used
    models.get(refs[2])  # lets the least recently used (b) go
    assert models.get(refs[0]) is first and models.loading_seconds > 0
    fingerprint = model_fingerprint(first[0])
    with pytest.raises(QuadaError, match=f"fingerprint {model_fingerprint(models.get(refs[1])[0])}, but the run's model has "
                                         f"{fingerprint}"):
        Models("cpu").get(ModelRef(folders[1], "float32", fingerprint))
    with pytest.raises(QuadaError, match="runs on cpu here, but the run's rows are keyed as computed on cuda"):
        Models("cpu").get(ModelRef(folders[0], "float32", fingerprint, "cuda"))
