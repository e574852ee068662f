import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from rich.console import Console

from quada.errors import QuadaError
from quada.runs import (
    PROGRESS_INTERVAL_ENV,
    LineProgress,
    atomic_folder,
    atomic_path,
    atomic_write_text,
    atomic_writer,
    check_apart,
    progress_interval,
    write_json,
)

WRITES = 400


def write_many(path: Path, writer: int) -> None:
    for n in range(WRITES):
        write_json(path, {"writer": writer, "n": n, "padding": "x" * 2000})


def test_two_processes_writing_one_file_never_fail(tmp_path):
    path = tmp_path / "results.json"
    workers = [multiprocessing.Process(target=write_many, args=(path, writer)) for writer in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [worker.exitcode for worker in workers] == [0, 0]
    payload = json.loads(path.read_text())
    assert payload["writer"] in (0, 1) and payload["n"] == WRITES - 1
    assert os.listdir(tmp_path) == ["results.json"]


def test_a_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    with atomic_writer(path) as f:
        f.write("new ")
        f.write("rows\n")
    assert path.read_text() == "new rows\n"
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_an_error_mid_write_keeps_the_old_file_and_removes_the_temporary_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_writer(path) as f:
            f.write("half a row")
            raise RuntimeError("killed")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_a_cleanup_that_fails_does_not_hide_the_error_it_cleans_up_after(tmp_path, monkeypatch):
    def read_only(path, *args, **kwargs):
        raise OSError(30, "Read-only file system", str(path))

    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    monkeypatch.setattr(os, "unlink", read_only)
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_writer(path) as f:
            f.write("half a row")
            raise RuntimeError("killed")
    with pytest.raises(QuadaError, match="the writer failed"):
        with atomic_path(tmp_path / "model.gguf"):
            raise QuadaError("the writer failed")
    assert path.read_text() == "old\n" and not (tmp_path / "model.gguf").exists()


def test_a_writer_by_name_fills_a_temporary_sibling_that_replaces_the_target(tmp_path):
    target = tmp_path / "model.gguf"
    with atomic_path(target) as partial:
        assert partial.parent == tmp_path and partial.name.startswith(".model.gguf.") and partial.stat().st_size == 0
        partial.write_bytes(b"GGUF")
    assert target.read_bytes() == b"GGUF" and os.listdir(tmp_path) == ["model.gguf"]


def test_an_output_that_is_an_input_is_refused_through_links_and_folders(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("input")
    (tmp_path / "hard.txt").hardlink_to(source)
    (tmp_path / "soft.txt").symlink_to(source)
    model = tmp_path / "model"
    (model / "weights").mkdir(parents=True)
    inputs = [("--in", source), ("--model", model), ("--benchmark", "advbench")]
    for out in ("in.txt", "hard.txt", "soft.txt"):
        with pytest.raises(QuadaError, match=re.escape(f"--out {tmp_path / out} is --in {source}, which this command reads")):
            check_apart(inputs, files=[("--out", tmp_path / out)])
    with pytest.raises(QuadaError, match="lies in --model"):
        check_apart(inputs, files=[("--out", model / "weights")])
    with pytest.raises(QuadaError, match="a folder that this command replaces whole, holds --in"):
        check_apart(inputs, folders=[("--out", tmp_path)])
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.md").write_text("a prompt")
    with pytest.raises(QuadaError, match="is report.md, a file that this command writes in --run-dir"):
        check_apart([("--benchmark", run / "report.md")], run_dirs=[("--run-dir", run)])
    with pytest.raises(QuadaError, match="--run-dir .*in.txt/run lies where a file is"):
        check_apart(inputs, run_dirs=[("--run-dir", source / "run")])
    # Beside the inputs, in a new file or folder, or in a run folder among files it does not write: allowed.
    check_apart(inputs, files=[("--out", tmp_path / "new.txt"), ("--out", model / "new.json")],
                folders=[("--out", tmp_path / "arms")], run_dirs=[("--run-dir", model), ("--run-dir", run)])


def test_a_new_file_gets_the_usual_permissions_and_a_replaced_one_keeps_its_own(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_text(tmp_path / "new.txt", "x")
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o666 & ~umask
    kept = tmp_path / "kept.txt"
    kept.write_text("x")
    kept.chmod(0o640)
    atomic_write_text(kept, "y")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640


@pytest.mark.parametrize("target_exists", [True, False])
def test_a_symlink_stays_a_symlink_and_its_target_gets_the_content(tmp_path, target_exists):
    target = tmp_path / "real" / "results.json"
    target.parent.mkdir()
    if target_exists:
        target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_json(link, {"asr": 0.5})
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert json.loads(target.read_text()) == {"asr": 0.5}
    assert sorted(os.listdir(tmp_path)) == ["link.json", "real"]
    assert os.listdir(target.parent) == ["results.json"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need POSIX")
def test_a_fifo_gets_the_content_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "responses.jsonl"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    with atomic_writer(fifo) as f:
        f.write('{"id": 1}\n')
        f.write('{"id": 2}\n')
    reader.join(timeout=10)
    assert received == ['{"id": 1}\n{"id": 2}\n']
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert os.listdir(tmp_path) == ["responses.jsonl"]


@pytest.mark.skipif(not Path("/dev/stdout").exists(), reason="no /dev/stdout")
def test_dev_stdout_is_written_in_place_after_what_it_already_holds(capfd):
    # Under capfd stdout is a regular file, like `quada ... --out /dev/stdout >> log`: it must be
    # appended to, not truncated or replaced.
    os.write(1, b"before\n")
    atomic_write_text("/dev/stdout", "after\n")
    assert capfd.readouterr().out == "before\nafter\n"


def test_a_folder_replaces_the_old_one_only_when_complete(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed")
    assert (target / "weights").read_text() == "old"
    with atomic_folder(target) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"
    assert os.listdir(tmp_path) == ["model"]


@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="no writable /dev/shm")
def test_a_regular_file_under_dev_is_replaced_like_any_other():
    folder = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        write_json(folder / "results.json", {"run": 1})
        write_json(folder / "results.json", {"run": 2})
        assert json.loads((folder / "results.json").read_text()) == {"run": 2}
        assert os.listdir(folder) == ["results.json"]
    finally:
        shutil.rmtree(folder)


KILLED_FOLDER_SAVE = """
import os, signal, sys
from pathlib import Path
from quada.runs import atomic_folder

with atomic_folder(Path(sys.argv[1])) as tmp:
    (tmp / "weights").write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-save: no cleanup runs
"""


def test_what_a_killed_save_left_is_removed_by_the_next_save_and_a_live_ones_stays(tmp_path):
    target = tmp_path / "model"
    killed = subprocess.run([sys.executable, "-c", KILLED_FOLDER_SAVE, str(target)])
    assert killed.returncode == -signal.SIGKILL
    [leftover] = tmp_path.glob(".model.*.partial")
    assert (leftover / "weights").read_text() == "half" and not target.exists()
    # A save under way in another process (this one) is not a leftover, even for the same target.
    with atomic_folder(target) as live:
        with atomic_folder(target) as other:
            (other / "weights").write_text("complete")
        assert live.is_dir() and not leftover.exists()
        (live / "weights").write_text("complete too")
    assert (target / "weights").read_text() == "complete too"
    assert os.listdir(tmp_path) == ["model"]


def test_a_killed_file_write_leaves_nothing_after_the_next_write(tmp_path):
    script = ("import os, signal, sys\nfrom quada.runs import atomic_writer\n"
              "with atomic_writer(sys.argv[1]) as f:\n    f.write('half')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", script, str(tmp_path / "results.json")]).returncode == -signal.SIGKILL
    assert len(list(tmp_path.glob(".results.json.*.partial"))) == 1
    write_json(tmp_path / "results.json", {"run": 2})
    assert os.listdir(tmp_path) == ["results.json"]


def log_progress(interval: float, steps) -> list[str]:
    """The lines a progress display prints into a log (a console that is no terminal)."""
    out = io.StringIO()
    with LineProgress(interval=interval, console=Console(file=out, width=40)) as bar:
        task = bar.add_task("generate none", total=10)
        for step in steps:
            bar.advance(task, step)
        other = bar.add_task("calibrate keyword", total=None)
        bar.advance(other, 3)
    return out.getvalue().splitlines()


def test_progress_in_a_log_is_plain_lines_with_counts_rate_and_time_left():
    lines = log_progress(0, [4, 6])
    assert lines[0] == "generate none: 0/10 (0%)"
    assert re.fullmatch(r"generate none: 4/10 \(40%\), [0-9.e+]+/s, about \d+s left", lines[1]), lines[1]
    assert re.fullmatch(r"generate none: 10/10 done in \d+s", lines[2]), lines[2]
    assert lines[3:] == ["calibrate keyword: 0 done, 0s elapsed", "calibrate keyword: 3 done, 0s elapsed"]
    assert not any("\r" in line or "━" in line for line in lines)  # no bar, no carriage return
    # With the usual interval a task prints when it starts and when it completes, not at every step
    # (its steady lines come from a timer every 30 seconds).
    steady = log_progress(30, [1] * 10)
    assert steady[0] == "generate none: 0/10 (0%)" and re.fullmatch(r"generate none: 10/10 done in \d+s", steady[1])


def test_a_task_whose_total_is_raised_after_it_completed_reports_again():
    # a vet's next look asks more prompts of a condition whose first look was done
    out = io.StringIO()
    with LineProgress(interval=30, console=Console(file=out, width=60)) as bar:
        task = bar.add_task("generate none", total=4)
        bar.advance(task, 4)
        bar.update(task, total=8)
        bar.advance(task, 4)
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"generate none: 4/4 done in \d+s", lines[1]), lines
    assert re.fullmatch(r"generate none: 8/8 done in \d+s", lines[-1]), lines


def test_progress_interval_comes_from_the_environment_and_a_bad_value_is_a_user_error(monkeypatch):
    monkeypatch.setenv(PROGRESS_INTERVAL_ENV, "2.5")
    assert progress_interval() == 2.5
    monkeypatch.delenv(PROGRESS_INTERVAL_ENV)
    assert progress_interval() == 30
    for bad in ("soon", "-1", "inf"):
        monkeypatch.setenv(PROGRESS_INTERVAL_ENV, bad)
        with pytest.raises(QuadaError, match=f"{PROGRESS_INTERVAL_ENV} must be a number of seconds"):
            progress_interval()


def test_the_run_folder_files_name_every_results_file_the_commands_write():
    from quada.attack.report import RESULTS_FILE as ATTACK_FILE
    from quada.defense.arms import ALIGN_FILE, ARMS_FILE
    from quada.report import clusters, layers, sweep, vet
    from quada.runs import RUN_FOLDER_FILES

    written = {vet.RESULTS_FILE, sweep.POINTS_FILE, layers.RESULTS_FILE, clusters.RESULTS_FILE, ATTACK_FILE, ALIGN_FILE,
               ARMS_FILE, "results.sqlite", "report.md", "report.html"}
    assert written <= set(RUN_FOLDER_FILES) and "*.png" in RUN_FOLDER_FILES  # the report's figures
