"""Polynomial activations of private inference (MPC/FHE), applied by swapping the act_fn module.

Every approximation here is a piecewise polynomial ``f`` with ``f(x) = 0`` below the first break,
``f(x) = x`` above the last, and one polynomial per interval in between; forms such as
``x/2 + Q(|x|)`` or ``x * S(|x|)`` are rewritten into that shape exactly (see the helpers), so one
evaluator, ``piecewise_poly``, serves them all. Sources (coefficients as published, PAPER.md
section 2): BOLT (Pang et al., S&P 2024), BumbleBee (Lu et al., NDSS 2025, official code), NEXUS
(Zhang et al., NDSS 2024), Puma (Dong et al. 2023, SecretFlow-SPU), Iron (Hao et al., NeurIPS 2022).

SiLU models get the published SiLU approximation where one exists (BumbleBee, Puma). For BOLT and
NEXUS, which publish only GELU, we fit the same piece layout and degrees to SiLU by least squares
**[ours]**, with the breaks stretched by 1.702, the constant of ``gelu(x) ~ x * sigmoid(1.702x)``
(Hendrycks & Gimpel 2016), so the SiLU pieces cover the same part of the curve. Iron's SiLU is
the same fixed-point tanh evaluation of ``x/2 * (1 + tanh(x/2))`` **[ours]**.

Every replacement acts entry by entry, with no statistic over a row or a tensor, as deployed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from quada.approx.base import ApproxConfig, installs, register
from quada.approx.sites import Decoder, activation_kind
from quada.errors import QuadaError

Pieces = tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]  # (breaks, ascending coefficients per interval)


def horner(x: torch.Tensor, coeffs: Sequence[float]) -> torch.Tensor:
    """``sum_k coeffs[k] * x**k`` by Horner's rule."""
    out = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        out = out * x + c
    return out


def piecewise_poly(x: torch.Tensor, breaks: Sequence[float], polys: Sequence[Sequence[float]]) -> torch.Tensor:
    """0 for ``x < breaks[0]``; ``polys[i](x)`` on ``[breaks[i], breaks[i+1])``; ``x`` for
    ``x >= breaks[-1]`` (the layout shared by BOLT, BumbleBee, NEXUS and Puma)."""
    out = torch.where(x >= breaks[-1], x, torch.zeros_like(x))
    for lo, hi, coeffs in zip(breaks[:-1], breaks[1:], polys):
        out = torch.where((x >= lo) & (x < hi), horner(x, coeffs), out)
    return out


def half_x_plus_abs_poly(q: Sequence[float], bound: float) -> Pieces:
    """Pieces of ``x/2 + Q(|x|)`` on ``[-bound, bound]``: on ``x < 0``, ``Q(-x)`` flips the sign of
    odd coefficients (BOLT: GELU(x) ~ 0.5x + Q4(|x|), since GELU(x) - x/2 is even)."""
    neg = [c * (-1) ** k + 0.5 * (k == 1) for k, c in enumerate(q)]
    pos = [c + 0.5 * (k == 1) for k, c in enumerate(q)]
    return (-bound, 0.0, bound), (tuple(neg), tuple(pos))


def x_times_sigmoid_poly(s: Sequence[float], bound: float) -> Pieces:
    """Pieces of ``x * sigmoid(x)`` with ``sigmoid(|x|) ~ S(|x|)`` and ``sigmoid(x) = 1 - S(-x)`` for
    ``x < 0`` (BumbleBee SiLU): ``x * S(x)`` on ``[0, bound)`` and ``x - x * S(-x)`` below."""
    neg_s = [c * (-1) ** k for k, c in enumerate(s)]
    pos = (0.0, *s)
    neg = tuple((1.0 if k == 1 else 0.0) - c for k, c in enumerate((0.0, *neg_s)))
    return (-bound, 0.0, bound), (neg, pos)


# --- published coefficients (ascending powers) ---------------------------------------------
BOLT_Q4 = (0.001620808531841547, -0.03798164612714154, 0.5410550166368381, -0.18352506127082727, 0.020848611754127593)
BUMBLEBEE_P3 = (-0.5054031199708174, -0.42226581151983866, -0.11807612951181953, -0.011034134030615728)
BUMBLEBEE_P6 = (0.008526321541038084, 0.5, 0.3603292692789629, 0.0, -0.037688200365904236, 0.0, 0.0018067462606141187)
BUMBLEBEE_S4 = (0.49352908920523014, 0.3028510171823098, -0.06808619212463336, 0.006747908074344234, -0.0002472776978734074)
PUMA_SILU_P2 = (-0.3067541139982155, -0.0819767021525476, -0.0055465625580307)
PUMA_SILU_P6 = (0.0085064025895951, 0.5, 0.2281430841728270, 0.0, -0.011113046708173, 0.0, 0.0002743776353465)
NEXUS_P12 = (
    2.25775755e-04, 0.5, 3.96880960e-01, 0, -6.37042698e-02, 0, 8.38841647e-03,
    0, -7.17830961e-04, 0, 3.49617829e-05, 0, -7.26059653e-07,
)  # fmt: skip
GELU_TO_SILU = 1.702  # gelu(x) ~ x * sigmoid(1.702 x): a SiLU break at 1.702*b matches a GELU break at b


def fit_abs_poly(target: Callable[[np.ndarray], np.ndarray], bound: float, powers: Sequence[int]) -> tuple[float, ...]:
    """Least-squares ``Q`` with the given powers such that ``x/2 + Q(|x|) ~ target(x)`` on
    ``[0, bound]`` **[ours]**; fitted in ``t = x / bound`` for conditioning. Ascending coefficients."""
    x = np.linspace(0.0, bound, 4001)
    t = x / bound
    coef, *_ = np.linalg.lstsq(np.stack([t**p for p in powers], axis=1), target(x) - x / 2, rcond=None)
    out = [0.0] * (max(powers) + 1)
    for p, c in zip(powers, coef):
        out[p] = float(c) / bound**p
    return tuple(out)


def _silu_np(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


BOLT_BOUND, NEXUS_BOUND = 2.7, 3.5
BOLT_SILU_Q4 = fit_abs_poly(_silu_np, BOLT_BOUND * GELU_TO_SILU, range(5))
NEXUS_SILU_P12 = fit_abs_poly(_silu_np, NEXUS_BOUND * GELU_TO_SILU, range(0, 13, 2))

APPROXIMATIONS: dict[tuple[str, str], Pieces] = {
    # BOLT: 0 below -2.7, x above 2.7, else 0.5x + Q4(|x|).
    ("bolt", "gelu"): half_x_plus_abs_poly(BOLT_Q4, BOLT_BOUND),
    ("bolt", "silu"): half_x_plus_abs_poly(BOLT_SILU_Q4, BOLT_BOUND * GELU_TO_SILU),  # [ours]
    # BumbleBee official code: the BOLT quartic on |x| <= 3.
    ("bumblebee", "gelu"): half_x_plus_abs_poly(BOLT_Q4, 3.0),
    # BumbleBee second variant: P3 on [-5, -1.97), P6 on [-1.97, 3].
    ("bumblebee2", "gelu"): ((-5.0, -1.97, 3.0), (BUMBLEBEE_P3, BUMBLEBEE_P6)),
    # BumbleBee SiLU: sigmoid(|x|) ~ S4(|x|) for |x| < 8.
    ("bumblebee", "silu"): x_times_sigmoid_poly(BUMBLEBEE_S4, 8.0),
    # Puma GELU (SPU ``hack_gelu``): the same P3/P6 with breaks -4, -1.95, 3.
    ("puma", "gelu"): ((-4.0, -1.95, 3.0), (BUMBLEBEE_P3, BUMBLEBEE_P6)),
    # Puma SiLU: P2 on [-8, -4), P6 on [-4, 4].
    ("puma", "silu"): ((-8.0, -4.0, 4.0), (PUMA_SILU_P2, PUMA_SILU_P6)),
    # NEXUS: even degree-12 polynomial (plus x/2) on [-3.5, 3.5].
    ("nexus", "gelu"): ((-NEXUS_BOUND, NEXUS_BOUND), (NEXUS_P12,)),
    ("nexus", "silu"): half_x_plus_abs_poly(NEXUS_SILU_P12, NEXUS_BOUND * GELU_TO_SILU),  # [ours]
}
APPROXIMATIONS[("bumblebee2", "silu")] = APPROXIMATIONS[("bumblebee", "silu")]  # one published SiLU


def to_fixed(x: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """Truncate to the fixed-point grid ``2^-frac_bits`` (an arithmetic right shift, as in MPC
    fixed-point arithmetic)."""
    scale = 2.0**frac_bits
    return torch.floor(x * scale) / scale


def iron_tanh_activation(x: torch.Tensor, inner_scale: float, cubic: float, frac_bits: int = 12) -> torch.Tensor:
    """``x/2 * (1 + tanh(inner_scale * (x + cubic * x^3)))`` with the input, every constant and
    every intermediate product truncated to ``frac_bits`` fractional bits (Iron, Hao et al. 2022:
    tanh-GELU in 12-bit fixed point; GELU: inner_scale = sqrt(2/pi), cubic = 0.044715; SiLU
    **[ours]**: inner_scale = 1/2, cubic = 0). Computed in float64 so the grid is exact."""
    fx = lambda v: to_fixed(v, frac_bits)  # noqa: E731
    xq = fx(x.double())
    c_inner, c_cubic = (fx(torch.tensor(c, dtype=torch.float64, device=x.device)) for c in (inner_scale, cubic))
    inner = xq if cubic == 0 else xq + fx(c_cubic * fx(fx(xq * xq) * xq))
    t = fx(torch.tanh(fx(c_inner * inner)))
    return fx(fx(xq / 2) * (1 + t)).to(x.dtype)


class ApproxActivation(nn.Module):
    """Stands in for a model's act_fn: evaluates ``fn`` in float32, optionally rounding inputs and
    outputs to ``frac_bits`` fractional bits, and returns the input dtype."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], frac_bits: int | None, label: str):
        super().__init__()
        self.fn, self.frac_bits, self.label = fn, frac_bits, label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        if self.frac_bits is not None:
            y = torch.round(y * 2.0**self.frac_bits) / 2.0**self.frac_bits
        y = self.fn(y)
        if self.frac_bits is not None:
            y = torch.round(y * 2.0**self.frac_bits) / 2.0**self.frac_bits
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return self.label


@dataclass(frozen=True, kw_only=True)
class PolyConfig(ApproxConfig):
    """Replace act_fn with a published polynomial. ``frac_bits``: round the activation's inputs and
    outputs to that many fractional bits (fixed point), or None for float."""

    order = 0  # a module swap: installed before hooks, so hooks attach to the module that runs
    replaces = "activation function"
    frac_bits: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.frac_bits is not None and not 1 <= self.frac_bits <= 30:
            raise QuadaError(f"frac_bits must be between 1 and 30 (or none), got {self.frac_bits}")

    def function(self, kind: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
        """The approximation of activation ``kind`` ("silu" | "gelu" | "gelu_tanh") and a label."""
        breaks, polys = APPROXIMATIONS[(self.name, "silu" if kind == "silu" else "gelu")]
        return (lambda x: piecewise_poly(x, breaks, polys)), f"{self.name} {kind}"


@register("bolt", "BOLT GELU: x/2 + quartic in |x| on [-2.7, 2.7], 12-bit fixed point (SiLU fit: ours)")
@dataclass(frozen=True, kw_only=True)
class BoltConfig(PolyConfig):
    frac_bits: int | None = 12


@register("bumblebee", "BumbleBee: quartic GELU on |x|<=3 (official code); SiLU via quartic sigmoid")
@dataclass(frozen=True, kw_only=True)
class BumbleBeeConfig(PolyConfig):
    pass


@register("bumblebee2", "BumbleBee second variant: GELU by cubic + degree-6 pieces; SiLU via quartic sigmoid")
@dataclass(frozen=True, kw_only=True)
class BumbleBee2Config(PolyConfig):
    pass


@register("nexus", "NEXUS (FHE): even degree-12 GELU on [-3.5, 3.5] (SiLU fit: ours)")
@dataclass(frozen=True, kw_only=True)
class NexusConfig(PolyConfig):
    pass


@register("puma", "Puma (SPU): GELU and SiLU by low-degree + degree-6 pieces")
@dataclass(frozen=True, kw_only=True)
class PumaConfig(PolyConfig):
    pass


@register("iron", "Iron: tanh-GELU in fixed point (frac_bits=12); SiLU as x/2(1+tanh(x/2)) (ours)")
@dataclass(frozen=True, kw_only=True)
class IronConfig(PolyConfig):
    frac_bits: int | None = 12

    def __post_init__(self):
        super().__post_init__()
        if self.frac_bits is None:
            raise QuadaError("iron is fixed-point arithmetic: frac_bits must be a number of bits, e.g. iron:frac_bits=12")

    def function(self, kind: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
        inner, cubic = (0.5, 0.0) if kind == "silu" else (math.sqrt(2 / math.pi), 0.044715)
        bits = self.frac_bits
        return (lambda x: iron_tanh_activation(x, inner, cubic, bits)), f"iron {kind} ({bits} fractional bits)"


@installs(PolyConfig)
def install_poly(config: PolyConfig, decoder: Decoder, layers, ctx, _prepared) -> None:
    for i in layers:
        sites = decoder.layers[i]
        fn, label = config.function(activation_kind(sites.act_fn))
        # Iron's fixed point is internal to its function; the others round inputs and outputs.
        bits = None if isinstance(config, IronConfig) else config.frac_bits
        ctx.swap(sites.mlp, sites.act_name, ApproxActivation(fn, bits, label))
