"""Activation sparsification: TEAL and CATS, with thresholds calibrated per layer.

- TEAL (Liu et al., "Training-Free Activation Sparsity in Large Language Models", 2024):
  magnitude sparsification of the inputs of all seven projections (q/k/v share one input, as do
  gate/up, so four tensors per layer); the threshold of each is the ``sparsity``-quantile of
  ``|x|`` read from a calibration histogram; during prefill only the last half of the prompt's
  positions is sparsified, decode tokens fully. The thresholds are fixed per layer, as deployed;
  the "last half" is taken per row from the row's own length (TEAL's code runs one sequence at a
  time, so this is its rule in any batch).
- CATS (Lee et al., "CATS: Contextually-Aware Thresholding for Sparsity", 2024): zero the entries of
  ``act_fn(gate_proj(x))`` whose magnitude is below a per-layer calibrated threshold (fixed per
  layer, applied entry by entry, as deployed).

``Applied.sparsity()`` reports the fraction zeroed per (layer, site) while the context is open.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from quada.approx.activation_stats import AbsHistogram, CalibrationSet, cached, capture
from quada.approx.base import ApproxConfig, installs, register
from quada.approx.noise import count_zeroed, zero_small
from quada.approx.sites import Decoder
from quada.errors import QuadaError

TEAL_SITES = ("qkv", "o", "gate_up", "down")


def teal_positions(positions: torch.Tensor) -> torch.Tensor:
    """(batch, seq) booleans: the tokens TEAL sparsifies in one forward pass, given each token's
    position in its row's own sequence (``positions``; padding -1). Per row: the last half of
    the row's own tokens in this pass, from index ``n // 2`` of its ``n`` tokens (prefill: the last
    half of the prompt; a decode step has one token, which is sparsified). A row's rule reads only
    its own length, never the padded width of the batch."""
    own = positions >= 0
    count = own.sum(-1, keepdim=True)
    first = torch.where(own, positions, torch.iinfo(positions.dtype).max).amin(-1, keepdim=True)
    return own & (positions - first >= count // 2)


def teal_sparsify(x: torch.Tensor, threshold: float, sparsified: torch.Tensor,
                  counter: torch.Tensor | None = None) -> torch.Tensor:
    """TEAL's rule on a ``(batch, seq, hidden)`` input: zero ``|x| <= threshold`` at the tokens
    ``sparsified`` marks (:func:`teal_positions`); ``counter`` gets ``[zeroed, total]`` over them."""
    keep = (x.abs() > threshold) | ~sparsified[..., None]
    if counter is not None:
        count_zeroed(counter, keep, sparsified)
    return x * keep


def _check_sparsity(sparsity: float) -> None:
    if not 0 <= sparsity < 1:
        raise QuadaError(f"sparsity must be in [0, 1), got {sparsity}; e.g. 0.5 zeroes half of the activations")


def _histograms(
    decoder: Decoder, calibration: CalibrationSet, technique: str, sites: tuple[str, ...], last_half: bool
) -> torch.Tensor:
    """Calibration histograms of ``|x|``, shape ``(layers, len(sites), bins)``, cached per model.
    With ``last_half`` only the positions TEAL's prefill rule sparsifies are counted **[ours]**, so
    the thresholds zero the target fraction of the activations they are applied to."""

    def compute() -> dict[str, torch.Tensor]:
        hists = {(i, s): AbsHistogram() for i in range(len(decoder.layers)) for s in sites}
        taps = {(i, s): decoder.layers[i].tap(s) for i, s in hists}
        add = lambda key, x: hists[key].add(x[len(x) // 2 :] if last_half else x)  # noqa: E731  (x: one prompt's rows)
        capture(decoder.model, calibration.input_ids(technique), taps, add)
        counts = torch.stack([torch.stack([hists[(i, s)].counts for s in sites]) for i in range(len(decoder.layers))])
        return {"counts": counts}

    key = f"{technique}-histograms:sites={','.join(sites)}:last_half={last_half}:prompts={calibration.key}"
    return cached(decoder.model, key, compute)["counts"]


def thresholds(counts: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-(layer, site) threshold = the ``sparsity``-quantile of the calibration histogram."""
    return torch.tensor([[AbsHistogram(h).quantile(sparsity) for h in per_layer] for per_layer in counts])


@register("teal", "TEAL: zero small inputs of all 7 projections, per-layer calibrated thresholds", example="teal:sparsity=0.5")
@dataclass(frozen=True, kw_only=True)
class TealConfig(ApproxConfig):
    """Target fraction of zeroed projection inputs, in [0, 1)."""

    per_call: ClassVar[bool] = True  # the last half of the tokens of each forward pass
    sparsity: float

    def __post_init__(self):
        super().__post_init__()
        _check_sparsity(self.sparsity)


def prepare_teal(config: TealConfig, decoder: Decoder, calibration: CalibrationSet) -> torch.Tensor:
    return thresholds(_histograms(decoder, calibration, "teal", TEAL_SITES, last_half=True), config.sparsity)


@installs(TealConfig, prepare=prepare_teal)
def install_teal(config: TealConfig, decoder: Decoder, layers, ctx, limits: torch.Tensor) -> None:
    for i in layers:
        device = decoder.layers[i].device
        for j, site in enumerate(TEAL_SITES):
            module, kind = decoder.layers[i].tap(site)

            def fn(x, t=limits[i, j].item(), c=ctx.counter(i, site, device)):
                return teal_sparsify(x, t, teal_positions(ctx.rows_for(x).positions), c)

            (ctx.transform_output if kind == "output" else ctx.transform_input)(module, fn)


@register("cats", "CATS: zero small act_fn(gate_proj(x)) entries, per-layer calibrated threshold", example="cats:sparsity=0.5")
@dataclass(frozen=True, kw_only=True)
class CatsConfig(ApproxConfig):
    """Target fraction of zeroed gate activations, in [0, 1)."""

    sparsity: float

    def __post_init__(self):
        super().__post_init__()
        _check_sparsity(self.sparsity)


def prepare_cats(config: CatsConfig, decoder: Decoder, calibration: CalibrationSet) -> torch.Tensor:
    return thresholds(_histograms(decoder, calibration, "cats", ("act",), last_half=False), config.sparsity)


@installs(CatsConfig, prepare=prepare_cats)
def install_cats(config: CatsConfig, decoder: Decoder, layers, ctx, limits: torch.Tensor) -> None:
    for i in layers:
        module, _ = decoder.layers[i].tap("act")
        counter = ctx.counter(i, "act", decoder.layers[i].device)
        fn = lambda x, t=limits[i, 0].item(), c=counter: zero_small(x, t, c, ctx.rows_for(x).own)  # noqa: E731
        ctx.transform_output(module, fn)
