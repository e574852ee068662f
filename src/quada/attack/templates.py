"""Jailbreak templates collected in the wild, filled with the request.

The templates are PyRIT's (``datasets/jailbreak/templates``, :mod:`quada.attack.sources`): the
named collection (DAN, AIM, developer mode, ...; mostly from jailbreakchat.com) and the
in-the-wild prompts of Shen et al., "Do Anything Now: Characterizing and Evaluating In-The-Wild
Jailbreak Prompts on Large Language Models", ACM CCS 2024, turned into single-slot templates by
PyRIT. Each behaviour gets one template, drawn by the caller's seeded generator, so the ASR is
that of a randomly drawn template.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from quada.attack.sources import fill


def template_prompt(request: str, templates: Sequence[tuple[str, str]], rng: random.Random) -> tuple[str, str]:
    """``request`` in one of the ``(name, template)`` pairs, and that template's name."""
    name, template = templates[rng.randrange(len(templates))]
    return fill(template, request), name
