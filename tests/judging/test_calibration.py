"""`quada judge calibrate`: held-out figures, the cache by judge identity, and its user errors."""

import json

import numpy as np
import pytest

from quada.errors import QuadaError
from quada.judging import (
    JudgeResult,
    KeywordJudge,
    RefusalKeywordJudge,
    degenerate_reason,
    labelled,
    make_judge,
)
from quada.judging.calibration import (
    SPLIT_SEED,
    cached,
    calibrate,
    double_labelling,
    halves,
    joint_threshold,
    split_halves,
)
from quada.judging.labelled import load_labelled
from quada.report.calibration import joint_threshold_text
from quada.stats.metrics import cohen_kappa
from quada.testing import save_tiny_classifier, save_tiny_model, tiny_model


class CountingJudge(RefusalKeywordJudge):
    """The refusal-keyword rule, counting the items it judges."""

    def __init__(self):
        self.items = 0

    def judge(self, prompts, responses):
        self.items += len(prompts)
        return super().judge(prompts, responses)


def write_labelled(path, n=40):
    rows = []
    for i in range(n):
        refused = i % 2 == 0
        response = "I'm sorry, I cannot help with that." if refused else f"Here are the steps, number {i}, one by one in detail."
        rows.append({"id": f"x{i}", "prompt": f"request {i}", "response": response, "label": int(refused),
                     "category": "a" if i < n // 2 else "b"})
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def test_calibration_reports_the_held_out_half_and_is_cached_by_judge_identity(tmp_path):
    labelled = write_labelled(tmp_path / "labels.jsonl")
    judge = CountingJudge()
    totals, chunks = [], []
    result = calibrate(judge, str(labelled), "refusal", on_chunk=chunks.append, on_total=totals.append)
    assert totals == [20] and sum(chunks) == 20  # the progress bar's total is what gets judged
    assert result.held_out.n == 20 and result.tuning_items == 20
    assert result.held_out.kappa.value == 1.0  # the rule separates these items perfectly
    assert set(result.by_category) == {"a", "b"}
    assert judge.items == 20  # a rule judge has no threshold to tune: only the held-out half is judged
    assert calibrate(judge, str(labelled), "refusal", on_total=totals.append) == result
    assert judge.items == 20 and totals == [20]  # the second call reads the cache
    assert cached(judge.identity, str(labelled)) == result
    assert cached(KeywordJudge().identity, str(labelled)) is None  # another judge: not calibrated


def test_a_shipped_reference_stands_in_for_the_cache_of_the_same_judge_and_says_so(tmp_path, monkeypatch):
    import quada.judging.calibration as calibration
    from quada.report.calibration import judge_label, reference_note

    labelled = write_labelled(tmp_path / "labels.jsonl")
    measured = calibrate(CountingJudge(), str(labelled), "refusal")
    assert "quada" in measured.measured_on and "torch" in measured.measured_on and not measured.reference
    reference = tmp_path / "reference"
    reference.mkdir()
    cache_file = calibration.cache_path(measured.judge, measured.items_sha256)
    cache_file.rename(reference / cache_file.name)  # this machine's cache is empty; the package holds the figures
    monkeypatch.setattr(calibration, "REFERENCE_DIR", reference)
    judge = CountingJudge()
    shipped = calibrate(judge, str(labelled), "refusal")
    assert judge.items == 0 and shipped.reference and shipped.held_out == measured.held_out
    assert cached(KeywordJudge().identity, str(labelled)) is None  # another judge: no reference applies
    info = {"refusal-keyword": calibration.JudgeInfo("refusal", judge.identity, shipped)}
    assert judge_label("refusal-keyword", info).endswith("shipped reference")
    assert measured.measured_on in reference_note(info)


def test_a_calibration_from_other_calibration_code_is_not_reused(tmp_path, monkeypatch):
    import quada.judging.calibration as calibration

    labelled = write_labelled(tmp_path / "labels.jsonl")
    judge = CountingJudge()
    first = calibrate(judge, str(labelled), "refusal")
    assert first.code_version == calibration.CALIBRATION_VERSION
    monkeypatch.setattr(calibration, "CALIBRATION_VERSION", calibration.CALIBRATION_VERSION + 1)
    assert cached(judge.identity, str(labelled)) is None
    again = calibrate(judge, str(labelled), "refusal")
    assert judge.items == 40 and again.code_version == calibration.CALIBRATION_VERSION  # judged anew


def test_a_tuned_threshold_comes_from_the_tuning_half_and_a_new_threshold_is_a_new_judge(tmp_path):
    labelled = write_labelled(tmp_path / "labels.jsonl", n=24)
    model, tokenizer = tiny_model("qwen2", seed=0)
    judge = make_judge("refusal", model, tokenizer)
    totals, chunks = [], []
    result = calibrate(judge, str(labelled), "refusal", on_chunk=chunks.append, on_total=totals.append)
    assert totals == [24] and sum(chunks) == 24  # both halves judged
    assert result.threshold == judge.threshold and result.tuned_threshold is not None and result.tuned is not None
    other = make_judge("refusal", model, tokenizer, threshold=result.tuned_threshold)
    assert other.identity != judge.identity
    assert cached(other.identity, str(labelled)) is None


def test_a_user_file_needs_its_measure_and_a_judge_of_that_measure(tmp_path):
    labelled = write_labelled(tmp_path / "labels.jsonl")
    with pytest.raises(QuadaError, match="--measure harm or --measure refusal"):
        calibrate(KeywordJudge(), str(labelled))
    with pytest.raises(QuadaError, match="pyrit-refusal is labelled for refusal, not harm"):
        calibrate(KeywordJudge(), "pyrit-refusal", "harm")
    with pytest.raises(QuadaError, match="measures refusal"):
        calibrate(KeywordJudge(), str(labelled), "harm")


def test_the_paper_keyword_rule_on_pyrit_refusal_labels():
    result = calibrate(KeywordJudge(), "pyrit-refusal")
    assert result.measure == "refusal" and result.labelled_set == "pyrit-refusal"
    assert result.held_out.n + result.tuning_items == 105
    assert 0 < result.held_out.kappa.value < 1


def test_calibrate_command_prints_the_table_and_rejects_a_file_without_measure(cli, tmp_path):
    labelled = write_labelled(tmp_path / "labels.jsonl")
    run = cli("judge", "calibrate", "--judges", "refusal-keyword", "--labelled", str(labelled), "--measure", "refusal")
    assert run.returncode == 0, run.stderr
    assert "refusal-keyword" in run.stdout and "1.00" in run.stdout
    assert "20/20 done" in run.stdout and "(cached)" not in run.stdout  # the held-out half, judged
    again = cli("judge", "calibrate", "--judges", "refusal-keyword", "--labelled", str(labelled), "--measure", "refusal")
    assert "(cached)" in again.stdout and "1.00" in again.stdout
    cli("judge", "calibrate", "--judges", "keyword", "--labelled", str(labelled)).assert_user_error("--measure")
    cli("judge", "calibrate", "--judges", "nonsense").assert_user_error("unknown judge")


def test_a_sequence_classifier_is_calibrated_as_the_llm_judge(cli, tmp_path):
    labelled = write_labelled(tmp_path / "labels.jsonl")
    classifier = save_tiny_classifier(tmp_path / "classifier", ("benign", "harmful"))
    run = cli("judge", "calibrate", "--judges", "llm", "--judge-model", str(classifier), "--labelled", str(labelled),
              "--measure", "harm", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert "llm" in run.stdout and "harm" in run.stdout


class RuleHarmJudge(KeywordJudge):
    """A harm judge by rule, for tests without a model."""

    measure = "harm"


class FlagEverything(RuleHarmJudge):
    """A harm judge that calls every response harmful."""

    name = "flag-everything"

    def judge(self, prompts, responses):
        return [JudgeResult(True, 1.0, "") for _ in responses]


class FlagUnlessDegenerate(RuleHarmJudge):
    """A harm judge that calls every response harmful unless it is degenerate text."""

    name = "flag-unless-degenerate"

    def judge(self, prompts, responses):
        return [JudgeResult(degenerate_reason(r) is None, 1.0, "") for r in responses]


def test_a_harm_judge_on_quada_harm_gets_its_specificity_on_vacuous_and_degenerate_items():
    items = {item.id: item for item in load_labelled("quada-harm")}
    _, held_out = split_halves(list(items), [f"{i.category}|{i.label}" for i in items.values()], SPLIT_SEED)
    held = [list(items.values())[i] for i in held_out]
    everything = calibrate(FlagEverything(), "quada-harm")
    assert list(everything.specificity) == ["vacuous", "degenerate", "vacuous + degenerate"]
    assert everything.specificity["vacuous"].n == sum(i.category == "vacuous" for i in held)
    assert everything.specificity["degenerate"].n == sum(i.category == "degenerate" for i in held)
    assert all(estimate.value == 0.0 for estimate in everything.specificity.values())  # flags them all
    ruled = calibrate(FlagUnlessDegenerate(), "quada-harm").specificity
    degenerate = [i for i in held if i.category == "degenerate"]
    assert ruled["degenerate"].value == pytest.approx(
        sum(degenerate_reason(i.response) is not None for i in degenerate) / len(degenerate))
    assert ruled["vacuous"].value == pytest.approx(
        sum(degenerate_reason(i.response) is not None for i in held if i.category == "vacuous")
        / sum(i.category == "vacuous" for i in held))


class LengthScore(RuleHarmJudge):
    """A harm judge with a threshold whose score is a fixed function of the response (its length),
    standing in for a model judge."""

    name = "length-score"
    threshold = 0.5

    def judge(self, prompts, responses):
        scores = [min(len(r) / 1000, 1.0) for r in responses]
        return [JudgeResult(s > self.threshold, s, "") for s in scores]


def test_one_threshold_chosen_on_both_tuning_halves_spares_the_vacuous_answers_and_is_measured_held_out():
    general, own = calibrate(LengthScore(), "pyrit-objective"), calibrate(LengthScore(), "quada-harm")
    assert general.tuning_scores is not None and len(general.tuning_scores) == general.tuning_items
    joint = joint_threshold(general, own, min_specificity=0.9)
    assert joint.tuning_specificity >= 0.9
    # recomputed by hand from the items: the held-out figures at the joint threshold
    pyrit, harm = load_labelled("pyrit-objective"), load_labelled("quada-harm")
    _, pyrit_held = halves(pyrit)
    predicted = [min(len(pyrit[i].response) / 1000, 1.0) > joint.threshold for i in pyrit_held]
    assert joint.held_out.kappa.value == pytest.approx(cohen_kappa([pyrit[i].label for i in pyrit_held], predicted))
    _, harm_held = halves(harm)
    harmless = [i for i in harm_held if harm[i].category in ("vacuous", "degenerate") and not harm[i].label]
    spared = sum(min(len(harm[i].response) / 1000, 1.0) <= joint.threshold for i in harmless)
    assert (joint.specificity.n, joint.specificity.value) == (len(harmless), pytest.approx(spared / len(harmless)))
    line = joint_threshold_text("length-score", "pyrit-objective", "quada-harm", joint)
    assert f"{joint.threshold:.3g}" in line and "at least 90% of quada-harm's vacuous and degenerate" in line
    assert f"specificity {joint.specificity.value:.2f}" in line and f"{joint.held_out.flagged} of {joint.held_out.n} flagged" in line
    # a looser constraint can only keep or raise the tuning kappa
    assert joint_threshold(general, own, min_specificity=0.5).tuning_kappa >= joint.tuning_kappa
    # an untuned calibration has no tuning scores to choose from
    assert joint_threshold(calibrate(FlagEverything(), "pyrit-objective", tune=False), own) is None


def test_the_double_labelling_covers_at_least_60_items_of_the_set_with_the_rubric_kinds():
    first = {item.id: item for item in load_labelled("quada-harm")}
    second = labelled.quada_harm_second_labels()
    assert len(second) >= 60 and set(second) <= set(first)
    assert {kind for _, kind in second.values()} <= set(labelled.HARM_KINDS)
    agreement, confirmed, positives = double_labelling()
    assert positives == sum(item.label for item in first.values()) and confirmed <= positives
    assert confirmed == sum(second[i][0] for i, item in first.items() if item.label and i in second)
    labeller, date = labelled.quada_harm_second_labelling()
    assert "project maintainer" in labeller and date == "2026-12-07"  # who and when, as the file records
    ids = sorted(second)
    truth, other = [first[i].label for i in ids], [second[i][0] for i in ids]
    assert agreement.n == len(ids) and agreement.positives == sum(truth) and agreement.flagged == sum(other)
    assert agreement.kappa.value == pytest.approx(cohen_kappa(truth, other))
    assert agreement.agreement.value == pytest.approx(100 * np.mean(np.array(truth) == np.array(other)))
    assert agreement.kappa.low <= agreement.kappa.value <= agreement.kappa.high


def test_calibrate_command_measures_a_harm_judge_on_quada_harm_with_its_specificity_and_double_labelling(cli, tmp_path):
    judge_model = save_tiny_model(tmp_path / "judge")
    run = cli("judge", "calibrate", "--judges", "uplift", "--judge-model", str(judge_model), "--labelled", "quada-harm",
              "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert "uplift" in run.stdout and "quada-harm" in run.stdout and "specificity on vacuous + degenerate" in run.stdout
    assert "a second, blind one of 69 items" in run.stdout and "agree on 89.9" in run.stdout
    assert "the second confirmed 3 of the first's 10 harmful items" in run.stdout
    assert "quada-harm: the project's maintainers, against harm_rubric.md" in run.stdout  # not "human"
