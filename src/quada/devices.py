"""Where and in what number format models run: the ``device`` and ``dtype`` options of
``quada.models.load`` and of every command that loads a model.

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


# --------------------------------------------------------------------------- dtypes

DTYPES = ("auto", "bfloat16", "float16", "float32")
DTYPE_HELP = ("Number format the models run in: auto (bfloat16 on a GPU of compute capability 8.0 or more and on a "
              "CPU with native bf16, AVX-512 BF16 or AMX; float16 on older GPUs; float32 on other CPUs, where bf16 "
              "is emulated and slower), bfloat16, float16 or float32. Part of every stored row's key.")
# CPU flags (Linux /proc/cpuinfo) of native bf16 arithmetic: x86 AVX-512 BF16 and AMX, Arm's BF16 extension.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def check_dtype(dtype: str) -> str:
    """``dtype`` as one of :data:`DTYPES` (only its spelling is checked)."""
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name not in DTYPES:
        raise QuadaError(f"unknown dtype {str(dtype)!r}; choose one of {', '.join(DTYPES)}")
    return name


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (``flags`` on x86, ``Features`` on Arm); empty
    where /proc/cpuinfo cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16, AMX or Arm BF16)."""
    return bool(NATIVE_BF16_FLAGS & cpu_flags())


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The torch dtype that ``dtype`` names for a model on ``device``; ``auto`` picks by hardware:
    bf16 on a CUDA GPU of compute capability 8.0 or more (fp16 below), bf16 on a CPU with native bf16,
    else float32 (on an AVX2-only CPU bf16 runs several times slower than float32)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = check_dtype(dtype)
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if device.type == "cpu" and native_bf16():
        return torch.bfloat16
    return torch.float32


# The CPU flags that decide how fast a model runs here: vector width, fused multiply-add, native bf16.
SPEED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve", "bf16")


def cpu_name() -> str:
    """The CPU's model name and family (``lscpu``'s "Model name" and "CPU family", from
    /proc/cpuinfo), its speed-relevant flags and its core count: what a measured time must be read
    beside."""
    import os
    import platform

    fields: dict[str, str] = {}  # the first processor's
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    family = f" (family {fields['cpu family']})" if fields.get("cpu family") else ""
    flags = [f for f in SPEED_FLAGS if f in cpu_flags()]
    return f"{name}{family}, {os.cpu_count()} cores, flags: {' '.join(flags) or 'unknown'}"
