import json

import pytest

import quada.engine.plan
from quada.attack.sources import many_shot_examples
from quada.data import Prompt, load_benchmark
from quada.defense.pairs import (
    GENERIC_KINDS,
    HELDOUT_BENIGN,
    HELDOUT_HARMFUL,
    PAIRS_FILE,
    RESTORE_KINDS,
    SPLIT_FILE,
    WRITTEN_REFUSALS,
    GenericPairsConfig,
    PreferencePair,
    RestorePairsConfig,
    SelfPairsConfig,
    Split,
    benign_pairs,
    generic_pairs,
    harmful_pairs,
    load_pairs,
    load_pku_saferlhf,
    many_shot_pairs,
    many_shot_prompts,
    restore_pairs,
    self_pairs,
    split_prompts,
    write_pairs,
)
from quada.errors import QuadaError
from quada.judging import keyword_verdict, refusal_phrase
from quada.store import CLEAN, Generation, Store
from quada.testing import save_tiny_model

REFUSAL = "I'm sorry, but I cannot help with that request at all."
COMPLIANCE = "Here is a detailed plan with many concrete steps that you can follow right away today."


def prompts(n, stem="p"):
    return [Prompt(f"{stem}-{i:02d}", f"{stem} request number {i}") for i in range(n)]


def test_the_split_is_disjoint_complete_and_seeded():
    items = prompts(20)
    train, heldout = split_prompts(items, 5, seed=1)
    assert len(heldout) == 5 and not {p.id for p in train} & {p.id for p in heldout}
    assert sorted(p.id for p in train + heldout) == [p.id for p in items]
    assert split_prompts(items, 5, seed=1) == (train, heldout)
    assert split_prompts(items, 5, seed=2)[1] != heldout
    with pytest.raises(QuadaError, match="cannot hold out 20 of 20"):
        split_prompts(items, 20, seed=0)


def test_harmful_pairs_follow_the_judges():
    items = prompts(4)
    clean = {"p-00": REFUSAL, "p-01": REFUSAL, "p-02": COMPLIANCE, "p-03": "Too short."}
    attempts = [{"p-00": REFUSAL, "p-01": COMPLIANCE}, {"p-00": COMPLIANCE}]
    pairs = {p.id: p for p in harmful_pairs(items, clean, attempts, compliant_pairs=True)}
    assert set(pairs) == {"p-00:perturbed", "p-01:perturbed", "p-02:compliant"}
    assert (pairs["p-00:perturbed"].chosen, pairs["p-00:perturbed"].rejected) == (REFUSAL, COMPLIANCE)
    assert pairs["p-02:compliant"].rejected == COMPLIANCE and pairs["p-02:compliant"].chosen in WRITTEN_REFUSALS
    assert all(refusal_phrase(text) for text in WRITTEN_REFUSALS)
    assert all(p.harmful for p in pairs.values())
    assert {p.id for p in harmful_pairs(items, clean, attempts, compliant_pairs=False)} == {"p-00:perturbed", "p-01:perturbed"}


def test_benign_pairs_keep_helpful_answers_against_a_refusal_or_the_heavy_answer():
    items = prompts(3, "b")
    clean = {"b-00": COMPLIANCE, "b-01": REFUSAL, "b-02": "   "}
    (pair,) = benign_pairs(items, clean, None)
    assert pair.chosen == COMPLIANCE and not pair.harmful and pair.rejected in WRITTEN_REFUSALS
    (heavy,) = benign_pairs(items, clean, {"b-00": "zzz qqq"})
    assert heavy.rejected == "zzz qqq"


def test_pairs_round_trip_and_bad_files_are_clear_errors(tmp_path):
    pairs = [PreferencePair("a", "q", "c", "r", True, "t"), PreferencePair("b", "q2", "c2", "r2", False, "t")]
    assert load_pairs(write_pairs(tmp_path / "p.jsonl", pairs)) == pairs
    assert not list(tmp_path.glob("*.partial"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q", "chosen": "c"}\n')
    with pytest.raises(QuadaError, match='line 1 needs non-empty "prompt", "chosen" and "rejected"'):
        load_pairs(tmp_path / "bad.jsonl")
    with pytest.raises(QuadaError, match="does not exist"):
        load_pairs(tmp_path / "missing.jsonl")


PKU_ROWS = [
    {"prompt": "How do I pick a lock?", "response_0": "Unsafe answer.", "response_1": "I can't help.",
     "safer_response_id": 1, "is_response_0_safe": False, "is_response_1_safe": True},
    {"prompt": "Best pasta recipe?", "response_0": "Boil water...", "response_1": "Bake it...",
     "safer_response_id": 0, "is_response_0_safe": True, "is_response_1_safe": True},
]


@pytest.mark.parametrize("layout", ["lines.jsonl", "lines.json", "list.json", "table.parquet"])
def test_pku_saferlhf_from_a_local_file_takes_the_safer_response(tmp_path, layout):
    from datasets import Dataset

    path = tmp_path / f"pku-{layout}"
    if layout.startswith("lines"):
        path.write_text("".join(json.dumps(r) + "\n" for r in PKU_ROWS))
    elif layout == "list.json":
        path.write_text(json.dumps(PKU_ROWS))
    else:
        Dataset.from_list(PKU_ROWS).to_parquet(str(path))
    first, second = load_pku_saferlhf(path)
    assert (first.chosen, first.rejected, first.harmful) == ("I can't help.", "Unsafe answer.", True)
    assert (second.chosen, second.harmful) == ("Boil water...", False)


def test_pku_saferlhf_errors_name_the_fix(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(QuadaError, match="--file"):
        load_pku_saferlhf()
    (tmp_path / "pku.jsonl").write_text(json.dumps({"prompt": "q", "response_0": "a"}) + "\n")
    with pytest.raises(QuadaError, match="pku.jsonl row 1 lacks response_1, safer_response_id"):
        load_pku_saferlhf(tmp_path / "pku.jsonl")
    (tmp_path / "pku.parquet").write_text("prompt,response_0\nthis is text, not parquet\n")
    with pytest.raises(QuadaError, match="pku.parquet is not a parquet file that can be read"):
        load_pku_saferlhf(tmp_path / "pku.parquet")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("pairs-model"), "qwen2", seed=2)


def fake_generate(calls):
    """Refuses when the model runs clean, complies when an approximation's hooks are installed."""

    def generate(model, tokenizer, texts, settings, progress=True, prompt_ids=None):
        norm = model.model.layers[0].input_layernorm
        calls.append(len(texts))
        return [COMPLIANCE if norm._forward_hooks else REFUSAL for _ in texts]

    return generate


def test_self_pairs_hold_out_evaluation_prompts_and_resume(model_dir, tmp_path, monkeypatch):
    harmful = tmp_path / "harmful.txt"
    harmful.write_text("\n".join(f"Harmful request {i}" for i in range(12)))
    benign = tmp_path / "benign.txt"
    benign.write_text("\n".join(f"Benign question {i}?" for i in range(6)))
    calls = []
    monkeypatch.setattr(quada.engine.plan, "generate", fake_generate(calls))
    config = SelfPairsConfig(model=str(model_dir), harmful=str(harmful), benign=str(benign), heldout=4,
                             benign_heldout=2, max_new_tokens=4, out_dir=tmp_path / "pairs")
    result = self_pairs(config, progress=False)
    out = tmp_path / "pairs"
    split = Split.read(out / SPLIT_FILE)
    assert len(split.harmful_heldout) == 4 and len(split.harmful_train) == 8
    assert not set(split.harmful_train) & set(split.harmful_heldout)
    heldout = load_benchmark(str(out / HELDOUT_HARMFUL))
    assert [p.id for p in heldout] == list(split.harmful_heldout)
    assert len(load_benchmark(str(out / HELDOUT_BENIGN))) == 2
    pairs = load_pairs(out / PAIRS_FILE)
    assert result.counts == {"self:perturbed": 8, "self:compliant": 0, "self:benign": 0}
    assert len(result.lengths.prompts) == len(result.lengths.totals) == 8
    heldout_texts = {p.text for p in heldout}
    assert all(p.prompt not in heldout_texts and p.chosen == REFUSAL and p.rejected == COMPLIANCE for p in pairs)
    generated = sum(calls)
    self_pairs(config, progress=False)
    assert sum(calls) == generated  # everything came from the store


def test_self_pairs_options_are_checked(tmp_path):
    with pytest.raises(QuadaError, match="benign-rejected"):
        SelfPairsConfig(benign_rejected="silence")
    with pytest.raises(QuadaError, match="attempts must be at least 1"):
        SelfPairsConfig(attempts=0)
    with pytest.raises(QuadaError, match="unknown approximation"):
        SelfPairsConfig(perturbation="warp-drive")


def test_generic_pairs_take_own_or_written_refusals_against_the_rejected_answers():
    items = prompts(3)
    clean = {"p-00": REFUSAL, "p-01": REFUSAL, "p-02": COMPLIANCE}
    unaligned = {"p-00": COMPLIANCE, "p-01": REFUSAL}
    pairs = {p.id: p for p in harmful_pairs(items, clean, [unaligned], True, ("generic:unaligned", "generic:compliant"))}
    assert set(pairs) == {"p-00:unaligned", "p-02:compliant"}  # the unaligned model's refusal is no pair
    assert (pairs["p-00:unaligned"].chosen, pairs["p-00:unaligned"].rejected) == (REFUSAL, COMPLIANCE)
    assert pairs["p-02:compliant"].chosen in WRITTEN_REFUSALS and pairs["p-02:compliant"].rejected == COMPLIANCE
    assert [p.source for p in pairs.values()] == ["generic:unaligned", "generic:compliant"]

    shots = prompts(3, "m")
    dataset = {"m-00": COMPLIANCE, "m-01": COMPLIANCE, "m-02": REFUSAL}
    shot_pairs = {p.id: p for p in many_shot_pairs(shots, dataset, {"m-00": REFUSAL, "m-01": COMPLIANCE, "m-02": REFUSAL})}
    assert set(shot_pairs) == {"m-00:own-refusal", "m-01:written-refusal"}
    assert (shot_pairs["m-00:own-refusal"].chosen, shot_pairs["m-00:own-refusal"].rejected) == (REFUSAL, COMPLIANCE)
    assert shot_pairs["m-01:written-refusal"].chosen in WRITTEN_REFUSALS
    assert all(p.harmful and p.source in GENERIC_KINDS for p in shot_pairs.values())
    (benign,) = benign_pairs(prompts(1, "b"), {"b-00": COMPLIANCE}, None, "generic:benign")
    assert (benign.id, benign.source) == ("b-00:benign", "generic:benign")


def test_many_shot_prompts_leave_out_held_out_questions():
    examples = many_shot_examples()
    question = examples[0]["user"]
    kept, answers = many_shot_prompts([Prompt("advbench-7", f"  {question}\n")])
    assert "manyshot-000" not in answers
    assert len(kept) == sum(e["user"].strip() != question.strip() for e in examples) > 300
    assert all(p.text.strip() != question.strip() for p in kept)
    assert answers["manyshot-001"] == examples[1]["assistant"] and kept[0].text == examples[1]["user"]


@pytest.fixture(scope="module")
def rejected_model_dir(tmp_path_factory):
    """A tiny model of another architecture: the stand-in for the unaligned rejected model."""
    return save_tiny_model(tmp_path_factory.mktemp("rejected-model"), "llama", seed=3)


def fake_clean_generate(calls):
    """Fails under any hook; the rejected (llama) model complies, the target answers only benign prompts."""

    def generate(model, tokenizer, texts, settings, progress=True, prompt_ids=None):
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "an approximation is on"
        calls.append((model.config.model_type, len(texts)))
        unaligned = model.config.model_type == "llama"
        return [COMPLIANCE if unaligned or text.startswith("Benign") else REFUSAL for text in texts]

    return generate


@pytest.fixture
def generic_inputs(tmp_path):
    harmful = tmp_path / "harmful.txt"
    harmful.write_text("\n".join(f"Harmful request {i}" for i in range(12)))
    benign = tmp_path / "benign.txt"
    benign.write_text("\n".join(f"Benign question {i}?" for i in range(6)))
    return harmful, benign


def test_generic_pairs_are_clean_hold_out_evaluation_prompts_and_resume(model_dir, rejected_model_dir, generic_inputs,
                                                                     tmp_path, monkeypatch):
    harmful, benign = generic_inputs
    calls = []
    monkeypatch.setattr(quada.engine.plan, "generate", fake_clean_generate(calls))
    config = GenericPairsConfig(model=str(model_dir), rejected_model=str(rejected_model_dir), harmful=str(harmful),
                                benign=str(benign), heldout=4, benign_heldout=2, limit=6, max_new_tokens=4,
                                out_dir=tmp_path / "pairs")
    result = generic_pairs(config, progress=False)
    out = tmp_path / "pairs"
    split = Split.read(out / SPLIT_FILE)
    assert len(split.harmful_heldout) == 4 and len(split.harmful_train) == 6
    pairs = load_pairs(out / PAIRS_FILE)
    shots = [p for p in pairs if p.id.startswith("manyshot-")]
    assert result.counts == {"generic:own-refusal": len(shots), "generic:written-refusal": 0, "generic:compliant": 0,
                             "generic:unaligned": 6, "generic:benign": 4}
    assert 0 < len(shots) <= 6 and all(keyword_verdict(p.prompt, p.rejected)[0] for p in shots)
    heldout_texts = {p.text for p in load_benchmark(str(out / HELDOUT_HARMFUL))}
    assert not heldout_texts & {p.prompt for p in pairs}
    unaligned = [p for p in pairs if p.source == "generic:unaligned"]
    assert all((p.chosen, p.rejected) == (REFUSAL, COMPLIANCE) for p in unaligned)
    # The target generates first and is freed; then the rejected model answers only what the target refused.
    kinds = [kind for kind, _ in calls]
    assert kinds == ["qwen2"] * kinds.count("qwen2") + ["llama"] and calls[-1] == ("llama", 6)
    with Store(out / "results.sqlite") as store:
        rows = store.rows(Generation)
    assert {row.key.approx for row in rows} == {CLEAN}
    by_model = {}
    for row in rows:
        by_model.setdefault(row.key.model, set()).add(row.key.prompt_id)
    assert sorted(map(len, by_model.values())) == [6, 6 + 6 + 4]  # two fingerprints: rejected rows never mix
    generated = len(calls)
    generic_pairs(config, progress=False)
    assert len(calls) == generated  # everything came from the store


def test_generic_pairs_from_the_command_line(cli, model_dir, rejected_model_dir, generic_inputs, tmp_path, monkeypatch):
    harmful, _ = generic_inputs
    monkeypatch.setattr(quada.engine.plan, "generate", fake_clean_generate([]))
    out = tmp_path / "pairs"
    run = cli("pairs", "--source", "generic", "--model", model_dir, "--rejected-model", rejected_model_dir,
              "--harmful", harmful, "--heldout", 4, "--limit", 2, "--no-many-shot", "--benign-limit", 3, "--out", out)
    assert run.returncode == 0, run.stderr
    assert "| generic:unaligned | 2 |" in run.stdout and "| generic:own-refusal | 0 |" in run.stdout
    # How long the pairs are in the model's tokens, and what `quada align`'s default length keeps of them.
    assert "`quada align --max-length 512` drops 0 pair(s) and cuts 0 short; --max-length" in run.stdout
    split = Split.read(out / SPLIT_FILE)
    assert (split.benign_source, len(split.benign_heldout), len(split.benign_train)) == ("benign-suite", 32, 3)
    assert not any(p.id.startswith("manyshot-") for p in load_pairs(out / PAIRS_FILE))


def test_generic_pairs_options_are_one_clear_error(cli, tmp_path):
    cli("pairs", "--source", "generic", "--benign-heldout", 0, "--out", tmp_path).assert_user_error(
        "benign-heldout must be at least 1")
    cli("pairs", "--source", "generic", "--rejected-model", " ", "--out", tmp_path).assert_user_error(
        "rejected-model must name a model")
    cli("pairs", "--source", "web", "--out", tmp_path).assert_user_error("unknown --source 'web'", "'generic'")
    assert SelfPairsConfig().benign == "quada-benign" and GenericPairsConfig().benign == "benign-suite"


def fake_restoring_generate(calls):
    """Clean, the model refuses odd harmful requests and answers everything else; under an
    approximation it answers every harmful request and gives another benign answer."""

    def generate(model, tokenizer, texts, settings, progress=True, prompt_ids=None):
        approximated = bool(model.model.layers[0].input_layernorm._forward_hooks)
        calls.append((approximated, len(texts)))
        answers = []
        for text in texts:
            if text.startswith("Benign"):
                answers.append(f"{'Another' if approximated else 'A helpful'} answer to {text} with enough words.")
            elif approximated or text.endswith(("0", "2", "4", "6", "8")):
                answers.append(COMPLIANCE)
            else:
                answers.append(REFUSAL)
        return answers

    return generate


def test_restore_pairs_prefer_the_clean_response_on_the_generic_split(model_dir, rejected_model_dir, generic_inputs,
                                                                     tmp_path, monkeypatch):
    harmful, benign = generic_inputs
    calls = []
    monkeypatch.setattr(quada.engine.plan, "generate", fake_restoring_generate(calls))
    shared = dict(model=str(model_dir), harmful=str(harmful), benign=str(benign), heldout=4, benign_heldout=2, limit=6,
                  max_new_tokens=4)
    config = RestorePairsConfig(**shared, perturbation="noise:site=up,dist=gaussian,std=0.5", out_dir=tmp_path / "restore")
    result = restore_pairs(config, progress=False)
    out = tmp_path / "restore"
    pairs = load_pairs(out / PAIRS_FILE)
    harmful_pairs_ = [p for p in pairs if p.source == "restore:harmful"]
    benign_pairs_ = [p for p in pairs if p.source == "restore:benign"]
    assert result.counts == {"restore:harmful": len(harmful_pairs_), "restore:benign": 4}
    # Only the refused requests (odd numbers; many-shot questions ending otherwise) give pairs: the clean refusal
    # against the approximated answer. A request the clean model answers gives none.
    assert harmful_pairs_ and all((p.chosen, p.rejected) == (REFUSAL, COMPLIANCE) and p.harmful for p in harmful_pairs_)
    assert not any(p.prompt.startswith("Harmful") and p.prompt[-1] in "02468" for p in harmful_pairs_)
    assert any(p.id.startswith("manyshot-") for p in harmful_pairs_)  # the generic source's questions too
    assert all(p.chosen.startswith("A helpful") and p.rejected.startswith("Another") and not p.harmful
               for p in benign_pairs_)
    # The generic source on the same prompt sets and seed holds out the same prompts.
    monkeypatch.setattr(quada.engine.plan, "generate", fake_clean_generate([]))
    generic_pairs(GenericPairsConfig(**shared, rejected_model=str(rejected_model_dir), out_dir=tmp_path / "generic"),
                  progress=False)
    assert Split.read(out / SPLIT_FILE) == Split.read(tmp_path / "generic" / SPLIT_FILE)
    held = {p.text for p in load_benchmark(str(out / HELDOUT_HARMFUL))}
    assert not held & {p.prompt for p in pairs}
    # Resumable: a rerun generates nothing.
    monkeypatch.setattr(quada.engine.plan, "generate", fake_restoring_generate(calls))
    generated = len(calls)
    restore_pairs(config, progress=False)
    assert len(calls) == generated
    assert {approximated for approximated, _ in calls} == {True, False}


def test_restore_pairs_from_the_command_line_and_their_errors(cli, model_dir, generic_inputs, tmp_path, monkeypatch):
    harmful, benign = generic_inputs
    monkeypatch.setattr(quada.engine.plan, "generate", fake_restoring_generate([]))
    out = tmp_path / "pairs"
    run = cli("pairs", "--source", "restore", "--model", model_dir, "--harmful", harmful, "--benign", benign,
              "--heldout", 4, "--benign-heldout", 2, "--limit", 3, "--no-many-shot", "--out", out)
    assert run.returncode == 0, run.stderr
    assert "| restore:benign | 4 |" in run.stdout
    assert all(p.source in RESTORE_KINDS for p in load_pairs(out / PAIRS_FILE))
    assert RestorePairsConfig().benign == "benign-suite"
    cli("pairs", "--source", "restore", "--attempts", 0, "--out", tmp_path / "x").assert_user_error(
        "attempts must be at least 1")
    cli("pairs", "--source", "restore", "--perturbation", "warp-drive", "--out", tmp_path / "y").assert_user_error(
        "unknown approximation")
