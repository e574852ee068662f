"""Counter-based random draws: noise that is a pure function of what it belongs to.

An approximation's noise at one activation entry is a function of (seed, technique, layer, site)
— folded on the host into a 64-bit *stream key* — and of (the prompt the row belongs to, the
position of the token within that prompt's own sequence, the channel). Nothing depends on the
batch, its padding, the row's index or on which other rows are still running, so a prompt gets
the same draws alone or in any batch, on any executor, after any resume.

The generator is an integer hash, computed with int64 tensor operations on the activation's
device: every intermediate value stays in ``[0, 2^32)``, products stay within int64 (a multiplier
above ``2^31`` is used as its negative twin, equal modulo ``2^32``), and shifts act on
non-negative values only. So one key gives bit-identical 32-bit draws on a CPU and a GPU; the
floating-point transform after it (``erfinv``, ``log1p``) agrees to the last bits.

- The mixing function is ``lowbias32`` (C. Wellons, "Prospecting for hash functions", 2018,
  hash-prospector; constants 0x7feb352d and 0x846ca68b), a bijection of 32-bit integers.
- Words are chained by ``h <- mix(h ^ word)``: stream key (two words), row key (two words),
  position, then the channel, whose word is itself the mixed channel index.
- A draw keeps the top 24 bits as a uniform ``u = (k + 1/2) / 2^24`` in (0, 1), exact in float32.
  Normal draws use the inverse CDF, ``z = sqrt(2) * erfinv(2u - 1)`` (|z| <= 5.4); Laplace draws
  ``eps = -b * sgn(w) * ln(1 - |w|)`` with ``w = 2u - 1``, the inverse CDF of Lap(0, b).
"""

from __future__ import annotations

import hashlib
import math

import torch

# The version of how random draws are keyed: part of every stream key, and of the generation keys of
# the results store (rows drawn under another scheme are never reused). 2: counter-based draws keyed
# by prompt and position (1 drew from one generator stream per chunk of prompts).
DRAW_SCHEME = 2

MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)  # 0x846ca68b modulo 2^32, kept below 2^31 in magnitude so products fit int64
UNIFORM_BITS = 24


def mix32(x: torch.Tensor) -> torch.Tensor:
    """``lowbias32`` on int64 tensors holding 32-bit values: x ^= x >> 16; x *= 0x7feb352d;
    x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16 (all modulo 2^32). Values stay in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & MASK32
    return x ^ (x >> 16)


def key64(*parts) -> int:
    """A 64-bit key fixed by ``parts`` (joined as text with ``:``; SHA-256), on the host."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def split64(key: int) -> tuple[int, int]:
    """The low and high 32-bit words of a 64-bit key."""
    return key & MASK32, (key >> 32) & MASK32


def token_keys(stream: int, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(batch, seq) 32-bit keys of each token: the stream key, the row's 64-bit key (``rows``:
    (batch, 2) int64 words) and the token's position (``positions``: (batch, seq), any integers;
    padding may hold -1), chained through :func:`mix32`."""
    low, high = split64(stream)
    h = mix32(mix32(rows[:, :1] ^ low) ^ high)  # (batch, 1)
    h = mix32(mix32(h ^ rows[:, 1:]) ^ (positions & MASK32))
    return h


def channel_words(channels: int, device: torch.device) -> torch.Tensor:
    """(channels,) the mixed channel indices that :func:`uniform_bits` folds into each token key."""
    return mix32(torch.arange(channels, dtype=torch.int64, device=device) + 0x9E3779B9)


def uniform_bits(stream: int, rows: torch.Tensor, positions: torch.Tensor, channels: int) -> torch.Tensor:
    """(batch, seq, channels) 32-bit draws, each a pure function of (stream, row key, position,
    channel); computed on ``positions``' device."""
    tokens = token_keys(stream, rows, positions)
    return mix32(tokens[..., None] ^ channel_words(channels, positions.device))


def centred_uniform(bits: torch.Tensor) -> torch.Tensor:
    """float32 ``w = 2u - 1`` in (-1, 1) from the top 24 of 32 bits, with ``u = (k + 1/2) / 2^24``:
    every value is exact in float32 and ``|w| <= 1 - 2^-24``."""
    top = (bits >> (32 - UNIFORM_BITS)).to(torch.float32)
    return top * 2.0 ** (1 - UNIFORM_BITS) - (1 - 2.0**-UNIFORM_BITS)


def standard_normal(bits: torch.Tensor) -> torch.Tensor:
    """N(0, 1) draws by the inverse CDF: ``z = sqrt(2) * erfinv(2u - 1)`` (float32)."""
    return torch.erfinv(centred_uniform(bits)) * math.sqrt(2)


def laplace(bits: torch.Tensor, scale: float) -> torch.Tensor:
    """Lap(0, ``scale``) draws by the inverse CDF: ``eps = -b * sgn(w) * ln(1 - |w|)``, w = 2u - 1
    (float32). ``1 - |w| >= 2^-24``, so every draw is finite."""
    w = centred_uniform(bits)
    return -scale * torch.sign(w) * torch.log1p(-w.abs())
