"""Numbers as the reports and the command line print them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quada.stats.metrics import Estimate


def percent_interval(estimate: Estimate | None) -> str:
    """A rate in percent with its 95% interval, ``"12.5 [6.2, 25.0]"``; ``"-"`` when not measured."""
    if estimate is None:
        return "-"
    return f"{100 * estimate.value:.1f} [{100 * estimate.low:.1f}, {100 * estimate.high:.1f}]"


def plain_number(value: float) -> str:
    """A number as spec text: whole numbers without a decimal point (so integer options parse),
    others in their shortest exact form."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
