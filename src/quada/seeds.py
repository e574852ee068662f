"""Seeds derived from what a random draw belongs to, never from run history."""

import hashlib


def derived_seed(*parts) -> int:
    """A 32-bit seed fixed by ``parts`` (joined as text with ``:``): the same parts give the same
    seed in every run and process, so a resumed run draws exactly what an uninterrupted one would."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")
