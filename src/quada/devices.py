"""Where models run: the ``device`` option of ``quada.models.load`` and of every command that loads one.

``auto`` takes the first CUDA GPU when there is one and the CPU otherwise; ``cpu``, ``cuda`` and
``cuda:N`` name a device. ``balanced`` is for a model too large for one GPU: :func:`quada.models.load`
hands it to accelerate (``device_map="auto"``), which spreads its layers over every visible GPU (and
the CPU when they are full); its inputs start where :func:`resolve_device` says, as for ``auto``.
A name is checked in two steps: its spelling when a run is configured (so a typo fails before any
work), and whether the machine has that device when a model loads.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from quada.errors import QuadaError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = ("Where models run: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N, or balanced "
               "(the model's layers spread over every visible GPU, for a model too large for one).")
BALANCED = "balanced"
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?|balanced")


def check_device(device: str | torch.device) -> str:
    """``device`` as a canonical name (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``balanced``); only its spelling
    is checked, not whether this machine has it."""
    name = str(device).strip().lower()
    if not _DEVICE_NAME.fullmatch(name):
        raise QuadaError(f"unknown device {str(device)!r}; choose auto, cpu, cuda or cuda:N (e.g. cuda:0), or balanced")
    return name


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device that ``device`` names on this machine (for ``balanced``: where a spread
    model's first layers, and so its inputs, go); asking for a CUDA device that is
    not there raises a ``QuadaError`` that says what to use instead."""
    import torch  # here, not at the top: the command line checks device names without loading torch

    name = check_device(device)
    if name in ("auto", BALANCED):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = torch.device(name)
    if target.type != "cuda":
        return target
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise QuadaError(f"device {name!r} was asked for, but {why}; use --device cpu (device='cpu'), or auto to take a GPU only when there is one")
    if target.index is not None and target.index >= count:
        raise QuadaError(f"there is no {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return target
