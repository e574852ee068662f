"""Run folders and files: every result is written whole or not at all; the progress display.

A file is written to a uniquely named temporary sibling (``.<name>.<random>.partial``), flushed to
disk, then renamed over its target, so a killed run never leaves a half-written result and two
processes writing the same file never trip over each other's temporary file. A symlink is
written through (the link stays a link); a pipe, a device or a stream alias such as
``/dev/stdout`` is written in place, since replacing it by a regular file would break it.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from quada.errors import QuadaError

# A process's open streams: written in place even when they lead to a regular file (a redirected
# stdout), which belongs to the shell and must not be replaced.
STREAM_ALIASES = ("/dev/stdout", "/dev/stderr", "/dev/fd/*", "/proc/*/fd/*")


def open_run_dir(run_dir: Path, option: str = "--run-dir") -> None:
    """Create the run folder (and its parents), or explain why it cannot be; the error names the
    command's ``option`` that chose the folder."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise QuadaError(f"cannot create the run folder {run_dir} ({err.strerror}); choose another {option}") from err


def progress_bar(enabled: bool) -> Progress:
    """The progress display of a run: one bar per task, with its count and elapsed time; silent
    unless ``enabled``."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not enabled
    )


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


@contextmanager
def atomic_writer(path: str | Path, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """Open ``path`` for writing (``mode`` "w" for UTF-8 text or "wb"); the content replaces it
    only when the block ends without an error, otherwise the temporary file is removed and
    ``path`` is left as it was. Pipes, devices and stream aliases are written in place."""
    path = Path(path).expanduser()
    encoding = None if "b" in mode else "utf-8"
    if writes_in_place(path):
        # Appending keeps what a `>>` redirect of stdout already holds; a pipe does not mind.
        with open(path, mode.replace("w", "a"), encoding=encoding, newline=newline) as f:
            yield f
        return
    path = path.resolve()  # through a symlink, so the link stays a link
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _permissions(path, 0o666))
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        yield tmp
        os.chmod(tmp, _permissions(target, 0o777))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
