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

Stores of runs made elsewhere (other machines, other Ray clusters) combine with
:meth:`Store.merge_from`: it adds the rows a store lacks and refuses a store that disagrees with it
on a key, so a merged store still holds one answer per key.

The schema version lives in SQLite's ``user_version``; a database written by a newer quada is
refused rather than misread, and a damaged one (SQLite's ``quick_check`` on opening) is refused
and left as it is.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from quada.errors import QuadaError
from quada.fingerprint import package_versions
from quada.runs import atomic_writer

SCHEMA_VERSION = 1
CLEAN = "none"  # the approximation spec of the unmodified model
EXPORT_FORMATS = ("csv", "json")
DAMAGE_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)  # primary result codes


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
TABLES = {table.key_type: table for table in (GENERATIONS, JUDGEMENTS)} | {
    table.row_type: table for table in (GENERATIONS, JUDGEMENTS)
}


_RECORD_SOURCES = [(c, "g") for c in GENERATIONS.key_columns] + [
    ("prompt", "g"), ("response", "g"), ("judge", "j"), ("label", "j"), ("score", "j"), ("raw", "j"), ("versions", "g")
]
RECORD_COLUMNS = [column for column, _ in _RECORD_SOURCES]


def _is_damage(err: BaseException) -> bool:
    """Whether SQLite reports a corrupt database file or a file that is no database at all."""
    code = getattr(err, "sqlite_errorcode", None)  # absent on errors raised by Python code
    return isinstance(err, sqlite3.DatabaseError) and code is not None and code & 0xFF in DAMAGE_CODES


def readable_store(path: str | Path) -> Path:
    """``path``, checked as a store to read from: a file (never created here) that opens as a quada
    results store, neither damaged nor foreign nor newer than this quada."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise QuadaError(f"no results store at {path}; give the results.sqlite of a run folder")
    Store(path).close()
    return path


def _table_of(kind: type) -> _Table:
    if kind not in TABLES:
        raise TypeError(f"the store holds generations and judgements, not {kind.__name__}")
    return TABLES[kind]


class Database:
    """An SQLite connection (``_db``) with all-or-nothing write transactions, closed on leaving a
    ``with`` block."""

    _db: sqlite3.Connection

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Store(Database):
    """An SQLite results database at ``path`` (created with its folders if missing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._check_intact()
            self._open_schema()
        except BaseException as err:
            if self._db is not None:
                self._db.close()
            if _is_damage(err):
                raise self._damage_error(str(err)) from err
            if isinstance(err, sqlite3.DatabaseError):
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

    def _check_intact(self) -> None:
        """Refuse a damaged database before any work is stored in it (the check only reads)."""
        problems = [row[0] for row in self._db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise self._damage_error(problems[0])

    def _damage_error(self, detail: str) -> QuadaError:
        """The user error for a damaged store file: it is kept, and a fresh store goes elsewhere."""
        return QuadaError(
            f"the results store {self.path} is damaged or not a database ({detail}); quada left it as it is. "
            f"To start a fresh store, move it aside (e.g. rename it to {self.path.name}.damaged) or choose "
            "another --run-dir (--db for the results and judge commands)"
        )

    def _open_schema(self) -> None:
        """Create the tables in a new database; refuse a newer schema or a foreign database."""
        with self._transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise QuadaError(
                    f"results database {self.path} has schema version {version}, newer than this quada "
                    f"understands ({SCHEMA_VERSION}); upgrade quada or use another database file"
                )
            if version == 0:
                tables = self._db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
                if tables:
                    raise QuadaError(
                        f"{self.path} is an SQLite database but not a quada results store; choose another file"
                    )
                for table in (GENERATIONS, JUDGEMENTS):
                    self._db.execute(table.create_sql())
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def get(self, key: GenerationKey | JudgementKey) -> Generation | Judgement | None:
        """The stored row for ``key``, or ``None``."""
        table = _table_of(type(key))
        where = " AND ".join(f"{c} = ?" for c in table.key_columns)
        record = self._db.execute(
            f"SELECT {', '.join(table.key_columns + table.value_columns)} FROM {table.name} WHERE {where}",
            tuple(asdict(key).values()),
        ).fetchone()
        return table.from_record(record) if record else None

    def get_many(self, keys: Iterable[GenerationKey | JudgementKey]) -> dict:
        """``{key: row}`` for those ``keys`` that are stored."""
        found = {}
        for key in keys:
            row = self.get(key)
            if row is not None:
                found[key] = row
        return found

    def missing(self, keys: Iterable[GenerationKey | JudgementKey]) -> list:
        """The ``keys`` not yet stored, deduplicated, in their given order."""
        return [key for key in dict.fromkeys(keys) if self.get(key) is None]

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
        return self.fill_chunks(keys, lambda chunks: map(compute, chunks), chunk_size)

    def fill_chunks(
        self,
        keys: Sequence[GenerationKey | JudgementKey],
        compute_all: Callable[[list[list]], Iterable[list]],
        chunk_size: int,
    ) -> list:
        """:meth:`fill` for a computation handed every missing chunk at once: ``compute_all(chunks)``
        yields each chunk's rows in the order of ``chunks``, so the chunks may be computed elsewhere
        (an executor) while each one is still committed the moment its rows arrive."""
        if chunk_size < 1:
            raise QuadaError(f"chunk size must be at least 1, got {chunk_size}")
        todo = self.missing(keys)
        chunks = [todo[start : start + chunk_size] for start in range(0, len(todo), chunk_size)]
        for chunk, rows in zip(chunks, compute_all(chunks), strict=True):
            if [row.key for row in rows] != chunk:
                raise ValueError("compute must return exactly one row per key, in the order of the keys")
            self.put(rows)
        found = self.get_many(keys)
        return [found[key] for key in keys]

    def merge_from(self, path: str | Path) -> int:
        """Add every generation and judgement of the store at ``path`` that this store lacks, in one
        transaction, and return how many were added (merging again adds none). A store that holds
        another value for a key this store has (another response to the same prompt under the same
        condition) is refused whole: the rows of both stay as they were."""
        source = readable_store(path)
        if source.resolve() == self.path.resolve():
            raise QuadaError(f"{source} is the store being merged into; give the stores of other runs")
        self._db.execute("ATTACH DATABASE ? AS incoming", (str(source),))
        try:
            with self._transaction():
                for table in (GENERATIONS, JUDGEMENTS):
                    self._check_agreement(table, source)
                added = 0
                for table in (GENERATIONS, JUDGEMENTS):
                    columns = ", ".join(table.columns)
                    added += self._db.execute(f"INSERT OR IGNORE INTO main.{table.name} ({columns}) "
                                              f"SELECT {columns} FROM incoming.{table.name}").rowcount
        finally:
            self._db.execute("DETACH DATABASE incoming")
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

    def rows(self, kind: type) -> list:
        """Every stored ``Generation`` or ``Judgement`` (``kind``), sorted by key."""
        table = _table_of(kind)
        columns = table.key_columns + table.value_columns
        records = self._db.execute(
            f"SELECT {', '.join(columns)} FROM {table.name} ORDER BY {', '.join(table.key_columns)}"
        ).fetchall()
        return [table.from_record(r) for r in records]

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

    def export(self, path: str | Path, fmt: str | None = None) -> int:
        """Write :meth:`records` to ``path`` as CSV or JSON (``fmt``, else from the suffix).

        Returns the number of records written. Responses may contain harmful text: the file is
        the place for them, not the terminal.
        """
        path = Path(path).expanduser()
        fmt = (fmt or path.suffix.lstrip(".")).lower()
        if fmt not in EXPORT_FORMATS:
            raise QuadaError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
        records = self.records()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_writer(path, newline="") as f:
                if fmt == "json":
                    for record in records:
                        record["versions"] = json.loads(record["versions"])
                        record["label"] = None if record["label"] is None else bool(record["label"])
                    json.dump(records, f, indent=1, ensure_ascii=False)
                else:
                    writer = csv.DictWriter(f, fieldnames=RECORD_COLUMNS)
                    writer.writeheader()
                    writer.writerows(records)
        except OSError as err:
            raise QuadaError(f"cannot write {path} ({err.strerror}); choose a writable location") from err
        return len(records)
