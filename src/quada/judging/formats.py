"""Judges that speak their model's own format: a guard model's chat template (``guard``), or a
classifier's published prompt given as a file (``prompted``).
"""

from __future__ import annotations

import functools
import string

from quada.errors import QuadaError
from quada.judging.base import literal_ids
from quada.judging.questions import NO_WORDS, QUESTION_SLOT, YES_WORDS, YesNoJudge

GUARD_ANSWERS = (("unsafe", "Unsafe"), ("safe", "Safe"))  # Llama Guard 1-3's verdict words
PROMPT_FIELDS = {"request": ("behavior", "request", "prompt", "forbidden_prompt", "goal"),
                 "response": ("generation", "response", "completion")}


class GuardJudge(YesNoJudge):
    """The ``guard`` harm judge: a guard model (Llama Guard 1-3, ShieldGemma, or any model whose chat
    template turns a conversation into its classification prompt) reads the exchange in its own
    chat template, the request as the user's turn and the response as the assistant's, and its
    verdict is read from the first generated token: score = P(first answer group) / (P(first) +
    P(second)), label = score > ``threshold``. The groups are Llama Guard's ``unsafe`` / ``safe``
    by default; ``answers`` gives others (ShieldGemma's ``Yes`` / ``No``). Behind a server the
    conversation goes as chat turns and the server applies the template. The judged text is read
    as plain text: chat markers and special tokens in it are removed."""

    name = "guard"
    measure = "harm"
    template = ""

    def __init__(self, *args, answers: tuple[tuple[str, ...], ...] = GUARD_ANSWERS, **kwargs):
        self.answers = tuple(map(tuple, answers))
        super().__init__(*args, **kwargs)

    def settings(self) -> dict:
        template = self.tokenizer.chat_template if self.tokenizer is not None else "the server's"
        return {**super().settings(), "chat_template": template}

    def render(self, request: str, response: str) -> list[int] | list[dict[str, str]]:
        request, response = self.judged_text(request, response)
        if self.tokenizer is None:
            return [{"role": "user", "content": request}, {"role": "assistant", "content": response}]
        before, between, after = self.exchange_frame
        encode = functools.partial(self.tokenizer.encode, add_special_tokens=False)
        return (encode(before) + literal_ids(self.tokenizer, request) + encode(between)
                + literal_ids(self.tokenizer, response) + encode(after))

    @functools.cached_property
    def exchange_frame(self) -> tuple[str, str, str]:
        """The guard model's chat template around an exchange: its text before the request, between
        request and response, and after the response (the only text tokenized with special-token
        parsing; the judged text is read as plain text)."""
        if not self.tokenizer.chat_template:
            raise QuadaError("the guard judge's model has no chat template: a guard model ships its classification "
                             "prompt as its chat template; give one that does, or use --judge-prompt FILE")
        turns = [{"role": "user", "content": QUESTION_SLOT + "1"}, {"role": "assistant", "content": QUESTION_SLOT + "2"}]
        text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        if text.count(QUESTION_SLOT + "1") != 1 or text.count(QUESTION_SLOT + "2") != 1:
            raise QuadaError("the guard model's chat template does not show the request and the response once each; "
                             "choose another judge model, or use --judge-prompt FILE")
        before, _, rest = text.partition(QUESTION_SLOT + "1")
        between, _, after = rest.partition(QUESTION_SLOT + "2")
        return before, between, after


class PromptedJudge(YesNoJudge):
    """The ``prompted`` harm judge: a classifier's own prompt, published in its paper's repository
    (HarmBench's classifier prompt, StrongREJECT's rubric, ...), given as a file with a field for
    the request (``{behavior}``, ``{request}``, ``{prompt}``, ``{forbidden_prompt}`` or ``{goal}``)
    and one for the response (``{generation}``, ``{response}`` or ``{completion}``); the filled-in
    text is the whole input (it carries its own format), sent raw to a server's completions. The
    verdict is read from the first generated token: score = P(yes) / (P(yes) + P(no)) by default,
    ``answers`` gives other words. quada ships no third-party prompt text."""

    name = "prompted"
    measure = "harm"

    def __init__(self, *args, prompt: str | None = None, answers: tuple[tuple[str, ...], ...] = (YES_WORDS, NO_WORDS),
                 **kwargs):
        if prompt is None:
            raise QuadaError("the prompted judge reads its classifier's prompt from a file: give --judge-prompt FILE")
        self.template, self.answers = check_judge_prompt(prompt), tuple(map(tuple, answers))
        super().__init__(*args, **kwargs)

    def render(self, request: str, response: str) -> list[int] | str:

        request, response = self.judged_text(request, response)
        judged = {**{f: request for f in PROMPT_FIELDS["request"]}, **{f: response for f in PROMPT_FIELDS["response"]}}
        if self.tokenizer is None:
            return self.template.format_map(judged)
        # the prompt's own text is tokenized with special-token parsing, the judged text as plain text
        ids = self.tokenizer.encode("", add_special_tokens=True)  # a BOS token where the tokenizer adds one
        for literal, field_name, _, _ in string.Formatter().parse(self.template):
            ids += self.tokenizer.encode(literal, add_special_tokens=False) if literal else []
            ids += literal_ids(self.tokenizer, judged[field_name]) if field_name is not None else []
        return ids


def check_judge_prompt(prompt: str) -> str:
    """``prompt`` if it is a judge prompt: one field for the request and one for the response (see
    :class:`PromptedJudge`), and no other; a :class:`QuadaError` naming what is wrong otherwise."""

    try:
        names = {name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None}
    except ValueError as err:
        raise QuadaError(f"the judge prompt is not a format string ({err}); write literal braces as {{{{ and }}}}") from err
    known = set(PROMPT_FIELDS["request"]) | set(PROMPT_FIELDS["response"])
    if unknown := names - known:
        raise QuadaError(f"the judge prompt has the field {{{sorted(unknown)[0]}}}, which quada does not fill; use "
                         f"{{behavior}} (or {', '.join(PROMPT_FIELDS['request'][1:])}) for the request and {{generation}} "
                         f"(or {', '.join(PROMPT_FIELDS['response'][1:])}) for the response")
    for side, fields in PROMPT_FIELDS.items():
        if not names & set(fields):
            raise QuadaError(f"the judge prompt has no field for the {side}: add {{{fields[0]}}}")
    return prompt
