import csv
import io
import json
import os
import subprocess
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

from quada import cli as quada_cli
from quada.models import BUILTINS

HEAVY = ("torch", "transformers", "matplotlib", "sklearn", "datasets", "trl", "ray")


def test_the_entry_point_shows_its_help_and_ends_a_user_error_with_exit_2(tmp_path):
    """The real entry point in its own process (every other command-line test runs in-process)."""
    def quada(*args):
        env = {**os.environ, "COLUMNS": "200"}
        return subprocess.run([sys.executable, "-m", "quada", *args], capture_output=True, text=True, env=env)

    shown = quada("--help")
    assert shown.returncode == 0, shown.stderr
    assert all(command in shown.stdout for command in ("vet", "sweep", "layers", "align", "approx"))
    failed = quada("vet", "--seed", "-5", "--run-dir", str(tmp_path / "run"))
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert "seed must be a whole number from 0" in failed.stderr
    assert not (tmp_path / "run").exists()


def test_the_command_line_imports_no_heavy_library():
    """`quada --help` and option errors stay fast: the heavy libraries load inside the commands."""
    code = f"import quada.cli, sys; loaded = [m for m in {HEAVY!r} if m in sys.modules]; assert not loaded, loaded"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_models_lists_every_builtin(cli):
    result = cli("models")
    assert result.returncode == 0, result.stderr
    for name in ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"):
        assert name in result.stdout


@pytest.mark.parametrize("width", [40, 20])
def test_models_never_cuts_a_name_in_a_narrow_console(monkeypatch, width):
    monkeypatch.setattr(quada_cli, "console", Console(width=width))
    result = CliRunner().invoke(quada_cli.app, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in BUILTINS:
        assert any(line.split()[:1] == [name] for line in lines), result.output


@pytest.mark.parametrize("width", [40, 60])
def test_tables_fold_a_long_name_instead_of_cutting_it(monkeypatch, width):
    from quada import approx_cli
    from quada.approx import list_specs

    monkeypatch.setattr(approx_cli, "console", Console(width=width, force_terminal=True))
    result = CliRunner().invoke(quada_cli.app, ["approx", "list"])
    assert result.exit_code == 0, result.output
    cells = "".join(line.split("│")[1].strip() for line in result.output.splitlines() if line.count("│") == 3)
    for name, _ in list_specs():
        assert name in cells, result.output


def test_generate_writes_one_row_per_prompt(cli, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the path is printed on one line
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hi\n\nName a colour\n")
    out = tmp_path / "[draft]" / "out.jsonl"  # brackets are text, not console markup
    result = cli("generate", "--model", model_dir, "--prompts", prompts, "--out", out,
                 "--max-new-tokens", "4", "--prompt-format", "paper")
    assert result.returncode == 0, result.stderr
    assert f"wrote 2 responses to {out}" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Say hi", "Name a colour"]
    assert all(r["prompt_format"] == "paper" and r["max_new_tokens"] == 4 for r in rows)
    assert len({r["id"] for r in rows}) == 2
    assert not list(out.parent.glob("*.partial"))


def test_unknown_model(cli, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    cli("generate", "-m", "gpt-17", "-p", prompts, "-o", tmp_path / "o.jsonl").assert_user_error(
        "unknown model 'gpt-17'", "quada models")


def test_empty_prompt_file(cli, model_dir, tmp_path):
    prompts = tmp_path / "empty.txt"
    prompts.write_text("\n\n")
    cli("generate", "-m", model_dir, "-p", prompts, "-o", tmp_path / "o.jsonl").assert_user_error("holds no prompts")


def test_missing_prompt_file(cli, model_dir, tmp_path):
    cli("generate", "-m", model_dir, "-p", tmp_path / "nope.txt", "-o", tmp_path / "o.jsonl").assert_user_error(
        "does not exist")


def test_bad_numbers(cli, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the message on one line of its box
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    for flag in ("--max-new-tokens", "--batch-size", "--limit"):
        result = cli("generate", "-m", model_dir, "-p", prompts, "-o", tmp_path / "o.jsonl", flag, "0")
        result.assert_user_error("positive whole number")
    cli("generate", "-m", model_dir, "-p", prompts, "-o", tmp_path / "o.jsonl", "--prompt-format", "x").assert_user_error(
        "unknown prompt format")


def test_unwritable_output_folder_is_a_user_error(cli, model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cli("generate", "-m", model_dir, "-p", prompts, "-o", blocker / "o.jsonl").assert_user_error(
        "cannot create the output folder")


def test_vet_rejects_a_bad_spec_before_loading_anything(cli, tmp_path):
    cli("vet", "--approx", "noise:std=-0.1", "--run-dir", tmp_path / "run").assert_user_error("std")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--approx", "bogus[/]"], "unknown approximation 'bogus[/]'"),
        (["--approx", "noise:site=up,dist=gaussian,std=0.1,layers=[a]"], "bad layer selection '[a]'"),
    ],
)
def test_brackets_in_an_error_message_are_printed_literally(cli, tmp_path, args, fragment):
    result = cli("vet", *args, "--run-dir", tmp_path / "run")
    assert result.returncode == 2
    result.assert_user_error(fragment)
    assert not (tmp_path / "run").exists()


def test_vet_rejects_an_unknown_judge(cli, tmp_path):
    cli("vet", "--judges", "keyword,oracle", "--run-dir", tmp_path / "run").assert_user_error("unknown judge 'oracle'")


def test_results_export_and_judge_agreement(cli, tmp_path, judged_store):
    db = judged_store
    out = tmp_path / "export.json"
    result = cli("results", "export", "--db", db, "--out", out)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(out.read_text())) == 8
    human = tmp_path / "human.csv"
    human.write_text("prompt_id,approx,label\np0,none,1\np1,none,1\np2,none,0\np3,none,0\n")
    # The table is read line by line, so it is not folded into one line as the `cli` fixture does. Off a
    # terminal it is a Markdown table.
    result = CliRunner().invoke(quada_cli.app, ["judge", "agreement", "--db", str(db), "--human", str(human)])
    assert result.exit_code == 0, result.output
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in result.stdout.splitlines() if line.startswith("| ")]
    rows = {(row[0], row[1]): row[2:] for row in cells}
    # keyword and llm agree on p0 and p3 only; llm matches the human labels exactly, keyword half.
    assert rows["keyword", "llm"] == ["4", "50.0", "0.000"]
    assert rows["llm", "human"] == ["4", "100.0", "1.000"]
    assert rows["keyword", "human"] == ["4", "50.0", "0.000"]


def test_results_merge_adds_each_store_once(cli, tmp_path, judged_store):
    from quada.store import CLEAN, Generation, GenerationKey, Store

    other = tmp_path / "other" / "results.sqlite"
    with Store(other) as store:
        store.put([Generation(GenerationKey("fp", CLEAN, "p9", "{}", 0), "prompt 9", "response 9")])
    merged = tmp_path / "all" / "results.sqlite"
    result = cli("results", "merge", merged, judged_store, other)
    assert result.returncode == 0, result.stderr
    assert f"12 new rows from {judged_store} 1 new row from {other}" in result.stdout
    assert f"0 new rows from {other}" in cli("results", "merge", merged, other).stdout
    with Store(merged) as store:
        assert [g.key.prompt_id for g in store.rows(Generation)] == ["p0", "p1", "p2", "p3", "p9"]


def test_store_commands_need_a_store(cli, tmp_path):
    cli("results", "export", "--db", tmp_path / "none.sqlite", "--out", tmp_path / "x.csv").assert_user_error(
        "no results store")


@pytest.mark.parametrize("out", ["-", "/dev/stdout"])
@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_results_export_to_standard_output_for_a_pipe(tmp_path, judged_store, out, fmt):
    done = subprocess.run([sys.executable, "-m", "quada", "results", "export", "--db", str(judged_store), "--out", out,
                           "--format", fmt], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout) if fmt == "json" else list(csv.DictReader(io.StringIO(done.stdout)))
    assert len(records) == 8 and records[0]["response"] == "response 0"
    assert f"wrote 8 records to {out}" in done.stderr  # the note stays out of the data


def test_results_export_never_prints_responses_to_a_terminal(judged_store):
    import pty

    leader, terminal = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "quada", "results", "export", "--db", str(judged_store), "--out",
                               "-", "--format", "csv"], stdout=terminal, stderr=subprocess.PIPE, text=True)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "not printed to a terminal" in " ".join(done.stderr.split())
        os.set_blocking(leader, False)
        with pytest.raises(BlockingIOError):  # nothing reached the terminal
            os.read(leader, 1024)
    finally:
        os.close(leader)
        os.close(terminal)
