"""User-facing errors and warnings: the CLI prints their message (which names the fix); an error
ends the command with a non-zero exit code, a warning lets it run."""

import numbers
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress


class QuadaError(Exception):
    """A problem with the user's input or environment, not a bug: shown without a traceback."""


class QuadaWarning(UserWarning):
    """Input that runs, but perhaps not as the user meant: the CLI prints it as one line."""


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


def warn(message: str) -> None:
    """Tell the user ``message`` (a :class:`QuadaWarning`) and go on: library code never prints."""
    warnings.warn(message, QuadaWarning, stacklevel=2)


SEED_LIMIT = 2**32  # numpy's global seed, which training sets, must lie below it


def check_seed(seed: int) -> None:
    """Fail on a seed that some random generator of a run would reject, before any work."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT:
        raise QuadaError(f"seed must be a whole number from 0 to {SEED_LIMIT - 1}, got {seed}")
