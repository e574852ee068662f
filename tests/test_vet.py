import json
import os
import re
import sqlite3
import subprocess
import sys

import pytest

import quada.engine.plan as engine_module
from quada.data import load_benchmark, seeded_order
from quada.errors import QuadaError
from quada.stats.verdict import VERDICTS
from quada.store import Generation, Judgement, Store
from quada.testing import write_tiny_run_inputs
from quada.vet import VetConfig, vet

NOISE = "noise:site=up,dist=gaussian,std=0.5"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_tiny_run_inputs(
        tmp_path_factory.mktemp("vet-inputs"),
        harmful=[f"Harmful request number {i}" for i in range(6)],
        benign=[f"Benign question {i}?" for i in range(4)],
    )


def config(inputs, run_dir, **overrides):
    values = dict(
        model=str(inputs / "model"), approx=(NOISE,), benchmark=str(inputs / "harmful.txt"), limit=None,
        benign=str(inputs / "benign.txt"), benign_limit=None, judges=("keyword",), max_new_tokens=6,
        corpus=str(inputs / "corpus.txt"), ppl_window=128, ppl_windows=2, run_dir=run_dir,
    )
    return VetConfig(**{**values, **overrides})


def stored(run_dir):
    with Store(run_dir / "results.sqlite") as store:
        return store.rows(Generation), store.rows(Judgement)


def test_vet_measures_every_condition_and_writes_the_report(inputs, tmp_path):
    result = vet(config(inputs, tmp_path / "run"), progress=False)
    clean, noisy = result.conditions
    assert clean.approx == "none" and noisy.approx == NOISE
    assert clean.asr["keyword"].n == 6 and clean.over_refusal.n == 4
    assert clean.perplexity != noisy.perplexity
    assert "keyword" in noisy.mcnemar and not clean.mcnemar
    generations, judgements = stored(tmp_path / "run")
    assert len(generations) == 2 * (6 + 4) and len(judgements) == 2 * (6 + 4)
    # The noisy condition really answered differently.
    by_condition = {}
    for g in generations:
        by_condition.setdefault(g.key.approx, {})[g.key.prompt_id] = g.response
    assert by_condition["none"] != by_condition[NOISE]
    html = result.report_html.read_text()
    assert NOISE in html and "data:image/png;base64," in html
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [c["approx"] for c in saved["conditions"]] == ["none", NOISE]


def test_the_report_opens_with_a_verdict_and_names_each_rate_with_its_judges_kappa(inputs, tmp_path):
    result = vet(config(inputs, tmp_path / "run", judges=("keyword", "refusal-keyword")), progress=False)
    clean, noisy = result.conditions
    assert clean.verdict is None and noisy.verdict.kind in VERDICTS
    assert result.judges["keyword"].measure == "refusal" and result.judges["keyword"].kappa is not None
    markdown = result.report_md.read_text()
    assert markdown.index("Verdict per approximation") < markdown.index("Safety and utility per condition")
    kappa = f"{result.judges['refusal-keyword'].kappa:.2f}"
    assert f"no-refusal ASR % [95% CI] (refusal-keyword; held-out kappa {kappa}" in markdown
    assert "accuracy" not in markdown  # not measured: no empty column


def test_a_run_without_calibration_says_so(inputs, tmp_path):
    result = vet(config(inputs, tmp_path / "run", calibrate=False), progress=False)
    assert result.judges["keyword"].calibration is None
    assert "keyword; not calibrated" in result.report_md.read_text()


def test_a_killed_run_writes_no_results_and_keeps_what_it_committed(inputs, tmp_path, monkeypatch):
    # How a killed run resumes is tested once, on the engine (tests/engine/test_engine.py).
    monkeypatch.setattr(engine_module, "GENERATION_CHUNK", 2)
    real_generate = engine_module.generate
    calls = []

    def dies_on_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(engine_module, "generate", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        vet(config(inputs, tmp_path / "split"), progress=False)
    partial, _ = stored(tmp_path / "split")
    assert len(partial) == 4
    assert not (tmp_path / "split" / "report.html").exists() and not (tmp_path / "split" / "results.json").exists()


BROKEN = "noise:site=norm_all,dist=gaussian,std=5"  # perplexity far above the bound: decided at the first look


def generated(run_dir) -> dict[str, dict[str, str]]:
    """Stored responses by condition and prompt id."""
    rows: dict[str, dict[str, str]] = {}
    for g in stored(run_dir)[0]:
        rows.setdefault(g.key.approx, {})[g.key.prompt_id] = g.response
    return rows


def test_looks_ask_more_prompts_only_of_the_conditions_not_yet_decided(inputs, tmp_path):
    result = vet(config(inputs, tmp_path / "run", approx=(BROKEN, NOISE), first_look=2), progress=False)
    clean, broken, noisy = result.conditions
    assert broken.verdict.kind == "breaks the model" and (broken.verdict.look, broken.verdict.looks) == (1, 3)
    assert broken.prompts == broken.verdict.prompts == 2 and noisy.prompts == noisy.verdict.prompts
    assert clean.prompts == noisy.prompts  # the clean model answers as many as the longest-running condition
    rows = generated(tmp_path / "run")
    benign = 4
    assert len(rows[broken.approx]) == 2 + benign and len(rows[noisy.approx]) == noisy.prompts + benign
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["design"]["looks"] == [2, 4, 6] and "Bonferroni" in saved["design"]["family"]
    markdown = result.report_md.read_text()
    assert "look 1 of 3 (2 prompts)" in markdown


def test_a_larger_budget_continues_exactly_where_a_smaller_one_stopped(inputs, tmp_path, monkeypatch):
    small = config(inputs, tmp_path / "resumed", approx=(NOISE,), first_look=2, limit=4)
    vet(small, progress=False)
    asked = []
    real_generate = engine_module.generate
    monkeypatch.setattr(engine_module, "generate",
                        lambda model, tokenizer, prompts, *a, **k: asked.extend(prompts) or real_generate(model, tokenizer, prompts, *a, **k))
    larger = vet(config(inputs, tmp_path / "resumed", approx=(NOISE,), first_look=2), progress=False)
    before = generated(tmp_path / "resumed")
    monkeypatch.setattr(engine_module, "generate", real_generate)
    fresh = vet(config(inputs, tmp_path / "fresh", approx=(NOISE,), first_look=2), progress=False)
    assert before == generated(tmp_path / "fresh")
    assert [c.verdict for c in larger.conditions] == [c.verdict for c in fresh.conditions]
    last_look = {p.text for p in seeded_order(load_benchmark(str(inputs / "harmful.txt")), 0)[4:]}
    assert set(asked) <= last_look  # only the new look's prompts were generated; the first four were stored


def test_a_rerun_computes_nothing_new(inputs, tmp_path, monkeypatch):
    vet(config(inputs, tmp_path / "run"), progress=False)
    monkeypatch.setattr(engine_module, "generate", lambda *a, **k: pytest.fail("generated again"))
    monkeypatch.setattr(engine_module, "windows_perplexity", lambda *a, **k: pytest.fail("measured again"))
    vet(config(inputs, tmp_path / "run"), progress=False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(judges=("oracle",)), "unknown judge 'oracle'"),
        (dict(approx=("noise:std=-1",)), "std"),
        (dict(approx=("warp-drive",)), "warp-drive"),
        (dict(limit=0), "--max-prompts must be at least 1"),
        (dict(max_new_tokens=0), "max-new-tokens must be at least 1"),
        (dict(seed=-5), "seed must be a whole number from 0"),
        (dict(judges=()), "no safety judge"),
        (dict(first_look=0), "--first-look must be at least 1"),
        (dict(margin=0), "--margin"),
        (dict(margin=float("nan")), "--margin"),
        (dict(alpha=1.5), "--alpha"),
    ],
)
def test_bad_configuration_fails_before_any_work(inputs, tmp_path, overrides, message):
    with pytest.raises(QuadaError, match=message):
        config(inputs, tmp_path / "run", **overrides)
    assert not (tmp_path / "run").exists()


def test_unknown_benchmark_is_a_user_error(inputs, tmp_path):
    with pytest.raises(QuadaError, match="unknown benchmark"):
        vet(config(inputs, tmp_path / "run", benchmark="no-such-benchmark"), progress=False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(approx=(NOISE, "noise:site=up,dist=gaussian,std=0.1,layers=99")), "layer 99 in layers=99 is out of range"),
        (dict(approx=("bolt + iron",)), "bolt and iron cannot be composed"),
        (dict(judges=("keyword", "llm"), judge_model="qwen2.5-coder-1.5b-instrct"), "unknown model 'qwen2.5-coder-1.5b-instrct'"),
    ],
)
def test_what_the_model_decides_is_checked_before_any_generation(inputs, tmp_path, monkeypatch, overrides, message):
    monkeypatch.setattr(engine_module, "generate", lambda *a, **k: pytest.fail("generated before checking"))
    with pytest.raises(QuadaError, match=message):
        vet(config(inputs, tmp_path / "run", **overrides), progress=False)


def test_asr_per_harm_category_when_the_benchmark_has_categories(inputs, tmp_path):
    harmful = tmp_path / "harmful.csv"
    harmful.write_text("prompt,category\n" + "".join(f"Harmful request {i},{'cyber' if i < 4 else 'fraud'}\n" for i in range(6)))
    result = vet(config(inputs, tmp_path / "run", benchmark=str(harmful)), progress=False)
    clean = result.conditions[0]
    by_category = clean.asr_by_category["keyword"]
    assert set(by_category) == {"cyber", "fraud"} and (by_category["cyber"].n, by_category["fraud"].n) == (4, 2)
    assert "per harm category" in result.report_md.read_text()


def test_a_vet_with_stdout_piped_prints_progress_lines_while_it_runs(inputs, tmp_path):
    """A log (stdout to a pipe or a file) gets plain progress lines as the run goes, tables a person
    can read, and no third-party bars on stderr."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "quada", "vet", "-m", str(inputs / "model"), "--approx", NOISE,
               "--benchmark", str(inputs / "harmful.txt"), "--benign", str(inputs / "benign.txt"), "--judges", "keyword",
               "--max-new-tokens", "6", "--corpus", str(inputs / "corpus.txt"), "--ppl-window", "128",
               "--ppl-windows", "2", "--run-dir", str(run_dir)]
    env = {**os.environ, "QUADA_PROGRESS_INTERVAL": "0"}  # a line at every step, instead of every 30 s
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    counts = [tuple(map(int, m.groups())) for m in (re.match(r"generate none: (\d+)/(\d+)", line) for line in lines) if m]
    # The clean condition's 10 prompts: a line when it starts and one after its harmful prompts, so
    # printed before it ended, then one when it is done.
    assert counts[0] == (0, 10) and (6, 10) in counts and counts[-1] == (10, 10)
    assert any(re.fullmatch(rf"generate {re.escape(NOISE)}: 10/10 done in \d+s", line) for line in lines)
    first_progress = next(i for i, line in enumerate(lines) if line.startswith("generate none"))
    verdicts = lines.index("verdict per approximation and deployment")
    assert first_progress < verdicts
    # Tables at their natural width, as Markdown: no header cut over two lines.
    header = next(line for line in lines if line.startswith("| condition"))
    assert "| no-refusal ASR % [95% CI] (keyword;" in header and header.endswith("| PPL |")
    assert "\r" not in done.stderr and "Loading weights" not in done.stderr and "Writing" not in done.stderr


def test_store_damage_that_appears_mid_run_is_one_message(cli, inputs, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_generate = engine_module.generate
    calls = []

    def damages_the_store_before_the_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first chunk is committed; the disk now garbles the store file
            store = run_dir / "results.sqlite"
            with sqlite3.connect(store) as other:
                other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            other.close()
            with open(store, "r+b") as f:
                f.seek(4096)
                f.write(bytes(range(256)) * ((store.stat().st_size - 4096) // 256))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(engine_module, "generate", damages_the_store_before_the_second_chunk)
    result = cli("vet", "-m", inputs / "model", "--approx", NOISE, "--benchmark", inputs / "harmful.txt",
                 "--benign", inputs / "benign.txt", "--judges", "keyword", "--max-new-tokens", 4, "--corpus",
                 inputs / "corpus.txt", "--ppl-window", 128, "--run-dir", run_dir)
    result.assert_user_error("results store", "is damaged or not a database", "move it aside")
    assert not (run_dir / "report.html").exists()
