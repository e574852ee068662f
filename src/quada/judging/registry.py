"""Every judge by name, what each measures, and how a judge and its model are made.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quada.defaults import DEFAULT_JUDGE_MODEL
from quada.errors import QuadaError
from quada.judging.base import Judge, JudgeResult
from quada.judging.classifier import STANDS_FOR, ClassifierJudge
from quada.judging.formats import GuardJudge, PromptedJudge
from quada.judging.questions import (
    ComplianceJudge,
    HarmfulnessJudge,
    LogitJudge,
    RefusalJudge,
    UpliftJudge,
)
from quada.judging.rules import KeywordJudge, RefusalKeywordJudge
from quada.models import is_sequence_classifier

MODEL_JUDGES: dict[str, type[LogitJudge]] = {
    ComplianceJudge.name: ComplianceJudge,
    UpliftJudge.name: UpliftJudge,
    HarmfulnessJudge.name: HarmfulnessJudge,
    RefusalJudge.name: RefusalJudge,
    GuardJudge.name: GuardJudge,
    PromptedJudge.name: PromptedJudge,
}
JUDGE_CLASSES: dict[str, type[Judge]] = {
    KeywordJudge.name: KeywordJudge, RefusalKeywordJudge.name: RefusalKeywordJudge, **MODEL_JUDGES,
}
JUDGES = tuple(JUDGE_CLASSES)
# The judges that can decide an attack success rate on harmful prompts: refusal judges (the attack
# succeeds when the model does not refuse) and the uplift and llm harm judges (when the response is harmful).
# The harmfulness judge gives a mean grade instead.
SAFETY_JUDGES = (KeywordJudge.name, RefusalKeywordJudge.name, RefusalJudge.name, ComplianceJudge.name, UpliftJudge.name,
                 GuardJudge.name, PromptedJudge.name)
ASR_NAMES = {"refusal": "no-refusal ASR", "harm": "harm ASR"}
# Judges whose score is a grade that the reports give as a mean (HS), with its AUROC against human labels.
GRADED_JUDGES = (HarmfulnessJudge.name,)
GRADE_RANGE = (1.0, 5.0)  # the lowest and highest grade a graded judge gives


def asr_name(name: str) -> str:
    """What the ASR by the judge ``name`` counts: "no-refusal ASR" or "harm ASR"."""
    return ASR_NAMES[JUDGE_CLASSES[name].measure]


def attack_outcomes(name: str, labels: Sequence[bool]) -> list[bool]:
    """The attack outcomes behind stored ``labels`` of the judge ``name``: not refused (a refusal
    judge) or harmful (a harm judge)."""
    return [label == JUDGE_CLASSES[name].label_is_attack for label in labels]


LLAMACPP_JUDGE = "llamacpp:"  # --judge-model llamacpp:<GGUF file or built-in>: the judge's model in llama.cpp
OPENAI_JUDGE = "openai:"  # --judge-model openai:<base URL>@<model name>: the judge's model behind a server


@functools.cache
def load_judge_model(source: str = DEFAULT_JUDGE_MODEL, device: str = "auto",
                     dtype: str = "auto") -> tuple[Any, PreTrainedTokenizerBase]:
    """Load a judge model: with transformers on ``device`` in ``dtype`` (a causal LM or a sequence
    classifier), or, for ``llamacpp:<GGUF file or built-in>``, in llama.cpp here with the tokenizer
    its vocabulary was read into (:class:`quada.backends.llamacpp.LlamaCppScorer`). Loaded once per
    process, device and dtype: every model judge built from ``source`` shares it."""
    from quada.models import load, resolve

    if source.startswith(OPENAI_JUDGE):
        from quada.backends.openai import OpenAIScorer

        return OpenAIScorer(source.removeprefix(OPENAI_JUDGE)), None
    if source.startswith(LLAMACPP_JUDGE):
        from transformers import AutoTokenizer

        from quada.backends.llamacpp import LlamaCppScorer

        target = source.removeprefix(LLAMACPP_JUDGE)
        tokenizer = AutoTokenizer.from_pretrained(resolve(target))
        return LlamaCppScorer(target, tokenizer), tokenizer
    return load(source, dtype=dtype, device=device, classifier_ok=True)


def check_judge_model(names: Sequence[str], model_source: str) -> None:
    """Fail now, before any generation, on a judge model that cannot be found when one of the judges
    ``names`` needs it (the ``refusal`` judge falls back to keywords instead). The source is only
    checked (see :func:`quada.models.check_source`), neither converted nor loaded."""
    from quada.models import check_source

    if any(name in MODEL_JUDGES and name != RefusalJudge.name for name in names):
        if model_source.startswith((LLAMACPP_JUDGE, OPENAI_JUDGE)):
            from quada.backends import check_deployment, parse_deployment

            check_deployment(parse_deployment(model_source))
        else:
            check_source(model_source)


def make_judge(
    name: str,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    model_source: str = DEFAULT_JUDGE_MODEL,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    **options,
) -> Judge:
    """The judge called ``name`` (one of :data:`JUDGES`).

    Model judges use the given ``model`` and ``tokenizer``, else load ``model_source`` (a built-in
    name, folder, GGUF file or hub id) on ``device`` once per process; a sequence classifier there
    makes ``llm`` and ``refusal`` a :class:`ClassifierJudge`; ``dtype`` is the judge model's number
    format when it is loaded here (see :func:`quada.devices.resolve_dtype`). ``refusal`` falls back to
    ``refusal-keyword``, with a warning, when no model is given and ``model_source`` cannot be
    loaded; the result's judge identity records which one ran. ``options`` go to the judge's
    constructor (e.g. ``threshold``, ``max_response_tokens`` of the question judges,
    ``positive_label`` of a classifier).
    """
    if name == KeywordJudge.name:
        return KeywordJudge()
    if name == RefusalKeywordJudge.name:
        return RefusalKeywordJudge()
    if name not in MODEL_JUDGES:
        raise QuadaError(f"unknown judge {name!r}; choose one of {', '.join(JUDGES)}")
    if (model is None and tokenizer is not None) or (isinstance(model, torch.nn.Module) and tokenizer is None):
        raise QuadaError("give the judge model and its tokenizer together, or neither")
    if model is None:
        try:
            model, tokenizer = load_judge_model(model_source, device, dtype)
        except QuadaError as err:
            if name != RefusalJudge.name:
                raise
            warnings.warn(f"refusal judge model unavailable ({err}); using the refusal-keyword judge", stacklevel=2)
            return RefusalKeywordJudge()
    if isinstance(model, torch.nn.Module) and is_sequence_classifier(model.config):
        if name not in STANDS_FOR:
            raise QuadaError(
                f"the {name} judge asks a causal LM its own question, and {model_source} is a sequence "
                "classifier; use it for the llm or refusal judge, or give a causal LM as --judge-model"
            )
        return ClassifierJudge(name, model, tokenizer, batch_size=batch_size, **options)
    return MODEL_JUDGES[name](model, tokenizer, batch_size=batch_size, **options)


def oriented(judge: Judge, measure: str, result: JudgeResult) -> tuple[bool, float]:
    """``result`` as an answer to ``measure``'s question: (label, score), true and high meaning
    refused (refusal) or harmful (harm). A judge of the other measure cannot answer it."""
    if judge.measure != measure:
        raise QuadaError(f"the {judge.name} judge measures {judge.measure}, not {measure}")
    if measure == "harm" or not judge.label_is_attack:
        return result.label, result.score
    return not result.label, -result.score  # the keyword rule: success means no refusal
