"""Activation approximations: the paper's noise model and real implementations, one reversible API.

    from quada.approx import apply, parse_spec, TealConfig
    with apply(model, "paper:bolt", layers="0:4", seed=0):
        ...                                   # the model runs approximated
    with apply(model, TealConfig(sparsity=0.5), tokenizer=tokenizer) as applied:
        ...; applied.sparsity()               # per-(layer, site) fraction zeroed
    # here the model is bit-identical to before

Spec strings (``quada approx list`` shows them all): ``noise:site=up,dist=gaussian,std=0.075``,
``teal:sparsity=0.5``, ``cats:sparsity=0.5``, ``smoothquant:bits=4,alpha=0.8``,
``omniquant:bits=4``, ``bolt``, ``bumblebee``, ``bumblebee2``, ``nexus``, ``puma``, ``iron``,
presets ``paper:<row>`` of the paper's Table 1; compose with ``+``.
"""

from quada.approx.base import (
    Applied,
    ApproxConfig,
    ComposedConfig,
    LayerSelection,
    Spec,
    apply,
    as_spec,
    list_specs,
    parse_spec,
    parse_technique,
    short_label,
    spec_label,
)
from quada.approx.noise import NoiseConfig
from quada.approx.poly import (
    BoltConfig,
    BumbleBee2Config,
    BumbleBeeConfig,
    IronConfig,
    NexusConfig,
    PumaConfig,
)
from quada.approx.profile import ErrorProfile, SiteError, profile
from quada.approx.quant import OmniQuantConfig, SmoothQuantConfig
from quada.approx.sparse import CatsConfig, TealConfig

PAPER_PRESETS = tuple(name for name, _ in list_specs() if name.startswith("paper:"))  # the rows of the paper's Table 1

__all__ = [
    "Applied",
    "ApproxConfig",
    "BoltConfig",
    "BumbleBee2Config",
    "BumbleBeeConfig",
    "CatsConfig",
    "ComposedConfig",
    "ErrorProfile",
    "IronConfig",
    "LayerSelection",
    "NexusConfig",
    "NoiseConfig",
    "OmniQuantConfig",
    "PAPER_PRESETS",
    "PumaConfig",
    "SiteError",
    "SmoothQuantConfig",
    "Spec",
    "TealConfig",
    "apply",
    "as_spec",
    "list_specs",
    "parse_spec",
    "parse_technique",
    "profile",
    "short_label",
    "spec_label",
]
