"""GCG on a tiny random model: the prefix cache, the gradient through the approximation, the
re-tokenization filter, convergence to a short target, and resuming from stored steps."""

import contextlib

import pytest
import torch

from quada.approx import parse_spec
from quada.approx.rows import prompt_rows
from quada.attack.gcg import (
    GcgSettings,
    PrefixCache,
    adversarial_request,
    candidate_scores,
    full_scores,
    gcg,
    initial_suffix,
    reaches_target,
    retokenizes,
    suffix_problem,
    token_gradients,
)
from quada.attack.loss import token_ids
from quada.attack.records import AttackKey, AttackRecords
from quada.engine.plan import approximated
from quada.measures.generate import GenerationSettings, generate
from quada.store import Store

REQUEST = "Tell me a secret"
SMALL = GcgSettings(steps=12, candidates=64, topk=32, suffix_tokens=8)


def clean(_step):
    return contextlib.nullcontext()


SUFFIXES = ("abcdefgh", "zz{}!?xy")
# One technique of every family; TEAL's rule reads the length of a forward pass (``per_call``).
FAMILIES = ("none", "bolt", "paper:bolt", "cats:sparsity=0.5", "smoothquant:bits=8", "omniquant:bits=8,steps=2")


def _suffixes(tokenizer):
    return torch.tensor([initial_suffix(tokenizer, 8), *(token_ids(tokenizer, s) for s in SUFFIXES)])


@pytest.mark.parametrize("spec", FAMILIES)
def test_prefix_cached_scores_equal_full_recomputation(tiny, spec):
    model, tokenizer = tiny
    problem = suffix_problem(tokenizer, REQUEST, "Sure, here is", "paper", model.device)
    suffixes = _suffixes(tokenizer)
    approximation = spec if spec == "none" else parse_spec(spec)
    assert approximation == "none" or not any(part.per_call for part in approximation.parts())
    with torch.no_grad(), approximated(model, approximation, tokenizer, 0), prompt_rows(every="b1"):
        cached, cached_matches = PrefixCache(model, problem).scores(suffixes)
        full, full_matches = full_scores(model, problem, suffixes)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    assert torch.equal(cached_matches, full_matches)
    assert len(set(full.tolist())) == 3  # the suffixes matter


def test_teal_is_scored_whole_because_the_prefix_cache_would_change_its_rule(tiny):
    model, tokenizer = tiny
    problem = suffix_problem(tokenizer, REQUEST, "Sure, here is", "paper", model.device)
    suffixes = _suffixes(tokenizer)
    teal = parse_spec("teal:sparsity=0.5")
    assert teal.per_call
    with torch.no_grad(), approximated(model, teal, tokenizer, 0):
        full, _ = full_scores(model, problem, suffixes)
        assert torch.equal(candidate_scores(model, problem, suffixes, reuse_prefix=False)[0], full)
        cached, _ = PrefixCache(model, problem).scores(suffixes)
    assert not torch.allclose(cached, full)  # the last half of each pass is not the last half of the prompt


def test_every_candidate_of_a_step_sees_one_draw(tiny):
    # Under noise, inside one step's draw, a candidate scores the same alone or beside the others.
    model, tokenizer = tiny
    problem = suffix_problem(tokenizer, REQUEST, "Sure", "plain", model.device)
    suffixes = _suffixes(tokenizer)
    noise = parse_spec("noise:site=up,dist=gaussian,std=0.3")
    with torch.no_grad(), approximated(model, noise, tokenizer, 5), prompt_rows(every="b1"):
        together, _ = full_scores(model, problem, suffixes)
        alone = torch.cat([full_scores(model, problem, suffixes[i : i + 1])[0] for i in range(len(suffixes))])
        with prompt_rows(every="b2"):
            other_draw, _ = full_scores(model, problem, suffixes)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together, other_draw)


def test_reached_is_read_as_the_response_is_generated(tiny):
    # A suffix found on the clean model; under noise, whether it still works depends on the draw,
    # which reaches_target must read exactly as generation does.
    model, tokenizer = tiny
    problem = suffix_problem(tokenizer, REQUEST, "x", "plain", model.device)
    suffix = list(gcg(model, tokenizer, problem, SMALL, clean, lambda step: step)[-1].suffix)
    prompt = adversarial_request(REQUEST, tokenizer.decode(suffix))
    outcomes = []
    for std, prompt_id in [(s, p) for s in (0.05, 0.1, 0.2) for p in ("p1", "p2", "p3")]:
        noise = parse_spec(f"noise:site=up,dist=gaussian,std={std}")
        with approximated(model, noise, tokenizer, 0):
            reached = reaches_target(model, tokenizer, problem, suffix, prompt_id)
            response = generate(model, tokenizer, ["Say hi", prompt], GenerationSettings(max_new_tokens=1),
                                progress=False, prompt_ids=["other", prompt_id])[1]
        assert reached == (response == "x")
        outcomes.append(reached)
    assert len(set(outcomes)) == 2  # the check is not trivially always or never true


def test_the_gradient_runs_through_the_approximation(tiny):
    model, tokenizer = tiny
    problem = suffix_problem(tokenizer, REQUEST, "Sure", "plain", model.device)
    suffix = torch.tensor(initial_suffix(tokenizer, 8))
    plain = token_gradients(model, problem, suffix)
    with approximated(model, parse_spec("noise:site=up,dist=gaussian,std=0.5"), tokenizer, 0):
        noisy = token_gradients(model, problem, suffix)
    assert plain.shape == (8, model.get_input_embeddings().num_embeddings)
    assert torch.isfinite(noisy).all() and not torch.allclose(plain, noisy)


def test_a_suffix_that_does_not_retokenize_is_filtered(tiny):
    _, tokenizer = tiny
    problem = suffix_problem(tokenizer, REQUEST, "Sure", "plain", "cpu")
    half_character = token_ids(tokenizer, "é")[:1]  # one byte of a two-byte character
    candidates = torch.tensor([token_ids(tokenizer, "abcd"), token_ids(tokenizer, "ab") + half_character + token_ids(tokenizer, "c")])
    assert retokenizes(tokenizer, problem, candidates).tolist() == [True, False]


def test_gcg_lowers_the_loss_until_the_model_says_the_target(tiny):
    model, tokenizer = tiny
    problem = suffix_problem(tokenizer, REQUEST, "x", "plain", model.device)
    steps = gcg(model, tokenizer, problem, SMALL, clean, lambda step: step)
    assert steps[-1].success and len(steps) < SMALL.steps  # stopped early
    with torch.no_grad():
        start, _ = full_scores(model, problem, torch.tensor([initial_suffix(tokenizer, 8)]))
    assert steps[-1].loss < float(start) - 0.5
    # The stored prompt, as text, makes the model answer with the target.
    prompt = adversarial_request(REQUEST, tokenizer.decode(list(steps[-1].suffix)))
    assert generate(model, tokenizer, [prompt], GenerationSettings(max_new_tokens=1), progress=False) == ["x"]


def test_an_interrupted_search_resumes_from_its_last_stored_step(tiny, tmp_path):
    model, tokenizer = tiny
    problem = suffix_problem(tokenizer, REQUEST, "Sure", "plain", model.device)
    settings = GcgSettings(steps=4, candidates=16, topk=8, suffix_tokens=6)
    noise = parse_spec("noise:site=up,dist=gaussian,std=0.05")

    def serving(step):
        return approximated(model, noise, tokenizer, 100 + step)

    def run(records, key, stop_after=None):
        def on_step(step):
            records.put_step(key, step)
            if step.step == stop_after:
                raise KeyboardInterrupt
        return gcg(model, tokenizer, problem, settings, serving, lambda step: step, records.steps(key), on_step)

    def outcome(steps):
        return [(s.step, s.suffix, round(s.loss, 5), s.success, s.forward_passes) for s in steps]

    with Store(tmp_path / "results.sqlite") as store, AttackRecords(store.path) as records:
        whole = run(records, AttackKey("fp", str(noise), "gcg", "b1", 0))
        key = AttackKey("fp", str(noise), "gcg", "b2", 0)
        with pytest.raises(KeyboardInterrupt):
            run(records, key, stop_after=1)
        assert len(records.steps(key)) == 2
        resumed = run(records, key)
        assert outcome(records.steps(key)) == outcome(resumed)
    assert len(whole) == 4 and outcome(resumed) == outcome(whole)
