"""The options of `quada sweep` and `quada layers`: :class:`SweepConfig` and :class:`LayersConfig`.

Both extend :class:`quada.options.EvalOptions` through :class:`AnalysisOptions` (one run folder,
judged by a first safety judge, responses of 64 tokens). Like :mod:`quada.options`, this module
does not import torch: the command line builds its options from these fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from quada.errors import QuadaError
from quada.options import EvalOptions, check_asr_judge, check_counts, redefault
from quada.store import CLEAN

# Each refinement round halves the step next to the MVA: ten rounds reach 1/1024 of the grid's step,
# finer than any ASR measured on a few hundred prompts can tell apart.
MAX_REFINE = 10


def spec_at(technique, parameter: str, strength: float):
    """``technique`` (a parsed technique config) with ``parameter`` set to ``strength``; 0 is the
    clean model."""
    return CLEAN if strength == 0 else technique.with_option(parameter, strength)


@dataclass
class AnalysisOptions(EvalOptions):
    """The evaluation options as the analyses use them: the first judge decides the ASR, and the
    analyses share a run folder (and with it one report)."""

    judges: tuple[str, ...] = redefault(EvalOptions, "judges", ("keyword",), help="Comma-separated judges (keyword, refusal-keyword, refusal, llm, harmfulness); the first decides the ASR.")
    max_new_tokens: int = redefault(EvalOptions, "max_new_tokens", 64)
    run_dir: Path = field(default_factory=lambda: Path("runs") / "sweep", metadata={
        "help": "Run folder: results store, report and the analyses' results; share it between `quada vet`, sweep, "
        "layers and clusters for one report on the whole story.",
    })

    def __post_init__(self):
        super().__post_init__()
        check_asr_judge(self.judges)
        self.run_dir = Path(self.run_dir)


@dataclass
class SweepConfig(AnalysisOptions):
    """What `quada sweep` measures; every field is a command-line option of the same name."""

    spec: str = field(default="noise:site=up,dist=gaussian", metadata={
        "help": "The approximation to sweep, without the swept option (see `quada approx list`); e.g. 'teal' with "
        "--parameter sparsity, 'noise:site=up,dist=gaussian,layers=0:4' with std.",
        "aliases": ("-s",),
    })
    parameter: str = field(default="std", metadata={
        "help": "The option of --spec whose value is swept: std, scale, threshold, sparsity, bits, ...",
        "aliases": ("-p",),
    })
    grid: tuple[float, ...] = field(default=(0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2), metadata={
        "help": "Strengths to evaluate, comma-separated; 0 (or 'clean') is the clean model.",
        "aliases": ("-g",),
    })
    variants: tuple[str, ...] = field(default=(), metadata={
        "help": "Sweep a list of approximations instead of a strength (repeat; e.g. -V bolt -V bumblebee -V nexus "
        "-V puma -V iron): the clean model and each variant, no refinement; spec, parameter and grid are then unused.",
        "aliases": ("--variant", "-V"),
        "repeat": True,
    })
    ppl_bound: float = redefault(AnalysisOptions, "ppl_bound", help="The most vulnerable approximation (MVA) must keep perplexity at most this multiple of the clean perplexity.")
    refine: int = field(default=2, metadata={
        "help": f"Bisection rounds around the current MVA after the grid (0 = grid only, at most {MAX_REFINE}); each "
        "adds at most two points.",
    })
    limit: int | None = redefault(EvalOptions, "limit", 64)

    def __post_init__(self):
        super().__post_init__()
        from quada.approx import as_spec, parse_technique

        grid = [float(v) for v in self.grid]
        if not grid:
            raise QuadaError("the grid is empty; give strengths such as 0,0.05,0.1")
        if not all(math.isfinite(v) and v >= 0 for v in grid):
            raise QuadaError(f"grid strengths must be finite and non-negative (0 = the clean model), got {tuple(grid)}")
        repeated = sorted({v for v in grid if grid.count(v) > 1})
        if repeated:
            raise QuadaError(f"the grid {','.join(f'{v:g}' for v in grid)} gives the strength {repeated[0]:g} more than "
                             "once (0 and 'clean' are the same point); give each strength once")
        self.grid = tuple(sorted(grid))
        positive = [s for s in self.grid if s > 0]
        if not positive and not self.variants:
            raise QuadaError("the grid holds no strength above 0, so the sweep would measure the clean model only; "
                             "add strengths, e.g. 0,0.05,0.1")
        # Parsed once, here: the technique at the first positive strength; every point replaces its option.
        self.technique = parse_technique(self.spec, self.parameter, positive[0]) if positive else None
        for strength in self.grid:  # a bad spec or parameter fails now, not after loading a model
            spec_at(self.technique, self.parameter, strength)
        self.variant_approximations = tuple(as_spec(v) for v in self.variants)
        self.variants = tuple(map(str, self.variant_approximations))  # canonical: one condition per variant
        if len(set(self.variants)) < len(self.variants):
            raise QuadaError(f"the variants repeat a spec: {', '.join(self.variants)}; list each one once")
        if not 0 <= self.refine <= MAX_REFINE:
            raise QuadaError(
                f"--refine must be 0 (grid only) to {MAX_REFINE} rounds (each halves the step next to the MVA), got "
                f"{self.refine}"
            )

    @property
    def axis(self) -> str:
        """What the sweep varies, for table headers and the figure."""
        return "variant" if self.variants else self.parameter

    def first_points(self) -> list[tuple[float, object]]:
        """``(strength, approximation)`` of the points measured before any refinement; a variant's
        strength is its position in the list (1, 2, ...), the clean model's is 0."""
        if self.variants:
            return [(0.0, CLEAN), *((float(i), v) for i, v in enumerate(self.variant_approximations, start=1))]
        return [(s, spec_at(self.technique, self.parameter, s)) for s in self.grid]


@dataclass
class LayersConfig(AnalysisOptions):
    """What `quada layers` measures; every field is a command-line option of the same name."""

    spec: str | None = field(default=None, metadata={
        "help": "Approximation spec; default: the most vulnerable approximation found by `quada sweep` in --run-dir.",
        "aliases": ("-s",),
    })
    stride: int = field(default=1, metadata={
        "help": "Measure every stride-th layer l and count k (the all-layer condition always): 4 on a 28-layer model "
        "measures 7 + 7 + 7 conditions.",
    })
    share: float = field(default=0.9, metadata={
        "help": "tau is the smallest k whose first-k ASR reaches this share of the all-layer ASR.",
    })
    proxy_only: bool = field(default=False, metadata={
        "help": "Cheap mode: rank layers by the refusal-probability proxy (forward passes only, no generation, no judge).",
    })

    def __post_init__(self):
        super().__post_init__()
        from quada.approx import as_spec

        check_counts(self, "stride")
        if self.spec == CLEAN:
            raise QuadaError("--spec must be an approximation, not the clean model")
        self.approximation = None if self.spec is None else as_spec(self.spec)  # parsed once, here
        if self.approximation is not None:
            self.spec = str(self.approximation)
            if any(part.layers is not None for part in self.approximation.parts()):
                raise QuadaError("the layer analysis chooses the layers itself: drop layers= from --spec")
        if not 0 < self.share <= 1:
            raise QuadaError(f"share must lie in (0, 1], e.g. 0.9 for 90% of the all-layer ASR; got {self.share}")
