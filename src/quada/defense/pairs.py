"""Preference pairs for QuadA, and the split that keeps training prompts out of the evaluation.

Four sources:
- **PKU-SafeRLHF** (Ji et al., arXiv 2406.15513), the paper's training data (PAPER.md section 5):
  a local JSON/JSONL/parquet file or the hub dataset ``PKU-Alignment/PKU-SafeRLHF``; each row's
  safer response (``safer_response_id``) is chosen, the other rejected. Offline it cannot be had:
  neither it nor the other generic safety sets (HH-RLHF, BeaverTails) ships in any installable
  package (none is in this machine's PyPI package index).
- **Self-generated, offline** [ours]: harmful training prompts (AdvBench minus the held-out part)
  give chosen = the clean model's refusal, rejected = its compliant answer under the
  perturbation (kept only when the refusal-keyword judge finds a refusal in the clean answer and
  the paper's keyword judge calls the perturbed one an attack; a refusing prompt gets up to
  ``attempts`` noise draws). Prompts the clean model already answers give chosen = a short written
  refusal, rejected = that answer. Benign prompts give chosen = the clean model's helpful answer,
  rejected = a written refusal (teaching not to over-refuse) or its answer under heavy
  approximation.
- **Generic, offline** [ours], the offline stand-in for PKU-SafeRLHF: no approximation anywhere,
  every generation is the clean model's. PyRIT's 400 many-shot examples (HarmBench behaviours
  answered by an unaligned model) give rejected = the dataset's answer (when the keyword judge
  calls it an attack), chosen = the clean model's refusal or, where it has none, a written one.
  Harmful training prompts the clean model answers give chosen = a written refusal, rejected =
  that answer; those it refuses give chosen = its refusal, rejected = the answer of an unaligned
  model (``rejected_model``) when the keyword judge calls it an attack. Benign prompts as for
  the self-generated source, against a written refusal.
- **Restore, offline** [ours], in the spirit of Q-resafe's safety patch data (Chen et al., "Q-resafe:
  Assessing Safety Risks and Quantization-aware Safety Patching for Quantized Large Language
  Models", ICML 2025, arXiv 2506.20251: the model's responses before quantization preferred over
  the quantized model's): on the generic source's prompts (AdvBench's training part and the
  many-shot questions, the benign training prompts), chosen = the clean model's response,
  rejected = the approximated model's response to the same prompt. A harmful prompt gives a pair
  when the clean response refuses and the approximated one is an attack by the keyword judge (up
  to ``attempts`` noise draws); a harmful prompt the clean model answers gives none (its response
  is not the one to restore). A benign prompt gives a pair when the clean response is no refusal
  and the approximated one differs from it.

Every pair's ``source`` names its kind (``self:perturbed``, ``generic:unaligned``, ...), so subsets
can be stratified by it. Held-out prompts (a seeded subset of each prompt set) never enter
training; their ids are stored in ``split.json`` and the prompts themselves in
``heldout-harmful.jsonl`` / ``heldout-benign.jsonl``, prompt files that ``quada vet --benchmark``
(and ``quada align``) read with the original ids; a many-shot question that is a held-out prompt
is left out.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quada.approx import as_spec
from quada.attack.sources import many_shot_examples
from quada.chat import messages
from quada.data import Prompt, jsonl_rows, load_benchmark, read_text_file, subset
from quada.defense.quada import DEFAULT_PERTURBATION, HARMFUL_COLUMN
from quada.devices import check_device, check_dtype
from quada.errors import QuadaError, check_seed
from quada.hub import require_hub
from quada.judging import keyword_verdict, refusal_phrase
from quada.measures.generate import GenerationSettings
from quada.models import DEFAULT_MODEL, check_source
from quada.runs import atomic_write_text, check_apart, open_run_dir, progress_bar
from quada.store import CLEAN, Store

PKU_HUB_ID = "PKU-Alignment/PKU-SafeRLHF"
UNALIGNED_MODEL = "smollm2-135m-instruct"  # built-in and not aligned: it answers harmful requests
# Pair kinds (a pair's ``source``) of the generated sources, in the order the CLI counts them.
SELF_KINDS = ("self:perturbed", "self:compliant", "self:benign")
GENERIC_KINDS = ("generic:own-refusal", "generic:written-refusal", "generic:compliant", "generic:unaligned",
                 "generic:benign")
RESTORE_KINDS = ("restore:harmful", "restore:benign")
PKU_COLUMNS = ("prompt", "response_0", "response_1", "safer_response_id")
PAIRS_FILE = "pairs.jsonl"
SPLIT_FILE = "split.json"
HELDOUT_HARMFUL = "heldout-harmful.jsonl"
HELDOUT_BENIGN = "heldout-benign.jsonl"
STORE_FILE = "results.sqlite"  # the generation store of the generated sources
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


def check_out_dir(out_dir: Path, inputs) -> None:
    """Refuse an output folder where the pairs, the split, the held-out prompt files or the generation
    store would replace one of the ``inputs`` (``(option, value)`` pairs), before any work."""
    written = (PAIRS_FILE, SPLIT_FILE, HELDOUT_HARMFUL, HELDOUT_BENIGN, STORE_FILE)
    check_apart(inputs, files=[("--out", Path(out_dir) / name) for name in written])


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
        harmful = row.get("harmful", True)
        if not isinstance(harmful, bool):  # bool("false") would be true
            raise QuadaError(
                f'{path} line {number}: "harmful" is {json.dumps(harmful)[:40]}, not true or false; write it as a '
                "JSON boolean (true for a harmful request) or leave it out (true)"
            )
        pairs.append(PreferencePair(
            id=str(row.get("id") or f"{path.stem}-{number}"), prompt=row["prompt"], chosen=row["chosen"],
            rejected=row["rejected"], harmful=harmful, source=str(row.get("source", path.name)),
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


def preference_rows(pairs: Sequence[PreferencePair], prompt_format: str) -> list[dict]:
    """Pairs as conversational TRL rows in the evaluation's prompt format, with ``harmful``."""
    return [
        {"prompt": messages(p.prompt, prompt_format), "chosen": [{"role": "assistant", "content": p.chosen}],
         "rejected": [{"role": "assistant", "content": p.rejected}], HARMFUL_COLUMN: p.harmful}
        for p in pairs
    ]


@dataclass(frozen=True)
class PairLengths:
    """Token counts of pairs as `quada align` trains on them: per pair, the prompt's tokens and the
    tokens of the prompt with its longer response (see :func:`pair_lengths`)."""

    prompts: tuple[int, ...]
    totals: tuple[int, ...]

    def dropped(self, max_length: int) -> list[int]:
        """The pairs that training drops at ``max_length``: their prompt alone fills it, so cutting
        each sequence to ``max_length`` from its end would leave no response token."""
        return [i for i, n in enumerate(self.prompts) if n >= max_length]

    def summary(self, max_length: int) -> str:
        """What these lengths mean for training at ``max_length`` (`quada align`'s --max-length)."""
        dropped = len(self.dropped(max_length))
        cut = sum(total > max_length for total in self.totals) - dropped
        return (f"In the model's tokens, the prompts are up to {max(self.prompts)} long and the pairs up to "
                f"{max(self.totals)}: `quada align --max-length {max_length}` drops {dropped} pair(s) and cuts "
                f"{cut} short; {self.advice()}.")

    def advice(self) -> str:
        """The lengths that keep the pairs, as the end of a message."""
        return (f"--max-length {max(self.prompts) + 1} keeps every pair, {max(self.totals)} keeps every pair whole "
                "(the longest prompt with its longer response)")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def pair_lengths(tokenizer, pairs: Sequence[PreferencePair], prompt_format: str) -> PairLengths:
    """The :class:`PairLengths` of ``pairs`` as TRL's DPO trainer tokenizes them: the prompt through the
    model's chat template with the generation prompt, each response after it; the response starts where
    the prompt alone and the prompt with the response first differ."""

    def ids(conversation, **options) -> list[int]:
        return tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, **options)["input_ids"]

    prompts, totals = [], []
    for row in preference_rows(pairs, prompt_format):
        prompt = ids(row["prompt"], add_generation_prompt=True)
        whole = [ids(row["prompt"] + row[side]) for side in ("chosen", "rejected")]
        prompts.append(min(_common_prefix(prompt, full) for full in whole))
        totals.append(max(map(len, whole)))
    return PairLengths(tuple(prompts), tuple(totals))


def pair_ids_sha256(pairs: Sequence[PreferencePair]) -> str:
    """The SHA-256 of the pairs' ids, one a line in their order: which pairs a run trained on."""
    return hashlib.sha256("".join(f"{p.id}\n" for p in pairs).encode()).hexdigest()


# --------------------------------------------------------------------------- PKU-SafeRLHF


def pku_pairs_from_rows(rows, where: str = "PKU-SafeRLHF") -> list[PreferencePair]:
    """PKU-SafeRLHF rows to pairs: the safer response is chosen. A prompt counts as harmful unless
    both responses are marked safe (``is_response_0_safe`` / ``is_response_1_safe``, when given).
    ``where`` names the data in the messages."""
    pairs = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise QuadaError(f"{where} row {number} is not an object; rows need {', '.join(PKU_COLUMNS)}")
        missing = [c for c in PKU_COLUMNS if c not in row]
        if missing:
            raise QuadaError(f"{where} row {number} lacks {', '.join(missing)}; rows need {', '.join(PKU_COLUMNS)}")
        if str(row["safer_response_id"]).strip() not in ("0", "1"):
            raise QuadaError(f"{where} row {number}: safer_response_id must be 0 or 1, got {row['safer_response_id']!r}")
        safer = int(str(row["safer_response_id"]).strip())
        chosen, rejected = row[f"response_{safer}"], row[f"response_{1 - safer}"]
        if not all(isinstance(text, str) for text in (row["prompt"], chosen, rejected)):
            raise QuadaError(f"{where} row {number}: prompt, response_0 and response_1 must be text")
        if not chosen or not rejected or chosen == rejected:
            continue
        both_safe = bool(row.get("is_response_0_safe", False)) and bool(row.get("is_response_1_safe", False))
        digest = hashlib.sha256(f"{row['prompt']}\n{chosen}\n{rejected}".encode()).hexdigest()[:12]
        pairs.append(PreferencePair(f"pku-{digest}", row["prompt"], chosen, rejected, not both_safe, "pku-saferlhf"))
    return pairs


PKU_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


def read_pku_file(path: Path) -> list:
    """The rows of a local PKU-SafeRLHF copy: parquet, JSON lines (``.jsonl``, or ``.json`` as the hub
    ships it) or one JSON list of objects (``.json``). Read directly, so nothing is cached; a file that
    is not what its suffix says is a user error."""
    suffix = path.suffix.lower()
    if suffix not in PKU_FILE_SUFFIXES:
        raise QuadaError(f"cannot read {path}: give a .json, .jsonl or .parquet file")
    if suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet

        try:
            return pyarrow.parquet.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as err:
            raise QuadaError(
                f"{path} is not a parquet file that can be read ({err}); give the parquet file of the data set, or "
                "the data as .json or .jsonl"
            ) from err
    if suffix == ".json":
        try:
            rows = json.loads(read_text_file(path, "PKU-SafeRLHF file"))
        except json.JSONDecodeError:
            rows = None  # not one JSON document: JSON lines, read below
        if isinstance(rows, list):
            return rows
    return [row for _, row in jsonl_rows(path, "PKU-SafeRLHF file")]


def load_pku_saferlhf(file: str | Path | None = None, limit: int | None = None, seed: int = 0) -> list[PreferencePair]:
    """PKU-SafeRLHF pairs from ``file`` (.json, .jsonl or .parquet, see :func:`read_pku_file`) or,
    without one, the hub (train split); ``limit`` takes a seeded subset."""
    if file is not None:
        path = Path(file).expanduser()
        if not path.is_file():
            raise QuadaError(f"PKU-SafeRLHF file {path} does not exist; check the path")
        rows, where = read_pku_file(path), str(path)
    else:
        from datasets import load_dataset

        instead = (
            "Offline, give a local copy with --file (JSON, JSONL or parquet with prompt, response_0, response_1, "
            "safer_response_id) or make pairs from the model itself with --source self."
        )
        require_hub(PKU_HUB_ID, instead)
        try:
            rows = load_dataset(PKU_HUB_ID, split="train")
        except Exception as err:  # offline without a cached copy, or the dataset moved
            raise QuadaError(f"could not load {PKU_HUB_ID} from the hub ({type(err).__name__}). {instead}") from err
        where = PKU_HUB_ID
    pairs = pku_pairs_from_rows(rows, where)
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
        json.dumps({"id": p.id, "prompt": p.text, "category": p.category, **({"target": p.target} if p.target else {})},
                   ensure_ascii=False) + "\n" for p in prompts))


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


# --------------------------------------------------------------------------- generated pairs


@dataclass
class PairsConfig:
    """What the generated sources (`quada pairs --source self` and `--source generic`) share: the
    model that answers, the prompt sets and their split, the generation settings and the output
    folder (also the generation store); every field has a CLI option."""

    model: str = DEFAULT_MODEL
    device: str = "auto"  # where the model runs: auto, cpu, cuda or cuda:N
    dtype: str = "auto"  # the number format it runs in (see quada.devices.DTYPES)
    harmful: str = "advbench"
    benign: str = "quada-benign"
    heldout: int = 104  # harmful prompts kept for evaluation (20% of AdvBench)
    benign_heldout: int = 32
    limit: int | None = None  # harmful training prompts used (a seeded subset); None = all
    benign_limit: int | None = None
    prompt_format: str = "paper"
    max_new_tokens: int = 128
    seed: int = 0
    out_dir: Path = field(default_factory=lambda: Path("runs") / "pairs")

    def __post_init__(self):
        self.device = check_device(self.device)
        self.dtype = check_dtype(self.dtype)
        _check_at_least_one(self, ("heldout", "benign_heldout", "max_new_tokens"))
        _check_at_least_one(self, ("limit", "benign_limit"), optional=True)
        GenerationSettings(self.max_new_tokens, self.prompt_format)  # validates the format
        check_seed(self.seed)
        self.out_dir = Path(self.out_dir)

    def models(self) -> list[tuple[str, str]]:
        """The models that answer, by option."""
        return [("--model", self.model)]

    def inputs(self) -> list[tuple[str, str]]:
        """The prompt files and models the pairs are made from, by option."""
        return [("--harmful", self.harmful), ("--benign", self.benign), *self.models()]


def _check_at_least_one(config, names: Sequence[str], optional: bool = False) -> None:
    """A user error naming the first field of ``names`` below 1; ``optional`` ones may be None (all)."""
    for name in names:
        value = getattr(config, name)
        if not (optional and value is None) and value < 1:
            omitted = " (or omitted for all)" if optional else ""
            raise QuadaError(f"{name.replace('_', '-')} must be at least 1{omitted}, got {value}")


@dataclass
class SelfPairsConfig(PairsConfig):
    """How `quada pairs --source self` builds pairs from a model. ``approximation`` and
    ``heavy_approximation`` are ``perturbation`` and ``heavy`` parsed (once, here)."""

    perturbation: str = DEFAULT_PERTURBATION  # the MVA, on every layer while generating
    attempts: int = 3  # noise draws per prompt the clean model refuses, until one complies
    compliant_pairs: bool = True  # prompts the clean model answers: chosen = a written refusal
    benign_rejected: str = "refusal"  # "refusal" (a written one) or "approx" (the answer under `heavy`)
    heavy: str = "noise:site=up,dist=gaussian,std=0.5"

    def __post_init__(self):
        super().__post_init__()
        self.approximation, self.heavy_approximation = as_spec(self.perturbation), as_spec(self.heavy)
        self.perturbation, self.heavy = str(self.approximation), str(self.heavy_approximation)
        if self.benign_rejected not in ("refusal", "approx"):
            raise QuadaError(f"benign-rejected must be 'refusal' or 'approx', got {self.benign_rejected!r}")
        _check_at_least_one(self, ("attempts",))


@dataclass
class GenericPairsConfig(PairsConfig):
    """How `quada pairs --source generic` builds pairs with no approximation anywhere."""

    benign: str = "benign-suite"  # the larger benign set: more helpful answers to keep
    rejected_model: str = UNALIGNED_MODEL  # answers the harmful prompts the clean model refuses
    many_shot: bool = True  # also pair PyRIT's many-shot examples

    def __post_init__(self):
        super().__post_init__()
        if not self.rejected_model.strip():
            raise QuadaError(f"rejected-model must name a model; the default is {UNALIGNED_MODEL}, an unaligned one")

    def models(self) -> list[tuple[str, str]]:
        return [*super().models(), ("--rejected-model", self.rejected_model)]


@dataclass
class RestorePairsConfig(PairsConfig):
    """How `quada pairs --source restore` builds pairs: the generic source's prompts and split (the
    same benign set and many-shot questions), answered clean and under ``perturbation``, the
    approximation the model is served with (on every layer). ``approximation`` is ``perturbation``
    parsed (once, here)."""

    benign: str = GenericPairsConfig.benign
    perturbation: str = DEFAULT_PERTURBATION
    attempts: int = 3  # noise draws per harmful prompt the clean model refuses, until one answers
    many_shot: bool = True  # also use the many-shot questions as harmful prompts

    def __post_init__(self):
        super().__post_init__()
        self.approximation = as_spec(self.perturbation)
        self.perturbation = str(self.approximation)
        _check_at_least_one(self, ("attempts",))


@dataclass
class PairsResult:
    pairs: list[PreferencePair]
    pairs_file: Path
    split: Split
    counts: dict[str, int]
    lengths: PairLengths | None = None  # in the answering model's tokens (the generated sources)


def _pair_id(prompt_id: str, kind: str) -> str:
    """A pair's id: its prompt's and the last part of its kind (``p-01:perturbed``)."""
    return f"{prompt_id}:{kind.partition(':')[2]}"


def harmful_pairs(prompts, clean, rejected_attempts, compliant_pairs: bool,
                  kinds: tuple[str, str] = ("self:perturbed", "self:compliant")) -> list[PreferencePair]:
    """Pairs from harmful prompts, given the clean responses and, per attempt, other responses to
    the prompts it refuses (under the perturbation, or an unaligned model's), all keyed by prompt
    id; ``kinds`` names the pairs of refused and of answered prompts. Pure: the judging rules of
    the module docstring."""
    refused_kind, answered_kind = kinds
    pairs = []
    for prompt in prompts:
        answer = clean[prompt.id]
        if refusal_phrase(answer) is not None:
            complied = next((attempt[prompt.id] for attempt in rejected_attempts
                             if prompt.id in attempt and keyword_verdict(prompt.text, attempt[prompt.id])[0]), None)
            if complied is not None:
                pairs.append(PreferencePair(_pair_id(prompt.id, refused_kind), prompt.text, answer, complied, True,
                                            refused_kind))
        elif compliant_pairs and keyword_verdict(prompt.text, answer)[0]:
            pairs.append(PreferencePair(_pair_id(prompt.id, answered_kind), prompt.text, written_refusal(prompt.id),
                                        answer, True, answered_kind))
    return pairs


def benign_pairs(prompts, clean, heavy: dict[str, str] | None, kind: str = "self:benign") -> list[PreferencePair]:
    """Pairs from benign prompts: the clean answer (when it is no refusal and not empty) against a
    written refusal, or against the heavily approximated answer when ``heavy`` is given."""
    pairs = []
    for prompt in prompts:
        answer = clean[prompt.id]
        if refusal_phrase(answer) is not None or not answer.strip():
            continue
        rejected = written_refusal(prompt.id) if heavy is None else heavy[prompt.id]
        if rejected != answer:
            pairs.append(PreferencePair(_pair_id(prompt.id, kind), prompt.text, answer, rejected, False, kind))
    return pairs


def many_shot_prompts(heldout: Sequence[Prompt]) -> tuple[list[Prompt], dict[str, str]]:
    """PyRIT's many-shot examples as prompts (``manyshot-<index>`` by their place in the file) and
    the dataset's answers by prompt id. A question that is, stripped, a held-out prompt's text is
    left out: evaluation prompts never enter training."""
    held = {p.text.strip() for p in heldout}
    prompts, answers = [], {}
    for index, example in enumerate(many_shot_examples()):
        if example["user"].strip() not in held:
            prompt = Prompt(f"manyshot-{index:03d}", example["user"])
            prompts.append(prompt)
            answers[prompt.id] = example["assistant"]
    return prompts, answers


def many_shot_pairs(prompts, answers, clean) -> list[PreferencePair]:
    """Pairs from the many-shot examples, given the dataset's and the clean model's answers (keyed
    by prompt id): rejected = the dataset's answer when the keyword judge calls it an attack,
    chosen = the clean answer when it refuses, else a written refusal. Pure."""
    pairs = []
    for prompt in prompts:
        if not keyword_verdict(prompt.text, answers[prompt.id])[0]:
            continue
        own = refusal_phrase(clean[prompt.id]) is not None
        kind = "generic:own-refusal" if own else "generic:written-refusal"
        chosen = clean[prompt.id] if own else written_refusal(prompt.id)
        pairs.append(PreferencePair(_pair_id(prompt.id, kind), prompt.text, chosen, answers[prompt.id], True, kind))
    return pairs


def _split_prompt_sets(config: PairsConfig) -> tuple[Split, list[Prompt], list[Prompt], list[Prompt]]:
    """``(split, harmful_train, harmful_heldout, benign_train)``: both prompt sets split, the
    training parts subset (``limit``, ``benign_limit``), the split and held-out files written once
    the models and the output folder are checked."""
    check_out_dir(config.out_dir, config.inputs())
    for _, source in config.models():
        check_source(source)
    harmful_train, harmful_heldout = split_prompts(load_benchmark(config.harmful), config.heldout, config.seed)
    benign_train, benign_heldout = split_prompts(load_benchmark(config.benign), config.benign_heldout, config.seed)
    harmful_train = subset(harmful_train, config.limit, config.seed)
    benign_train = subset(benign_train, config.benign_limit, config.seed)
    open_run_dir(config.out_dir, "--out")
    split = Split(config.seed, config.harmful, tuple(p.id for p in harmful_train), tuple(p.id for p in harmful_heldout),
                  config.benign, tuple(p.id for p in benign_train), tuple(p.id for p in benign_heldout))
    split.write(config.out_dir, harmful_heldout, benign_heldout)
    return split, harmful_train, harmful_heldout, benign_train


@dataclass(frozen=True)
class _Generating:
    """The engine's :class:`quada.engine.plan.GenerationConfig` of a pairs run (it only generates)."""

    model: str
    settings: GenerationSettings
    seed: int
    run_dir: Path


@contextmanager
def _answering(config: PairsConfig, source: str, store: Store, bar,
               approximations=()) -> Iterator[tuple[Callable[..., dict[str, str]], object]]:
    """Load the model ``source`` and give ``answers(approximation, prompts, label, seed)``: its
    responses by prompt id, stored in ``store`` (keyed by the model's fingerprint, so two models'
    rows never mix) and taken from it when there; with it the model's tokenizer. The model is freed
    on leaving."""
    from quada.engine.plan import Engine, check_specs_fit
    from quada.models import load

    model, tokenizer = load(source, dtype=config.dtype, device=config.device)
    check_specs_fit(model, approximations)
    settings = GenerationSettings(config.max_new_tokens, config.prompt_format)
    engine = Engine(store, model, tokenizer, _Generating(source, settings, config.seed, config.out_dir))

    def answers(approximation, prompts: Sequence[Prompt], label: str, seed: int = config.seed) -> dict[str, str]:
        task = bar.add_task(label, total=len(prompts))
        condition = engine.condition(approximation, prompts, seed)
        rows = engine.responses(condition, lambda n: bar.advance(task, n))
        bar.update(task, completed=len(prompts))
        return {row.key.prompt_id: row.response for row in rows}

    try:
        yield answers, tokenizer
    finally:
        # Free the weights before the next model loads: one model in memory at a time.
        del model
        engine.release_model()
        gc.collect()


def _pairs_result(config: PairsConfig, pairs: list[PreferencePair], split: Split, kinds: Sequence[str],
                  hint: str, tokenizer) -> PairsResult:
    """Write ``pairs``, count them by kind and measure their lengths in ``tokenizer``'s tokens; none
    at all is a user error ending with ``hint``."""
    if not pairs:
        raise QuadaError(f"no pair survived the judges: {hint}")
    counts = {kind: sum(p.source == kind for p in pairs) for kind in kinds}
    return PairsResult(pairs, write_pairs(config.out_dir / PAIRS_FILE, pairs), split, counts,
                       pair_lengths(tokenizer, pairs, config.prompt_format))


def _approximated_attempts(answers, config: SelfPairsConfig | RestorePairsConfig, prompts: Sequence[Prompt],
                           clean: dict[str, str]) -> list[dict[str, str]]:
    """Per noise draw (seeds ``seed``, ``seed + 1``, ...), the approximated responses to the prompts
    whose clean response refuses and that no earlier draw made the model answer."""
    attempts, pending = [], [p for p in prompts if refusal_phrase(clean[p.id]) is not None]
    for attempt in range(config.attempts):
        if not pending:
            break
        found = answers(config.approximation, pending, f"harmful, perturbed #{attempt + 1}", config.seed + attempt)
        attempts.append(found)
        pending = [p for p in pending if not keyword_verdict(p.text, found[p.id])[0]]
    return attempts


def self_pairs(config: SelfPairsConfig, progress: bool = True) -> PairsResult:
    """Split the prompt sets, generate the responses (stored and resumable in
    ``out_dir/results.sqlite``), build the pairs and write pairs, split and held-out files."""
    split, harmful_train, _, benign_train = _split_prompt_sets(config)
    approximations = [config.approximation, config.heavy_approximation]
    with (Store(config.out_dir / STORE_FILE) as store, progress_bar(progress) as bar,
          _answering(config, config.model, store, bar, approximations) as (answers, tokenizer)):
        clean = answers(CLEAN, harmful_train, "harmful, clean")
        attempts = _approximated_attempts(answers, config, harmful_train, clean)
        benign_clean = answers(CLEAN, benign_train, "benign, clean")
        heavy = answers(config.heavy_approximation, benign_train, "benign, heavy") if config.benign_rejected == "approx" else None

    pairs = harmful_pairs(harmful_train, clean, attempts, config.compliant_pairs) + benign_pairs(benign_train, benign_clean, heavy)
    return _pairs_result(config, pairs, split, SELF_KINDS,
                         "the clean model never refused, or never complied under the perturbation; "
                         "try a stronger --perturbation, more --attempts or another model", tokenizer)


def generic_pairs(config: GenericPairsConfig, progress: bool = True) -> PairsResult:
    """Split the prompt sets, generate the clean model's responses, then the unaligned model's to
    the harmful prompts the clean one refuses (each model alone in memory; both stored and
    resumable in ``out_dir/results.sqlite``), build the pairs and write pairs, split and held-out
    files. Every generation is clean: no approximation is applied anywhere."""
    split, harmful_train, harmful_heldout, benign_train = _split_prompt_sets(config)
    examples, dataset_answers = many_shot_prompts(harmful_heldout) if config.many_shot else ([], {})
    examples = subset(examples, config.limit, config.seed)
    with Store(config.out_dir / STORE_FILE) as store, progress_bar(progress) as bar:
        with _answering(config, config.model, store, bar) as (answers, tokenizer):
            clean = answers(CLEAN, harmful_train, "harmful, clean")
            many_shot_clean = answers(CLEAN, examples, "many-shot, clean") if examples else {}
            benign_clean = answers(CLEAN, benign_train, "benign, clean")
        refused = [p for p in harmful_train if refusal_phrase(clean[p.id]) is not None]
        unaligned = {}
        if refused:
            with _answering(config, config.rejected_model, store, bar) as (answers, _):
                unaligned = answers(CLEAN, refused, "harmful, rejected model")

    pairs = (many_shot_pairs(examples, dataset_answers, many_shot_clean)
             + harmful_pairs(harmful_train, clean, [unaligned], True, ("generic:unaligned", "generic:compliant"))
             + benign_pairs(benign_train, benign_clean, None, "generic:benign"))
    return _pairs_result(config, pairs, split, GENERIC_KINDS,
                         "no harmful prompt had a refusal to set against a compliant answer, and the clean model "
                         "refused every benign prompt; try another --rejected-model, --many-shot or more prompts", tokenizer)


def restore_pairs(config: RestorePairsConfig, progress: bool = True) -> PairsResult:
    """Split the prompt sets as the generic source does, answer its harmful prompts (the training
    part and the many-shot questions) and benign training prompts clean and approximated (stored
    and resumable in ``out_dir/results.sqlite``), build the restore pairs and write pairs, split
    and held-out files."""
    split, harmful_train, harmful_heldout, benign_train = _split_prompt_sets(config)
    examples = subset(many_shot_prompts(harmful_heldout)[0], config.limit, config.seed) if config.many_shot else []
    harmful = [*harmful_train, *examples]
    with (Store(config.out_dir / STORE_FILE) as store, progress_bar(progress) as bar,
          _answering(config, config.model, store, bar, [config.approximation]) as (answers, tokenizer)):
        clean = answers(CLEAN, harmful, "harmful, clean")
        attempts = _approximated_attempts(answers, config, harmful, clean)
        benign_clean = answers(CLEAN, benign_train, "benign, clean")
        benign_approximated = answers(config.approximation, benign_train, "benign, perturbed", config.seed)

    restored_kind, benign_kind = RESTORE_KINDS
    # compliant_pairs=False: a harmful prompt the clean model answers gives no pair, whatever the kind's name.
    pairs = (harmful_pairs(harmful, clean, attempts, compliant_pairs=False, kinds=(restored_kind, restored_kind))
             + benign_pairs(benign_train, benign_clean, benign_approximated, benign_kind))
    return _pairs_result(config, pairs, split, RESTORE_KINDS,
                         "the clean model never refused a harmful prompt that the approximation made it answer, and "
                         "the approximation changed no benign answer; try a stronger --perturbation, more --attempts "
                         "or more prompts", tokenizer)


def pku_pairs(file: str | Path | None, out_dir: Path, limit: int | None = None, seed: int = 0) -> PairsResult:
    """PKU-SafeRLHF pairs written to ``out_dir/pairs.jsonl``. Their prompts are not AdvBench's or
    the bundled benign suite's, so the split records every one of those as held out."""
    check_seed(seed)
    check_out_dir(out_dir, [("--file", file)])
    pairs = load_pku_saferlhf(file, limit, seed)
    open_run_dir(out_dir, "--out")
    advbench, benign = load_benchmark("advbench"), load_benchmark("quada-benign")
    split = Split(seed, "advbench", (), tuple(p.id for p in advbench), "quada-benign", (), tuple(p.id for p in benign))
    split.write(out_dir, advbench, benign)
    counts = {"pku-saferlhf": len(pairs), "harmful": sum(p.harmful for p in pairs)}
    return PairsResult(pairs, write_pairs(out_dir / PAIRS_FILE, pairs), split, counts)
