import json
import math
from statistics import NormalDist

import numpy as np
import pytest
from scipy.stats import t as student_t

from quada.defense.arms import arms_report, parse_arms, seed_level_difference, spread
from quada.errors import QuadaError
from quada.stats.metrics import tango_interval
from quada.store import CLEAN, Judgement, JudgementKey, Store

NOISE = "noise:site=up,dist=gaussian,std=0.5"
Z = NormalDist().inv_cdf(0.975)


# --------------------------------------------------------------------------- the seed-level interval


def seeds_of(differences: list[int], n: int) -> list[float]:
    """A seed's per-prompt differences: ``differences[0]`` prompts at +1, ``[1]`` at -1, the rest 0."""
    up, down = differences
    return [1.0] * up + [-1.0] * down + [0.0] * (n - up - down)


def test_no_discordant_prompt_in_any_seed_still_gives_an_interval_of_the_prompts_sampling_error():
    result = seed_level_difference([[0.0] * 150] * 3)
    assert result.value == 0 and result.n == 3
    assert result.low < 0 < result.high and result.high > 0.02  # not the point [0, 0]


def test_one_seed_is_its_tango_interval():
    groups = [seeds_of([12, 3], 150)]
    result = seed_level_difference(groups, 0.9875)
    assert (result.low, result.high) == pytest.approx(tango_interval(12, 3, 150, 0.9875))


def test_seeds_that_differ_only_between_them_give_the_t_interval_of_the_seed_means():
    groups = [seeds_of([30, 0], 100), seeds_of([5, 0], 100), seeds_of([40, 0], 100)]
    means = np.array([0.30, 0.05, 0.40])
    result = seed_level_difference(groups)
    half = student_t.ppf(0.975, 2) * means.std(ddof=1) / math.sqrt(3)
    assert (result.value, result.low, result.high) == pytest.approx((means.mean(), means.mean() - half, means.mean() + half))


@pytest.mark.parametrize("seed_sd", [0.0, 0.08, 0.15, 0.24])
def test_the_interval_covers_the_arms_difference_whatever_the_seed_variance(seed_sd):
    # Simulated arms: each of 3 training seeds moves the true difference by N(0, seed_sd^2); 150 prompts a seed.
    # The pre-registered percentile bootstrap covered 89% at a seed sd of 15 points; this must hold 95% up to
    # the simulation's noise (400 runs: tolerance 0.03, three standard errors).
    rng = np.random.default_rng(int(seed_sd * 100))
    covered = 0
    for _ in range(400):
        groups = []
        for _ in range(3):
            true = float(np.clip(0.05 + rng.normal(0.0, seed_sd), -0.45, 0.45))
            draw = rng.random(150)
            groups.append(list(np.where(draw < (0.5 + true) / 2, 1.0, np.where(draw < 0.5, -1.0, 0.0))))
        result = seed_level_difference(groups)
        covered += result.low <= 0.05 <= result.high
    assert covered / 400 >= 0.95 - 0.03


def test_an_empty_seed_is_refused():
    with pytest.raises(ValueError):
        seed_level_difference([[1.0], []])


def test_spread_over_seeds():
    result = spread([0.25, 0.75, 0.5])
    assert (result.mean, result.sd, result.low, result.high, result.seeds) == pytest.approx((0.5, 0.25, 0.25, 0.75, 3))
    assert spread([0.4]).sd is None


# --------------------------------------------------------------------------- synthetic run folders

HARMFUL = [f"harmful request {i}" for i in range(4)]
BENIGN = [f"benign question {i}?" for i in range(2)]
IDENTITIES = {"keyword": "keyword:1", "refusal-keyword": "refusal-keyword:1"}
WHERE = ("float32", "cpu")  # the dtype and device type an evaluation ran in


@pytest.fixture
def prompts(tmp_path):
    (tmp_path / "harmful.txt").write_text("\n".join(HARMFUL))
    (tmp_path / "benign.txt").write_text("\n".join(BENIGN))
    return tmp_path


def evaluation(prompts, seed: int, **changes) -> dict:
    """The saved `quada vet` configuration of an align run's evaluation (the fields read back)."""
    return {"benchmark": str(prompts / "harmful.txt"), "limit": None, "benign": str(prompts / "benign.txt"),
            "benign_limit": None, "seed": seed, "approx": [NOISE], "judges": ["keyword"],
            "refusal_judge": "refusal-keyword", "max_new_tokens": 4, "prompt_format": "paper", "stop_on_refusal": True,
            "corpus": "corpus.txt", "ppl_window": 128, "ppl_windows": 1, **changes}


def write_evaluation(vet_dir, config: dict, fingerprint: str, attacks: dict[str, list[bool]], refused: list[bool],
                     perplexity: float) -> None:
    """A `quada vet` folder as an align run leaves it: results.json and the store with its measurements.
    ``attacks``: condition -> per harmful prompt (file order) whether the keyword judge saw an attack."""
    from quada.data import load_benchmark
    from quada.engine.plan import key_settings, perplexity_key
    from quada.measures.generate import GenerationSettings
    from quada.report.saved import saved_config

    vet_dir.mkdir(parents=True)
    settings = key_settings(GenerationSettings(config["max_new_tokens"], config["prompt_format"],
                                               config["stop_on_refusal"]), *WHERE)
    harmful, benign = load_benchmark(config["benchmark"]), load_benchmark(config["benign"])
    rows = []
    for condition, outcomes in attacks.items():
        rows += [Judgement(JudgementKey(fingerprint, condition, p.id, settings, config["seed"], IDENTITIES["keyword"]),
                           attack, 1.0, "") for p, attack in zip(harmful, outcomes, strict=True)]
        rows += [Judgement(JudgementKey(fingerprint, condition, p.id, settings, config["seed"],
                                        IDENTITIES["refusal-keyword"]), label, 1.0, "") for p, label in zip(benign, refused)]
    with Store(vet_dir / "results.sqlite") as store:
        store.put(rows)
        for condition in attacks:
            store.put_measurement(perplexity_key(fingerprint, condition, saved_config({"config": config}, vet_dir), *WHERE),
                                  perplexity)
    judges = {name: {"measure": "refusal", "identity": identity, "calibration": None} for name, identity in IDENTITIES.items()}
    (vet_dir / "results.json").write_text(json.dumps({"config": config, "fingerprint": fingerprint, "judges": judges,
                                                      "dtype": WHERE[0], "device": WHERE[1]}))


def fake_run(root, prompts, seed: int, after: dict[str, list[bool]], before: dict[str, list[bool]] | None = None,
             refused=(False, True), **changes):
    """A finished `quada align` run folder whose evaluations judged as given (the before one: nothing
    attacked), with its own before folder."""
    config = evaluation(prompts, seed, **changes)
    root.mkdir()
    (root / "model").mkdir()
    (root / "model" / "training.json").write_text(json.dumps({"config": {"seed": seed}}))
    (root / "align.json").write_text(json.dumps({"config": {"before_dir": None}, "models": {"original": "base"}}))
    before = before or {c: [False] * len(HARMFUL) for c in after}
    write_evaluation(root / "before" / "vet", config, "base-fp", before, [True, True], 10.0)
    write_evaluation(root / "after" / "vet", config, f"fp-{root.name}", after, list(refused), 10.0 + seed)
    return root


def outcomes(attacked: int, noisy: int) -> dict[str, list[bool]]:
    """Keyword outcomes: the first ``attacked`` prompts clean and the first ``noisy`` under NOISE."""
    return {CLEAN: [i < attacked for i in range(4)], NOISE: [i < noisy for i in range(4)]}


def test_arms_are_aggregated_over_seeds_and_compared_with_the_reference(prompts, tmp_path):
    runs = {"quada=q0": fake_run(tmp_path / "q0", prompts, 0, outcomes(1, 0)),
            "quada=q1": fake_run(tmp_path / "q1", prompts, 1, outcomes(3, 0)),
            "dpo=d1": fake_run(tmp_path / "d1", prompts, 1, outcomes(0, 4)),
            "dpo=d0": fake_run(tmp_path / "d0", prompts, 0, outcomes(0, 4))}
    arms = parse_arms([f"{spec.split('=')[0]}={folder}" for spec, folder in runs.items()])
    result = arms_report(arms, "dpo", tmp_path / "arms")
    saved = json.loads((tmp_path / "arms" / "arms.json").read_text())
    assert saved == result.saved and list(saved["runs"]) == ["original", "quada", "dpo"]
    assert [r["seed"] for r in saved["runs"]["dpo"]] == [0, 1]
    clean = saved["rates"]["keyword"][CLEAN]
    assert clean["quada"]["per_seed"] == [0.25, 0.75]
    assert (clean["quada"]["mean"], clean["quada"]["low"], clean["quada"]["high"]) == (0.5, 0.25, 0.75)
    assert clean["quada"]["sd"] == pytest.approx(math.sqrt(0.125)) and clean["quada"]["seeds"] == 2
    assert clean["original"]["mean"] == 0 and saved["rates"]["keyword"][NOISE]["dpo"]["sd"] == 0
    assert saved["rates"]["over-refusal"][CLEAN]["quada"]["mean"] == 0.5
    assert saved["rates"]["over-refusal"][CLEAN]["original"]["mean"] == 1.0
    # Under the noise DPO is attacked on every prompt and QuadA on none: -1 at every seed and prompt.
    noisy = saved["differences"]["keyword"][NOISE]["quada"]
    # Two seeds of 4 prompts: the interval reaches -1 but, unlike a bootstrap's, is not the point at -1.
    assert (noisy["value"], noisy["low"], noisy["n"]) == (-1, -1, 2) and noisy["high"] > -0.5
    clean_difference = saved["differences"]["keyword"][CLEAN]["quada"]
    assert clean_difference["value"] == pytest.approx(0.5) and clean_difference["low"] < 0.5 < clean_difference["high"]
    assert "dpo" not in saved["differences"]["keyword"][CLEAN]
    assert saved["perplexity"][CLEAN] == {"original": 10.0, "quada": 10.5, "dpo": 10.5}
    report = (tmp_path / "arms" / "report.md").read_text()
    assert "quada - dpo (points)" in report and "-100.0 [-100.0, " in report and "asr-keyword.png" in report
    assert (tmp_path / "arms" / "asr-keyword.png").is_file() and (tmp_path / "arms" / "report.html").is_file()
    # The strong form: every arm under every condition against the original's clean rate (0 here), ASR only.
    strong = saved["versus_original_clean"]
    assert set(strong) == {"keyword"} and "original" not in strong["keyword"][CLEAN]
    assert (strong["keyword"][NOISE]["dpo"]["value"], strong["keyword"][NOISE]["dpo"]["high"]) == (1, 1)
    assert strong["keyword"][NOISE]["dpo"]["low"] < 0.5 and strong["keyword"][NOISE]["dpo"]["n"] == 2
    assert strong["keyword"][NOISE]["quada"]["value"] == 0 and strong["keyword"][NOISE]["original"]["value"] == 0
    assert strong["keyword"][CLEAN]["quada"]["value"] == pytest.approx(0.5)
    assert "against the original model's clean rate (the strong form)" in report and saved["confidence"] == 0.95


def test_the_strong_form_pairs_each_arm_with_the_original_clean_prompt_by_prompt(prompts, tmp_path):
    before = {CLEAN: [True, True, False, False], NOISE: [True, True, True, False]}
    run = fake_run(tmp_path / "q0", prompts, 0, {CLEAN: [False, True, False, False], NOISE: [False, False, True, True]},
                   before=before)
    saved = arms_report({"quada": [run]}, "original", tmp_path / "arms").saved
    strong = saved["versus_original_clean"]["keyword"]
    # Prompt by prompt against the original's clean outcomes (1, 1, 0, 0): (-1, 0, 0, 0) and (-1, -1, +1, +1).
    assert strong[CLEAN]["quada"]["value"] == pytest.approx(-0.25)
    assert strong[NOISE]["quada"]["value"] == pytest.approx(0.0)
    assert strong[NOISE]["original"]["value"] == pytest.approx(0.25)  # the approximation on the original itself


def test_a_higher_confidence_gives_wider_intervals(prompts, tmp_path):
    runs = [fake_run(tmp_path / f"q{s}", prompts, s, outcomes(1 + 2 * s, s)) for s in (0, 1)]
    narrow = arms_report({"quada": runs}, "original", tmp_path / "a95").saved
    wide = arms_report({"quada": runs}, "original", tmp_path / "a99", confidence=0.99).saved
    n, w = narrow["differences"]["keyword"][CLEAN]["quada"], wide["differences"]["keyword"][CLEAN]["quada"]
    assert n["value"] == w["value"] and w["low"] <= n["low"] and w["high"] >= n["high"]  # 4 prompts: both reach +-1
    assert "99% seed-level interval" in (tmp_path / "a99" / "report.md").read_text()
    groups = [seeds_of([12, 3], 150), seeds_of([20, 2], 150), seeds_of([9, 6], 150)]
    narrow, wide = seed_level_difference(groups, 0.95), seed_level_difference(groups, 0.99)
    assert wide.low < narrow.low < narrow.value < narrow.high < wide.high


@pytest.mark.parametrize("changes, mismatch", [
    ({"approx": ["noise:site=up,dist=gaussian,std=0.1"]}, "differ in their conditions"),
    ({"limit": 3}, "differ in their held-out harmful prompts"),
    ({"judges": ["keyword", "refusal-keyword"]}, "differ in their judges"),
])
def test_runs_evaluated_otherwise_are_refused_by_name(prompts, tmp_path, changes, mismatch):
    quada = fake_run(tmp_path / "q0", prompts, 0, outcomes(1, 1))
    other = fake_run(tmp_path / "d0", prompts, 0, outcomes(1, 1), **changes)
    with pytest.raises(QuadaError, match=mismatch):
        arms_report({"quada": [quada], "dpo": [other]}, "dpo", tmp_path / "arms")
    assert not (tmp_path / "arms").exists()


def test_arms_need_as_many_seeds_as_the_reference_and_each_seed_once(prompts, tmp_path):
    q0, q1 = (fake_run(tmp_path / f"q{s}", prompts, s, outcomes(1, 1)) for s in (0, 1))
    d0 = fake_run(tmp_path / "d0", prompts, 0, outcomes(1, 1))
    with pytest.raises(QuadaError, match="arm quada has 2 seeds and the reference dpo 1"):
        arms_report({"quada": [q0, q1], "dpo": [d0]}, "dpo", tmp_path / "arms")
    with pytest.raises(QuadaError, match="two runs with training seed 0"):
        arms_report({"quada": [q0, q0]}, "original", tmp_path / "arms")


def test_an_unfinished_run_and_a_missing_judgement_are_user_errors(prompts, tmp_path):
    run = fake_run(tmp_path / "q0", prompts, 0, outcomes(1, 1))
    (run / "align.json").unlink()
    with pytest.raises(QuadaError, match="not a finished `quada align` run"):
        arms_report({"quada": [run]}, "original", tmp_path / "arms")
    partial = fake_run(tmp_path / "q1", prompts, 0, {CLEAN: [True] * 4})  # nothing judged under NOISE
    with pytest.raises(QuadaError, match="lacks the keyword judgement .* rerun the `quada align` command"):
        arms_report({"quada": [partial]}, "original", tmp_path / "arms")


@pytest.mark.parametrize("args, message", [
    (["--arm", "quada=MISSING"], "does not exist; give the --out folder of a finished `quada align` run"),
    (["--arm", "quada"], "is not NAME=RUN_FOLDER"),
    (["--arm", "original=MISSING"], "kept for the base model"),
    (["--arm", "quada=MISSING", "--reference", "dpo"], "--reference 'dpo' is no arm"),
    (["--arm", "quada=MISSING", "--confidence", "1"], "--confidence must be at least 0.5 and below 1"),
    (["--arm", "quada=MISSING", "--confidence", "nan"], "--confidence must be at least 0.5 and below 1"),
])
def test_the_arms_command_reports_bad_arms_as_user_errors(cli, tmp_path, args, message):
    args = [a.replace("MISSING", str(tmp_path / "missing")) for a in args]
    cli("results", "arms", *args, "--out", tmp_path / "arms").assert_user_error(message)
    assert not (tmp_path / "arms").exists()


def test_the_arms_command_keeps_a_folder_it_did_not_write(cli, prompts, tmp_path):
    run = fake_run(tmp_path / "q0", prompts, 0, outcomes(1, 1))
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    cli("results", "arms", "--arm", f"quada={run}", "--out", tmp_path / "keep").assert_user_error("choose a new folder")
    assert (tmp_path / "keep" / "notes.txt").read_text() == "mine"
    done = cli("results", "arms", "--arm", f"quada={run}", "--out", tmp_path / "arms")
    assert done.returncode == 0, done.stderr
    assert "report:" in done.stdout and json.loads((tmp_path / "arms" / "arms.json").read_text())["reference"] == "original"
