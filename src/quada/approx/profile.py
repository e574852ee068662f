"""Error profiling: the error a real approximation introduces, per layer and site, in the terms of
the paper's noise model (Table 1: a gaussian std at ``up``, a Laplace scale at ``down``).

The error is *local*: at each site it is the difference between what the next projection actually
receives and what the exact model would compute from the same upstream values, so errors of
earlier layers are not counted twice. Activations are compared in the model's original
coordinates (scales that SmoothQuant/OmniQuant folded into the weights are multiplied back):
- ``up:attn`` / ``up:mlp``: q_proj / gate_proj input versus the raw norm output;
- ``o``: o_proj input versus its input before any hook;
- ``down``: down_proj input versus ``act(gate_proj(x)) * up_proj(x)`` with the original act_fn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from quada.approx.activation_stats import CalibrationSet, capture
from quada.approx.base import Installation, Spec, apply, as_spec
from quada.approx.sites import resolve_decoder

SAMPLE_PER_SITE = 1 << 16  # errors kept per site for the median and the Laplace fit


def laplace_scale(errors: torch.Tensor) -> float:
    """Maximum-likelihood Laplace scale: ``b = mean |e - median(e)|``."""
    return (errors - errors.median()).abs().mean().item()


@dataclass(frozen=True)
class SiteError:
    """Error statistics of one (layer, site). ``relative_error = ||e|| / ||x_exact||``;
    ``sparsity`` = fraction of exact zeros the projection receives."""

    layer: int
    site: str
    count: int
    mean: float
    std: float
    laplace_scale: float
    relative_error: float
    sparsity: float


@dataclass(frozen=True)
class ErrorProfile:
    spec: str
    rows: tuple[SiteError, ...]

    def equivalent_noise(self) -> str:
        """The paper-style spec with the same error size: ``up`` gaussian std = the RMS of the up
        sites' stds, ``down`` Laplace scale = the mean of the down sites' fitted scales."""
        up = [r.std for r in self.rows if r.site.startswith("up")]
        down = [r.laplace_scale for r in self.rows if r.site == "down"]
        std = (sum(s * s for s in up) / max(len(up), 1)) ** 0.5
        scale = sum(down) / max(len(down), 1)
        return f"noise:site=up,dist=gaussian,std={std:.4g} + noise:site=down,dist=laplace,scale={scale:.4g}"


class _Accumulator:
    """Running error statistics of one site, and a seeded subsample of its errors (drawn by a
    generator on the errors' device)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}
        self.count = 0
        self.total = self.total_sq = self.exact_sq = self.zeros = 0.0
        self.sample: list[torch.Tensor] = []
        self.kept = 0

    def add(self, error: torch.Tensor, exact: torch.Tensor, received: torch.Tensor) -> None:
        e = error.reshape(-1).double()
        self.count += e.numel()
        self.total += e.sum().item()
        self.total_sq += e.pow(2).sum().item()
        self.exact_sq += exact.double().pow(2).sum().item()
        self.zeros += (received == 0).sum().item()
        if self.kept < SAMPLE_PER_SITE:
            take = min(SAMPLE_PER_SITE - self.kept, 4096, e.numel())
            if e.device not in self.generators:
                self.generators[e.device] = torch.Generator(device=e.device).manual_seed(self.seed)
            pick = torch.randperm(e.numel(), generator=self.generators[e.device], device=e.device)[:take]
            self.sample.append(e[pick])
            self.kept += take

    def result(self, layer: int, site: str) -> SiteError:
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        return SiteError(
            layer=layer,
            site=site,
            count=self.count,
            mean=mean,
            std=var**0.5,
            laplace_scale=laplace_scale(torch.cat(self.sample)),
            relative_error=(self.total_sq / max(self.exact_sq, 1e-300)) ** 0.5,
            sparsity=self.zeros / self.count,
        )


def profile(
    model,
    tokenizer,
    spec: Spec | str | Sequence,
    prompts: Sequence[str] | None = None,
    layers=None,
    seed: int = 0,
) -> ErrorProfile:
    """Run ``prompts`` (default: the bundled benign prompts) under ``spec`` and measure the local
    error at every site of every decoder layer (see the module docstring)."""
    spec = as_spec(spec)
    decoder = resolve_decoder(model)
    exact_act = [sites.act_fn for sites in decoder.layers]  # before a polynomial swaps them
    stats: dict[tuple[int, str], _Accumulator] = {}
    calibration = CalibrationSet.of(tokenizer, prompts)
    with apply(model, spec, layers=layers, seed=seed, tokenizer=tokenizer) as applied:
        scales = applied.installation.input_scales
        probes = Installation(seed)
        raw: dict[tuple[int, str], torch.Tensor] = {}

        def keep(key):
            def fn(x: torch.Tensor) -> torch.Tensor:
                raw[key] = x
                return x

            return fn

        def measure(i: int, site: str, scale_site: str, exact_of):
            scale = scales.get((i, scale_site))

            def fn(x: torch.Tensor) -> torch.Tensor:
                received = x.float() if scale is None else x.float() * scale
                exact = exact_of().float() if scale is None else exact_of().float() * scale
                stats.setdefault((i, site), _Accumulator(seed)).add(received - exact, exact, x)
                return x

            return fn

        try:
            for i, sites in enumerate(decoder.layers):
                lin = sites.linears
                probes.transform_output(sites.attn_norm, keep((i, "qkv")), prepend=True)
                probes.transform_output(sites.mlp_norm, keep((i, "gate_up")), prepend=True)
                probes.transform_input(lin["o"], keep((i, "o")), prepend=True)
                probes.transform_output(lin["gate"], keep((i, "gate")), prepend=True)
                probes.transform_output(lin["up"], keep((i, "up")), prepend=True)
                probes.transform_input(lin["q"], measure(i, "up:attn", "qkv", lambda i=i: raw[(i, "qkv")]))
                probes.transform_input(lin["gate"], measure(i, "up:mlp", "gate_up", lambda i=i: raw[(i, "gate_up")]))
                probes.transform_input(lin["o"], measure(i, "o", "o", lambda i=i: raw[(i, "o")]))
                down_exact = lambda i=i: exact_act[i](raw[(i, "gate")]) * raw[(i, "up")]  # noqa: E731
                probes.transform_input(lin["down"], measure(i, "down", "down", down_exact))
            capture(model, calibration.input_ids("profile"), {}, lambda *_: None)
        finally:
            probes.undo()
        label = str(applied)
    return ErrorProfile(label, tuple(stats[key].result(*key) for key in sorted(stats)))
