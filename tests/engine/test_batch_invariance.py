"""A row is a function of its key: under every technique and every preset of the paper, a prompt
gets the same tokens alone, beside longer and shorter prompts, at any batch size, and while other
rows of its batch stop early (tiny float32 models; see the README for bfloat16)."""

import pytest

from quada.approx import PAPER_PRESETS, apply, parse_spec
from quada.chat import format_prompt
from quada.measures.batching import padded_batch
from quada.measures.generate import (
    GenerationSettings,
    eos_token_ids,
    generate,
    greedy_batch,
)
from quada.measures.scoring import pad_id_of
from quada.testing import tiny_model

# Every technique and the paper's twelve presets. The first ones are strong enough to change a tiny
# model's answers; the polynomials are accurate enough that they may not.
STRONG = (
    "noise:site=up,dist=gaussian,std=0.5", "noise:site=down,dist=laplace,scale=0.3",
    "noise:site=norm_all,dist=gaussian,std=0.3", "noise:site=act,dist=gaussian,std=0.3",
    "noise:site=up,dist=truncated,threshold=0.5", "teal:sparsity=0.5", "cats:sparsity=0.5", "smoothquant:bits=4",
    "omniquant:bits=4,steps=2",
)
TECHNIQUES = STRONG + ("bolt", "bumblebee", "bumblebee2", "nexus", "puma", "iron")
PROMPTS = {f"p{i}": text for i, text in enumerate([
    "Hi", "Tell me a story about a cat and a hat", "Why?", "List three colours, then three shapes, then three fruits",
    "Say yes", "What is the capital of a country that has a long coastline and many islands?", "Count", "Go on",
])}
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=1)


def responses(model, tokenizer, batch_size: int | None = None) -> dict[str, str]:
    """Every prompt's response from :func:`generate`, at ``batch_size``."""
    out = generate(model, tokenizer, list(PROMPTS.values()), GenerationSettings(max_new_tokens=NEW_TOKENS),
                   batch_size=batch_size, progress=False, prompt_ids=list(PROMPTS))
    return dict(zip(PROMPTS, out))


def token_ids(model, tokenizer, ids, stop=None) -> dict[str, list[int]]:
    """Each prompt's new token ids, all of ``ids`` in one left-padded batch."""
    rows = [tokenizer(format_prompt(tokenizer, PROMPTS[i], "plain"), add_special_tokens=False)["input_ids"] for i in ids]
    input_ids, mask = padded_batch(rows, pad_id_of(tokenizer))
    out = greedy_batch(model, input_ids, mask, NEW_TOKENS, eos_token_ids(model, tokenizer), stop, row_ids=list(ids))
    return dict(zip(ids, out))


@pytest.mark.parametrize("spec", TECHNIQUES + PAPER_PRESETS)
def test_a_prompt_gets_the_same_tokens_in_any_batch(tiny, spec):
    model, tokenizer = tiny
    clean = responses(model, tokenizer)
    with apply(model, parse_spec(spec), seed=3, tokenizer=tokenizer):
        full = {i: token_ids(model, tokenizer, (i,))[i] for i in PROMPTS}  # each prompt alone
        alone = {i: tokenizer.decode(ids, skip_special_tokens=True) for i, ids in full.items()}
        for batch_size in (1, 3, 8):
            assert responses(model, tokenizer, batch_size) == alone
        # Rows stop early: the first two prompts end after two tokens, the others go on beside them.
        stoppers = {tuple(full[i][:2]) for i in ("p0", "p1")}
        going_on = [i for i in PROMPTS if tuple(full[i][:2]) not in stoppers]
        stopped = token_ids(model, tokenizer, tuple(PROMPTS), stop=lambda new: len(new) == 2 and tuple(new) in stoppers)
    assert len(going_on) >= 2
    assert all(stopped[i] == full[i][:2] for i in ("p0", "p1")) and all(stopped[i] == full[i] for i in going_on)
    if spec in STRONG:
        assert alone != clean  # the approximation acts at this strength


def test_a_prompt_draws_other_noise_under_another_id_or_seed(tiny):
    model, tokenizer = tiny
    noise = parse_spec("noise:site=up,dist=gaussian,std=0.5")
    many = {f"q{i}": "Tell me a story about a cat and a hat" for i in range(6)}
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS)
    with apply(model, noise, seed=3, tokenizer=tokenizer):
        by_id = generate(model, tokenizer, list(many.values()), settings, progress=False, prompt_ids=list(many))
    with apply(model, noise, seed=4, tokenizer=tokenizer):
        by_seed = generate(model, tokenizer, list(many.values()), settings, progress=False, prompt_ids=list(many))
    assert len(set(by_id)) > 1  # the same text under six ids: six draws
    assert by_seed != by_id


@pytest.mark.parametrize("spec", ["teal:sparsity=0.5", "cats:sparsity=0.5", "noise:site=up,dist=truncated,threshold=0.5"])
def test_sparsity_is_counted_over_the_rows_own_tokens(tiny, spec):
    # A batch counts what its prompts count alone: padding is never counted.
    model, tokenizer = tiny

    def counted(*ids):
        with apply(model, parse_spec(spec), seed=0, tokenizer=tokenizer) as applied:
            token_ids(model, tokenizer, ids)
            return {key: tuple(c.tolist()) for key, c in applied.installation.counters.items()}

    short, long, both = counted("p0"), counted("p5"), counted("p0", "p5")
    assert both == {key: (short[key][0] + long[key][0], short[key][1] + long[key][1]) for key in both}
    assert any(zeroed for zeroed, _ in both.values())
