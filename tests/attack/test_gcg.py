"""GCG on a tiny random model: the prefix cache, the gradient through the approximation, the
re-tokenization filter, convergence to a short target, and resuming from stored steps."""

import contextlib

import pytest
import torch

from quada.approx import parse_spec
from quada.attack.gcg import (
    GcgSettings,
    PrefixCache,
    adversarial_request,
    full_losses,
    gcg,
    initial_suffix,
    retokenizes,
    suffix_problem,
    token_gradients,
)
from quada.attack.loss import token_ids
from quada.attack.records import AttackKey, AttackRecords
from quada.eval.engine import approximated
from quada.eval.generate import GenerationSettings, generate
from quada.store import Store

REQUEST = "Tell me a secret"
SMALL = GcgSettings(steps=12, candidates=64, topk=32, suffix_tokens=8)


def clean(_step):
    return contextlib.nullcontext()


@pytest.mark.parametrize("spec", ["none", "bolt"])
def test_prefix_cached_loss_equals_full_recomputation(tiny, spec):
    model, tokenizer = tiny
    problem = suffix_problem(tokenizer, REQUEST, "Sure, here is", "paper", model.device)
    suffixes = torch.tensor([initial_suffix(tokenizer, 8), token_ids(tokenizer, "abcdefgh"), token_ids(tokenizer, "zz{}!?xy")])
    approximation = spec if spec == "none" else parse_spec(spec)
    with torch.no_grad(), approximated(model, approximation, tokenizer, 0):
        cached = PrefixCache(model, problem).losses(suffixes)
        full = full_losses(model, problem, suffixes)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    assert len(set(full.tolist())) == 3  # the suffixes matter


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
        start = full_losses(model, problem, torch.tensor([initial_suffix(tokenizer, 8)]))
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
