"""User-facing errors: the CLI prints their message (which names the fix) and exits non-zero."""

import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress


class QuadaError(Exception):
    """A problem with the user's input or environment, not a bug: shown without a traceback."""


@contextmanager
def cleanup_after(cleanup: Callable[[], object], on_success: bool = True) -> Iterator[None]:
    """Run ``cleanup`` when the block ends (with ``on_success`` False, only when it fails). After a
    failed block, a failure of the cleanup itself is dropped, so that the block's error is the one
    reported, never replaced by the cleanup's (a read-only disk, a lost connection)."""
    try:
        yield
    except BaseException:
        with suppress(Exception):
            cleanup()
        raise
    if on_success:
        cleanup()


SEED_LIMIT = 2**32  # numpy's global seed, which training sets, must lie below it


def check_seed(seed: int) -> None:
    """Fail on a seed that some random generator of a run would reject, before any work."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT:
        raise QuadaError(f"seed must be a whole number from 0 to {SEED_LIMIT - 1}, got {seed}")
