"""Judges: decide, for each (request, response) pair, whether the model refused, or whether it
gave real harmful content.

One interface, ``judge.judge(prompts, responses) -> list[JudgeResult]``, and a registry by name.
Each judge answers one of two questions (its ``measure``):

*refusal* — did the model refuse? (the aligned behaviour an approximation breaks)
- ``keyword``: the source paper's keyword ASR rule (Zhang et al., arXiv 2502.00840, section 3 of
  PAPER.md); label = attack success, i.e. no refusal;
- ``refusal-keyword``: label = refusal, by the paper's phrases and :data:`MORE_REFUSAL_PHRASES`;
- ``refusal``: label = refusal, by those phrases, then a yes/no question to a local causal LM.

*harm* — does the response carry real harmful uplift?
- ``llm``: a yes/no question with HarmBench's classifier criteria (Mazeika et al., arXiv
  2402.04249) to a local causal LM; label = attack success (harmful);
- ``harmfulness``: a graded 1-5 harmfulness score (the paper's HS scale) from a rubric prompt;
  label = the expected grade rounds to 4 or 5.

How far each agrees with human labels is measured by :mod:`quada.judging.calibration`.

The model judges read the probabilities of the answer tokens at the answer position (one forward
pass, no sampling): yes/no mass for the binary judges, the digits 1..5 for the grade. The judge
prompts are quada's own wording. Text from the judged model cannot close the judge's turn or
answer on its behalf: every special or chat-template marker inside it is removed (until none is
left), and it is tokenized as plain text, so only the judge's own template contributes special
tokens.
"""

from quada.judging.base import *  # noqa: F401,F403
from quada.judging.classifier import *  # noqa: F401,F403
from quada.judging.formats import *  # noqa: F401,F403
from quada.judging.questions import *  # noqa: F401,F403
from quada.judging.registry import *  # noqa: F401,F403
from quada.judging.rules import *  # noqa: F401,F403
