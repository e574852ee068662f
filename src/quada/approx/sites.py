"""Find the hook points of a decoder by module role, not by architecture name.

Roles are looked up through ``ROLE_ALIASES``, a small ordered override table: the first child name
that exists wins (Gemma-2/3 have both ``pre_feedforward_layernorm`` and a
``post_attention_layernorm`` that normalises the attention output, so the former is listed first).
Anything that does not resolve raises a ``QuadaError`` naming the missing role.

Sites (the activations a technique reads or changes), per decoder layer:
- ``qkv``: output of the attention norm = the input of q/k/v_proj (the paper's ``up`` site);
- ``gate_up``: output of the MLP norm = the input of gate/up_proj (also ``up``);
- ``o``: input of o_proj;  ``down``: input of down_proj (the paper's ``down`` site);
- ``act``: output of act_fn (the authors' code variant).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quada.errors import QuadaError

ROLE_ALIASES: dict[str, tuple[str, ...]] = {
    "attn": ("self_attn", "attention", "attn"),
    "mlp": ("mlp", "feed_forward"),
    "attn_norm": ("input_layernorm", "attention_norm"),
    "mlp_norm": ("pre_feedforward_layernorm", "post_attention_layernorm", "ffn_norm"),
    "q": ("q_proj", "wq"),
    "k": ("k_proj", "wk"),
    "v": ("v_proj", "wv"),
    "o": ("o_proj", "wo", "out_proj"),
    "gate": ("gate_proj", "w1"),
    "up": ("up_proj", "w3"),
    "down": ("down_proj", "w2"),
    "act_fn": ("act_fn", "act"),
    "final_norm": ("norm", "final_layernorm", "final_norm"),
}

SITES = ("qkv", "gate_up", "o", "down", "act")
# Which linears consume each site (for weight folding and quantization).
CONSUMERS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up"), "o": ("o",), "down": ("down",)}


def _child(parent: nn.Module, role: str, where: str) -> nn.Module:
    for name in ROLE_ALIASES[role]:
        module = getattr(parent, name, None)
        if isinstance(module, nn.Module):
            return module
    raise QuadaError(
        f"cannot find the {role} module of {where} ({type(parent).__name__}); looked for "
        f"{', '.join(ROLE_ALIASES[role])}. Add its name to quada.approx.sites.ROLE_ALIASES"
    )


def _act_name(mlp: nn.Module, where: str) -> str:
    for name in ROLE_ALIASES["act_fn"]:
        if isinstance(getattr(mlp, name, None), nn.Module):
            return name
    raise QuadaError(f"cannot find the activation module of {where}; looked for {', '.join(ROLE_ALIASES['act_fn'])}")


@dataclass
class LayerSites:
    """The modules of one decoder layer, by role."""

    index: int
    layer: nn.Module
    attn_norm: nn.Module
    mlp_norm: nn.Module
    mlp: nn.Module
    act_name: str
    linears: dict[str, nn.Linear]  # q, k, v, o, gate, up, down

    @property
    def device(self) -> torch.device:
        """Where the layer's weights (and so its activations) live."""
        return next(self.layer.parameters()).device

    @property
    def act_fn(self) -> nn.Module:
        """The activation module that runs now (looked up live: polynomials swap it)."""
        return getattr(self.mlp, self.act_name)

    def tap(self, site: str) -> tuple[nn.Module, str]:
        """``(module, "output" | "input")`` whose output or first input is the site's tensor."""
        if site == "qkv":
            return self.attn_norm, "output"
        if site == "gate_up":
            return self.mlp_norm, "output"
        if site == "act":
            return self.act_fn, "output"
        if site in ("o", "down"):
            return self.linears[site], "input"
        raise QuadaError(f"unknown site {site!r}; choose one of {', '.join(SITES)}")

    def named_norms(self) -> list[tuple[str, nn.Module]]:
        """Every normalisation module inside the layer (RMSNorm, LayerNorm, q/k norms...), by its
        name within the layer."""
        return [(name, m) for name, m in self.layer.named_modules() if type(m).__name__.endswith("Norm")]


@dataclass
class Decoder:
    """A causal LM seen as its decoder layers plus the final norm; ``base`` is the module that runs
    the layers (its forward receives the token ids, mask and positions)."""

    model: nn.Module
    layers: list[LayerSites]
    final_norm: nn.Module
    base: nn.Module


def _decoder_layer_list(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    for module in model.modules():
        for child in module.children():
            if isinstance(child, nn.ModuleList) and len(child) and all(
                any(hasattr(layer, n) for n in ROLE_ALIASES["attn"]) and any(hasattr(layer, n) for n in ROLE_ALIASES["mlp"])
                for layer in child
            ):
                return module, child
    raise QuadaError(
        f"cannot find the decoder layers of {type(model).__name__}: no list of modules with an "
        "attention and an MLP child; quada supports Llama/Qwen2/Mistral/Gemma-style decoders"
    )


def resolve_decoder(model: nn.Module) -> Decoder:
    """Resolve every role of every decoder layer (raises ``QuadaError`` if one is missing)."""
    parent, layer_list = _decoder_layer_list(model)
    layers = []
    for i, layer in enumerate(layer_list):
        where = f"decoder layer {i}"
        attn, mlp = _child(layer, "attn", where), _child(layer, "mlp", where)
        linears = {role: _child(attn, role, where) for role in ("q", "k", "v", "o")}
        linears |= {role: _child(mlp, role, where) for role in ("gate", "up", "down")}
        layers.append(
            LayerSites(
                index=i,
                layer=layer,
                attn_norm=_child(layer, "attn_norm", where),
                mlp_norm=_child(layer, "mlp_norm", where),
                mlp=mlp,
                act_name=_act_name(mlp, where),
                linears=linears,
            )
        )
    return Decoder(model, layers, _child(parent, "final_norm", "the decoder"), parent)


EXACT_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation_kind(act_fn: nn.Module) -> str:
    """Which exact activation a module computes (``silu``, ``gelu`` or ``gelu_tanh``), by probing it
    on a grid rather than trusting class names."""
    grid = torch.linspace(-8, 8, 801)
    with torch.no_grad():
        out = act_fn(grid)
        errors = {kind: (out - fn(grid)).abs().max().item() for kind, fn in EXACT_ACTIVATIONS.items()}
    kind = min(errors, key=errors.get)
    if errors[kind] > 1e-5:
        raise QuadaError(
            f"the activation {type(act_fn).__name__} is neither SiLU nor GELU; polynomial "
            "approximations exist only for those"
        )
    return kind


def norm_weight_offset(norm: nn.Module) -> float:
    """The constant the norm adds to its weight: 0 for Llama-style RMSNorm (``w * x_hat``), 1 for
    Gemma-style (``(1 + w) * x_hat``). Probed with an all-ones input, whose RMS-normalised form is
    all ones, so the output is ``w + offset``."""
    weight = getattr(norm, "weight", None)
    if weight is None or getattr(norm, "bias", None) is not None:
        raise QuadaError(f"{type(norm).__name__} is not an RMSNorm with a weight; cannot fold scales into it")
    with torch.no_grad():  # forward() skips hooks: an enclosing approximation neither alters nor sees the probe
        out = norm.forward(torch.ones(1, 1, weight.shape[-1], dtype=weight.dtype, device=weight.device))
    offset = round((out.float() - weight.float()).mean().item())
    if offset not in (0, 1):
        raise QuadaError(f"{type(norm).__name__} does not behave like an RMSNorm; cannot fold scales into it")
    return float(offset)


@contextlib.contextmanager
def capturing(taps: Mapping[Hashable, tuple[nn.Module, str]], consume: Callable[[Hashable, torch.Tensor], None]) -> Iterator[None]:
    """While inside, hand each tap's tensor to ``consume(key, tensor)`` at every forward.

    ``taps`` maps a key to ``(module, "output" | "input")`` (see :meth:`LayerSites.tap`): the
    module's output (its first element when the module returns a tuple) or its first input, as
    the model computed it (on its device, with its graph; after the hooks of an approximation
    installed before). The hooks are removed on exit, also after an error.
    """

    def hook(key: Hashable, kind: str):
        if kind == "output":
            return lambda _m, _args, out: consume(key, out[0] if isinstance(out, tuple) else out)
        return lambda _m, args: consume(key, args[0])

    handles = []
    try:
        for key, (module, kind) in taps.items():
            register = module.register_forward_hook if kind == "output" else module.register_forward_pre_hook
            handles.append(register(hook(key, kind)))
        yield
    finally:
        for handle in handles:
            handle.remove()
