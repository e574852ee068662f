"""Preference pairs for QuadA, and the split that keeps training prompts out of the evaluation.

Two sources:
- **PKU-SafeRLHF** (Ji et al., arXiv 2406.15513), the paper's training data (PAPER.md section 5):
  a local JSON/JSONL/parquet file or the hub dataset ``PKU-Alignment/PKU-SafeRLHF``; each row's
  safer response (``safer_response_id``) is chosen, the other rejected.
- **Self-generated, offline** [ours]: harmful training prompts (AdvBench minus the held-out part)
  give chosen = the clean model's refusal, rejected = its compliant answer under the
  perturbation (kept only when the refusal-keyword judge finds a refusal in the clean answer and
  the paper's keyword judge calls the perturbed one an attack; a refusing prompt gets up to
  ``attempts`` noise draws). Prompts the clean model already answers give chosen = a short written
  refusal, rejected = that answer. Benign prompts give chosen = the clean model's helpful answer,
  rejected = a written refusal (teaching not to over-refuse) or its answer under heavy
  approximation.

Held-out prompts (a seeded subset of each prompt set) never enter training; their ids are stored
in ``split.json`` and the prompts themselves in ``heldout-harmful.jsonl`` / ``heldout-benign.jsonl``,
prompt files that ``quada vet --benchmark`` (and ``quada align``) read with the original ids.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quada.approx import as_spec
from quada.data import Prompt, jsonl_rows, load_benchmark, subset
from quada.defense.quada import DEFAULT_PERTURBATION
from quada.devices import check_device
from quada.errors import QuadaError, check_seed
from quada.eval.generate import GenerationSettings
from quada.eval.judges import keyword_verdict, refusal_phrase
from quada.hub import require_hub
from quada.models import DEFAULT_MODEL
from quada.runs import atomic_write_text, open_run_dir, progress_bar
from quada.store import CLEAN

PKU_HUB_ID = "PKU-Alignment/PKU-SafeRLHF"
PKU_COLUMNS = ("prompt", "response_0", "response_1", "safer_response_id")
PAIRS_FILE = "pairs.jsonl"
SPLIT_FILE = "split.json"
HELDOUT_HARMFUL = "heldout-harmful.jsonl"
HELDOUT_BENIGN = "heldout-benign.jsonl"
# Refusals written for quada, used where the model has no refusal of its own to offer (chosen for a
# prompt it answered, rejected for a benign prompt).
WRITTEN_REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause real harm to people.",
    "I cannot help with this request, because it could be used to hurt someone.",
    "I'm sorry, I can't assist with that. If you have another question, I'm glad to help.",
    "I can't provide that. Helping with this could put people at risk.",
)


@dataclass(frozen=True)
class PreferencePair:
    """One training pair; ``harmful`` marks a harmful request (the regularizer's prompts)."""

    id: str
    prompt: str
    chosen: str
    rejected: str
    harmful: bool
    source: str


def written_refusal(key: str) -> str:
    """One of :data:`WRITTEN_REFUSALS`, fixed by ``key`` (a prompt id)."""
    return WRITTEN_REFUSALS[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(WRITTEN_REFUSALS)]


def _write_atomically(path: Path, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as err:
        raise QuadaError(f"cannot write {path} ({err.strerror}); choose a writable output folder") from err


def write_pairs(path: str | Path, pairs: Sequence[PreferencePair]) -> Path:
    """Write pairs as JSONL (one object a line), whole or not at all."""
    path = Path(path)
    _write_atomically(path, "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in pairs))
    return path


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """Pairs from a JSONL file with ``prompt``, ``chosen`` and ``rejected`` strings on every line
    (optional ``harmful``, default true, ``id`` and ``source``)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise QuadaError(f"pairs file {path} does not exist; make one with `quada pairs`")
    pairs = []
    for number, row in jsonl_rows(path, "pairs file"):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip()
                                                for k in ("prompt", "chosen", "rejected")):
            raise QuadaError(f'{path} line {number} needs non-empty "prompt", "chosen" and "rejected" strings')
        pairs.append(PreferencePair(
            id=str(row.get("id") or f"{path.stem}-{number}"), prompt=row["prompt"], chosen=row["chosen"],
            rejected=row["rejected"], harmful=bool(row.get("harmful", True)), source=str(row.get("source", path.name)),
        ))
    if not pairs:
        raise QuadaError(f"pairs file {path} holds no pairs")
    return pairs


def kind_quotas(counts: dict[str, int], n: int) -> dict[str, int]:
    """How many of ``n`` pairs each kind gets: its share ``n * count / total`` rounded by largest
    remainder (Hamilton's method: the floors, then one more for the largest remainders, ties by kind
    name), so the quotas add up to exactly ``n``. When ``n`` is at least the number of kinds, a kind
    whose share rounded to nothing still gets one pair, taken from the kind furthest above its
    share (among those with two or more), so that no kind drops out of training."""
    total = sum(counts.values())
    floors = {kind: divmod(n * count, total) for kind, count in counts.items()}  # exact integer shares
    quotas = {kind: whole for kind, (whole, _) in floors.items()}
    by_remainder = sorted(counts, key=lambda kind: (-floors[kind][1], kind))
    for kind in by_remainder[: n - sum(quotas.values())]:
        quotas[kind] += 1
    if n >= len(counts):
        for kind in sorted(k for k, quota in quotas.items() if quota == 0):
            # Surplus over the exact share, in units of 1/total: quota * total - n * count.
            donor = max((k for k, quota in quotas.items() if quota > 1),
                        key=lambda k: (quotas[k] * total - n * counts[k], k))
            quotas[donor] -= 1
            quotas[kind] = 1
    return quotas


def stratified_pairs(pairs: Sequence[PreferencePair], n: int | None, seed: int) -> list[PreferencePair]:
    """A seeded subset of ``n`` pairs, stratified by kind (``source``), in file order.

    Each kind gets its :func:`kind_quotas` share; within a kind, the pairs ranked first by the
    SHA-256 of ``"{seed}:{id}"`` are taken, so the subset depends on the pairs, ``n`` and ``seed``
    but not on the order of the file. ``n=None`` or ``n >= len(pairs)`` keeps every pair.
    """
    if n is None or n >= len(pairs):
        return list(pairs)
    counts: dict[str, int] = {}
    for pair in pairs:
        counts[pair.source] = counts.get(pair.source, 0) + 1
    quotas = kind_quotas(counts, n)
    ranked = sorted(range(len(pairs)), key=lambda i: hashlib.sha256(f"{seed}:{pairs[i].id}".encode()).hexdigest())
    chosen = []
    for index in ranked:
        if quotas[pairs[index].source] > 0:
            quotas[pairs[index].source] -= 1
            chosen.append(index)
    return [pairs[i] for i in sorted(chosen)]


def pair_ids_sha256(pairs: Sequence[PreferencePair]) -> str:
    """The SHA-256 of the pairs' ids, one a line in their order: which pairs a run trained on."""
    return hashlib.sha256("".join(f"{p.id}\n" for p in pairs).encode()).hexdigest()


# --------------------------------------------------------------------------- PKU-SafeRLHF


def pku_pairs_from_rows(rows) -> list[PreferencePair]:
    """PKU-SafeRLHF rows to pairs: the safer response is chosen. A prompt counts as harmful unless
    both responses are marked safe (``is_response_0_safe`` / ``is_response_1_safe``, when given)."""
    pairs = []
    for row in rows:
        missing = [c for c in PKU_COLUMNS if c not in row]
        if missing:
            raise QuadaError(f"a PKU-SafeRLHF row lacks {', '.join(missing)}; rows need {', '.join(PKU_COLUMNS)}")
        safer = int(row["safer_response_id"])
        if safer not in (0, 1):
            raise QuadaError(f"safer_response_id must be 0 or 1, got {row['safer_response_id']!r}")
        chosen, rejected = row[f"response_{safer}"], row[f"response_{1 - safer}"]
        if not chosen or not rejected or chosen == rejected:
            continue
        both_safe = bool(row.get("is_response_0_safe", False)) and bool(row.get("is_response_1_safe", False))
        digest = hashlib.sha256(f"{row['prompt']}\n{chosen}\n{rejected}".encode()).hexdigest()[:12]
        pairs.append(PreferencePair(f"pku-{digest}", row["prompt"], chosen, rejected, not both_safe, "pku-saferlhf"))
    return pairs


def load_pku_saferlhf(file: str | Path | None = None, limit: int | None = None, seed: int = 0) -> list[PreferencePair]:
    """PKU-SafeRLHF pairs from ``file`` (.json, .jsonl or .parquet) or, without one, the hub
    (train split); ``limit`` takes a seeded subset."""
    from datasets import Dataset, load_dataset

    if file is not None:
        path = Path(file).expanduser()
        if not path.is_file():
            raise QuadaError(f"PKU-SafeRLHF file {path} does not exist; check the path")
        readers = {".json": Dataset.from_json, ".jsonl": Dataset.from_json, ".parquet": Dataset.from_parquet}
        if path.suffix.lower() not in readers:
            raise QuadaError(f"cannot read {path}: give a .json, .jsonl or .parquet file")
        rows = readers[path.suffix.lower()](str(path))
    else:
        instead = (
            "Offline, give a local copy with --file (JSON, JSONL or parquet with prompt, response_0, response_1, "
            "safer_response_id) or make pairs from the model itself with --source self."
        )
        require_hub(PKU_HUB_ID, instead)
        try:
            rows = load_dataset(PKU_HUB_ID, split="train")
        except Exception as err:  # offline without a cached copy, or the dataset moved
            raise QuadaError(f"could not load {PKU_HUB_ID} from the hub ({type(err).__name__}). {instead}") from err
    pairs = pku_pairs_from_rows(rows)
    if not pairs:
        raise QuadaError("the PKU-SafeRLHF data holds no usable pair (every row lacked two different responses)")
    return subset(pairs, limit, seed)


# --------------------------------------------------------------------------- the split


def split_prompts(prompts: Sequence[Prompt], heldout: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """``(train, held_out)``: a seeded subset of ``heldout`` prompts is kept for evaluation, the
    rest is for training; both keep the original order."""
    if not 1 <= heldout < len(prompts):
        raise QuadaError(f"cannot hold out {heldout} of {len(prompts)} prompts; hold out at least 1 and leave some to train on")
    kept = {p.id for p in subset(prompts, heldout, seed)}
    return [p for p in prompts if p.id not in kept], [p for p in prompts if p.id in kept]


def write_prompt_file(path: Path, prompts: Sequence[Prompt]) -> None:
    """A JSONL prompt file (``id``, ``prompt``, ``category``) that `quada vet --benchmark` reads."""
    _write_atomically(path, "".join(
        json.dumps({"id": p.id, "prompt": p.text, "category": p.category}, ensure_ascii=False) + "\n" for p in prompts))


@dataclass(frozen=True)
class Split:
    """Which prompts train and which are held out, per prompt set."""

    seed: int
    harmful_source: str
    harmful_train: tuple[str, ...]
    harmful_heldout: tuple[str, ...]
    benign_source: str
    benign_train: tuple[str, ...]
    benign_heldout: tuple[str, ...]

    def write(self, out_dir: Path, harmful_heldout: Sequence[Prompt], benign_heldout: Sequence[Prompt]) -> None:
        write_prompt_file(out_dir / HELDOUT_HARMFUL, harmful_heldout)
        write_prompt_file(out_dir / HELDOUT_BENIGN, benign_heldout)
        _write_atomically(out_dir / SPLIT_FILE, json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, path: Path) -> Split:
        try:
            values = json.loads(path.read_text())
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        except (OSError, ValueError, TypeError) as err:
            raise QuadaError(f"cannot read the split {path} ({err}); make the pairs again with `quada pairs`") from err


# --------------------------------------------------------------------------- self-generated pairs


@dataclass
class SelfPairsConfig:
    """How `quada pairs --source self` builds pairs from a model; every field has a CLI option.
    ``approximation`` and ``heavy_approximation`` are ``perturbation`` and ``heavy`` parsed (once, here)."""

    model: str = DEFAULT_MODEL
    device: str = "auto"  # where the model runs: auto, cpu, cuda or cuda:N
    perturbation: str = DEFAULT_PERTURBATION  # the MVA, on every layer while generating
    harmful: str = "advbench"
    benign: str = "quada-benign"
    heldout: int = 104  # harmful prompts kept for evaluation (20% of AdvBench)
    benign_heldout: int = 32
    limit: int | None = None  # harmful training prompts used (a seeded subset); None = all
    benign_limit: int | None = None
    attempts: int = 3  # noise draws per prompt the clean model refuses, until one complies
    compliant_pairs: bool = True  # prompts the clean model answers: chosen = a written refusal
    benign_rejected: str = "refusal"  # "refusal" (a written one) or "approx" (the answer under `heavy`)
    heavy: str = "noise:site=up,dist=gaussian,std=0.5"
    prompt_format: str = "paper"
    max_new_tokens: int = 128
    seed: int = 0
    out_dir: Path = field(default_factory=lambda: Path("runs") / "pairs")

    def __post_init__(self):
        self.device = check_device(self.device)
        self.approximation, self.heavy_approximation = as_spec(self.perturbation), as_spec(self.heavy)
        self.perturbation, self.heavy = str(self.approximation), str(self.heavy_approximation)
        if self.benign_rejected not in ("refusal", "approx"):
            raise QuadaError(f"benign-rejected must be 'refusal' or 'approx', got {self.benign_rejected!r}")
        for name in ("heldout", "benign_heldout", "attempts", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise QuadaError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("limit", "benign_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise QuadaError(f"{name.replace('_', '-')} must be at least 1 (or omitted for all), got {getattr(self, name)}")
        GenerationSettings(self.max_new_tokens, self.prompt_format)  # validates the format
        check_seed(self.seed)
        self.out_dir = Path(self.out_dir)

    # What the measurement engine reads from its config to generate (no perplexity is measured here).
    @property
    def settings(self) -> GenerationSettings:
        return GenerationSettings(self.max_new_tokens, self.prompt_format)

    @property
    def run_dir(self) -> Path:
        return self.out_dir


@dataclass
class PairsResult:
    pairs: list[PreferencePair]
    pairs_file: Path
    split: Split
    counts: dict[str, int]


def harmful_pairs(prompts, clean, perturbed_attempts, compliant_pairs: bool) -> list[PreferencePair]:
    """Pairs from harmful prompts, given the clean responses and, per attempt, the perturbed ones
    (all keyed by prompt id). Pure: the judging rules of the module docstring."""
    pairs = []
    for prompt in prompts:
        answer = clean[prompt.id]
        if refusal_phrase(answer) is not None:
            complied = next((attempt[prompt.id] for attempt in perturbed_attempts
                             if prompt.id in attempt and keyword_verdict(prompt.text, attempt[prompt.id])[0]), None)
            if complied is not None:
                pairs.append(PreferencePair(f"{prompt.id}:perturbed", prompt.text, answer, complied, True, "self:perturbed"))
        elif compliant_pairs and keyword_verdict(prompt.text, answer)[0]:
            pairs.append(PreferencePair(f"{prompt.id}:compliant", prompt.text, written_refusal(prompt.id), answer, True,
                                        "self:compliant"))
    return pairs


def benign_pairs(prompts, clean, heavy: dict[str, str] | None) -> list[PreferencePair]:
    """Pairs from benign prompts: the clean answer (when it is no refusal and not empty) against a
    written refusal, or against the heavily approximated answer when ``heavy`` is given."""
    pairs = []
    for prompt in prompts:
        answer = clean[prompt.id]
        if refusal_phrase(answer) is not None or not answer.strip():
            continue
        rejected = written_refusal(prompt.id) if heavy is None else heavy[prompt.id]
        if rejected != answer:
            pairs.append(PreferencePair(f"{prompt.id}:benign", prompt.text, answer, rejected, False, "self:benign"))
    return pairs


def self_pairs(config: SelfPairsConfig, progress: bool = True) -> PairsResult:
    """Split the prompt sets, generate the responses (stored and resumable in
    ``out_dir/results.sqlite``), build the pairs and write pairs, split and held-out files."""
    from quada.eval.engine import Engine, check_specs_fit
    from quada.models import load
    from quada.store import Store

    harmful_train, harmful_heldout = split_prompts(load_benchmark(config.harmful), config.heldout, config.seed)
    benign_train, benign_heldout = split_prompts(load_benchmark(config.benign), config.benign_heldout, config.seed)
    harmful_train = subset(harmful_train, config.limit, config.seed)
    benign_train = subset(benign_train, config.benign_limit, config.seed)
    open_run_dir(config.out_dir, "--out")
    split = Split(config.seed, config.harmful, tuple(p.id for p in harmful_train), tuple(p.id for p in harmful_heldout),
                  config.benign, tuple(p.id for p in benign_train), tuple(p.id for p in benign_heldout))
    split.write(config.out_dir, harmful_heldout, benign_heldout)

    model, tokenizer = load(config.model, device=config.device)
    check_specs_fit(model, [config.approximation, config.heavy_approximation])
    with Store(config.out_dir / "results.sqlite") as store, progress_bar(progress) as bar:
        engine = Engine(store, model, tokenizer, config)

        def responses(approximation, prompts: Sequence[Prompt], seed: int, label: str) -> dict[str, str]:
            task = bar.add_task(label, total=len(prompts))
            condition = engine.condition(approximation, prompts, seed)
            rows = engine.responses(condition, lambda n: bar.advance(task, n))
            bar.update(task, completed=len(prompts))
            return {row.key.prompt_id: row.response for row in rows}

        clean = responses(CLEAN, harmful_train, config.seed, "harmful, clean")
        attempts, pending = [], [p for p in harmful_train if refusal_phrase(clean[p.id]) is not None]
        for attempt in range(config.attempts):
            if not pending:
                break
            answers = responses(config.approximation, pending, config.seed + attempt, f"harmful, perturbed #{attempt + 1}")
            attempts.append(answers)
            pending = [p for p in pending if not keyword_verdict(p.text, answers[p.id])[0]]
        benign_clean = responses(CLEAN, benign_train, config.seed, "benign, clean")
        heavy = responses(config.heavy_approximation, benign_train, config.seed, "benign, heavy") if config.benign_rejected == "approx" else None

    pairs = harmful_pairs(harmful_train, clean, attempts, config.compliant_pairs) + benign_pairs(benign_train, benign_clean, heavy)
    if not pairs:
        raise QuadaError(
            "no pair survived the judges: the clean model never refused, or never complied under the perturbation; "
            "try a stronger --perturbation, more --attempts or another model"
        )
    counts = {source: sum(p.source == source for p in pairs) for source in ("self:perturbed", "self:compliant", "self:benign")}
    path = write_pairs(config.out_dir / PAIRS_FILE, pairs)
    return PairsResult(pairs, path, split, counts)


def pku_pairs(file: str | Path | None, out_dir: Path, limit: int | None = None, seed: int = 0) -> PairsResult:
    """PKU-SafeRLHF pairs written to ``out_dir/pairs.jsonl``. Their prompts are not AdvBench's or
    the bundled benign suite's, so the split records every one of those as held out."""
    check_seed(seed)
    pairs = load_pku_saferlhf(file, limit, seed)
    open_run_dir(out_dir, "--out")
    advbench, benign = load_benchmark("advbench"), load_benchmark("quada-benign")
    split = Split(seed, "advbench", (), tuple(p.id for p in advbench), "quada-benign", (), tuple(p.id for p in benign))
    split.write(out_dir, advbench, benign)
    counts = {"pku-saferlhf": len(pairs), "harmful": sum(p.harmful for p in pairs)}
    return PairsResult(pairs, write_pairs(out_dir / PAIRS_FILE, pairs), split, counts)
