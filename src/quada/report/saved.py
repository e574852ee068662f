"""Reading a results file back: the pieces every kind of results file shares."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from quada.stats.metrics import Estimate


def saved_config(saved: dict, run_dir: Path) -> SimpleNamespace:
    """The configuration a results file was written with, as read-only attributes.

    The report only reads it, so it is not validated again: a results file stays readable on a
    machine without the device it ran on, and after the folder was moved (``run_dir`` is where it
    is now).
    """
    return SimpleNamespace(**{**saved["config"], "run_dir": run_dir})


def estimate_or_none(saved: dict | None) -> Estimate | None:
    """An :class:`Estimate` saved as a dict, or ``None`` for a measurement that was not made."""
    return None if saved is None else Estimate(**saved)
