import json

import pytest

import quada.eval.engine
from quada.data import Prompt, load_benchmark
from quada.defense.pairs import (
    HELDOUT_BENIGN,
    HELDOUT_HARMFUL,
    PAIRS_FILE,
    SPLIT_FILE,
    WRITTEN_REFUSALS,
    PreferencePair,
    SelfPairsConfig,
    Split,
    benign_pairs,
    harmful_pairs,
    load_pairs,
    load_pku_saferlhf,
    self_pairs,
    split_prompts,
    write_pairs,
)
from quada.errors import QuadaError
from quada.eval.judges import refusal_phrase
from quada.testing import tiny_model

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


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_pku_saferlhf_from_a_local_file_takes_the_safer_response(tmp_path, suffix):
    from datasets import Dataset

    path = tmp_path / f"pku{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in PKU_ROWS))
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
    with pytest.raises(QuadaError, match="lacks response_1, safer_response_id"):
        load_pku_saferlhf(tmp_path / "pku.jsonl")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs-model")
    model, tokenizer = tiny_model("qwen2", seed=2)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def fake_generate(calls):
    """Refuses when the model runs clean, complies when an approximation's hooks are installed."""

    def generate(model, tokenizer, texts, settings, progress=True):
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
    monkeypatch.setattr(quada.eval.engine, "generate", fake_generate(calls))
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
