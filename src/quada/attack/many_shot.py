"""Many-shot jailbreaking: the request after many faux exchanges in which an assistant complies.

Anil et al., "Many-shot Jailbreaking", NeurIPS 2024: in-context examples of compliance with
harmful requests make a model comply with the final one, more so the more shots. The examples and
the single-turn layout ("User: ... Assistant: ..." in one message) are PyRIT's
(``many_shot_examples.json`` and ``templates/multi_parameter/many_shot_template.yaml``,
:mod:`quada.attack.sources`); the ``shots`` examples are drawn by the caller's seeded generator.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from quada.attack.sources import render


def many_shot_prompt(request: str, layout: str, examples: Sequence[Mapping[str, str]], shots: int,
                     rng: random.Random) -> str:
    """``request`` after ``shots`` of ``examples`` (fewer when there are fewer), laid out by the
    Jinja template ``layout``."""
    chosen = rng.sample(list(examples), min(shots, len(examples)))
    return render(layout, prompt=request, examples=chosen)
