import pytest
import torch

from quada.measures.scoring import common_prefix_length, next_token_logprobs
from quada.testing import ARCHITECTURES, tiny_model

PREFIX = [40, 41, 42, 43, 44, 45]
# Ragged rows behind one shared prefix; the last row leaves it early, so only its first three ids
# are common to all rows.
RAGGED = [PREFIX + [7, 8, 9, 10, 11], PREFIX + [12], PREFIX + [13, 14, 15], PREFIX + [7, 8], PREFIX[:3] + [99, 98]]
CANDIDATES = [[1, 2, 3, 100]] * len(RAGGED)


def forwarded_tokens(model) -> list[tuple[int, int]]:
    """Record the (rows, columns) of every forward pass of ``model``."""
    shapes = []
    model.register_forward_pre_hook(lambda _m, _args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    return shapes


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_prefix_cached_scores_equal_each_row_scored_alone(arch, batch_size):
    model, _ = tiny_model(arch)
    shared = next_token_logprobs(model, RAGGED, CANDIDATES, pad_id=0, batch_size=batch_size)
    alone = [next_token_logprobs(model, [row], CANDIDATES[:1], pad_id=0, share_prefix=False)[0] for row in RAGGED]
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(alone), atol=1e-5, rtol=0)


def test_the_shared_prefix_runs_once_and_batches_run_only_their_own_ids():
    model, _ = tiny_model("qwen2")
    rows = [PREFIX + [7, 8, 9], PREFIX + [12], PREFIX + [13, 14]]
    shapes = forwarded_tokens(model)
    next_token_logprobs(model, rows, CANDIDATES[:3], pad_id=0, batch_size=2)
    assert shapes == [(1, len(PREFIX)), (2, 2), (1, 3)]


def test_pad_ids_between_prefix_and_row_change_nothing():
    model, _ = tiny_model("llama")
    rows = [PREFIX + [7, 8, 9, 10, 11, 12, 13], PREFIX + [14]]
    scores = [next_token_logprobs(model, rows, CANDIDATES[:2], pad_id=pad) for pad in (0, 77)]
    torch.testing.assert_close(torch.tensor(scores[0]), torch.tensor(scores[1]), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "sequences, length",
    [
        ([], 0),
        ([[1, 2, 3]], 2),
        ([[1, 2, 3], [1, 2, 3]], 2),
        ([[1, 2], [1, 2, 3, 4]], 1),
        ([[1, 2, 3], [1, 5, 3]], 1),
        ([[1, 2], [2, 2]], 0),
    ],
)
def test_the_common_prefix_leaves_every_row_an_id_of_its_own(sequences, length):
    assert common_prefix_length(sequences) == length


def test_identical_and_nested_rows_score_like_alone():
    model, _ = tiny_model("qwen2")
    rows = [PREFIX, PREFIX, PREFIX + [9, 10]]
    shared = next_token_logprobs(model, rows, CANDIDATES[:3], pad_id=0)
    alone = [next_token_logprobs(model, [row], CANDIDATES[:1], pad_id=0, share_prefix=False)[0] for row in rows]
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(alone), atol=1e-5, rtol=0)


def test_no_sequences_score_nothing():
    model, _ = tiny_model("qwen2")
    assert next_token_logprobs(model, [], [], pad_id=0) == []
