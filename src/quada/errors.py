"""User-facing errors: the CLI prints their message (which names the fix) and exits non-zero."""

import numbers


class QuadaError(Exception):
    """A problem with the user's input or environment, not a bug: shown without a traceback."""


SEED_LIMIT = 2**32  # numpy's global seed, which training sets, must lie below it


def check_seed(seed: int) -> None:
    """Fail on a seed that some random generator of a run would reject, before any work."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT:
        raise QuadaError(f"seed must be a whole number from 0 to {SEED_LIMIT - 1}, got {seed}")
