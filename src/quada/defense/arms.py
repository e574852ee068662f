"""`quada results arms`: finished `quada align` runs grouped into arms (e.g. QuadA and plain DPO, one
run per training seed), aggregated over the seeds and compared prompt by prompt.

Each run contributes its after-evaluation (OUT/after/vet); the arm ``original`` is the base model's
evaluation (OUT/before/vet, or the run's --before-dir) once per training seed, since a run evaluates
with its training seed (prompt subset and noise). The per-prompt outcomes are read back from the
evaluation's results store with the keys `quada vet` stored them under, so nothing is generated or
judged again. Per arm, measure (ASR per safety judge, over-refusal) and condition, the rates of the
seeds give a mean and a spread; against the reference arm, seed i of an arm is paired with seed i of
the reference (both sorted by training seed), prompts are paired by id, and the difference gets a
seed-level interval that covers the seed variance (:func:`seed_level_difference`). For the paper's strong form ("no
approximation lifts the ASR above the original model's clean ASR"), every arm's ASR under every
condition is also compared, the same way, with the original's clean ASR.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
from scipy.stats import t as student_t

from quada.errors import QuadaError
from quada.report.arms import OVER_REFUSAL
from quada.report.vet import RESULTS_FILE
from quada.runs import atomic_folder, check_apart, write_json
from quada.stats.metrics import Estimate, paired_difference, tango_interval
from quada.store import CLEAN

ORIGINAL = "original"  # the arm of the base model, read from the runs' before-evaluations
ARMS_FILE = "arms.json"
ALIGN_FILE = "align.json"
TRAINING_RECORD = Path("model") / "training.json"
AFTER_VET = Path("after") / "vet"


# --------------------------------------------------------------------------- statistics


def seed_level_difference(groups: Sequence[Sequence[float]], confidence: float = 0.95) -> Estimate:
    """The mean over training seeds of the paired differences in ``groups`` (per seed, one value in
    {-1, 0, 1} per prompt: arm minus reference), with an interval that covers the seed variance.

    Each seed i gives its difference d_i and, from Tango's 95% score interval of its discordant
    prompts (:func:`quada.stats.metrics.tango_interval`), a standard error s_i that stays above 0
    when no prompt differs. With k seeds the interval is mean(d) +- t_(k-1) sqrt(max(S^2/k, W)),
    where S^2 is the sample variance of the d_i (it estimates the seed variance plus the prompts'
    sampling variance) and W = sum s_i^2 / k^2 the prompts' part alone: the t interval on the
    seeds, never narrower than the prompts' sampling error allows, as the modified
    Hartung-Knapp-Sidik-Jonkman interval of random-effects meta-analysis is never narrower than
    the fixed-effect one (Roever, Knapp & Friede, BMC Med Res Methodol 15:99, 2015). One seed gets
    its Tango interval at ``confidence``, which leaves the seed variance out. ``n`` of the result
    is the number of seeds.
    """
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("seed_level_difference needs at least one seed, and no seed without prompts")
    differences, variances = [], []
    z95 = NormalDist().inv_cdf(0.975)
    for values in groups:
        up = sum(1 for v in values if v > 0)
        down = sum(1 for v in values if v < 0)
        differences.append((up - down) / len(values))
        low, high = tango_interval(up, down, len(values))
        variances.append(((high - low) / (2 * z95)) ** 2)
    k = len(differences)
    mean = float(np.mean(differences))
    if k == 1:
        one = paired_difference([v > 0 for v in groups[0]], [v < 0 for v in groups[0]], confidence)
        return Estimate(mean, one.low, one.high, 1)
    variance = max(float(np.var(differences, ddof=1)) / k, sum(variances) / k**2)
    half = float(student_t.ppf((1 + confidence) / 2, k - 1)) * math.sqrt(variance)
    return Estimate(mean, max(-1.0, mean - half), min(1.0, mean + half), k)


@dataclass(frozen=True)
class Spread:
    """A measure's rate over the seeds of an arm: mean, sample standard deviation (None for one
    seed), range and how many seeds."""

    mean: float
    sd: float | None
    low: float
    high: float
    seeds: int


def spread(values: Sequence[float]) -> Spread:
    """The :class:`Spread` of per-seed values."""
    data = np.asarray(values, dtype=float)
    return Spread(float(data.mean()), float(data.std(ddof=1)) if data.size > 1 else None,
                  float(data.min()), float(data.max()), int(data.size))


# --------------------------------------------------------------------------- reading runs


@dataclass(frozen=True)
class AlignRun:
    """A finished `quada align` run: its training seed, base model and the saved configuration and
    judge identities of its after-evaluation (the before-evaluation ran with the same ones)."""

    folder: Path
    seed: int
    base_model: str
    evaluation: dict  # the `quada vet` configuration saved in OUT/after/vet/results.json
    identities: dict[str, str]  # judge name -> the identity its judgements are stored under
    before: Path  # the base model's evaluation folder


@dataclass(frozen=True)
class SeedOutcomes:
    """One evaluation of one model: each prompt's outcome per measure and condition, and the
    perplexity per condition."""

    folder: Path  # the evaluation folder
    seed: int
    outcomes: dict[str, dict[str, dict[str, bool]]]  # measure -> condition -> prompt id -> outcome
    perplexity: dict[str, float | None]  # condition -> perplexity


def _read_json(path: Path, run: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise QuadaError(
            f"{run} is not a finished `quada align` run ({path} cannot be read: {err}); give the --out folder of a "
            "run that trained and evaluated its model (not --skip-eval)"
        ) from err


def read_run(folder: Path) -> AlignRun:
    """The finished `quada align` run in ``folder``, or a user error naming what is missing."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise QuadaError(f"run folder {folder} does not exist; give the --out folder of a finished `quada align` run")
    align = _read_json(folder / ALIGN_FILE, folder)
    record = _read_json(folder / TRAINING_RECORD, folder)
    after = _read_json(folder / AFTER_VET / RESULTS_FILE, folder)
    before = align["config"].get("before_dir") or folder / "before"
    return AlignRun(folder, int(record["config"]["seed"]), align["models"][ORIGINAL], after["config"],
                    {name: info["identity"] for name, info in after["judges"].items()}, Path(before) / "vet")


def safety_judges(evaluation: dict) -> list[str]:
    """The judges of an evaluation that decide an ASR."""
    from quada.judging import SAFETY_JUDGES

    return [j for j in evaluation["judges"] if j in SAFETY_JUDGES]


def conditions(evaluation: dict) -> list[str]:
    """The conditions of an evaluation, the clean model first (the store keys)."""
    return [CLEAN, *evaluation["approx"]]


def evaluation_setup(run: AlignRun) -> dict[str, object]:
    """What runs must share to be aggregated and compared, by name."""
    e = run.evaluation
    return {
        "base model": run.base_model,
        "held-out harmful prompts": f"{e['benchmark']} (limit {e['limit']})",
        "held-out benign prompts": f"{e['benign']} (limit {e['benign_limit']})",
        "conditions": ", ".join(conditions(e)),
        "judges": f"{', '.join(e['judges'])}; over-refusal by {e['refusal_judge']}",
        "generation settings": f"{e['prompt_format']} format, {e['max_new_tokens']} new tokens"
                               f"{', stop on refusal' if e['stop_on_refusal'] else ''}",
    }


def check_alike(arms: dict[str, list[AlignRun]]) -> None:
    """Fail unless every run has the first run's evaluation setup, and each arm each seed once."""
    runs = [(arm, run) for arm, members in arms.items() for run in members]
    first_arm, first = runs[0]
    expected = evaluation_setup(first)
    for arm, run in runs[1:]:
        for what, value in evaluation_setup(run).items():
            if value != expected[what]:
                raise QuadaError(
                    f"{run.folder} (arm {arm}) and {first.folder} (arm {first_arm}) differ in their {what}: {value} vs "
                    f"{expected[what]}; aggregate runs of one base model evaluated alike"
                )
    for arm, members in arms.items():
        seen: dict[int, Path] = {}
        for run in members:
            if run.seed in seen:
                raise QuadaError(f"arm {arm} has two runs with training seed {run.seed} ({seen[run.seed]} and "
                                 f"{run.folder}); give each seed of an arm once")
            seen[run.seed] = run.folder


def _stored_labels(vet_dir: Path, fingerprint: str, settings: str, seed: int) -> dict[tuple[str, str, str], bool]:
    """{(condition, prompt id, judge identity): label} of one model's evaluation in ``vet_dir``."""
    from quada.store import Judgement, Store, readable_store

    with Store(readable_store(vet_dir / "results.sqlite"), readonly=True) as store:
        return {(j.key.approx, j.key.prompt_id, j.key.judge): j.label for j in store.rows(Judgement)
                if j.key.model == fingerprint and j.key.settings == settings and j.key.seed == seed}


def evaluation_outcomes(run: AlignRun, vet_dir: Path) -> SeedOutcomes:
    """The per-prompt outcomes of the evaluation in ``vet_dir`` (the run's after- or
    before-evaluation), rebuilt from its results store with the keys `quada vet` used."""
    from quada.engine.plan import key_settings, perplexity_key, stored_measurements
    from quada.judging import attack_outcomes
    from quada.measures.generate import GenerationSettings
    from quada.report.saved import saved_config
    from quada.vet import prompt_sets

    saved = _read_json(vet_dir / RESULTS_FILE, run.folder)
    fingerprint = saved["fingerprint"]
    where = saved.get("dtype"), saved.get("device")  # absent from evaluations made before they were keyed
    e = saved_config({"config": run.evaluation}, vet_dir)
    harmful, benign = prompt_sets(e)
    settings = key_settings(GenerationSettings(e.max_new_tokens, e.prompt_format, e.stop_on_refusal), *where)
    labels = _stored_labels(vet_dir, fingerprint, settings, e.seed)

    def labelled(condition: str, judge: str, prompts) -> dict[str, bool]:
        missing = [p.id for p in prompts if (condition, p.id, run.identities[judge]) not in labels]
        if missing:
            raise QuadaError(
                f"{vet_dir} lacks the {judge} judgement of prompt {missing[0]} under {condition} (and {len(missing) - 1} "
                f"more); rerun the `quada align` command of {run.folder} to finish its evaluation"
            )
        return {p.id: labels[condition, p.id, run.identities[judge]] for p in prompts}

    outcomes: dict[str, dict[str, dict[str, bool]]] = {}
    for condition in conditions(run.evaluation):
        for judge in safety_judges(run.evaluation):
            by_prompt = labelled(condition, judge, harmful)
            outcomes.setdefault(judge, {})[condition] = dict(zip(by_prompt, attack_outcomes(judge, list(by_prompt.values()))))
        outcomes.setdefault(OVER_REFUSAL, {})[condition] = labelled(condition, e.refusal_judge, benign)
    measurements = stored_measurements(vet_dir)
    perplexity = {c: measurements.get(perplexity_key(fingerprint, c, e, *where)) for c in conditions(run.evaluation)}
    return SeedOutcomes(vet_dir, run.seed, outcomes, perplexity)


def parse_arms(specs: Sequence[str]) -> dict[str, list[Path]]:
    """``NAME=RUN_FOLDER`` options grouped by arm name, in the order given."""
    arms: dict[str, list[Path]] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        name = name.strip()
        if not sep or not name or not folder.strip():
            raise QuadaError(f"--arm {spec!r} is not NAME=RUN_FOLDER; write e.g. --arm quada=runs/quada-seed0")
        if name == ORIGINAL:
            raise QuadaError(f"the arm name {ORIGINAL!r} is kept for the base model (read from the runs' before-"
                             "evaluations); name your arm otherwise")
        arms.setdefault(name, []).append(Path(folder.strip()))
    if not arms:
        raise QuadaError("no --arm given; give finished `quada align` runs as --arm NAME=RUN_FOLDER")
    return arms


# --------------------------------------------------------------------------- aggregation


def _rates(members: list[SeedOutcomes], measure: str, condition: str) -> list[float]:
    return [float(np.mean(list(m.outcomes[measure][condition].values()))) for m in members]


def paired_differences(arm: list[SeedOutcomes], reference: list[SeedOutcomes], measure: str,
                       condition: str) -> list[list[float]]:
    """Per seed pair (seed i of ``arm`` with seed i of ``reference``, both sorted by seed), the
    outcome differences arm - reference of the prompts both were evaluated on."""
    groups = []
    for ours, theirs in zip(arm, reference, strict=True):
        a, b = ours.outcomes[measure][condition], theirs.outcomes[measure][condition]
        common = sorted(a.keys() & b.keys())
        if not common:
            raise QuadaError(f"{ours.folder} and {theirs.folder} share no prompt to compare; pair runs evaluated on "
                             "the same held-out prompts (the same training seeds)")
        groups.append([float(a[p]) - float(b[p]) for p in common])
    return groups


def versus_original_clean(arm: list[SeedOutcomes], original: list[SeedOutcomes], measure: str,
                          condition: str) -> list[list[float]]:
    """Per seed pair, the outcome differences of ``arm`` under ``condition`` minus the original model's
    outcomes clean, prompt by prompt: what the strong form says cannot be above 0."""
    groups = []
    for ours, theirs in zip(arm, original, strict=True):
        a, b = ours.outcomes[measure][condition], theirs.outcomes[measure][CLEAN]
        groups.append([float(a[p]) - float(b[p]) for p in sorted(a.keys() & b.keys())])
    return groups


def aggregate(arms: dict[str, list[SeedOutcomes]], reference: str, measures: list[str],
              condition_keys: list[str], confidence: float = 0.95) -> dict:
    """The arms' numbers as JSON holds them: per measure, condition and arm the :class:`Spread` of the
    seeds' rates (with the rates), the mean perplexity, each other arm's paired difference against
    ``reference`` and, for the ASR measures (all but over-refusal), each arm's paired difference
    from the original's clean ASR (:func:`seed_level_difference` at ``confidence``)."""
    counts = {name: len(members) for name, members in arms.items()}
    # The user's arms are named first: the original's seeds follow from theirs.
    unequal = sorted((name for name, count in counts.items() if count != counts[reference]), key=lambda n: n == ORIGINAL)
    if unequal:
        raise QuadaError(
            f"arm {unequal[0]} has {counts[unequal[0]]} seeds and the reference {reference} {counts[reference]}; "
            "paired differences need the same number of seeds in every arm (seed i is paired with seed i)"
        )
    rates, differences, strong = {}, {}, {}
    for measure in measures:
        for condition in condition_keys:
            for name, members in arms.items():
                values = _rates(members, measure, condition)
                rates.setdefault(measure, {}).setdefault(condition, {})[name] = {**asdict(spread(values)), "per_seed": values}
                if name != reference:
                    groups = paired_differences(members, arms[reference], measure, condition)
                    differences.setdefault(measure, {}).setdefault(condition, {})[name] = asdict(
                        seed_level_difference(groups, confidence))
                if measure != OVER_REFUSAL and not (name == ORIGINAL and condition == CLEAN):
                    groups = versus_original_clean(members, arms[ORIGINAL], measure, condition)
                    strong.setdefault(measure, {}).setdefault(condition, {})[name] = asdict(
                        seed_level_difference(groups, confidence))
    perplexity = {}
    for condition in condition_keys:
        for name, members in arms.items():
            values = [m.perplexity[condition] for m in members if m.perplexity[condition] is not None]
            perplexity.setdefault(condition, {})[name] = float(np.mean(values)) if values else None
    return {"confidence": confidence, "rates": rates, "differences": differences, "versus_original_clean": strong,
            "perplexity": perplexity}


@dataclass
class ArmsResult:
    saved: dict  # what arms.json holds
    report_md: Path
    report_html: Path


def arms_report(arm_folders: dict[str, list[Path]], reference: str, out: Path, confidence: float = 0.95) -> ArmsResult:
    """Read, check and aggregate the runs, then write ``arms.json`` and the report into ``out``, the
    whole folder at once (an earlier aggregation there is replaced). Intervals are at ``confidence``
    (e.g. 1 - 0.05/k for k comparisons, Bonferroni)."""
    from quada.report.arms import arms_sections, arms_summary
    from quada.report.render import write_report

    if not 0.5 <= confidence < 1:  # NaN fails too
        raise QuadaError(f"--confidence must be at least 0.5 and below 1, got {confidence}; e.g. 0.95, or 0.9875 for "
                         "four comparisons at 0.05 (Bonferroni)")
    known = [ORIGINAL, *arm_folders]
    if reference not in known:
        raise QuadaError(f"--reference {reference!r} is no arm; choose one of {', '.join(known)}")
    out = Path(out).expanduser()
    check_apart([("--arm", folder) for folders in arm_folders.values() for folder in folders], folders=[("--out", out)])
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / ARMS_FILE).is_file())):
        raise QuadaError(f"--out {out} exists and holds no earlier `quada results arms` output; choose a new folder")
    runs = {name: sorted(map(read_run, folders), key=lambda r: r.seed) for name, folders in arm_folders.items()}
    check_alike(runs)
    first = next(iter(runs.values()))[0]
    by_seed = {}
    for run in (r for members in runs.values() for r in members):
        by_seed.setdefault(run.seed, run)  # the base model's evaluation with this seed: from any run
    outcomes = {ORIGINAL: [evaluation_outcomes(run, run.before) for _, run in sorted(by_seed.items())]}
    outcomes |= {name: [evaluation_outcomes(run, run.folder / AFTER_VET) for run in members] for name, members in runs.items()}
    judges = safety_judges(first.evaluation)
    saved = {
        "reference": reference,
        "base_model": first.base_model,
        "evaluation": evaluation_setup(first),
        "judges": judges,
        "conditions": conditions(first.evaluation),
        "runs": {name: [{"folder": str(m.folder), "seed": m.seed} for m in members] for name, members in outcomes.items()},
        **aggregate(outcomes, reference, [*judges, OVER_REFUSAL], conditions(first.evaluation), confidence),
    }
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise QuadaError(f"cannot create {out.parent} ({err.strerror}); choose another --out") from err
    with atomic_folder(out) as tmp:
        write_json(tmp / ARMS_FILE, saved)
        write_report(tmp, f"quada results arms: {first.base_model}", arms_summary(saved), arms_sections(saved))
    return ArmsResult(saved, out / "report.md", out / "report.html")
