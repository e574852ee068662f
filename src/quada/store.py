"""The results store: every generation and judgement in one embedded SQLite database.

Rows are keyed by what decides them, so a result is computed once and a rerun reuses it:
- a generation by (model fingerprint, approximation spec, prompt id, generation settings, seed);
- a judgement by the same plus the judge's identity (judge name, judge model and prompt).
Each row also records the package versions that produced it.

A run that is killed and restarted continues where it stopped and ends with exactly the rows of
an uninterrupted run: rows are written in transactions (all of a batch or none of it), the
database runs in write-ahead-log mode (a killed writer never corrupts it; ``synchronous=NORMAL``
keeps every committed batch through a process crash), the key is the primary key and writes are
``INSERT OR IGNORE`` (a repeated batch adds nothing), and ``Store.fill`` computes only the keys
that are missing. No timestamps are stored, so rows are identical however the run was split.

Numbers measured on the model (perplexity, multiple-choice answers, the refusal proxy) are stored
beside them as JSON values keyed by a string that names what decides them (the model, the
condition, the corpus and its windows, ...), so two runs in one folder add to one another's values
instead of overwriting them, and the store stays the single record of a run.

Stores of runs made elsewhere (other machines, other Ray clusters) combine with
:meth:`Store.merge_from`: it adds the rows a store lacks and refuses a store that disagrees with it
on a key, so a merged store still holds one answer per key.

The schema version lives in SQLite's ``user_version``: version 1 had no measurements table and is
upgraded in place when opened for writing (read as it is otherwise); a database written by a newer
quada is refused rather than misread. A file is first inspected on a read-only connection
(SQLite's ``quick_check``, the schema), so a damaged, foreign or newer database is refused before
anything writes to it, and left as it is. Damage or a full disk that appears during a run ends it
with the same kind of message, the rows committed before kept.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from quada.errors import QuadaError, cleanup_after
from quada.fingerprint import package_versions
from quada.runs import atomic_writer, check_apart, same_file, writes_in_place

SCHEMA_VERSION = 2  # 2: the measurements table
CLEAN = "none"  # the approximation spec of the unmodified model
EXPORT_FORMATS = ("csv", "json")
STDOUT = "-"  # the export target that means standard output
DAMAGE_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)  # primary result codes
# Failures of the file or the disk under a store in use (primary result codes), as opposed to bugs.
FILE_FAILURE_CODES = {
    sqlite3.SQLITE_FULL: "the disk is full",
    sqlite3.SQLITE_IOERR: "the disk failed to read or write it",
    sqlite3.SQLITE_READONLY: "it cannot be written (read-only file or folder)",
    sqlite3.SQLITE_CANTOPEN: "it cannot be opened",
    sqlite3.SQLITE_BUSY: "another process holds it locked for too long",
}


def settings_json(settings: Mapping[str, Any]) -> str:
    """Canonical JSON of generation settings (sorted keys, no spaces): equal settings, equal keys."""
    return json.dumps(dict(settings), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class JudgementKey:
    """What decides a judgement: the generation's key and the judge's identity."""

    model: str
    approx: str
    prompt_id: str
    settings: str
    seed: int
    judge: str


@dataclass(frozen=True)
class GenerationKey:
    """What decides a generation. ``settings`` is :func:`settings_json` of the generation settings."""

    model: str
    approx: str
    prompt_id: str
    settings: str
    seed: int

    def judged_by(self, judge: str) -> JudgementKey:
        return JudgementKey(**asdict(self), judge=judge)


@dataclass(frozen=True)
class Generation:
    key: GenerationKey
    prompt: str
    response: str


@dataclass(frozen=True)
class Judgement:
    key: JudgementKey
    label: bool
    score: float
    raw: str


@dataclass(frozen=True)
class MeasurementKey:
    """What decides a number measured on the model: one string naming the model, the condition and
    the measurement's settings (see :func:`quada.engine.plan.perplexity_key`)."""

    key: str


@dataclass(frozen=True)
class Measurement:
    """A number (or list) measured on the model, as canonical JSON text."""

    key: MeasurementKey
    value: str


@dataclass(frozen=True)
class _Table:
    """How one row type maps to one SQL table: key columns, then value columns."""

    name: str
    key_type: type
    row_type: type
    value_types: tuple[tuple[str, type, str], ...]  # (column, Python type, SQL type)

    @property
    def key_columns(self) -> list[str]:
        return [f.name for f in fields(self.key_type)]

    @property
    def value_columns(self) -> list[str]:
        return [name for name, _, _ in self.value_types]

    @property
    def columns(self) -> list[str]:
        """Every column, in the order of the table."""
        return [*self.key_columns, *self.value_columns, "versions"]

    def create_sql(self) -> str:
        keys = ", ".join(f"{c} {'INTEGER' if c == 'seed' else 'TEXT'} NOT NULL" for c in self.key_columns)
        values = ", ".join(f"{name} {sql} NOT NULL" for name, _, sql in self.value_types)
        return (
            f"CREATE TABLE IF NOT EXISTS {self.name} ({keys}, {values}, versions TEXT NOT NULL, "
            f"PRIMARY KEY ({', '.join(self.key_columns)})) WITHOUT ROWID"
        )

    def to_params(self, row, versions: str) -> tuple:
        values = [getattr(row, name) for name in self.value_columns]
        return (*asdict(row.key).values(), *values, versions)

    def from_record(self, record: Sequence) -> Any:
        n = len(self.key_columns)
        values = [kind(v) for (_, kind, _), v in zip(self.value_types, record[n:])]
        return self.row_type(self.key_type(*record[:n]), *values)


GENERATIONS = _Table("generations", GenerationKey, Generation, (("prompt", str, "TEXT"), ("response", str, "TEXT")))
JUDGEMENTS = _Table(
    "judgements", JudgementKey, Judgement, (("label", bool, "INTEGER"), ("score", float, "REAL"), ("raw", str, "TEXT"))
)
MEASUREMENTS = _Table("measurements", MeasurementKey, Measurement, (("value", str, "TEXT"),))
TABLES = {table.key_type: table for table in (GENERATIONS, JUDGEMENTS, MEASUREMENTS)} | {
    table.row_type: table for table in (GENERATIONS, JUDGEMENTS, MEASUREMENTS)
}


_RECORD_SOURCES = [(c, "g") for c in GENERATIONS.key_columns] + [
    ("prompt", "g"), ("response", "g"), ("judge", "j"), ("label", "j"), ("score", "j"), ("raw", "j"), ("versions", "g")
]
RECORD_COLUMNS = [column for column, _ in _RECORD_SOURCES]


def _primary_code(err: BaseException) -> int | None:
    """SQLite's primary result code of ``err`` (``None`` for errors raised by Python code)."""
    code = getattr(err, "sqlite_errorcode", None)
    return None if code is None or not isinstance(err, sqlite3.Error) else code & 0xFF


def _is_damage(err: BaseException) -> bool:
    """Whether SQLite reports a corrupt database file or a file that is no database at all."""
    return _primary_code(err) in DAMAGE_CODES


def readable_store(path: str | Path) -> Path:
    """``path``, checked as a store to read from: a file (never created here) that opens as a quada
    results store, neither damaged nor foreign nor newer than this quada; nothing is written to it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise QuadaError(f"no results store at {path}; give the results.sqlite of a run folder")
    Store(path, readonly=True).close()
    return path


def _file_uri(path: Path, mode: str) -> str:
    """The SQLite URI of ``path`` opened in ``mode`` (``ro``, ``rw`` or ``rwc``, which creates it)."""
    return f"{path.resolve().as_uri()}?mode={mode}"


def _reports_file_failures(method):
    """A :class:`Store` method whose SQLite failures of the file or the disk (damage, a full disk,
    lost write access) are user errors naming the store, not tracebacks."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as err:
            if _is_damage(err):
                raise self._damage_error(str(err)) from err
            if _primary_code(err) in FILE_FAILURE_CODES:
                raise QuadaError(
                    f"the results store {self.path} failed: {FILE_FAILURE_CODES[_primary_code(err)]} ({err}). "
                    "The rows committed before are kept; fix the cause and run the command again to continue"
                ) from err
            raise

    return guarded


def _table_of(kind: type) -> _Table:
    if kind not in TABLES:
        raise TypeError(f"the store holds generations, judgements and measurements, not {kind.__name__}")
    return TABLES[kind]


class Database:
    """An SQLite connection (``_db``) with all-or-nothing write transactions, closed on leaving a
    ``with`` block."""

    _db: sqlite3.Connection

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        with cleanup_after(self._rollback, on_success=False):
            yield
        self._db.execute("COMMIT")

    def _rollback(self) -> None:
        if self._db.in_transaction:  # a failing disk may have ended it already
            self._db.execute("ROLLBACK")

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Store(Database):
    """An SQLite results database at ``path`` (created with its folders if missing), or with
    ``readonly`` an existing one, read as it is: neither upgraded nor switched to WAL mode."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path).expanduser()
        self._db: sqlite3.Connection | None = None
        try:
            if (self.path.is_file() and self.path.stat().st_size > 0) or readonly:
                self._inspect()  # before any connection that can write
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A store read as it is keeps its schema and journal mode; one used for writing runs in WAL mode.
            self._db = sqlite3.connect(_file_uri(self.path, "rw" if readonly else "rwc"), uri=True, timeout=30,
                                       isolation_level=None)
            if not readonly:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._open_schema()
        except BaseException as err:
            if self._db is not None:
                self._db.close()
            if _is_damage(err):
                raise self._damage_error(str(err)) from err
            if isinstance(err, sqlite3.Error):
                raise QuadaError(
                    f"cannot use {self.path} as a results database ({err}); give a writable path to a "
                    "new file or to a database written by quada"
                ) from err
            if isinstance(err, OSError):
                raise QuadaError(
                    f"cannot create the folder of {self.path} ({err.strerror}); choose a writable location"
                ) from err
            raise
        self._versions = json.dumps(package_versions(), sort_keys=True)

    def _inspect(self) -> None:
        """Refuse a damaged, foreign or newer database on a read-only connection, so that nothing is
        written to a file that is refused. Without a write-ahead log beside it the file is the whole
        database, and it is read as immutable: SQLite then creates no companion files either."""
        immutable = "&immutable=1" if not Path(f"{self.path}-wal").exists() else ""
        self._db = sqlite3.connect(_file_uri(self.path, "ro") + immutable, uri=True, isolation_level=None)
        try:
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise self._damage_error(problems[0])
            self._schema_version()
        finally:
            self._db.close()
            self._db = None

    def _damage_error(self, detail: str) -> QuadaError:
        """The user error for a damaged store file: it is kept, and a fresh store goes elsewhere."""
        return QuadaError(
            f"the results store {self.path} is damaged or not a database ({detail}); quada left it as it is. "
            f"To start a fresh store, move it aside (e.g. rename it to {self.path.name}.damaged) or choose "
            "another --run-dir (--db for the results and judge commands)"
        )

    def _schema_version(self) -> int:
        """The schema version of the open database (0: a new, empty one); a newer schema or a
        database with tables of its own is refused."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise QuadaError(
                f"results database {self.path} has schema version {version}, newer than this quada "
                f"understands ({SCHEMA_VERSION}); upgrade quada or use another database file"
            )
        if version == 0 and self._db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]:
            raise QuadaError(f"{self.path} is an SQLite database but not a quada results store; choose another file")
        return version

    def _open_schema(self) -> None:
        """Create the tables of a new database, or add those an older schema lacks."""
        with self._transaction():
            version = self._schema_version()
            if version < SCHEMA_VERSION:
                if version == 0:
                    for table in (GENERATIONS, JUDGEMENTS):
                        self._db.execute(table.create_sql())
                self._db.execute(MEASUREMENTS.create_sql())
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @_reports_file_failures
    def _has_measurements(self, schema: str = "main") -> bool:
        """Whether the database ``schema`` (``main`` or an attached one) has the measurements table
        (a store of schema 1 read as it is has none)."""
        return self._db.execute(
            f"SELECT count(*) FROM {schema}.sqlite_master WHERE type = 'table' AND name = 'measurements'"
        ).fetchone()[0] > 0

    @_reports_file_failures
    def get(self, key: GenerationKey | JudgementKey | MeasurementKey) -> Generation | Judgement | Measurement | None:
        """The stored row for ``key``, or ``None``."""
        table = _table_of(type(key))
        where = " AND ".join(f"{c} = ?" for c in table.key_columns)
        record = self._db.execute(
            f"SELECT {', '.join(table.key_columns + table.value_columns)} FROM {table.name} WHERE {where}",
            tuple(asdict(key).values()),
        ).fetchone()
        return table.from_record(record) if record else None

    @_reports_file_failures
    def get_many(self, keys: Iterable[GenerationKey | JudgementKey]) -> dict:
        """``{key: row}`` for those ``keys`` that are stored."""
        found = {}
        for key in keys:
            row = self.get(key)
            if row is not None:
                found[key] = row
        return found

    @_reports_file_failures
    def missing(self, keys: Iterable[GenerationKey | JudgementKey]) -> list:
        """The ``keys`` not yet stored, deduplicated, in their given order."""
        return [key for key in dict.fromkeys(keys) if self.get(key) is None]

    @_reports_file_failures
    def put(self, rows: Iterable[Generation | Judgement]) -> int:
        """Store ``rows`` in one transaction; rows whose key is stored already are ignored.

        Returns how many rows were added.
        """
        rows = list(rows)
        if not rows:
            return 0
        added = 0
        with self._transaction():
            for row in rows:
                table = _table_of(type(row))
                marks = ", ".join("?" * (len(table.key_columns) + len(table.value_columns) + 1))
                cursor = self._db.execute(
                    f"INSERT OR IGNORE INTO {table.name} VALUES ({marks})", table.to_params(row, self._versions)
                )
                added += cursor.rowcount
        return added

    def measurement(self, key: str) -> Any:
        """The stored measurement ``key`` (a JSON value), or ``None``."""
        row = self.get(MeasurementKey(key)) if self._has_measurements() else None
        return None if row is None else json.loads(row.value)

    def measurements(self) -> dict[str, Any]:
        """Every stored measurement by key."""
        rows = self.rows(Measurement) if self._has_measurements() else []
        return {row.key.key: json.loads(row.value) for row in rows}

    def put_measurement(self, key: str, value: Any) -> Any:
        """Store ``value`` (a JSON value) as the measurement ``key`` unless one is stored already, and
        return the stored one: when two runs measure the same key, the first to commit is kept and
        both go on with it."""
        self.put([Measurement(MeasurementKey(key), json.dumps(value, sort_keys=True))])
        return self.measurement(key)

    @_reports_file_failures
    def fill(
        self,
        keys: Sequence[GenerationKey | JudgementKey],
        compute: Callable[[list], list],
        chunk_size: int = 16,
    ) -> list:
        """The rows for ``keys`` (in order), computing only the missing ones, ``chunk_size`` at a time.

        ``compute(chunk_of_keys)`` returns one row per key, in the same order. Each chunk is
        committed as soon as it is computed, so an interrupted fill loses at most one chunk and
        the next call carries on from there.
        """
        if chunk_size < 1:
            raise QuadaError(f"chunk size must be at least 1, got {chunk_size}")
        todo = self.missing(keys)
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            rows = compute(chunk)
            if [row.key for row in rows] != chunk:
                raise ValueError("compute must return exactly one row per key, in the order of the keys")
            self.put(rows)
        found = self.get_many(keys)
        return [found[key] for key in keys]

    @_reports_file_failures
    def merge_from(self, path: str | Path) -> int:
        """Add every generation, judgement and measurement of the store at ``path`` that this store
        lacks, in one transaction, and return how many were added (merging again adds none). A store
        that holds another value for a key this store has (another response to the same prompt under
        the same condition) is refused whole: the rows of both stay as they were. The store at
        ``path`` is only read."""
        source = readable_store(path)
        if same_file(source, self.path):
            raise QuadaError(f"{source} is the store being merged into; give the stores of other runs")
        self._db.execute("ATTACH DATABASE ? AS incoming", (_file_uri(source, "rw"),))  # no c: never created
        with cleanup_after(lambda: self._db.execute("DETACH DATABASE incoming")):
            tables = [GENERATIONS, JUDGEMENTS] + ([MEASUREMENTS] if self._has_measurements("incoming") else [])
            with self._transaction():
                for table in tables:
                    self._check_agreement(table, source)
                added = 0
                for table in tables:
                    columns = ", ".join(table.columns)
                    added += self._db.execute(f"INSERT OR IGNORE INTO main.{table.name} ({columns}) "
                                              f"SELECT {columns} FROM incoming.{table.name}").rowcount
        return added

    def _check_agreement(self, table: _Table, source: Path) -> None:
        """Fail if the attached store ``incoming`` has a key of ``table`` with other values than here."""
        keys = ", ".join(f"i.{c}" for c in table.key_columns)
        same_key = " AND ".join(f"m.{c} = i.{c}" for c in table.key_columns)
        differs = " OR ".join(f"m.{c} IS NOT i.{c}" for c in table.value_columns)
        record = self._db.execute(
            f"SELECT count(*) OVER (), {keys} FROM main.{table.name} m JOIN incoming.{table.name} i "
            f"ON {same_key} WHERE {differs} ORDER BY {keys} LIMIT 1"
        ).fetchone()
        if record is not None:
            raise QuadaError(
                f"{source} disagrees with {self.path} on {record[0]} {table.name} (first: {table.key_type(*record[1:])}): "
                f"the same key with another {' or '.join(table.value_columns)}, so the runs were not made alike "
                "(other versions or hardware); nothing of it was merged. Keep such runs in separate stores"
            )

    @_reports_file_failures
    def rows(self, kind: type) -> list:
        """Every stored ``Generation``, ``Judgement`` or ``Measurement`` (``kind``), sorted by key."""
        table = _table_of(kind)
        columns = table.key_columns + table.value_columns
        records = self._db.execute(
            f"SELECT {', '.join(columns)} FROM {table.name} ORDER BY {', '.join(table.key_columns)}"
        ).fetchall()
        return [table.from_record(r) for r in records]

    @_reports_file_failures
    def records(self) -> list[dict]:
        """Every generation joined with each of its judgements (judge columns empty when it has
        none), sorted by key: the flat table of :data:`RECORD_COLUMNS` that :meth:`export` writes."""
        keys = GENERATIONS.key_columns
        joined = " AND ".join(f"g.{c} = j.{c}" for c in keys)
        cursor = self._db.execute(
            f"SELECT {', '.join(f'{table}.{c}' for c, table in _RECORD_SOURCES)} FROM generations g "
            f"LEFT JOIN judgements j ON {joined} ORDER BY {', '.join('g.' + c for c in keys)}, j.judge"
        )
        return [dict(zip(RECORD_COLUMNS, record)) for record in cursor.fetchall()]

    @_reports_file_failures
    def export(self, path: str | Path, fmt: str | None = None) -> int:
        """Write :meth:`records` to ``path`` (:data:`STDOUT`, ``-``, for standard output) as CSV or
        JSON (``fmt``, else from the suffix).

        Returns the number of records written. Responses may contain harmful text: the file or a
        pipe is the place for them, so a terminal is refused; so is the store's own file.
        """
        to_stdout = str(path) == STDOUT
        path = Path(path).expanduser()
        fmt = (fmt or ("" if to_stdout else path.suffix.lstrip("."))).lower()
        if not fmt:
            raise QuadaError(f"{path} has no .csv or .json suffix to tell the export format; give --format csv or --format json")
        if fmt not in EXPORT_FORMATS:
            raise QuadaError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
        if sys.stdout.isatty() if to_stdout else _is_terminal(path):
            raise QuadaError(
                "the export holds the model's responses, which may be harmful, and is not printed to a terminal; "
                "write it to a file with --out FILE, or pipe it (e.g. --out - | gzip > results.csv.gz)"
            )
        if not to_stdout:
            check_apart([("--db", self.path)], files=[("--out", path)])
        records = self.records()
        try:
            if not to_stdout:
                path.parent.mkdir(parents=True, exist_ok=True)
            with nullcontext(sys.stdout) if to_stdout else atomic_writer(path, newline="") as f:
                if fmt == "json":
                    for record in records:
                        record["versions"] = json.loads(record["versions"])
                        record["label"] = None if record["label"] is None else bool(record["label"])
                    json.dump(records, f, indent=1, ensure_ascii=False)
                    f.write("\n")
                else:
                    writer = csv.DictWriter(f, fieldnames=RECORD_COLUMNS)
                    writer.writeheader()
                    writer.writerows(records)
                f.flush()
        except OSError as err:
            raise QuadaError(f"cannot write {path} ({err.strerror}); choose a writable location") from err
        return len(records)


def _is_terminal(path: Path) -> bool:
    """Whether ``path`` leads to a terminal (``/dev/stdout`` of an interactive shell, ``/dev/tty``)."""
    if not writes_in_place(path) or not path.exists():
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.isatty(fd)
    finally:
        os.close(fd)
