"""Run folders and files: every result is written whole or not at all; the progress display.

A file is written to a uniquely named temporary sibling (``.<name>.<host>.<pid>.<random>.partial``),
flushed to disk, then renamed over its target, so a killed run never leaves a half-written result
and two processes writing the same file never trip over each other's temporary file. What a killed
process left (its process is gone from this machine) is removed by the next write of the same
target. A symlink is written through (the link stays a link); a pipe, a device or a stream alias
such as ``/dev/stdout`` is written in place, since replacing it by a regular file would break it.
Cleaning up after a failed write never replaces the failure by one of its own
(:func:`quada.errors.cleanup_after`), and no command writes over its own input (:func:`check_apart`).

The progress display is a live bar per task on a terminal; in a log (stdout redirected to a file or
a pipe), where a live display would appear only once, at the end, it is a plain line per running
task every :data:`PROGRESS_INTERVAL_ENV` seconds (30 by default): done/total, rate, time left.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from rich import get_console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from quada.errors import QuadaError, cleanup_after

# A process's open streams: written in place even when they lead to a regular file (a redirected
# stdout), which belongs to the shell and must not be replaced.
STREAM_ALIASES = ("/dev/stdout", "/dev/stderr", "/dev/fd/*", "/proc/*/fd/*")
PARTIAL_SUFFIX = ".partial"
# What the commands write in a run folder: the results store, the results files, the report and its figures.
RUN_FOLDER_FILES = ("results.sqlite", "results.json", "sweep.json", "layers.json", "clusters.json", "attack.json",
                    "align.json", "arms.json", "report.md", "report.html", "*.png")
PROGRESS_INTERVAL_ENV = "QUADA_PROGRESS_INTERVAL"  # seconds between progress lines in a log
DEFAULT_PROGRESS_INTERVAL = 30.0


def open_run_dir(run_dir: Path, option: str = "--run-dir") -> None:
    """Create the run folder (and its parents), or explain why it cannot be; the error names the
    command's ``option`` that chose the folder."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise QuadaError(f"cannot create the run folder {run_dir} ({err.strerror}); choose another {option}") from err


def progress_interval() -> float:
    """Seconds between the progress lines of a log: ``$QUADA_PROGRESS_INTERVAL``, else 30 (0: a line
    at every step)."""
    text = os.environ.get(PROGRESS_INTERVAL_ENV, "")
    try:
        seconds = float(text) if text.strip() else DEFAULT_PROGRESS_INTERVAL
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise QuadaError(f"${PROGRESS_INTERVAL_ENV} must be a number of seconds, 0 or more, got {text!r}; fix or unset it")
    return seconds


def _duration(seconds: float) -> str:
    """``seconds`` as ``1h02m``, ``3m05s`` or ``12s``."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class LineProgress(Progress):
    """Progress for a console that is not a terminal (a log file, a pipe): instead of a live display,
    which such a console shows only when it stops, a plain line per task when it starts, every
    ``interval`` seconds while it runs (also when it does not advance: the run is alive) and when it
    completes."""

    def __init__(self, *columns, interval: float, **kwargs):
        super().__init__(*columns, disable=True, **kwargs)
        self.interval = interval
        self._printed: dict[TaskID, float] = {}  # when each task's last line was printed
        self._done: set[TaskID] = set()
        self._stopping = threading.Event()
        self._ticker: threading.Thread | None = None

    def line(self, task_id: TaskID) -> str:
        """The progress line of one task: done/total, percent, rate and time left (or taken)."""
        task = self._tasks[task_id]
        done, total, elapsed = int(task.completed), task.total, task.elapsed or 0.0
        if task.finished:
            return f"{task.description}: {done}/{int(total)} done in {_duration(elapsed)}"
        if total is None:
            return f"{task.description}: {done} done, {_duration(elapsed)} elapsed"
        text = f"{task.description}: {done}/{int(total)} ({100 * done / total if total else 100:.0f}%)"
        if done and elapsed:
            rate = done / elapsed
            text += f", {rate:.0f}/s" if rate >= 100 else f", {rate:.3g}/s"
            text += f", about {_duration((total - done) / rate)} left"
        return text

    def _print(self, task_id: TaskID) -> None:
        self._printed[task_id] = time.monotonic()
        self.console.print(self.line(task_id), markup=False, highlight=False, soft_wrap=True)

    def _report(self, task_id: TaskID, due_only: bool = True) -> None:
        """Print the task's line once it completes, or when its last line is ``interval`` old."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or not task.visible or task_id in self._done:
                return
            if task.finished:
                self._done.add(task_id)
                self._print(task_id)
            elif not due_only or time.monotonic() - self._printed.get(task_id, 0.0) >= self.interval:
                self._print(task_id)

    def _tick(self) -> None:
        while not self._stopping.wait(self.interval):
            for task_id in list(self._tasks):
                self._report(task_id)

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> TaskID:
        task_id = super().add_task(description, *args, **kwargs)
        self._report(task_id, due_only=False)
        return task_id

    def update(self, task_id: TaskID, *args: Any, **kwargs: Any) -> None:
        super().update(task_id, *args, **kwargs)
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None and task_id in self._done and not task.finished:
                self._done.discard(task_id)  # its total was raised (a vet's next look): it runs again
        self._report(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._report(task_id)

    def start(self) -> None:
        if self.interval > 0:
            self._ticker = threading.Thread(target=self._tick, name="quada-progress-lines", daemon=True)
            self._ticker.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._ticker is not None:
            self._ticker.join()


def progress_bar(enabled: bool) -> Progress:
    """The progress display of a run: one bar per task, with its count and elapsed time, on a
    terminal; plain lines in a log (:class:`LineProgress`); silent unless ``enabled``."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    if enabled and not get_console().is_terminal:
        return LineProgress(*columns, interval=progress_interval())
    return Progress(*columns, disable=not enabled)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether the paths ``a`` and ``b`` lead to the same file or folder: the same device and inode
    where both exist (so through symlinks and hard links), else the same path once resolved."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is not there (yet)
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def lies_in(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies somewhere under it (through symlinks and hard links)."""
    path = Path(path).expanduser().resolve()
    return any(same_file(at, folder) for at in (path, *path.parents))


def _existing(value: Any) -> Path | None:
    """``value`` as the path of an existing file or folder; None for anything else (a benchmark's or a
    built-in model's name, a path that is not there)."""
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    return path if path.exists() else None


def check_apart(inputs: Iterable[tuple[str, Any]], files: Iterable[tuple[str, Path]] = (),
                folders: Iterable[tuple[str, Path]] = (), run_dirs: Iterable[tuple[str, Path]] = ()) -> None:
    """Refuse, before any work, a command that would write over one of its own ``inputs`` (``(option,
    value)`` pairs; a value that is no existing path, such as a benchmark's name, is skipped). Its
    outputs are ``(option, path)`` pairs, so that the message names the option to change: ``files``
    it replaces (refused where one is an input, or a file in an input folder), ``folders`` it
    replaces whole (refused where one holds an input, or is a folder in one) and ``run_dirs`` it
    writes its results in (refused where an input is one of the :data:`RUN_FOLDER_FILES` there, or
    where a file stands in the way of the folder)."""
    given = [(f"{option} {value}", path) for option, value in inputs if (path := _existing(value)) is not None]
    replaced = [(option, Path(target).expanduser(), False) for option, target in files]
    replaced += [(option, Path(target).expanduser(), True) for option, target in folders]
    for out_option, target, whole in replaced:
        for name, path in given:
            if target.exists() and (lies_in(target, path) or (whole and lies_in(path, target))):
                relation = "is" if same_file(target, path) else "lies in" if lies_in(target, path) else "holds"
                what = f"{out_option} {target}" + (", a folder that this command replaces whole," if whole else "")
                raise QuadaError(f"{what} {relation} {name}, which this command reads: it would write over its own "
                                 f"input; choose another {out_option}")
    for out_option, run_dir in run_dirs:
        run_dir = Path(run_dir).expanduser()
        if any(at.exists() and not at.is_dir() for at in (run_dir, *run_dir.parents)):
            raise QuadaError(f"{out_option} {run_dir} lies where a file is, not a folder; choose another {out_option}")
        written = [found for pattern in RUN_FOLDER_FILES for found in run_dir.glob(pattern)]
        for name, path in given:
            if any(same_file(target, path) for target in written):
                raise QuadaError(f"{name} is {path.resolve().name}, a file that this command writes in {out_option} "
                                 f"{run_dir}: it would write over its own input; move the input or choose another "
                                 f"{out_option}")


def jsonable(value):
    """``value`` with its paths as strings and its tuples as lists, the way JSON holds them."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def writes_in_place(path: str | Path) -> bool:
    """Whether ``path`` is a stream alias, a pipe or a device, which must be written directly."""
    if any(fnmatch.fnmatchcase(os.path.abspath(path), alias) for alias in STREAM_ALIASES):
        return True
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:  # a new file, or a symlink to one
        return False


@functools.cache
def _umask() -> int:
    # The umask can only be read by setting it (for an instant, to the usual value): read it once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _permissions(path: Path, default: int) -> int:
    """The permission bits for what replaces ``path``: its own, else ``default`` less the umask
    (temporary files and folders are created private)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return default & ~_umask()


def _partial_prefix(target: Path) -> str:
    """The name of a temporary sibling of ``target`` up to its random part: the target's name, this
    machine and this process, so that a leftover can be told from a write still under way."""
    host = socket.gethostname().replace(".", "_") or "host"
    return f".{target.name}.{host}.{os.getpid()}."


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists under another user
        return False
    return False


def remove_leftovers(target: Path) -> None:
    """Remove the temporary siblings of ``target`` that killed writers on this machine left (their
    process is gone); those of writers still at work, or of other machines, stay."""
    host = socket.gethostname().replace(".", "_") or "host"
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.{glob.escape(host)}.*{PARTIAL_SUFFIX}"):
        pid = leftover.name[len(f".{target.name}.{host}."):].split(".", 1)[0]
        if pid.isdigit() and _process_is_gone(int(pid)):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                with suppress(OSError):  # one that cannot be removed stays
                    leftover.unlink()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A new, empty temporary sibling of ``path`` for a writer that opens its output by name (such as
    llama.cpp's quantizer): it replaces ``path`` when the block ends without an error, and is removed
    otherwise, leaving ``path`` as it was. A symlink is written through (the link stays a link)."""
    path = Path(path).expanduser().resolve()
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_partial_prefix(path), suffix=PARTIAL_SUFFIX)
    os.close(fd)
    with cleanup_after(lambda: os.unlink(tmp), on_success=False):
        yield Path(tmp)
        os.chmod(tmp, _permissions(path, 0o666))
        os.replace(tmp, path)


@contextmanager
def atomic_writer(path: str | Path, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """Open ``path`` for writing (``mode`` "w" for UTF-8 text or "wb"); the content replaces it
    only when the block ends without an error, otherwise the temporary file is removed and
    ``path`` is left as it was (see :func:`atomic_path`). Pipes, devices and stream aliases are
    written in place."""
    path = Path(path).expanduser()
    encoding = None if "b" in mode else "utf-8"
    if writes_in_place(path):
        # Appending keeps what a `>>` redirect of stdout already holds; a pipe does not mind.
        with open(path, mode.replace("w", "a"), encoding=encoding, newline=newline) as f:
            yield f
        return
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding, newline=newline) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (see :func:`atomic_writer`)."""
    with atomic_writer(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all (see :func:`atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(text)


def write_json(path: str | Path, payload) -> None:
    """Write ``payload`` as indented JSON to ``path``, whole or not at all."""
    atomic_write_text(path, json.dumps(payload, indent=1))


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """A fresh temporary sibling folder to fill; it takes the place of ``target`` when the block
    ends without an error, and is removed otherwise, so a folder that exists is complete."""
    target = Path(target)
    remove_leftovers(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_partial_prefix(target), suffix=PARTIAL_SUFFIX))
    try:
        yield tmp
        os.chmod(tmp, _permissions(target, 0o777))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
