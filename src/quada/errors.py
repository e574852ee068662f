"""User-facing errors: the CLI prints their message (which names the fix) and exits non-zero."""


class QuadaError(Exception):
    """A problem with the user's input or environment, not a bug: shown without a traceback."""
