import json
import multiprocessing
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path

import pytest

from quada.runs import atomic_folder, atomic_write_text, atomic_writer, write_json

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
