"""Calibration data, activation capture and the per-model calibration cache.

Calibrated techniques (TEAL, CATS, SmoothQuant, OmniQuant) read activation statistics from a small
set of benign prompts run through the clean model. Results are cached in memory and on disk under
``<quada cache>/approx/<model fingerprint>/`` (``quada.fingerprint``), keyed by the technique's
canonical spec and a hash of the prompts, so a sweep calibrates each model once. ``apply`` lifts
any enclosing approximation while calibrating, so the cache never holds an approximated model's
statistics under the clean model's fingerprint.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quada.approx.sites import capturing
from quada.errors import QuadaError
from quada.fingerprint import model_fingerprint
from quada.runs import atomic_writer

# [ours] Ordinary, harmless instructions of varied length and topic.
CALIBRATION_PROMPTS: tuple[str, ...] = (
    "Give three tips for staying healthy.",
    "Explain how photosynthesis works in simple terms.",
    "Write a short poem about the ocean at dawn.",
    "What are the main differences between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do I make a simple tomato sauce for pasta?",
    "Describe the water cycle to a ten-year-old.",
    "Suggest a name for a bakery that specializes in sourdough bread.",
    "Translate 'Good morning, how are you?' into French and Spanish.",
    "Write a Python function that returns the factorial of a number.",
    "What causes the seasons on Earth?",
    "List five fruits that are rich in vitamin C.",
    "Explain the difference between weather and climate.",
    "Write a polite email asking a colleague to reschedule a meeting.",
    "How does a bicycle stay upright while moving?",
    "Give me a beginner's weekly running plan.",
    "What is the capital of Australia, and why was it chosen?",
    "Explain what a prime number is and give some examples.",
    "Write a haiku about autumn leaves.",
    "How can I improve my time management at work?",
    "Describe how a rainbow forms.",
    "What are some good habits for getting better sleep?",
    "Explain recursion with a short example in JavaScript.",
    "Compose a short thank-you note for a birthday gift.",
    "What is the Pythagorean theorem used for?",
    "Recommend three classic novels and say why each is worth reading.",
    "How do vaccines help the immune system?",
    "Write a SQL query that counts the rows in a table named orders.",
    "Explain the rules of chess for the knight piece.",
    "What should I pack for a weekend hiking trip?",
    "Describe the life cycle of a butterfly.",
    "Give an example of a metaphor and explain what it means.",
)


@dataclass(frozen=True)
class CalibrationSet:
    """Prompts (chat-formatted with the tokenizer's template when it has one) to calibrate on."""

    tokenizer: object
    prompts: tuple[str, ...]

    @classmethod
    def of(cls, tokenizer, prompts: Sequence[str] | None = None) -> CalibrationSet:
        return cls(tokenizer, tuple(prompts) if prompts else CALIBRATION_PROMPTS)

    @property
    def key(self) -> str:
        return hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()[:16]

    def input_ids(self, technique: str) -> list[torch.Tensor]:
        """One ``(1, tokens)`` id tensor per prompt (no padding, so statistics see no pad tokens)."""
        if self.tokenizer is None:
            raise QuadaError(
                f"{technique} calibrates on prompts and needs the tokenizer: call "
                "apply(model, spec, tokenizer=tokenizer)"
            )
        from quada.chat import format_prompt

        texts = [format_prompt(self.tokenizer, p) if self.tokenizer.chat_template else p for p in self.prompts]
        return [self.tokenizer(t, add_special_tokens=False, return_tensors="pt")["input_ids"] for t in texts]


_MEMORY: dict[tuple[str, str], dict[str, torch.Tensor]] = {}


def cache_root() -> str:
    from quada.models import cache_dir

    return os.path.join(cache_dir().parent, "approx")


def cached(model: nn.Module, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Return ``compute()``'s tensors for (model, key), from memory, disk or a fresh computation.
    They are kept on the CPU, whatever device computed them, so a cache file loads on any
    machine; installers move what they use onto the layer's device."""
    fingerprint = model_fingerprint(model)
    if (fingerprint, key) in _MEMORY:
        return _MEMORY[(fingerprint, key)]
    path = os.path.join(cache_root(), fingerprint, hashlib.sha256(key.encode()).hexdigest()[:24] + ".pt")
    result = None
    if os.path.exists(path):
        try:
            stored = torch.load(path, weights_only=True, map_location="cpu")
            result = stored["tensors"] if stored.get("key") == key else None
        except Exception:  # a corrupt cache file is recomputed, never trusted
            result = None
    if result is None:
        result = {name: tensor.cpu() for name, tensor in compute().items()}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_writer(path, "wb") as f:
            torch.save({"key": key, "tensors": result}, f)
    _MEMORY[(fingerprint, key)] = result
    return result


def capture(
    model: nn.Module,
    batches: list[torch.Tensor],
    taps: dict[Hashable, tuple[nn.Module, str]],
    consume: Callable[[Hashable, torch.Tensor], None],
) -> None:
    """Run ``batches`` through ``model`` and hand each tap's tensor to ``consume(key, x)``.

    ``taps`` maps a key to ``(module, "output" | "input")``; ``x`` arrives as float32
    ``(tokens, channels)``.
    """
    def flat(key: Hashable, x: torch.Tensor) -> None:
        consume(key, x.detach().reshape(-1, x.shape[-1]).float())

    with capturing(taps, flat):
        device = next(model.parameters()).device
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids.to(device), use_cache=False)


class AbsHistogram:
    """Histogram of ``|x|`` over log-spaced bins from 1e-8 to 1e4 (values below land in bin 0).

    TEAL calibrates thresholds from such histograms; 4096 bins resolve a quantile to 0.7%.
    """

    LOW, HIGH, BINS = -8.0, 4.0, 4096

    def __init__(self, counts: torch.Tensor | None = None):
        self.counts = torch.zeros(self.BINS, dtype=torch.float64) if counts is None else counts

    def add(self, x: torch.Tensor) -> None:
        logs = x.abs().clamp_min(10**self.LOW).log10()
        # Binned where x lives; the counts stay on the CPU, like every cached statistic.
        self.counts += torch.histc(logs, self.BINS, self.LOW, self.HIGH).cpu().double()

    def quantile(self, q: float) -> float:
        return histogram_quantile(self.counts, self.LOW, self.HIGH, q)


def histogram_quantile(counts: torch.Tensor, low: float, high: float, q: float) -> float:
    """The ``q``-quantile of a histogram over log10-spaced bins, interpolated in log space within
    the bin where the cumulative fraction crosses ``q``. ``q = 0`` gives 0 (zero sparsity)."""
    if q <= 0:
        return 0.0
    cdf = counts.cumsum(0) / counts.sum()
    i = int(torch.searchsorted(cdf, torch.tensor([q], dtype=cdf.dtype)).item())
    i = min(i, len(counts) - 1)
    before = cdf[i - 1].item() if i else 0.0
    inside = (q - before) / max(cdf[i].item() - before, 1e-300)
    width = (high - low) / len(counts)
    return 10 ** (low + width * (i + min(max(inside, 0.0), 1.0)))
