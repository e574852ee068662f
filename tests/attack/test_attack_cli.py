"""`quada attack` end to end on a tiny model: stored prompts, responses and verdicts, a report,
nothing harmful on the terminal, reproducible prompts, and user errors for bad input."""

import json
import sqlite3

import pytest

ATTACKS = "direct,gcg,gcg-transfer"  # short prompts: the byte-level tiny tokenizer makes templates long
BUDGET = ("--steps", 2, "--candidates", 8, "--topk", 4, "--suffix-tokens", 4, "--population", 3, "--elite", 1,
          "--shots", 2, "--limit", 2, "--max-new-tokens", 4, "--judges", "keyword", "--seed", 5)


def run_attack(cli, inputs, run_dir, attacks=ATTACKS):
    return cli("attack", "-m", inputs / "model", "--benchmark", inputs / "harmful.txt", "--attack", attacks,
               "--approx", "none", *BUDGET, "--run-dir", run_dir)


def stored(run_dir, sql):
    with sqlite3.connect(run_dir / "results.sqlite") as db:
        return db.execute(sql).fetchall()


def test_an_attack_run_stores_everything_and_prints_only_rates(cli, inputs, tmp_path):
    run_dir = tmp_path / "run"
    result = run_attack(cli, inputs, run_dir)
    assert result.returncode == 0, result.stderr
    prompts = stored(run_dir, "SELECT attack, prompt FROM attack_prompts")
    generations = stored(run_dir, "SELECT prompt, response FROM generations")
    assert len(prompts) == len(generations) == 3 * 2
    assert len(stored(run_dir, "SELECT * FROM judgements")) == 3 * 2
    assert stored(run_dir, "SELECT count(*) FROM gcg_steps") == [(2 * 2,)]
    terminal = result.stdout + result.stderr
    requests = (inputs / "harmful.txt").read_text().splitlines()
    harmful = requests + [p for _, p in prompts] + [r for _, r in generations if len(r.strip()) > 3]
    assert not [text for text in harmful if " ".join(text.split())[:40] in terminal]
    cells = json.loads((run_dir / "attack.json").read_text())["cells"]
    assert sorted(c["attack"] for c in cells) == sorted(ATTACKS.split(","))
    assert all(0 <= c["asr"]["keyword"]["value"] <= 1 for c in cells)
    assert "gcg" in (run_dir / "report.md").read_text()

    # The same seed in a new folder optimises the same prompts; a rerun in place adds nothing.
    again = tmp_path / "again"
    assert run_attack(cli, inputs, again, "gcg").returncode == 0
    optimised = [row for row in prompts if row[0].startswith("gcg ")]
    assert sorted(stored(again, "SELECT attack, prompt FROM attack_prompts")) == sorted(optimised)
    assert run_attack(cli, inputs, run_dir).returncode == 0
    assert len(stored(run_dir, "SELECT * FROM generations")) == 3 * 2
    assert len(json.loads((run_dir / "attack.json").read_text())["cells"]) == 3


def test_responses_are_judged_against_the_behaviour_not_the_adversarial_prompt(cli, inputs, tmp_path, monkeypatch):
    from quada.eval.judges import make_judge

    shown = []

    def recording_judge(name, *args, **kwargs):
        judge = make_judge(name, *args, **kwargs)
        rule = judge.judge
        monkeypatch.setattr(judge, "judge", lambda prompts, responses: shown.extend(prompts) or rule(prompts, responses))
        return judge

    monkeypatch.setattr("quada.eval.engine.make_judge", recording_judge)
    run_dir = tmp_path / "run"
    assert run_attack(cli, inputs, run_dir, "gcg-transfer").returncode == 0
    behaviours = (inputs / "harmful.txt").read_text().splitlines()
    adversarial = [p for (p,) in stored(run_dir, "SELECT prompt FROM attack_prompts")]
    judged = shown[:2]  # then come the judge's calibration examples
    assert len(set(judged)) == 2 and set(judged) <= set(behaviours)
    assert not set(judged) & set(adversarial)


@pytest.mark.parametrize("options, fragment", [
    ((), "no attack: give --attack"),
    (("--attack", "gcg,bogus"), "unknown attack 'bogus'"),
    (("--attack", "gcg", "--steps", 0), "--steps must be at least 1"),
    (("--attack", "gcg", "--candidates", -3), "--candidates must be at least 1"),
    (("--attack", "gcg", "--topk", 0), "--topk must be at least 1"),
    (("--attack", "autodan", "--population", 4, "--elite", 4), "--elite (4) must be smaller than --population (4)"),
    (("--attack", "gcg", "--target", " "), "--target is empty"),
    (("--attack", "dra", "--approx", "noise:site=up,dist=gaussian,std=-1"), "std"),
    (("--attack", "dra", "--judges", "oracle"), "unknown judge 'oracle'"),
])
def test_bad_input_is_a_user_error_before_any_work(cli, tmp_path, options, fragment):
    run_dir = tmp_path / "run"
    cli("attack", "-m", "nosuchmodel", *options, "--run-dir", run_dir).assert_user_error(fragment)
    assert not run_dir.exists()
