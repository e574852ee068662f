"""Activation quantization: SmoothQuant and OmniQuant-style, as fake quantization on CPU.

Both move activation outliers into the weights with a per-channel equivalent transformation
``X W^T = (X / s)(W * s)^T`` folded into the weights, then fake-quantize the activations at the
inputs of all seven projections per token (symmetric abs-max), optionally the weights per output
channel too. The paper's settings keep 16-bit weights (W16A8, W16A4) — ``weight_bits=none``.
Statistics: the quantization step is taken per token (each token's own abs-max, as deployed by
both methods' per-token dynamic quantization), the smoothing and clipping factors once from
calibration; so no row's quantization depends on the other rows of its batch.

- SmoothQuant (Xiao et al., ICML 2023): ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (its eq. 4)
  from calibration maxima, folded into the preceding norm and the q/k/v and gate/up weights, as
  its Llama code does.
- OmniQuant (Shao et al., ICLR 2024): learnable equivalent transformation (LET) and clipping,
  trained briefly on calibration data. Ours is a short version **[ours]**: per group of
  projections sharing an input (q/k/v, gate/up, down, o) we learn the LET scale (folded like
  SmoothQuant's; for down into up_proj's rows, as OmniQuant and AWQ do), one activation clipping
  ratio and, with ``weight_bits``, one weight clipping ratio, by minimising the group's output
  error on calibration inputs with a straight-through estimator. RMSNorm has no bias, so LET's
  shift is left out; inputs come from the clean model rather than from quantized earlier blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from quada.approx.activation_stats import CalibrationSet, cached, capture
from quada.approx.base import ApproxConfig, Installation, installs, register
from quada.approx.sites import CONSUMERS, Decoder, LayerSites, norm_weight_offset
from quada.errors import QuadaError

QUANT_SITES = ("qkv", "gate_up", "o", "down")


def fake_quant(x: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0, rounding: Callable = torch.round) -> torch.Tensor:
    """Symmetric abs-max fake quantization along the last dim (per token for activations, per
    output channel for ``(out, in)`` weights): ``q = clamp(round(x / d), -Q, Q) * d`` with
    ``Q = 2^(bits-1) - 1`` and ``d = clip * max|x| / Q`` (SmoothQuant, section 2)."""
    qmax = 2 ** (bits - 1) - 1
    step = (clip * x.abs().amax(-1, keepdim=True)).clamp_min(1e-8) / qmax
    return rounding(x / step).clamp(-qmax, qmax) * step


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass (straight-through)."""
    return x + (torch.round(x) - x).detach()


def smoothing_factors(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant eq. (4): ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``."""
    return (act_amax.clamp_min(1e-5) ** alpha / weight_amax.clamp_min(1e-5) ** (1 - alpha)).clamp_min(1e-5)


def _consumer_weight(sites: LayerSites, site: str) -> torch.Tensor:
    """The weights of the linears reading ``site``, stacked as ``(sum of outputs, in)``."""
    return torch.cat([sites.linears[role].weight.detach().float() for role in CONSUMERS[site]])


def fold_scale(sites: LayerSites, site: str, s: torch.Tensor, ctx: Installation) -> None:
    """Fold ``X -> X / s`` into the producer of ``site`` (its norm, or up_proj's rows for down) and
    ``W -> W * s`` into its consumers: the model's function is unchanged before quantization."""
    s = s.to(sites.device)
    if site == "down":
        up = sites.linears["up"]
        ctx.replace_data(up.weight, up.weight.float() / s[:, None])
        if up.bias is not None:
            ctx.replace_data(up.bias, up.bias.float() / s)
    else:
        norm = sites.attn_norm if site == "qkv" else sites.mlp_norm
        offset = norm_weight_offset(norm)  # Gemma's norm multiplies by (1 + w)
        ctx.replace_data(norm.weight, (norm.weight.float() + offset) / s - offset)
    for role in CONSUMERS[site]:
        linear = sites.linears[role]
        ctx.replace_data(linear.weight, linear.weight.float() * s)
    ctx.input_scales[(sites.index, site)] = s


@dataclass(frozen=True, kw_only=True)
class QuantConfig(ApproxConfig):
    """Activation bits (per token) and optional weight bits (per output channel; none = 16-bit)."""

    bits: int = 8
    weight_bits: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if not 2 <= self.bits <= 16:
            raise QuadaError(f"bits must be between 2 and 16, got {self.bits}")
        if self.weight_bits is not None and not 2 <= self.weight_bits <= 16:
            raise QuadaError(f"weight_bits must be between 2 and 16 (or none for 16-bit weights), got {self.weight_bits}")


@register("smoothquant", "SmoothQuant: smoothing folded into weights + per-token activation fake quant", example="smoothquant:bits=4,alpha=0.8")
@dataclass(frozen=True, kw_only=True)
class SmoothQuantConfig(QuantConfig):
    """``alpha``: migration strength of the smoothing, in [0, 1] (SmoothQuant uses 0.5-0.85)."""

    alpha: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise QuadaError(f"alpha must be in [0, 1], got {self.alpha}")


@register("omniquant", "OmniQuant-style: short learned scaling/clipping + per-token activation fake quant", example="omniquant:bits=4")
@dataclass(frozen=True, kw_only=True)
class OmniQuantConfig(QuantConfig):
    """``steps`` of Adam at learning rate ``lr`` per group of projections."""

    steps: int = 20
    lr: float = 0.005

    def __post_init__(self):
        super().__post_init__()
        if self.steps < 0 or self.lr <= 0:
            raise QuadaError(f"omniquant needs steps >= 0 and lr > 0, got steps={self.steps}, lr={self.lr}")


def _collect_inputs(decoder: Decoder, calibration: CalibrationSet, technique: str, sites: tuple[str, ...], rows: int):
    """Per (layer, site): the per-channel max of ``|x|`` over all calibration tokens and, if
    ``rows``, about that many input rows sampled uniformly (seeded) for training."""
    batches = calibration.input_ids(technique)
    amax: dict = {}
    samples: dict = {}
    per_batch = -(-rows // len(batches))
    generator = torch.Generator().manual_seed(0)  # on the CPU: the same rows on any device

    def consume(key, x: torch.Tensor) -> None:
        amax[key] = torch.maximum(amax[key], x.abs().amax(0)) if key in amax else x.abs().amax(0)
        if rows:
            pick = torch.randperm(len(x), generator=generator)[:per_batch].to(x.device)
            samples.setdefault(key, []).append(x[pick])

    taps = {(i, s): decoder.layers[i].tap(s) for i in range(len(decoder.layers)) for s in sites}
    capture(decoder.model, batches, taps, consume)
    return amax, {key: torch.cat(parts)[:rows] for key, parts in samples.items()}


def prepare_smoothquant(config: SmoothQuantConfig, decoder: Decoder, calibration: CalibrationSet) -> dict[str, torch.Tensor]:
    def compute():
        amax, _ = _collect_inputs(decoder, calibration, "smoothquant", ("qkv", "gate_up"), rows=0)
        return {f"{i}.{s}.amax": a for (i, s), a in amax.items()}

    amax = cached(decoder.model, f"act-amax:sites=qkv,gate_up:prompts={calibration.key}", compute)
    return {
        f"{i}.{s}.scale": smoothing_factors(
            amax[f"{i}.{s}.amax"].to(sites.device), _consumer_weight(sites, s).abs().amax(0), config.alpha
        )
        for i, sites in enumerate(decoder.layers)
        for s in ("qkv", "gate_up")
    }


def learn_transform(
    x: torch.Tensor, w: torch.Tensor, s0: torch.Tensor | None, config: OmniQuantConfig
) -> dict[str, torch.Tensor]:
    """OmniQuant-style calibration of one projection group **[ours, short form]**: minimise
    ``|| X W^T - Qa(X / s) Qw(W * s)^T ||^2 / ||X W^T||^2`` over the LET scale ``s`` (if ``s0`` is
    given), the activation clipping ratio and (with ``weight_bits``) the weight clipping ratio,
    both ``sigmoid`` of a logit started at 4 (0.98) as in OmniQuant's LWC."""
    with torch.inference_mode(False), torch.enable_grad():
        x, w = x.clone(), w.clone()
        log_s = torch.zeros(x.shape[1], device=x.device) if s0 is None else s0.log().clone()
        log_s.requires_grad_(s0 is not None)
        act_logit, weight_logit = (torch.tensor(4.0, device=x.device, requires_grad=True) for _ in range(2))
        params = [p for p in (log_s, act_logit, weight_logit) if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=config.lr)
        target = x @ w.T
        norm = target.pow(2).mean().clamp_min(1e-12)
        for _ in range(config.steps):
            s = log_s.exp()
            xq = fake_quant(x / s, config.bits, torch.sigmoid(act_logit), round_ste)
            ws = w * s
            if config.weight_bits:
                ws = fake_quant(ws, config.weight_bits, torch.sigmoid(weight_logit), round_ste)
            loss = (xq @ ws.T - target).pow(2).mean() / norm
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {
        "scale": log_s.detach().exp(),
        "act_clip": torch.sigmoid(act_logit.detach()),
        "weight_clip": torch.sigmoid(weight_logit.detach()),
    }


OMNI_ROWS, OMNI_OUTPUTS = 128, 512  # calibration tokens per group; output channels in the loss


def prepare_omniquant(config: OmniQuantConfig, decoder: Decoder, calibration: CalibrationSet) -> dict[str, torch.Tensor]:
    def compute():
        amax, samples = _collect_inputs(decoder, calibration, "omniquant", QUANT_SITES, rows=OMNI_ROWS)
        generator = torch.Generator().manual_seed(0)  # on the CPU: the same channels on any device
        plan = {}
        for i, sites in enumerate(decoder.layers):
            for s in QUANT_SITES:
                w = _consumer_weight(sites, s)
                w = w[torch.randperm(len(w), generator=generator)[:OMNI_OUTPUTS].to(w.device)]
                s0 = None if s == "o" else smoothing_factors(amax[(i, s)], w.abs().amax(0), 0.5)
                plan |= {f"{i}.{s}.{k}": v for k, v in learn_transform(samples[(i, s)], w, s0, config).items()}
        return plan

    key = f"omniquant:{config.without_layers()}:prompts={calibration.key}"
    return cached(decoder.model, key, compute)


def install_quantized(config: QuantConfig, decoder: Decoder, layers, ctx: Installation, plan: dict[str, torch.Tensor]) -> None:
    """Fold the plan's scales, optionally fake-quantize weights, and hook per-token activation
    fake quantization on every projection input. ``plan`` keys: ``"{layer}.{site}.scale"`` and
    optionally ``.act_clip`` / ``.weight_clip``."""
    for i in layers:
        sites = decoder.layers[i]
        for site in QUANT_SITES:
            if f"{i}.{site}.scale" in plan:
                fold_scale(sites, site, plan[f"{i}.{site}.scale"], ctx)
            if config.weight_bits:
                clip = torch.as_tensor(plan.get(f"{i}.{site}.weight_clip", 1.0), device=sites.device)
                for role in CONSUMERS[site]:
                    weight = sites.linears[role].weight
                    ctx.replace_data(weight, fake_quant(weight.float(), config.weight_bits, clip))
            module, kind = sites.tap(site)
            clip = torch.as_tensor(plan.get(f"{i}.{site}.act_clip", 1.0), device=sites.device)
            fn = lambda x, c=clip: fake_quant(x.float(), config.bits, c).to(x.dtype)  # noqa: E731
            (ctx.transform_output if kind == "output" else ctx.transform_input)(module, fn)


installs(SmoothQuantConfig, prepare=prepare_smoothquant)(install_quantized)
installs(OmniQuantConfig, prepare=prepare_omniquant)(install_quantized)
