import numpy as np
import pytest
import torch

from quada.errors import QuadaError
from quada.measures.batching import padded_batch, pool_prompt_activations, position_ids
from quada.measures.scoring import next_token_logprobs, pad_id_of
from quada.testing import tiny_model

ROWS = [[5, 6, 7], [8], [9, 10]]


def test_left_padding_ends_every_row_at_the_last_column():
    input_ids, mask = padded_batch(ROWS, pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    assert input_ids.dtype == mask.dtype == torch.long


def test_right_padding_starts_every_row_at_the_first_column():
    input_ids, mask = padded_batch(ROWS, pad_id=3, side="right")
    assert input_ids.tolist() == [[5, 6, 7], [8, 3, 3], [9, 10, 3]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_the_pad_id_does_not_change_what_a_batch_scores():
    model, tokenizer = tiny_model()
    rows, candidates = [[5, 6, 7, 8], [9], [10, 11]], [[1, 2]] * 3
    assert next_token_logprobs(model, rows, candidates, pad_id_of(tokenizer)) == next_token_logprobs(
        model, rows, candidates, pad_id=42)


def test_pooling_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 6, 4))
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]], dtype=bool)
    last = pool_prompt_activations(torch.tensor(hidden), torch.tensor(mask), "last").numpy()
    mean = pool_prompt_activations(torch.tensor(hidden), torch.tensor(mask), "mean").numpy()
    for row in range(3):
        positions = np.flatnonzero(mask[row])
        np.testing.assert_allclose(last[row], hidden[row, positions[-1]])
        np.testing.assert_allclose(mean[row], hidden[row, positions].mean(0))
    with pytest.raises(QuadaError, match="unknown pooling"):
        pool_prompt_activations(torch.tensor(hidden), torch.tensor(mask), "max")
