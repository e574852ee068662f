"""The paper's error model: additive activation noise at fixed sites of every decoder layer.

Zhang et al., arXiv 2502.00840, Table 1 (PAPER.md section 2) model every approximation as
``x + eps`` with ``eps_up ~ N(0, std^2)`` on the activations feeding q/k/v and gate/up and
``eps_down ~ Lap(0, b)`` on the input of down_proj; for TEAL the "truncated" entries mean zeroing
``|x| <= t``. Sites: ``up`` (both norm outputs feeding projections), ``down`` (input of
down_proj), and the authors' code variants ``norm_all`` (the output of every norm in the layer,
plus the final norm when the last layer is selected) and ``act`` (output of act_fn).

Noise is drawn entry by entry, keyed by the prompt, the token's position and the channel (see
:mod:`quada.approx.draws`); truncation zeroes entry by entry. Neither reads a statistic of a row
or a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quada.approx.base import ApproxConfig, installs, register, register_preset
from quada.approx.draws import laplace, standard_normal
from quada.approx.sites import Decoder
from quada.errors import QuadaError

NOISE_SITES = ("up", "down", "norm_all", "act")
DISTRIBUTIONS = {"gaussian": "std", "laplace": "scale", "truncated": "threshold"}


def gaussian_noise(x: torch.Tensor, std: float, bits: torch.Tensor) -> torch.Tensor:
    """``x + eps``, eps ~ N(0, std^2) elementwise (Table 1, eps_up), from the 32-bit draws ``bits``
    shaped like ``x`` (see :mod:`quada.approx.draws`). The noise is made in float32 and cast to
    ``x``'s dtype, so a draw gives the same noise values whatever the dtype."""
    return x + (std * standard_normal(bits)).to(x.dtype)


def laplace_noise(x: torch.Tensor, scale: float, bits: torch.Tensor) -> torch.Tensor:
    """``x + eps``, eps ~ Lap(0, b) elementwise (Table 1, eps_down; std = b * sqrt(2)), from the
    32-bit draws ``bits`` by the inverse CDF; made in float32 like :func:`gaussian_noise`."""
    return x + laplace(bits, scale).to(x.dtype)


def zero_small(x: torch.Tensor, threshold: float, counter: torch.Tensor | None = None,
               counted: torch.Tensor | None = None) -> torch.Tensor:
    """Magnitude truncation: entries with ``|x| <= threshold`` become 0 (Table 1's "truncated"
    noise for TEAL; CATS). Adds ``[zeroed, total]`` over the tokens that ``counted`` (batch, seq)
    marks (default: all) to ``counter``, so padding never enters the sparsity report."""
    keep = x.abs() > threshold
    if counter is not None:
        count_zeroed(counter, keep, counted)
    return x * keep


def count_zeroed(counter: torch.Tensor, keep: torch.Tensor, counted: torch.Tensor | None) -> None:
    """Add ``[zeroed, total]`` of ``keep``'s false entries over the tokens ``counted`` marks."""
    if counted is None:
        counter[0] += (~keep).sum()
        counter[1] += keep.numel()
        return
    per_token = keep[0, 0].numel()
    counter[0] += (~keep & counted.reshape(*counted.shape, *[1] * (keep.dim() - 2))).sum()
    counter[1] += counted.sum() * per_token


@register(
    "noise",
    "the paper's error model: gaussian/laplace/zeroing noise at site up, down, norm_all or act",
    example="noise:site=up,dist=gaussian,std=0.05",
)
@dataclass(frozen=True, kw_only=True)
class NoiseConfig(ApproxConfig):
    """Additive noise (or zeroing) at one site. ``gaussian`` takes ``std``, ``laplace`` takes
    ``scale`` (b; its std is b*sqrt(2)), ``truncated`` takes ``threshold``."""

    site: str
    dist: str
    std: float | None = None
    scale: float | None = None
    threshold: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.site not in NOISE_SITES:
            raise QuadaError(f"unknown noise site {self.site!r}; choose one of {', '.join(NOISE_SITES)}")
        if self.dist not in DISTRIBUTIONS:
            raise QuadaError(f"unknown noise dist {self.dist!r}; choose one of {', '.join(DISTRIBUTIONS)}")
        wanted = DISTRIBUTIONS[self.dist]
        for option in DISTRIBUTIONS.values():
            value = getattr(self, option)
            if option == wanted and value is None:
                raise QuadaError(f"{self.dist} noise needs {option}=..., e.g. noise:site={self.site},dist={self.dist},{option}=0.05")
            if option != wanted and value is not None:
                raise QuadaError(f"{self.dist} noise takes {wanted}=, not {option}=")
            if value is not None and value < 0:
                raise QuadaError(f"noise {option} must be non-negative, got {value}")

    @property
    def amount(self) -> float:
        return getattr(self, DISTRIBUTIONS[self.dist])


@installs(NoiseConfig)
def install_noise(config: NoiseConfig, decoder: Decoder, layers, ctx, _prepared) -> None:
    """Noise hooks at the config's site of every chosen layer. Gaussian and Laplace draws are keyed
    per (layer, site) stream and per prompt, position and channel (:meth:`Installation.draws`);
    truncation is deterministic and counts the rows' own tokens."""

    def perturb(layer: int, site: str, counter: torch.Tensor | None):
        stream = ctx.stream(layer, site)
        if config.dist == "gaussian":
            return lambda x: gaussian_noise(x, config.std, ctx.draws(x, stream))
        if config.dist == "laplace":
            return lambda x: laplace_noise(x, config.scale, ctx.draws(x, stream))
        return lambda x: zero_small(x, config.threshold, counter, ctx.rows_for(x).own)

    truncated = config.dist == "truncated"
    for i in layers:
        sites = decoder.layers[i]
        if config.site == "norm_all":
            for name, norm in sites.named_norms():
                ctx.transform_output(norm, perturb(i, name, ctx.counter(i, "norm", sites.device) if truncated else None))
            continue
        for site in {"up": ("qkv", "gate_up"), "down": ("down",), "act": ("act",)}[config.site]:
            module, kind = sites.tap(site)
            fn = perturb(i, site, ctx.counter(i, site, sites.device) if truncated else None)
            (ctx.transform_output if kind == "output" else ctx.transform_input)(module, fn)
    if config.site == "norm_all" and len(decoder.layers) - 1 in layers:
        ctx.transform_output(decoder.final_norm, perturb(len(decoder.layers) - 1, "final_norm", None))


# Table 1 of the paper, row by row: (preset, description, eps_up, eps_down).
_TABLE_1 = (
    ("iron", "Iron (MPC polynomialization)", "gaussian,std=0.064", "laplace,scale=0.049"),
    ("bolt", "BOLT (MPC polynomialization)", "gaussian,std=0.042", "laplace,scale=0.036"),
    ("bumblebee", "BumbleBee (MPC polynomialization)", "gaussian,std=0.026", "laplace,scale=0.018"),
    ("nexus", "NEXUS (FHE polynomialization)", "gaussian,std=0.031", "laplace,scale=0.014"),
    ("teal-10", "TEAL 10% sparsity (zeroing)", "truncated,threshold=0.04", "truncated,threshold=0.003"),
    ("teal-25", "TEAL 25% sparsity (zeroing)", "truncated,threshold=0.11", "truncated,threshold=0.007"),
    ("teal-50", "TEAL 50% sparsity (zeroing)", "truncated,threshold=0.24", "truncated,threshold=0.017"),
    ("teal-90", "TEAL 90% sparsity (zeroing)", "truncated,threshold=0.57", "truncated,threshold=0.055"),
    ("smoothquant-a8", "SmoothQuant W16A8", "gaussian,std=0.027", "laplace,scale=0.019"),
    ("smoothquant-a4", "SmoothQuant W16A4", "gaussian,std=0.035", "laplace,scale=0.024"),
    ("omniquant-a8", "OmniQuant W16A8", "gaussian,std=0.029", "laplace,scale=0.028"),
    ("omniquant-a4", "OmniQuant W16A4", "gaussian,std=0.036", "laplace,scale=0.037"),
)

for _name, _label, _up, _down in _TABLE_1:
    register_preset(
        f"paper:{_name}",
        f"paper Table 1, {_label}: up {_up.replace(',', ' ')}, down {_down.replace(',', ' ')}",
        f"noise:site=up,dist={_up} + noise:site=down,dist={_down}",
    )
